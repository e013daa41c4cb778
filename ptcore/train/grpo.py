"""Group relative policy optimization with the fused ``linear_policy_loss``.

Every ``num_iterations`` optimizer steps, a rollout: each prompt of the step's global batch gets
``group_size`` completions sampled from the current policy (``model.generate``, temperature
sampling with no top-k / top-p, so the sampled distribution is the tempered softmax), rewards
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

from ptcore.ops import group_advantages, linear_logprobs, linear_policy_loss
from ptcore.ops.policy import AGGREGATION
from ptcore.train import data as D
from ptcore.train.config import TrainConfig, TrainResult
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


def _int(op, name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{op}: '{name}' must be an int >= {low}, got {value!r}")
    return value


def check_options(*, reward_fns=(answer_reward,), reward_weights=None, group_size=8, temperature=1.0,
                  max_new_tokens=64, num_iterations=1, kl_coef=0.0, loss_type="dapo",
                  epsilon_low=0.2, epsilon_high=None, estimator="grpo", scale_rewards="group",
                  kl_estimator="k3"):
    """Raises ValueError / TypeError naming a bad GRPO option (by run_grpo's names: ``kl_coef``,
    not the loss's ``beta``), before any work. Returns (reward functions, their weights)."""
    from ptcore.ops import checks
    from ptcore.ops.advantages import ESTIMATORS, SCALES
    from ptcore.ops.policy import KL_ESTIMATORS
    op = "run_grpo"
    _int(op, "group_size", group_size, 2)  # group statistics need two completions
    _int(op, "max_new_tokens", max_new_tokens, 1)
    _int(op, "num_iterations", num_iterations, 1)
    checks.number(op, "temperature", temperature, low=0, low_open=True)
    checks.number(op, "kl_coef", kl_coef, low=0)
    checks.number(op, "epsilon_low", epsilon_low, low=0, high=1)
    if epsilon_high is not None:
        checks.number(op, "epsilon_high", epsilon_high, low=0)
    checks.choice(op, "loss_type", loss_type, tuple(AGGREGATION))
    checks.choice(op, "estimator", estimator, ESTIMATORS)
    checks.choice(op, "scale_rewards", scale_rewards, SCALES)
    checks.choice(op, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
    if not fns or not all(callable(f) for f in fns):
        raise ValueError(f"{op}: 'reward_fns' must be a callable or a non-empty list of callables")
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"{op}: 'reward_weights' needs one weight per reward function")
    weights = [checks.number(op, "reward_weights", w) for w in weights]
    return fns, weights


class GRPOObjective(BaseObjective):
    name = "grpo"

    def __init__(self, prompts, tokenizer, config: TrainConfig, *, reward_fns, reward_weights=None,
                 group_size: int = 8, temperature: float = 1.0, max_new_tokens: int = 64,
                 num_iterations: int = 1, kl_coef: float = 0.0, ref_model=None, loss_type: str = "dapo",
                 epsilon_low: float = 0.2, epsilon_high=None, estimator: str = "grpo",
                 scale_rewards: str = "group", kl_estimator: str = "k3"):
        super().__init__(prompts, config)
        fns, weights = check_options(
            reward_fns=reward_fns, reward_weights=reward_weights, group_size=group_size,
            temperature=temperature, max_new_tokens=max_new_tokens, num_iterations=num_iterations,
            kl_coef=kl_coef, loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
            estimator=estimator, scale_rewards=scale_rewards, kl_estimator=kl_estimator)
        self.reward_fns = fns
        self.reward_weights = weights
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.G, self.temperature, self.max_new_tokens = group_size, float(temperature), max_new_tokens
        self.num_iterations, self.kl_coef, self.loss_type = num_iterations, float(kl_coef), loss_type
        self.loss_opts = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
                              beta=float(kl_coef), kl_estimator=kl_estimator)
        self.estimator, self.scale_rewards = estimator, scale_rewards
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
        with _autocast(self.device, self.config.bf16):
            cache = self._shared_prompt_cache(policy, ids[::self.G], attn[::self.G])
            seqs = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                   temperature=self.temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                   eos_token_id=self.eos_id, cache=cache,
                                   # FSDP2: every rank must run as many forwards (all-gathers)
                                   synced_gpus=self.ctx.enabled and self.config.strategy == "fsdp")
        comp = seqs[:, P:]
        cmask = completion_mask(comp, self.eos_id, self.pad_id).to(attn.dtype)
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
        batch = {"input_ids": input_ids, "attention_mask": attention,
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
            vals = fn(prompts=prompt_texts, completions=texts, **columns)
            if len(vals) != len(rows):
                raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {len(vals)} "
                                 f"values for {len(rows)} completions")
            r = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float32)
            if bool(torch.isinf(r).any()):
                i = int(torch.isinf(r).nonzero()[0, 0])
                raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {vals[i]!r} for "
                                 f"completion {i}; a reward must be finite (None or NaN: missing)")
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
        batch["units"] = self._units(mask)
        batch["tokens"] = n_tok
        return batch

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
                                                              temperature=self.temperature)
        with _autocast(self.device, self.config.bf16):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], head_loss=head, use_cache=False)
        return out.loss.float()

    def micro_batches(self, step, model):
        rollout_step = step - step % self.num_iterations
        if self.rollout is None or self.rollout_step != rollout_step:
            # The prompts of rollout k are the k-th global batch of prompts.
            batches = self.batches(rollout_step // self.num_iterations)
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
                                                      softcap=softcap, temperature=self.temperature)
            return linear_policy_loss(hidden, weight, mb["target"], mb["old_logps"], mb["advantages"],
                                      mb["mask"], ref_logps=mb.get("ref_logps"), softcap=softcap,
                                      temperature=self.temperature, normalizer=float(max(global_units, 1)),
                                      **self.loss_opts)

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


