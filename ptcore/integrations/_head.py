"""What the TRL integration needs from a Hugging Face causal LM: its backbone's last hidden states
and its LM head (weight, bias, softcap), in the dtypes the fused ops take."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ptcore.patching.forward import _autocast
from ptcore.patching.registry import supported_base

PREFIX = "ptcore.integrations.trl"


class Head(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


def causal_lm(trainer, model):
    """The bare ``*ForCausalLM`` behind ``model`` (accelerate may have wrapped it); raises, naming
    the architecture, for one that ``ptcore.patch`` does not support."""
    accelerator = getattr(trainer, "accelerator", None)
    bare = accelerator.unwrap_model(model) if accelerator is not None else model
    supported_base(bare)
    return bare


def backbone_hidden(model, **kwargs) -> torch.Tensor:
    """The final-norm hidden states ``[B, T, H]`` of the backbone (``model.model``), as the
    causal LM's own forward would feed them to ``lm_head``."""
    kwargs["use_cache"] = False
    return model.model(**kwargs).last_hidden_state


def head_inputs(model, hidden: torch.Tensor, *, fp32: bool = False) -> Head:
    """hidden, weight and bias in one dtype: autocast's (as ``nn.Linear`` would compute), or float32
    outside autocast when ``fp32`` (TRL's ``cast_lm_head_to_fp32``)."""
    lm_head = model.lm_head
    hidden = hidden.to(lm_head.weight.device)  # a model split across devices ends on the head's
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if fp32:
        bias = None if lm_head.bias is None else lm_head.bias.float()
        return Head(hidden.float(), lm_head.weight.float(), bias, softcap)
    return Head(*_autocast(hidden, lm_head.weight, lm_head.bias), softcap)


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Position t's target is ``labels[t + 1]``; the last position has none (ignored rows cost the
    fused ops no GEMM work, so the hidden states need no slicing copy)."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def unsupported(trainer, what: str) -> ValueError:
    return ValueError(f"{PREFIX}: {type(trainer).__name__} with {what} is not supported by ptcore's "
                      "fused heads (it would give a different result); unset it or leave this "
                      "trainer unpatched")
