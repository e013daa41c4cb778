"""Group relative policy optimization with the fused ``linear_policy_loss``.

Every ``num_iterations`` optimizer steps, a rollout: each prompt of the step's global batch gets
``group_size`` completions sampled from the current policy (on :class:`ptcore.engine.Engine`
over the policy's own parameters by default, or ``model.generate`` with ``rollout="hf"``;
temperature sampling, with optional top-k / top-p, so the sampled distribution is the
tempered, possibly truncated softmax, whose log-probs of the sampled tokens go to the loss as
``sampling_logps``), rewards
from Python callables, group advantages (:func:`ptcore.ops.group_advantages`), and with
``kl_coef > 0`` the reference's log-probs. ``old_logps`` are the sampling policy's on the same
tempered distribution: the first optimization pass over a rollout comes before any update, so
they are that pass's own log-probs (detached; one extra LM-head pass inside the same forward,
instead of a second backbone forward), kept for the later passes.
The next ``num_iterations`` optimizer steps each take a pass over that rollout (PPO-style reuse;
the clipped ratio keeps later passes close to the sampling policy).

Reward functions take ``(prompts, completions, **columns)`` -- lists of strings, plus every other
key of the data records as lists, one entry per completion -- and return one float (or None =
missing) per completion, as in TRL. The built-in :func:`answer_reward` checks the record's
``answer`` with :func:`ptcore.train.tasks.answer_reward`.
"""
from __future__ import annotations

import copy
import math

import torch

from ptcore.ops import group_advantages, linear_logprobs, linear_policy_loss, policy_loss
from ptcore.ops.policy import AGGREGATION
from ptcore.train import data as D
from ptcore.train.config import GRPOConfig, TrainResult, objective_config
from ptcore.train.distributed import unwrap
from ptcore.train.loop import _autocast, count_parameters, train
from ptcore.train.objective import BaseObjective, head_of, patch


def answer_reward(prompts, completions, answer=None, **_):
    """1.0 when the completion's final answer equals the record's ``answer``, else 0.0."""
    from ptcore.train.tasks import answer_reward as check
    if answer is None:
        raise ValueError("answer_reward: the GRPO records need an 'answer' key")
    return [check(c, a) for c, a in zip(completions, answer)]


def completion_mask(completions: torch.Tensor, eos_id, pad_id) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first eos (generate pads after it)."""
    if eos_id is None:
        return (completions != pad_id).long() if pad_id is not None else torch.ones_like(completions)
    is_eos = completions == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    return (~after).long()


def reward_functions(reward_fns, reward_weights) -> tuple[list, list]:
    """(reward functions, their weights), checked: ``reward_fns`` a callable or a non-empty list
    of them, ``reward_weights`` (the config's) None or one number per function."""
    op = "run_grpo"
    fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
    if not fns or not all(callable(f) for f in fns):
        raise ValueError(f"{op}: 'reward_fns' must be a callable or a non-empty list of callables")
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"{op}: 'reward_weights' needs one weight per reward function")
    return fns, weights


