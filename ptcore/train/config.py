"""The options every objective shares, and what a run returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainConfig:
    """Options of the shared loop (:mod:`ptcore.train.loop`).

    Args:
        output_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``final/`` go.
        max_steps: optimizer steps.
        batch_size: examples per micro-batch on each rank (SFT with packing: packed rows of
            ``max_length`` tokens; DPO: pairs; GRPO: prompts, each with ``group_size`` completions).
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

    def __post_init__(self):
        ints = dict(max_steps=1, batch_size=1, grad_accum=1, max_length=2, log_every=1)
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig: '{name}' must be an int >= {low}, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig: '{name}' must be an int >= 0, got {value!r}")
        if not (self.lr > 0):
            raise ValueError(f"TrainConfig: 'lr' must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig: 'weight_decay' must be >= 0 and 'min_lr_ratio' in [0, 1], "
                             f"got {self.weight_decay!r}, {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"TrainConfig: 'max_grad_norm' must be >= 0, got {self.max_grad_norm!r}")
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
