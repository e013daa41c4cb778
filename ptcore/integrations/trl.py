"""ptcore's fused LM heads inside TRL 1.16's trainers: one call, no ``[B, T, V]`` logits.

``patch_trainer(trainer)`` binds, on that trainer instance only, ptcore versions of the methods
where TRL computes its loss and log-probs (the class and other trainers are untouched):

* SFTTrainer: ``compute_loss`` (:mod:`ptcore.integrations.trl_sft`);
* DPOTrainer: ``_compute_loss`` and ``compute_ref_log_probs`` (:mod:`ptcore.integrations.trl_dpo`);
* GRPOTrainer: ``_compute_loss`` and ``_get_per_token_logps_and_entropies``
  (:mod:`ptcore.integrations.trl_grpo`).

Each runs the model's backbone (``model.model``) for the final hidden states and a fused head on
``model.lm_head.weight``; TRL's logged metrics are computed from the fused outputs. A TRL option
whose result ptcore's ops cannot reproduce raises ValueError naming it at patch time; nothing is
silently computed differently. ``unpatch_trainer`` restores TRL's methods.

Example:
    >>> trainer = ptcore.integrations.trl.patch_trainer(SFTTrainer(model=model, args=args, train_dataset=ds))
    >>> trainer.train()
"""
from __future__ import annotations

import types

from ptcore.integrations import trl_dpo, trl_grpo, trl_sft
from ptcore.integrations._head import PREFIX, causal_lm

_ATTR = "_ptcore_patched"  # on the instance: the names of the methods bound here


def _methods():
    """{TRL trainer class: (check, {method name: ptcore function})}; TRL imported on first use."""
    try:
        from trl import DPOTrainer, GRPOTrainer, SFTTrainer
    except ImportError as e:  # pragma: no cover - exercised only without TRL
        raise ImportError(f"{PREFIX} needs TRL (pip install trl): {e}") from e
    return {
        SFTTrainer: (trl_sft.check, {"compute_loss": trl_sft.compute_loss}),
        DPOTrainer: (trl_dpo.check, {"_compute_loss": trl_dpo._compute_loss,
                                     "compute_ref_log_probs": trl_dpo.compute_ref_log_probs}),
        GRPOTrainer: (trl_grpo.check, {"_compute_loss": trl_grpo._compute_loss,
                                       "_get_per_token_logps_and_entropies":
                                           trl_grpo._get_per_token_logps_and_entropies}),
    }


SUPPORTED = ("SFTTrainer", "DPOTrainer", "GRPOTrainer")


def _entry(trainer):
    for cls, entry in _methods().items():
        if isinstance(trainer, cls):
            return cls, entry
    raise TypeError(f"{PREFIX}: {type(trainer).__name__} is not supported; supported trainers: "
                    f"{', '.join('trl.' + n for n in SUPPORTED)} (TRL 1.16)")


def is_patched(trainer) -> bool:
    return bool(getattr(trainer, "__dict__", {}).get(_ATTR))


def patch_trainer(trainer):
    """Make ``trainer`` (TRL's SFTTrainer, DPOTrainer or GRPOTrainer, or a subclass that keeps
    their loss methods) compute its losses and per-token log-probs with ptcore's fused heads;
    returns ``trainer``. Idempotent.

    Raises TypeError for another trainer type (listing the supported ones), ValueError for a
    model ``ptcore.patch`` does not support (naming its architecture), for a PEFT or
    multi-process setup, and for a TRL option ptcore cannot honour (naming the option).
    """
    cls, (check, methods) = _entry(trainer)
    if is_patched(trainer):
        return trainer
    for name in methods:
        if getattr(type(trainer), name) is not getattr(cls, name):
            raise TypeError(f"{PREFIX}: {type(trainer).__name__} overrides {cls.__name__}.{name}, which "
                            "the patch replaces; patch a trainer that keeps TRL's")
    _check_setup(trainer)
    check(trainer)
    for name, fn in methods.items():
        setattr(trainer, name, types.MethodType(fn, trainer))
    trainer.__dict__[_ATTR] = tuple(methods)
    return trainer


def unpatch_trainer(trainer):
    """Undo :func:`patch_trainer`: TRL's own methods run again; returns ``trainer``."""
    for name in trainer.__dict__.pop(_ATTR, ()):
        trainer.__dict__.pop(name, None)
    return trainer


def _check_setup(trainer) -> None:
    from accelerate.utils import is_peft_model
    if is_peft_model(trainer.model):
        raise ValueError(f"{PREFIX}: PEFT models are not supported yet (the backbone and head are read "
                         "from the bare *ForCausalLM)")
    if trainer.accelerator.num_processes > 1:
        raise ValueError(f"{PREFIX}: multi-process training ({trainer.accelerator.num_processes} processes) "
                         "is not supported yet: the backbone is called outside the DDP/FSDP wrapper")
    causal_lm(trainer, trainer.model)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        causal_lm(trainer, ref)