class GRPOObjective(BaseObjective):
    name = "grpo"

    def __init__(self, prompts, tokenizer, config: GRPOConfig, *, reward_fns, ref_model=None,
                 **deprecated_options):
        # the objective's own options; the loop's stay those of the config given
        c = objective_config(GRPOConfig, config, deprecated_options, "GRPOObjective")
        super().__init__(prompts, config)
        fns, weights = reward_functions(reward_fns, c.reward_weights)
        self.top_k, self.top_p = c.top_k, float(c.top_p)
        self.rollout_kind, self.stop_strings = c.rollout, tuple(c.stop_strings)
        self.engine_max_tokens, self.deterministic = c.engine_max_tokens, c.deterministic
        self.engine = None
        self._rollout_for = 0
        self.reward_fns = fns
        self.reward_weights = weights
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.G, self.temperature, self.max_new_tokens = c.group_size, float(c.temperature), c.max_new_tokens
        self.num_iterations, self.kl_coef, self.loss_type = c.num_iterations, float(c.kl_coef), c.loss_type
        self.loss_opts = c.loss_options()  # policy_loss's keywords: clip, KL, rollout correction
        self.estimator, self.scale_rewards = c.estimator, c.scale_rewards
        self.ref_model = ref_model
        self.rollout = None        # this rank's micro-batches of the current rollout
        self.rollout_step = None   # the optimizer step that made it
        self._flops = 0.0

    # -- model set-up ---------------------------------------------------------------------------
    def setup(self, model, ctx, config) -> None:
        super().setup(model, ctx, config)
        if self.kl_coef > 0 and self.ref_model is None:
            self.ref_model = copy.deepcopy(unwrap(model))  # the frozen initial policy
        if self.ref_model is not None:
            patch(self.ref_model)
            self.ref_model.to(self.device).eval().requires_grad_(False)
        self.n_params = count_parameters(model)
        if self.rollout_kind == "engine":
            self.engine = self._make_engine(model)

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
        sampler's log-probs (``output_scores``: the logits after the temperature, which is all the
        processing here, so the log-softmax is the sampled distribution's)."""
        P = ids.shape[1]
        with _autocast(self.device, self.config.bf16):
            cache = self._shared_prompt_cache(policy, ids[::self.G], attn[::self.G])
            out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
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

    def _units(self, mask) -> int:
        agg = AGGREGATION[self.loss_type]
        if agg == "token-mean":
            return int(mask.sum())
        if agg == "seq-mean-token-mean":
            return mask.shape[0]
        return mask.shape[0] * self.max_new_tokens  # dr_grpo: B * L_max, a constant L_max

    def _logps(self, model, batch) -> torch.Tensor:
        """Per-token log-probs ``[B, T]`` of the targets on the tempered distribution."""
        tgt = batch["target"]
        head = lambda hidden, weight, softcap: linear_logprobs(hidden, weight, tgt, softcap=softcap,
                                                              temperature=self.temperature,
                                                              top_k=self.top_k, top_p=self.top_p)
        with _autocast(self.device, self.config.bf16):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], head_loss=head, use_cache=False)
        return out.loss.float()

    def micro_batches(self, step, model):
        rollout_step = step - step % self.num_iterations
        if self.rollout is None or self.rollout_step != rollout_step:
            # The prompts of rollout k are the k-th global batch of prompts.
            batches = self.batches(rollout_step // self.num_iterations)
            self._rollout_for = rollout_step
            self.rollout = [self.make_rollout(model, prompts) for prompts in batches]
            self.rollout_step = rollout_step
        return self.rollout

    def units(self, mb) -> int:
        return mb["units"]

    def tokens(self, mb) -> int:
        return mb["tokens"]

    def loss(self, model, mb, global_units):
        def head(hidden, weight, softcap):
            if mb["old_logps"] is None:
                # The first pass over a rollout runs before any update since sampling: the policy
                # IS the sampling policy, so its own log-probs (no grad, tempered, from the same
                # hidden states: one LM-head pass, no second backbone forward) are the old ones.
                # Later passes reuse them.
                with torch.no_grad():
                    mb["old_logps"] = linear_logprobs(hidden.detach(), weight.detach(), mb["target"],
                                                      softcap=softcap, temperature=self.temperature,
                                                      deterministic=self.deterministic,
                                                      top_k=self.top_k, top_p=self.top_p)
            if self.top_k or self.top_p < 1:
                # truncated sampling: the policy's log-probs of the truncated distribution
                # (log p - log S over the sampler's kept set), then the loss on them
                logp, ent = linear_logprobs(hidden, weight, mb["target"], softcap=softcap,
                                            temperature=self.temperature, top_k=self.top_k,
                                            top_p=self.top_p, return_entropy=True)
                return policy_loss(logp, mb["old_logps"], mb["advantages"], mb["mask"],
                                   ref_logps=mb.get("ref_logps"), normalizer=float(max(global_units, 1)),
                                   entropy=ent, sampling_logps=mb.get("sampling_logps"),
                                   **self.loss_opts)
            return linear_policy_loss(hidden, weight, mb["target"], mb["old_logps"], mb["advantages"],
                                      mb["mask"], ref_logps=mb.get("ref_logps"), softcap=softcap,
                                      temperature=self.temperature, normalizer=float(max(global_units, 1)),
                                      sampling_logps=mb.get("sampling_logps"), **self.loss_opts)

        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                    position_ids=mb["position_ids"], head_loss=head, use_cache=False)
        metrics = {k: float(v) for k, v in head_of(out).metrics.items()}
        metrics.update(mb["stats"])
        return out.loss, metrics

    def step_flops(self) -> float:
        f, self._flops = self._flops, 0.0
        return f

    def state_dict(self) -> dict:
        cpu = lambda b: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        return {"rollout": None if self.rollout is None else [cpu(b) for b in self.rollout],
                "rollout_step": self.rollout_step}

    def load_state_dict(self, state: dict) -> None:
        self.rollout_step = state.get("rollout_step")
        self.rollout = None if state.get("rollout") is None else [self.to_device(b) for b in state["rollout"]]


