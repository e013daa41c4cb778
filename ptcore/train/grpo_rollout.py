"""GRPO's rollouts: the half of :class:`ptcore.train.grpo.GRPOObjective` that samples.

Each prompt of a step's global batch gets ``group_size`` completions sampled from the current
policy: on :class:`ptcore.engine.Engine` over the policy's own parameters (the default; each
prompt prefilled once, its completions forked from it, per-request seeds), or with
``model.generate`` (``rollout="hf"``). Temperature sampling, with optional top-k / top-p, so the
sampled distribution is the tempered, possibly truncated softmax; the sampler's log-probs of the
sampled tokens go to the loss as ``sampling_logps``. The completions are scored by the reward
callables and turned into group advantages (:func:`ptcore.ops.group_advantages`), with
``kl_coef > 0`` the reference's log-probs too: one training micro-batch per rollout.
"""
from __future__ import annotations

import math

import torch

from ptcore.ops import group_advantages
from ptcore.train.distributed import unwrap
from ptcore.train.loop import _autocast


def completion_mask(completions: torch.Tensor, eos_id, pad_id) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first eos (generate pads after it)."""
    if eos_id is None:
        return (completions != pad_id).long() if pad_id is not None else torch.ones_like(completions)
    is_eos = completions == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    return (~after).long()


class GroupRollouts:
    """Sampling and scoring for :class:`ptcore.train.grpo.GRPOObjective` (which sets the options
    read here: ``G``, ``temperature``, ``top_k``, ``top_p``, ``max_new_tokens``,
    ``min_new_tokens`` (EOS and stop strings held off until then, on both paths), the reward
    functions, the tokenizer's ids, ``_units`` and ``_logps``)."""

    def _make_engine(self, model):
        """The rollout engine over the policy's own parameters (no copy: ``fuse_weights=False``
        keeps views of the parameters, which the optimizer updates in place, so every rollout
        samples with the current weights; ``weights_version`` proves it)."""
        from ptcore.engine import Engine
        if self.ctx.enabled and self.config.strategy == "fsdp":
            raise ValueError("run_grpo: rollout='engine' needs the whole parameters on each rank; "
                             "use rollout='hf' with strategy='fsdp'")
        policy = unwrap(model)
        was_training = policy.training
        P = max(len(p["prompt"]) for p in self.items)
        need = self.G * (P + self.max_new_tokens)  # one group, every page unshared (an upper bound)
        tokens = self.engine_max_tokens or max(4096, 2 * need)
        if P + self.max_new_tokens > tokens:
            raise ValueError(f"run_grpo: a prompt of {P} tokens plus max_new_tokens="
                             f"{self.max_new_tokens} does not fit the engine's cache of "
                             f"engine_max_tokens={tokens} tokens")
        engine = Engine(policy, tokenizer=self.tokenizer, page_size=16, max_cached_tokens=tokens,
                        fuse_weights=False)
        policy.train(was_training)  # the Engine puts its model in eval mode
        engine.eos_token_ids = () if self.eos_id is None else (int(self.eos_id),)
        self.pages_per_group = self._pages_per_group(engine, P)
        if self.pages_per_group > engine.pool.num_pages:
            raise ValueError(f"run_grpo: engine_max_tokens={tokens} is too small for one group of "
                             f"{self.G} completions of prompts up to {P} tokens and max_new_tokens="
                             f"{self.max_new_tokens} (needs {self.pages_per_group * engine.page_size})")
        return engine

    def _pages_per_group(self, engine, P):
        ps = engine.page_size
        shared = P // ps  # full prompt pages, shared by the G forks
        return shared + self.G * (-(-(P + self.max_new_tokens) // ps) - shared)

    @staticmethod
    def weights_checksum(tensors) -> float:
        """A float64 sum over ``tensors``: which weights a rollout read (the fused AdamW updates
        parameters without bumping torch's in-place version counters, so those cannot tell)."""
        return float(sum(t.sum(dtype=torch.float64) for t in tensors if t is not None))

    def engine_weights(self):
        """The tensors the engine's forward reads (views of the policy's parameters)."""
        m = self.engine.model
        out = [m.embed, m.norm, m.lm_head, m.lm_head_bias]
        for L in m.layers:
            out += [L.ln1, L.ln2, L.q_norm, L.k_norm, *L.o, *L.down]
            out += [t for pair in L.qkv + L.gate_up for t in pair]
        return out

    # -- rollouts -------------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, model, prompts) -> dict:
        """Samples G completions per prompt and returns the tensors of one training micro-batch."""
        policy = unwrap(model)
        P = max(len(p["prompt"]) for p in prompts)
        rows = [p for p in prompts for _ in range(self.G)]
        ids = torch.full((len(rows), P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), P), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding: every prompt ends where generation starts
            n = len(p["prompt"])
            ids[i, P - n:] = torch.tensor(p["prompt"])
            attn[i, P - n:] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        was_training = policy.training
        policy.eval()
        # the weights this rollout samples with: the engine's own views of them
        version = self.weights_checksum(self.engine_weights() if self.engine is not None
                                        else list(policy.parameters()))
        if self.engine is not None:
            comp, cmask, samp = self._sample_engine(prompts)
            comp, cmask, samp = comp.to(self.device), cmask.to(attn.dtype).to(self.device), samp.to(self.device)
        else:
            comp, cmask, samp = self._sample_hf(policy, ids, attn)
            cmask = cmask.to(attn.dtype)
        comp = torch.where(cmask.bool(), comp, torch.full_like(comp, self.pad_id))
        input_ids = torch.cat([ids, comp], 1)
        attention = torch.cat([attn, cmask], 1)
        # Targets: position t predicts token t + 1; only completion tokens are learned.
        T = input_ids.shape[1]
        target = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        target[:, P - 1:T - 1] = comp
        mask[:, P - 1:T - 1] = cmask
        target = torch.where(mask.bool(), target, torch.full_like(target, -100))
        sampling_logps = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
        sampling_logps[:, P - 1:T - 1] = torch.where(cmask.bool(), samp.float(), 0.0)
        batch = {"sampling_logps": sampling_logps, "input_ids": input_ids, "attention_mask": attention,
                 "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "target": target, "mask": mask}

        texts = [self.tokenizer.decode(c[m.bool()].tolist(), skip_special_tokens=True)
                 for c, m in zip(comp.cpu(), cmask.cpu())]
        prompt_texts = [p["record"]["prompt"] for p in rows]
        columns = {}
        for k in rows[0]["record"]:
            if k not in ("prompt", "__line__", "__where__"):
                columns[k] = [p["record"].get(k) for p in rows]
        total = torch.zeros(len(rows), dtype=torch.float32)
        per_fn = {}
        for fn, w in zip(self.reward_fns, self.reward_weights):
            name = getattr(fn, "__name__", fn)
            try:
                vals = fn(prompts=prompt_texts, completions=texts, **columns)
            except Exception as e:
                raise RuntimeError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            if not hasattr(vals, "__len__"):
                raise ValueError(f"reward function {name!r} returned {type(vals).__name__}, not a "
                                 f"list of {len(rows)} values")
            if len(vals) != len(rows):
                raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {len(vals)} "
                                 f"values for {len(rows)} completions")
            try:
                r = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"reward function {name!r} returned a value that is not a number "
                                 f"(or None): {list(vals)[:8]!r}") from None
            nan = [i for i, v in enumerate(vals) if v is not None and math.isnan(float(v))]
            if nan:
                raise ValueError(f"reward function {name!r} returned NaN for completion {nan[0]}; "
                                 f"return None for a missing reward")
            if bool(torch.isinf(r).any()):
                i = int(torch.isinf(r).nonzero()[0, 0])
                raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {vals[i]!r} for "
                                 f"completion {i}; a reward must be finite (None: missing)")
            per_fn[getattr(fn, "__name__", "reward")] = r
            total = total + w * r
        adv = group_advantages(total, self.G, estimator=self.estimator, scale=self.scale_rewards)
        batch["advantages"] = adv.to(self.device)
        # old_logps: filled by the first optimization pass over this rollout (see loss()).
        batch["old_logps"] = None
        if self.ref_model is not None:
            batch["ref_logps"] = self._logps(self.ref_model, batch)
        policy.train(was_training)

        valid = total[~torch.isnan(total)]
        lengths = cmask.sum(-1).float()
        n_tok = int(attention.sum())
        forwards = 1 + (self.ref_model is not None)  # generation, reference
        self._flops += 2.0 * self.n_params * n_tok * forwards
        batch["stats"] = {"reward": float(valid.mean()) if len(valid) else 0.0,
                          "reward_std": float(valid.std()) if len(valid) > 1 else 0.0,
                          "completion_length": float(lengths.mean()),
                          # cut by max_new_tokens: no eos among the kept tokens (one in the last column counts as ended)
                          "truncated": float((~((comp == self.eos_id) & cmask.bool()).any(-1)).float().mean())
                          if self.eos_id is not None else 0.0,
                          **{f"rewards/{k}": float(v[~torch.isnan(v)].mean()) if (~torch.isnan(v)).any() else 0.0
                             for k, v in per_fn.items()}}
        batch["stats"]["rollout/policy_step"] = self._rollout_for  # the version it claims
        batch["stats"]["rollout/weights_checksum"] = version
        batch["units"] = self._units(mask)
        batch["tokens"] = n_tok
        return batch

    def _sample_hf(self, policy, ids, attn):
        """HF ``generate`` (the fallback and baseline): completions ``[B, L]``, their mask, and the
        sampler's log-probs (``output_scores``: the logits after generate's processors, i.e. the
        temperature, top-k / top-p and min_new_tokens' ban on EOS, so the log-softmax is the
        sampled distribution's)."""
        P = ids.shape[1]
        with _autocast(self.device, self.config.bf16):
            cache = self._shared_prompt_cache(policy, ids[::self.G], attn[::self.G])
            out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                  pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_id, cache=cache, output_scores=True,
                                  return_dict_in_generate=True,
                                  # FSDP2: every rank must run as many forwards (all-gathers)
                                  synced_gpus=self.ctx.enabled and self.config.strategy == "fsdp")
        comp = out.sequences[:, P:]
        scores = torch.stack(out.scores, 1).float()[:, :comp.shape[1]]
        samp = torch.log_softmax(scores, -1).gather(-1, comp[..., None])[..., 0]
        cmask = completion_mask(comp, self.eos_id, self.pad_id)
        return comp, cmask, samp

    def _sample_engine(self, prompts):
        """G completions per prompt on the engine: each prompt is prefilled once and its G
        completions fork from it; per-request seeds (config.seed, rollout step, prompt); groups
        run as many at a time as the cache holds. Every sequence is released (nothing stays in
        the radix cache: the next step's weights differ), also on error."""
        from ptcore.engine import SamplingParams
        eng = self.engine
        rows_tok, rows_lp = [], []
        per_batch = max(1, eng.pool.num_pages // self.pages_per_group)
        for g0 in range(0, len(prompts), per_batch):
            chunk = prompts[g0:g0 + per_batch]
            roots, seqs, sp, gens = [], [], [], []
            try:
                for k, p in enumerate(chunk):
                    seed = hash((int(self.config.seed), int(self._rollout_for), self.ctx.rank,
                                 g0 + k)) & (2**62 - 1)
                    params = SamplingParams(max_new_tokens=self.max_new_tokens,
                                            min_new_tokens=self.min_new_tokens,
                                            temperature=self.temperature, seed=seed,
                                            top_k=self.top_k, top_p=self.top_p,
                                            stop_strings=self.stop_strings)
                    roots.append(eng.start(list(p["prompt"]), compute=False))
                    sp += [params] * self.G
                    gens += eng.generators(params, self.G)
                eng.forward(roots, [[] for _ in roots])  # the prompts' one prefill, batched
                for root in roots:
                    seqs += [eng.fork(root) for _ in range(self.G)]
                    eng.release(root)
                done = eng.generate_from(seqs, sp, gens)
            finally:
                for s in roots + seqs:
                    if s.alive:
                        eng.release(s)
                eng.flush()
            rows_tok += [c.tokens for c in done]
            rows_lp += [c.logprobs for c in done]
        L = max(len(t) for t in rows_tok)
        comp = torch.full((len(rows_tok), L), self.pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows_tok), L), dtype=torch.long)
        samp = torch.zeros((len(rows_tok), L), dtype=torch.float32)
        for i, (t, lp) in enumerate(zip(rows_tok, rows_lp)):
            comp[i, :len(t)] = torch.tensor(t)
            cmask[i, :len(t)] = 1
            samp[i, :len(t)] = torch.tensor(lp)
        return comp, cmask, samp

    def _shared_prompt_cache(self, policy, ids, attn):
        """The KV cache of each prompt but its last token, computed ONCE per prompt and repeated
        for its G completions: ``generate`` then encodes only the last prompt token and the
        completions (the prompts' prefill is G times cheaper). Positions as generate's own."""
        if ids.shape[1] < 2:
            return None
        from transformers import DynamicCache
        cache = DynamicCache(config=policy.config)
        head = attn[:, :-1]
        policy(input_ids=ids[:, :-1], attention_mask=head, position_ids=(head.cumsum(-1) - 1).clamp(min=0),
               cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(self.G)
        return cache
