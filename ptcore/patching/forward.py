"""The patched ``forward`` of a Hugging Face causal LM.

Without ``labels`` and ``head_loss`` it calls the original forward unchanged (generation and
inference are untouched). With ``labels`` it runs the backbone and computes Hugging Face's
causal-LM loss through :func:`ptcore.ops.linear_cross_entropy` on the final hidden states and the
LM-head weight, so the ``[B, T, V]`` logits never exist (``logits`` is ``None`` in the output).
With ``head_loss=fn`` it returns ``fn(hidden, weight, softcap)`` as the loss: the fused RL losses
run inside ``forward``, where DDP and FSDP2 expect every use of the parameters to happen.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ptcore.ops.cross_entropy import linear_cross_entropy
from ptcore.patching import backbone

# transformers is imported on first use, not by ``import ptcore`` (it takes about a second).


@functools.cache
def output_class() -> type:
    """``CausalLMOutputWithHead``: Hugging Face's ``CausalLMOutputWithPast`` (``logits`` None)
    plus ``head_output``, what ``head_loss`` returned (e.g. a ``PolicyLossOutput``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class CausalLMOutputWithHead(CausalLMOutputWithPast):
        head_output: Any = None

    # A module-level name, so that outputs pickle (e.g. across processes).
    CausalLMOutputWithHead.__qualname__ = "CausalLMOutputWithHead"
    globals()["CausalLMOutputWithHead"] = CausalLMOutputWithHead
    return CausalLMOutputWithHead


def __getattr__(name):  # ptcore.patching.forward.CausalLMOutputWithHead, e.g. when unpickling
    if name == "CausalLMOutputWithHead":
        return output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_forward(original):
    """A forward for the class whose (unpatched) forward is ``original``; ``original`` is kept as
    ``__ptcore_original__`` so that unpatching can restore it."""
    params = list(inspect.signature(original).parameters.values())[1:]  # without self
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(original)  # keeps the signature HF's generate and Trainer inspect
    def forward(self, *args, head_loss=None, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(positional)} "
                            f"positional arguments, got {len(args)}")
        named = dict(zip(positional, args))
        labels = named["labels"] if "labels" in named else kwargs.get("labels")
        if labels is None and head_loss is None:
            return original(self, *args, **kwargs)
        for name in named.keys() & kwargs.keys():
            raise TypeError(f"{type(self).__name__}.forward got multiple values for '{name}'")
        return fused_forward(self, head_loss=head_loss, **named, **kwargs)

    forward.__ptcore_original__ = original
    return forward


def fused_forward(model, *, labels=None, head_loss=None, logits_to_keep=0, return_dict=None,
                  **kwargs):
    """The training forward: backbone, then the fused head. ``kwargs`` reach the backbone as in
    Hugging Face's forward (``num_items_in_batch``, ``shift_labels``, ``ignore_index`` included)."""
    if labels is not None and head_loss is not None:
        raise ValueError("ptcore.patch: pass either 'labels' (fused cross-entropy) or 'head_loss', "
                         "not both")
    if head_loss is not None and not callable(head_loss):
        raise TypeError(f"ptcore.patch: 'head_loss' must be callable, got {type(head_loss).__name__}")
    if labels is not None:
        _check_ids("labels", labels)
    from transformers.modeling_utils import slice_logits_to_keep

    with backbone.active(model):  # the fused norms, RoPE and MLP activations (backbone.py)
        outputs = model.model(**kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    head = model.lm_head
    hidden, weight, bias = _autocast(hidden, head.weight, head.bias)
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2; None elsewhere
    head_output = None
    if labels is not None:
        loss = causal_lm_loss(hidden, weight, bias, labels, softcap=softcap, **kwargs)
    else:
        if bias is not None:
            raise ValueError("ptcore.patch: 'head_loss' gets no LM-head bias; this model has one")
        head_output = head_loss(hidden, weight, softcap)
        loss = head_output if isinstance(head_output, torch.Tensor) else getattr(head_output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise TypeError("ptcore.patch: 'head_loss' must return a tensor or an object with a "
                            f"tensor '.loss', got {type(head_output).__name__}")
    out = output_class()(loss=loss, logits=None, cache=outputs.cache,
                        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                        head_output=head_output)
    if return_dict is None:  # as transformers' can_return_tuple
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict is not False else out.to_tuple()


def causal_lm_loss(hidden, weight, bias, labels, *, softcap=None, num_items_in_batch=None,
                   ignore_index=-100, shift_labels=None, **_):
    """Hugging Face's ``ForCausalLMLoss`` without logits: position t predicts ``labels[t + 1]``
    (or ``shift_labels[t]``), ``ignore_index`` rows add nothing; the mean over the valid tokens, or
    their sum divided by ``num_items_in_batch`` when given (gradient accumulation across batches)."""
    name, given = "labels", labels
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        name, given = "shift_labels", shift_labels
        _check_ids(name, shift_labels)
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"ptcore.patch: '{name}' of shape {tuple(given.shape)} do not match the "
                         f"{tuple(hidden.shape[:-1])} positions of the input")
    target = shift_labels.to(device=hidden.device, dtype=torch.long)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                softcap=softcap, reduction=reduction)
    if loss.dtype in (torch.float16, torch.bfloat16):
        loss = loss.float()  # Hugging Face returns the loss in fp32 (it upcasts the logits)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _autocast(hidden, weight, bias):
    """Under autocast, the head's inputs in the autocast dtype, as ``lm_head`` (an ``nn.Linear``)
    would compute them: a custom op is not autocast by torch, and the final norm often returns
    fp32 hidden states while the weight is an fp32 parameter."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_ids(name, ids):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ptcore.patch: '{name}' must be a torch.Tensor of token ids, got "
                        f"{type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ptcore.patch: '{name}' must hold integer token ids, got {ids.dtype}")