def require_answers(records) -> None:
    """DataError (file and line) for a record without ``answer``: the built-in answer reward needs
    it, and finding out at the first rollout would be too late."""
    for rec in records:
        if rec.get("answer") is None:
            raise D.DataError(f"{rec.get('__where__', 'data')}: missing key 'answer' (the built-in "
                              "answer reward compares completions with it)")


def run_grpo(model, tokenizer, data, config: GRPOConfig, *, reward_fns=(answer_reward,), ref_model=None,
             **deprecated_options) -> TrainResult:
    """GRPO on ``data`` (jsonl path or list of dicts with ``prompt`` and, for the built-in reward,
    ``answer``). ``config``: a :class:`GRPOConfig` (a plain :class:`TrainConfig` takes the GRPO
    defaults); ``config.batch_size`` counts prompts; each gets ``group_size`` completions.
    ``loss_type`` is any of :func:`ptcore.ops.policy_loss`'s (default dapo: token-mean over the
    whole optimizer step); ``kl_coef > 0`` adds the KL to ``ref_model`` (default: a frozen copy of
    the initial model). Every option is checked first; with the built-in :func:`answer_reward`,
    a record without ``answer`` is a DataError at load time (file and line).

    Rollouts: ``rollout="engine"`` (default) samples on :class:`ptcore.engine.Engine` over the
    policy's own parameters (each prompt prefilled once, its G completions forked from it,
    per-request seeds, ``stop_strings`` and eos honoured, every page back in the pool after
    the rollout; ``engine_max_tokens`` sizes its KV cache), ``"hf"`` uses ``model.generate``.
    Either way the sampler's log-probs reach the loss as ``sampling_logps``:
    ``rollout_correction`` / ``rollout_clip`` / ``off_policy_threshold`` are
    :func:`ptcore.ops.policy_loss`'s (TRL 1.16's vLLM importance-sampling correction and OPSM),
    and the mismatch metrics (``rollout/logp_diff_mean|max``, ``rollout/kl_k3``, the masked
    fractions) go to metrics.jsonl. ``deterministic`` computes the trainer's old log-probs with
    ``linear_logprobs(deterministic=True)``. ``top_k`` / ``top_p`` truncate the sampling (engine or
    generate); the trainer's log-probs (old, current, reference) are then the truncated
    distribution's, renormalized over the kept set (``linear_logprobs(top_k=, top_p=)``), and the
    loss runs unfused on them. The old keyword options (``group_size=`` ...; ``rollout_clip=(min,
    max)`` for the two clip fields) still work for one release, with a DeprecationWarning."""
    config = objective_config(GRPOConfig, config, deprecated_options, "run_grpo")
    fns, _ = reward_functions(reward_fns, config.reward_weights)
    records = D.load_records(data, "grpo")
    if answer_reward in fns:
        require_answers(records)
    limit = config.max_prompt_length or max(1, config.max_length - config.max_new_tokens)
    prompts = D.prompt_examples(records, tokenizer, limit, config.overflow)
    objective = GRPOObjective(prompts, tokenizer, config, reward_fns=fns, ref_model=ref_model)
    return train(model, objective, config, tokenizer=tokenizer)
