"""ptcore.train: one small training loop and three post-training objectives on top of it.

* :func:`run_sft`: supervised fine-tuning (prompt/completion or chat messages, completion-only loss,
  packing without cross-contamination, fused cross-entropy through :func:`ptcore.patch`);
* :func:`run_dpo`: preference optimization with cached reference log-probs and the fused
  :func:`ptcore.ops.linear_dpo_loss` (every loss type of :func:`ptcore.ops.dpo_loss`);
* :func:`run_grpo`: group-relative policy optimization with Python reward callables and the fused
  :func:`ptcore.ops.linear_policy_loss`.

Each takes its config, a dataclass that declares every option once with its help text
(:class:`SFTConfig`, :class:`DPOConfig`, :class:`GRPOConfig`, subclasses of :class:`TrainConfig`;
the CLI parses the same dataclasses). All three share the loop of :mod:`ptcore.train.loop` (AdamW, warmup +
cosine, accumulation normalized by the optimizer step's global token count, clipping, atomic
checkpoints with exact resume, DDP / FSDP2 under ``torchrun``). The embedded tiny model and the
synthetic tasks live in :mod:`ptcore.train.tiny` and :mod:`ptcore.train.tasks`.
"""
from ptcore.train.config import DPOConfig, GRPOConfig, SFTConfig, TrainConfig, TrainingError, TrainResult

__all__ = ["DPOConfig", "GRPOConfig", "SFTConfig", "TrainConfig", "TrainResult", "TrainingError", "run_dpo",
           "run_grpo", "run_sft"]


def __getattr__(name):
    # The objectives import transformers-facing code; load them on first use so that
    # ``import ptcore.train.tiny`` stays light.
    if name == "run_sft":
        from ptcore.train.sft import run_sft
        return run_sft
    if name == "run_dpo":
        from ptcore.train.dpo import run_dpo
        return run_dpo
    if name == "run_grpo":
        from ptcore.train.grpo import run_grpo
        return run_grpo
    raise AttributeError(f"module 'ptcore.train' has no attribute {name!r}")
