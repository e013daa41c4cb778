"""The options every objective shares, and what a run returns."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from ptcore.ops import checks

MAX_LR = 1.0


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. diverged: too many non-finite steps in a row); says why."""


@dataclass
class TrainConfig:
    """Options of the shared loop (:mod:`ptcore.train.loop`).

    Args:
        output_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``final/`` go.
        max_steps: optimizer steps.
        batch_size: examples per micro-batch on each rank (SFT: examples, packed or not -- with
            packing, each micro-batch's examples go into rows of ``max_length`` tokens, as TRL
            counts them; DPO: pairs; GRPO: prompts, each with ``group_size`` completions).
        grad_accum: micro-batches per optimizer step on each rank. The global batch of a step is
            ``batch_size * grad_accum * world_size`` examples, and the loss is normalized by the
            global count over all of them, so any split gives the same step.
        lr, warmup_steps, weight_decay, min_lr_ratio: AdamW with linear warmup, then cosine decay
            from ``lr`` to ``min_lr_ratio * lr`` at ``max_steps``.
        max_grad_norm: gradient clipping (0 or None: no clipping; the norm is still logged).
        max_length: longest tokenized example (prompt + completion).
        overflow: what to do with a longer example: ``"truncate"`` or ``"skip"`` (counted and
            printed either way).
        seed: seeds the model-independent randomness (data order, sampling).
        log_every: print a metrics line every this many steps (metrics.jsonl gets every step).
        save_every: checkpoint every this many steps (0: only at the end); keep_checkpoints: how
            many to keep.
        resume: continue from the latest checkpoint in ``output_dir`` (if any).
        progress: tqdm progress bar.
        bf16: autocast to bfloat16 on a GPU (never on the CPU); None = on when the model is on CUDA.
        strategy: under ``torchrun``: ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``).
        save_final: save the trained model (and tokenizer) to ``output_dir/final``.
        max_consecutive_skips: a step whose loss or gradient norm is not finite is skipped (no
            update; counted in ``metrics.jsonl`` as ``skipped``); this many skips in a row stop
            the run with :class:`TrainingError` (default 3). A model with a non-finite weight is
            never saved (neither a checkpoint nor ``final/``).

    Every option is checked here, before any work: a bad one raises ``ValueError`` naming it
    (non-finite numbers included: ``lr=inf`` or ``weight_decay=nan`` would train on NaN).
    """
    output_dir: str = "ptcore-run"
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    max_length: int = 512
    overflow: str = "truncate"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    bf16: Optional[bool] = None
    strategy: str = "ddp"
    save_final: bool = True
    max_consecutive_skips: int = 3

    def __post_init__(self):
        ints = dict(max_steps=1, batch_size=1, grad_accum=1, max_length=2, log_every=1,
                    max_consecutive_skips=1)
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig: '{name}' must be an int >= {low}, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig: '{name}' must be an int >= 0, got {value!r}")
        if self.seed >= 2**64:
            raise ValueError(f"TrainConfig: 'seed' must be < 2**64, got {self.seed!r}")
        op = "TrainConfig"
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
