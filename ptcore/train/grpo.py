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

This module holds the objective (options, loss, the rollout buffer across passes, resume) and
:func:`run_grpo`; the sampling and scoring of a rollout are in :mod:`ptcore.train.grpo_rollout`.
"""
from __future__ import annotations

import copy

import torch

from ptcore.ops import linear_logprobs, linear_policy_loss, policy_loss
from ptcore.ops.policy import AGGREGATION
from ptcore.train import data as D
from ptcore.train.config import GRPOConfig, TrainResult, objective_config
from ptcore.train.distributed import unwrap
from ptcore.train.grpo_rollout import GroupRollouts, completion_mask  # noqa: F401 (re-exported)
from ptcore.train.loop import _autocast, count_parameters, train
from ptcore.train.objective import BaseObjective, head_of, patch


def answer_reward(prompts, completions, answer=None, **_):
    """1.0 when the completion's final answer equals the record's ``answer``, else 0.0."""
    from ptcore.train.tasks import answer_reward as check
    if answer is None:
        raise ValueError("answer_reward: the GRPO records need an 'answer' key")
    return [check(c, a) for c, a in zip(completions, answer)]


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


class GRPOObjective(GroupRollouts, BaseObjective):
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
        self.min_new_tokens = c.min_new_tokens
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

    def _units(self, mask) -> int:
        agg = AGGREGATION[self.loss_type]
        if agg == "token-mean":
            return int(mask.sum())
        if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):  # per sequence (luspo: the sum)
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
