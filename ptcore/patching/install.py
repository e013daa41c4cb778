"""Installing the patched forward on one model (``patch``) or on a whole class (``patch_class``).

A model is patched when its effective ``forward`` is a ptcore forward. ``patch(model)`` binds one
on the instance (its class, ``type(model).__name__`` and ``save_pretrained`` stay as they are);
``patch_class`` replaces the class attribute, so models built afterwards (``from_pretrained``)
are patched too. Both are idempotent and both are undone exactly: ``unpatch(model)`` makes that
model run the original forward, ``unpatch_class`` restores the class.
"""
import types

from ptcore.patching.forward import make_forward
from ptcore.patching.registry import causal_lm_class, supported_base


def _original(forward):
    """The unpatched function behind ``forward`` (a function or bound method), or None."""
    return getattr(getattr(forward, "__func__", forward), "__ptcore_original__", None)


def is_patched(model) -> bool:
    """True when ``model``'s forward computes the fused loss for ``labels`` / ``head_loss``."""
    return _original(getattr(model, "forward", None)) is not None


def patch(model):
    """Make ``model`` (a supported Hugging Face ``*ForCausalLM``) compute its training loss with
    ptcore's fused kernels; returns ``model``. Idempotent. Patch before wrapping the model in
    DDP / FSDP2 / ``torch.compile``.

    With ``labels`` the loss is Hugging Face's causal-LM loss (shifted labels, ``-100`` ignored,
    mean over valid tokens or sum / ``num_items_in_batch``) and ``logits`` is None; with
    ``head_loss=fn`` the loss is ``fn(hidden [B, T, H], lm_head.weight [V, H], softcap)`` and the
    whole return is ``output.head_output``; otherwise the original forward runs.

    Raises ValueError, listing the supported architectures, for any other model.

    Example:
        >>> model = ptcore.patch(AutoModelForCausalLM.from_pretrained(path))
        >>> model(input_ids, attention_mask=mask, labels=input_ids).loss.backward()
    """
    supported_base(model)
    if "forward" not in model.__dict__ or not is_patched(model):
        cls_forward = type(model).forward  # a subclass's own forward is kept
        original = _original(cls_forward) or cls_forward
        model.forward = types.MethodType(make_forward(original), model)
    return model


def unpatch(model):
    """Make ``model`` run the original Hugging Face forward again; returns ``model``."""
    model.__dict__.pop("forward", None)
    original = _original(getattr(model, "forward", None))
    if original is not None:  # the class is patched: override it for this instance only
        model.forward = types.MethodType(original, model)
    return model


def patch_class(name: str) -> type:
    """Patch a supported class by model type (``"llama"``) or class name (``"LlamaForCausalLM"``),
    so that every instance, including those built later, is patched; returns the class."""
    cls = causal_lm_class(name)
    if _original(cls.__dict__.get("forward")) is None:
        cls.forward = make_forward(cls.forward)
    return cls


def unpatch_class(name: str) -> type:
    """Undo :func:`patch_class` (models given to :func:`patch` stay patched)."""
    cls = causal_lm_class(name)
    original = _original(cls.__dict__.get("forward"))
    if original is not None:
        cls.forward = original
    return cls
