"""Every training option, declared once, and what a run returns.

:class:`TrainConfig` holds the options of the shared loop; :class:`SFTConfig`, :class:`DPOConfig`
and :class:`GRPOConfig` add each objective's own (subclasses, as transformers'
``TrainingArguments`` and TRL's configs are). Each field carries its help text in
``metadata["help"]``: ``ptcore sft|dpo|grpo`` parses these same dataclasses with transformers'
``HfArgumentParser``, so a field is a flag (``lr`` -> ``--lr``, ``batch_size`` -> ``--batch-size``)
with that help, and ``metadata`` may add ``aliases`` (a flag's older spelling) and ``choices``.

Every option is checked when the config is built, before any work: a bad one raises
``ValueError`` (``TypeError`` for some wrong types) naming it, non-finite numbers included
(``lr=inf`` or ``weight_decay=nan`` would train on NaN). The loop's options report as
``TrainConfig``'s, each objective's own as its run function's (``run_grpo: 'kl_coef' ...``).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ptcore.ops import checks
from ptcore.ops.advantages import ESTIMATORS, SCALES
from ptcore.ops.policy import AGGREGATION, KL_ESTIMATORS, ROLLOUT_CORRECTIONS
from ptcore.ops.preference import LOSS_TYPES as DPO_LOSS_TYPES

MAX_LR = 1.0
FAMILY_OPTIONS = ("delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                  "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile", "entropy_coef",
                  "bias_correction_kl")  # GRPOConfig fields passed to policy_loss as they are
ROLLOUTS = ("engine", "hf")


def option(default, help: str, **cli):
    """A config field: its default, its help text (also the CLI's), and argparse extras for the
    CLI (``aliases``, ``choices``, ``action``). A list default is copied per instance."""
    meta = {"help": help, **cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. diverged: too many non-finite steps in a row); says why."""


def _int(op, name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{op}: '{name}' must be an int >= {low}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Options of the shared loop (:mod:`ptcore.train.loop`): AdamW with linear warmup, then
    cosine decay from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps``; one help text per field."""
    output_dir: str = option("ptcore-run", "where metrics.jsonl, checkpoints/ and final/ go",
                             aliases=["--output"])
    max_steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "examples per micro-batch on each rank (SFT: examples, packed or not, "
                             "as TRL counts them; DPO: pairs; GRPO: prompts, each with group_size "
                             "completions)")
    grad_accum: int = option(1, "micro-batches per optimizer step on each rank; the loss is normalized "
                             "by the global count over batch_size * grad_accum * world_size examples, "
                             "so any split gives the same step")
    lr: float = option(1e-4, "peak learning rate of AdamW (0 < lr <= 1)")
    warmup_steps: int = option(0, "steps of linear warmup from 0 to lr")
    weight_decay: float = option(0.0, "AdamW weight decay (not on 1-D parameters); lr * weight_decay <= 1")
    min_lr_ratio: float = option(0.0, "the cosine decay ends at min_lr_ratio * lr at max_steps")
    max_grad_norm: Optional[float] = option(1.0, "gradient clipping norm (0 or None: no clipping; the "
                                            "norm is logged either way)")
    max_length: int = option(512, "longest tokenized example (prompt + completion)")
    overflow: str = option("truncate", "what to do with a longer example (counted and printed either "
                           "way)", choices=("truncate", "skip"))
    seed: int = option(0, "seeds the model-independent randomness (data order, sampling)")
    log_every: int = option(10, "print a metrics line every this many steps (metrics.jsonl gets "
                            "every step)")
    save_every: int = option(0, "checkpoint every this many steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many checkpoints to keep")
    resume: bool = option(False, "continue from the latest checkpoint in output_dir (if any)")
    progress: bool = option(True, "tqdm progress bar (off: print metrics lines)")
    bf16: Optional[bool] = option(None, "autocast to bfloat16 on a GPU, never on the CPU (None: on when "
                                  "the model is on CUDA)")
    strategy: str = option("ddp", "under torchrun: ddp, or fsdp (FSDP2 fully_shard)",
                           choices=("ddp", "fsdp"))
    save_final: bool = option(True, "save the trained model (and tokenizer) to output_dir/final")
    max_consecutive_skips: int = option(3, "a step whose loss or gradient norm is not finite is skipped "
                                        "(no update, counted as skipped in metrics.jsonl); this many "
                                        "in a row stop the run with TrainingError. A model with a "
                                        "non-finite weight is never saved")

    def __post_init__(self):
        op = "TrainConfig"
        for name, low in dict(max_steps=1, batch_size=1, grad_accum=1, max_length=2, log_every=1,
                              max_consecutive_skips=1, warmup_steps=0, save_every=0, seed=0,
                              keep_checkpoints=0).items():
            _int(op, name, getattr(self, name), low)
        if self.seed >= 2**64:
            raise ValueError(f"TrainConfig: 'seed' must be < 2**64, got {self.seed!r}")
        # AdamW moves each weight by about lr a step: lr > 1 (or inf, nan) only makes NaN.
        self.lr = checks.number(op, "lr", self.lr, low=0, low_open=True, high=MAX_LR)
        self.weight_decay = checks.number(op, "weight_decay", self.weight_decay, low=0)
        if self.lr * self.weight_decay > 1:
            raise ValueError(f"TrainConfig: 'weight_decay' times 'lr' must be <= 1 (AdamW scales each "
                             f"weight by 1 - lr * weight_decay a step), got {self.weight_decay!r} "
                             f"with lr {self.lr!r}")
        self.min_lr_ratio = checks.number(op, "min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        if self.max_grad_norm is not None:
            self.max_grad_norm = checks.number(op, "max_grad_norm", self.max_grad_norm, low=0)
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"TrainConfig: 'output_dir' must be a directory path, got {self.output_dir!r}")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"TrainConfig: 'output_dir' {str(self.output_dir)!r} exists and is not a "
                             "directory")
        if self.overflow not in ("truncate", "skip"):
            raise ValueError(f"TrainConfig: 'overflow' must be 'truncate' or 'skip', got {self.overflow!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig: 'strategy' must be 'ddp' or 'fsdp', got {self.strategy!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def legacy_options(options: dict) -> dict:
        """Keyword options of the API before the configs, by today's field names."""
        return options


@dataclass
class SFTConfig(TrainConfig):
    """:func:`ptcore.train.run_sft`'s options: the loop's, and how examples become rows."""
    packing: bool = option(True, "pack each micro-batch's examples into rows of max_length tokens, "
                           "nothing crossing between examples (off: pad each example to a row)")

    def __post_init__(self):
        super().__post_init__()
        checks.flag("run_sft", "packing", self.packing)


@dataclass
class DPOConfig(TrainConfig):
    """:func:`ptcore.train.run_dpo`'s options: the loop's, and the preference loss's
    (:func:`ptcore.ops.dpo_loss`)."""
    loss_type: Union[str, list[str]] = option(
        "sigmoid", "the DPO-family loss, or several of them (summed with loss_weights); simpo and "
        "orpo need no reference", choices=DPO_LOSS_TYPES)
    beta: float = option(0.1, "the inverse temperature of the implicit reward")
    label_smoothing: float = option(0.0, "the assumed rate of flipped preference labels (sigmoid, "
                                    "robust)")
    gamma: float = option(0.5, "simpo's target reward margin")
    orpo_lambda: float = option(1.0, "orpo's weight of the odds-ratio term")
    loss_weights: Optional[list[float]] = option(None, "one weight per loss in loss_type (a list)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.loss_type, (list, tuple)) and len(self.loss_type) == 1 and self.loss_weights is None:
            self.loss_type = self.loss_type[0]  # the CLI's --loss-type X: one loss, as the string X
        # The loss checks its own options: on a one-pair dummy batch, under run_dpo's name.
        from ptcore.ops import dpo_loss
        z = torch.zeros(1, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.float64)
        with checks.as_op("run_dpo", "dpo_loss"):
            dpo_loss(z - 1, z - 1, z - 1, z - 1, beta=self.beta, loss_type=self.loss_type,
                     label_smoothing=self.label_smoothing, chosen_lengths=one, rejected_lengths=one,
                     gamma=self.gamma, orpo_lambda=self.orpo_lambda, loss_weights=self.loss_weights)


@dataclass
class GRPOConfig(TrainConfig):
    """:func:`ptcore.train.run_grpo`'s options: the loop's, the rollout's and the policy loss's
    (:func:`ptcore.ops.policy_loss`). A new loss option is a field here, its check in
    ``__post_init__``, and its entry in :meth:`loss_options`."""
    # -- rollout ------------------------------------------------------------------------------
    group_size: int = option(8, "completions sampled per prompt (>= 2: group statistics)")
    temperature: float = option(1.0, "sampling temperature; the loss's log-probs are the tempered "
                                "distribution's")
    max_new_tokens: int = option(64, "longest completion")
    min_new_tokens: int = option(0, "shortest completion: EOS and stop strings cannot end one before "
                                 "this many new tokens (Hugging Face's meaning; <= max_new_tokens)")
    max_prompt_length: Optional[int] = option(None, "longest prompt (None: max_length - max_new_tokens)")
    top_k: int = option(0, "truncated sampling: the top k tokens (0: off)")
    top_p: float = option(1.0, "truncated sampling: the nucleus of mass top_p (1: off)")
    rollout: str = option("engine", "sample on ptcore.engine over the policy's own parameters, or "
                          "with HF generate", choices=ROLLOUTS)
    stop_strings: list[str] = option([], "strings that end a completion (engine rollouts; repeatable)",
                                     aliases=["--stop-string"], action="extend")
    engine_max_tokens: Optional[int] = option(None, "the engine's KV cache in tokens (None: "
                                              "max(4096, twice one group))")
    num_iterations: int = option(1, "optimizer steps per rollout (PPO-style reuse)")
    # -- rewards and advantages ---------------------------------------------------------------
    reward_weights: Optional[list[float]] = option(None, "one weight per reward function (None: all 1)")
    estimator: str = option("grpo", "group advantage estimator", choices=ESTIMATORS)
    scale_rewards: str = option("group", "advantages divided by the std of the group, of the batch, or "
                                "not at all", choices=SCALES)
    # -- policy loss --------------------------------------------------------------------------
    loss_type: str = option("dapo", "the policy loss and its aggregation", choices=tuple(AGGREGATION))
    epsilon_low: float = option(0.2, "lower clip of the ratio, 1 - epsilon_low", aliases=["--epsilon"])
    epsilon_high: Optional[float] = option(None, "upper clip of the ratio, 1 + epsilon_high (None: "
                                           "epsilon_low)")
    kl_coef: float = option(0.0, "weight of the KL to the reference (the loss's beta); > 0 loads a "
                            "frozen copy of the initial model")
    kl_estimator: str = option("k3", "KL estimator", choices=KL_ESTIMATORS)
    rollout_correction: Optional[str] = option(None, "importance weight of the sampler/trainer "
                                               "mismatch (TRL's vllm_importance_sampling_mode)",
                                               choices=ROLLOUT_CORRECTIONS)
    rollout_clip_min: Optional[float] = option(None, "lower bound of that weight (None: none)")
    rollout_clip_max: Optional[float] = option(3.0, "upper bound of that weight (None: none; mask modes)")
    off_policy_threshold: Optional[float] = option(None, "OPSM: drop negative-advantage sequences "
                                                   "whose mean sampler-minus-trainer log-prob exceeds it")
    deterministic: bool = option(False, "batch-invariant trainer log-probs (linear_logprobs "
                                 "deterministic=True)")
    # the newer policy-loss families (docs/losses.md §2.2; None: the loss type's default / off)
    delta: Optional[float] = option(None, "two-sided clip: the unclipped ratio capped at delta (> 1; "
                                    "PPO-clip loss types)")
    sapo_temperature_pos: Optional[float] = option(None, "sapo: gate temperature where A > 0 (None: 1.0)")
    sapo_temperature_neg: Optional[float] = option(None, "sapo: gate temperature where A <= 0 (None: 1.05)")
    vespo_k_pos: Optional[float] = option(None, "vespo: power k of the gamma weight where A >= 0 (None: 2)")
    vespo_lambda_pos: Optional[float] = option(None, "vespo: decay lambda where A >= 0 (None: 3)")
    vespo_k_neg: Optional[float] = option(None, "vespo: power k where A < 0 (None: 3)")
    vespo_lambda_neg: Optional[float] = option(None, "vespo: decay lambda where A < 0 (None: 2)")
    top_entropy_quantile: float = option(1.0, "only the completion tokens in this top quantile of "
                                         "entropy get the policy loss (1: all)")
    entropy_coef: float = option(0.0, "entropy bonus: the loss minus coef x the mean entropy of "
                                 "those tokens")
    bias_correction_kl: bool = option(False, "weight the KL term by the ratio rho (TRL's "
                                      "use_bias_correction_kl; needs kl_coef > 0)")

    @staticmethod
    def legacy_options(options: dict) -> dict:
        """The old keyword ``rollout_clip=(min, max)`` is two fields now."""
        if "rollout_clip" in options:
            clip = options.pop("rollout_clip")
            if not isinstance(clip, (tuple, list)) or len(clip) != 2:
                raise ValueError(f"run_grpo: 'rollout_clip' must be a pair (min, max) of numbers or "
                                 f"None, got {clip!r}")
            options["rollout_clip_min"], options["rollout_clip_max"] = clip
        return options

    @property
    def rollout_clip(self) -> tuple:
        return (self.rollout_clip_min, self.rollout_clip_max)

    def loss_options(self) -> dict:
        """The keyword arguments of :func:`ptcore.ops.policy_loss` / ``linear_policy_loss``."""
        return dict(epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                    beta=float(self.kl_coef), kl_estimator=self.kl_estimator,
                    rollout_correction=self.rollout_correction, rollout_clip=self.rollout_clip,
                    off_policy_threshold=self.off_policy_threshold,
                    **{k: getattr(self, k) for k in FAMILY_OPTIONS})

    def __post_init__(self):
        super().__post_init__()
        from ptcore.ops.policy import check_rollout_options
        from ptcore.ops.rows import MIN_TEMPERATURE  # the fused log-prob ops' bound
        op = "run_grpo"
        _int(op, "group_size", self.group_size, 2)  # group statistics need two completions
        _int(op, "max_new_tokens", self.max_new_tokens, 1)
        _int(op, "min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"{op}: 'min_new_tokens' must be <= max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens!r}")
        _int(op, "num_iterations", self.num_iterations, 1)
        if self.max_prompt_length is not None:
            _int(op, "max_prompt_length", self.max_prompt_length, 1)
        checks.number(op, "temperature", self.temperature, low=MIN_TEMPERATURE)
        checks.number(op, "kl_coef", self.kl_coef, low=0)
        checks.number(op, "epsilon_low", self.epsilon_low, low=0, high=1)
        if self.epsilon_high is not None:
            checks.number(op, "epsilon_high", self.epsilon_high, low=0)
        checks.choice(op, "loss_type", self.loss_type, tuple(AGGREGATION))
        checks.choice(op, "estimator", self.estimator, ESTIMATORS)
        checks.choice(op, "scale_rewards", self.scale_rewards, SCALES)
        checks.choice(op, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        checks.choice(op, "rollout", self.rollout, ROLLOUTS)
        check_rollout_options(op, self.rollout_correction, self.rollout_clip, self.off_policy_threshold)
        from ptcore.ops.policy_families import check_family_options
        check_family_options(op, self.loss_type, **{k: getattr(self, k) for k in FAMILY_OPTIONS},
                             beta=self.kl_coef, beta_name="kl_coef", has_entropy=True,  # the loss computes it
                             importance_sampling_level="token", rollout_correction=self.rollout_correction,
                             dual_clip=None, cispo_max=None)
        s = self.stop_strings
        if not isinstance(s, (list, tuple)) or not all(isinstance(x, str) and x for x in s):
            raise ValueError(f"{op}: 'stop_strings' must be a list of non-empty strings, got {s!r}")
        if s and self.rollout != "engine":
            raise ValueError(f"{op}: 'stop_strings' need rollout='engine' (HF generate's stop strings "
                             f"need its tokenizer object), got rollout={self.rollout!r}")
        if self.engine_max_tokens is not None:
            _int(op, "engine_max_tokens", self.engine_max_tokens, 1)
        checks.integer(op, "top_k", self.top_k, low=0)
        checks.number(op, "top_p", self.top_p, low=0, low_open=True, high=1)
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"{op}: 'deterministic' must be a bool, got {self.deterministic!r}")
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)):
                raise ValueError(f"{op}: 'reward_weights' must be a list of numbers, got "
                                 f"{self.reward_weights!r}")
            self.reward_weights = [checks.number(op, "reward_weights", w) for w in self.reward_weights]


def objective_config(cls, config, options: dict, op: str):
    """The ``cls`` config a run function works with: ``config`` itself, or a plain
    :class:`TrainConfig` completed with the objective's defaults; ``options`` are the loose
    keyword options of the API before the configs, still applied for one release with a
    DeprecationWarning."""
    if not isinstance(config, cls):
        if type(config) is not TrainConfig:
            raise TypeError(f"{op}: 'config' must be a {cls.__name__} (or a TrainConfig), got "
                            f"{type(config).__name__}")
        config = cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)})
    if options:
        given = ", ".join(sorted(options))
        options = cls.legacy_options(dict(options))
        names = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{op}() got an unexpected keyword argument {unknown[0]!r}")
        warnings.warn(f"{op}: passing {given} as keyword arguments is deprecated "
                      f"and will be removed in the next release; set them in the {cls.__name__}",
                      DeprecationWarning, stacklevel=3)
        config = dataclasses.replace(config, **options)
    return config


@dataclass
class TrainResult:
    """What a run returns: the metrics of every optimizer step (as in ``metrics.jsonl``), the
    step it ended at, where the final model went (None when not saved), and the model itself."""
    metrics: list = field(default_factory=list)
    step: int = 0
    final_dir: Optional[str] = None
    model: object = None

    @property
    def final_loss(self) -> Optional[float]:
        return self.metrics[-1]["loss"] if self.metrics else None