def run_grpo(model, tokenizer, data, config: TrainConfig, *, reward_fns=(answer_reward,),
             reward_weights=None, group_size: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 64, num_iterations: int = 1, kl_coef: float = 0.0,
             ref_model=None, loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high=None,
             estimator: str = "grpo", scale_rewards: str = "group",
             max_prompt_length: int = None) -> TrainResult:
    """GRPO on ``data`` (jsonl path or list of dicts with ``prompt`` and, for the built-in reward,
    ``answer``). ``config.batch_size`` counts prompts; each gets ``group_size`` completions.
    ``loss_type`` is any of :func:`ptcore.ops.policy_loss`'s (default dapo: token-mean over the
    whole optimizer step); ``kl_coef > 0`` adds the KL to ``ref_model`` (default: a frozen copy of
    the initial model). Every option is checked first; with the built-in :func:`answer_reward`,
    a record without ``answer`` is a DataError at load time (file and line)."""
    check_options(reward_fns=reward_fns, reward_weights=reward_weights, group_size=group_size,
                  temperature=temperature, max_new_tokens=max_new_tokens,
                  num_iterations=num_iterations, kl_coef=kl_coef, loss_type=loss_type,
                  epsilon_low=epsilon_low, epsilon_high=epsilon_high, estimator=estimator,
                  scale_rewards=scale_rewards)
    records = D.load_records(data, "grpo")
    fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
    if answer_reward in fns:
        require_answers(records)
    limit = max_prompt_length or max(1, config.max_length - max_new_tokens)
    prompts = D.prompt_examples(records, tokenizer, limit, config.overflow)
    objective = GRPOObjective(prompts, tokenizer, config, reward_fns=reward_fns, reward_weights=reward_weights,
                              group_size=group_size, temperature=temperature, max_new_tokens=max_new_tokens,
                              num_iterations=num_iterations, kl_coef=kl_coef, ref_model=ref_model,
                              loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                              estimator=estimator, scale_rewards=scale_rewards)
    return train(model, objective, config, tokenizer=tokenizer)
