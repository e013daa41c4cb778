"""Installing the patched forward on one model (``patch``) or on a whole class (``patch_class``).

A model is patched when its effective ``forward`` is a ptcore forward. ``patch(model)`` binds one
on the instance (its class, ``type(model).__name__`` and ``save_pretrained`` stay as they are);
``patch_class`` replaces the class attribute, so models built afterwards (``from_pretrained``)
are patched too. Both are idempotent and both are undone exactly: ``unpatch(model)`` makes that
model run the original forward, ``unpatch_class`` restores the class.
"""
import types

from ptcore.ops import checks
from ptcore.patching import backbone as _backbone
from ptcore.patching.forward import make_forward
from ptcore.patching.registry import SUPPORTED, causal_lm_class, supported_base


def _original(forward):
    """The unpatched function behind ``forward`` (a function or bound method), or None."""
    return getattr(getattr(forward, "__func__", forward), "__ptcore_original__", None)


def is_patched(model) -> bool:
    """True when ``model``'s forward computes the fused loss for ``labels`` / ``head_loss``."""
    return _original(getattr(model, "forward", None)) is not None


def _install_backbone(cls) -> None:
    """Wraps the architecture's backbone modules (inert until a backbone model trains)."""
    for module, name in SUPPORTED.values():
        if any(c.__module__ == module and c.__name__ == name for c in cls.__mro__):
            _backbone.install(module, name)
            return


def patch(model, backbone: bool = True):
    """Make ``model`` (a supported Hugging Face ``*ForCausalLM``) compute its training loss with
    ptcore's fused kernels; returns ``model``. Idempotent. Patch before wrapping the model in
    DDP / FSDP2 / ``torch.compile``.

    With ``labels`` the loss is Hugging Face's causal-LM loss (shifted labels, ``-100`` ignored,
    mean over valid tokens or sum / ``num_items_in_batch``) and ``logits`` is None; with
    ``head_loss=fn`` the loss is ``fn(hidden [B, T, H], lm_head.weight [V, H], softcap)`` and the
    whole return is ``output.head_output``; otherwise the original forward runs.

    ``backbone`` (default True): the training forward also runs ptcore's fused RMSNorm (with the
    residual add), RoPE and SwiGLU / GeGLU in the decoder layers (ptcore/patching/backbone.py);
    generation and inference still run Hugging Face's code.

    Raises ValueError, listing the supported architectures, for any other model.

    Example:
        >>> model = ptcore.patch(AutoModelForCausalLM.from_pretrained(path))
        >>> model(input_ids, attention_mask=mask, labels=input_ids).loss.backward()
    """
    base = supported_base(model)
    checks.flag("ptcore.patch", "backbone", backbone)
    if backbone:
        _install_backbone(base)
    model._ptcore_backbone = backbone
    if "forward" not in model.__dict__ or not is_patched(model):
        cls_forward = type(model).forward  # a subclass's own forward is kept
        original = _original(cls_forward) or cls_forward
        model.forward = types.MethodType(make_forward(original), model)
    return model


def unpatch(model):
    """Make ``model`` run the original Hugging Face forward again; returns ``model``."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_ptcore_backbone", None)
    original = _original(getattr(model, "forward", None))
    if original is not None:  # the class is patched: override it for this instance only
        model.forward = types.MethodType(original, model)
    return model


def patch_class(name: str, backbone: bool = True) -> type:
    """Patch a supported class by model type (``"llama"``) or class name (``"LlamaForCausalLM"``),
    so that every instance, including those built later, is patched; returns the class.
    ``backbone``: as for :func:`patch`."""
    cls = causal_lm_class(name)
    checks.flag("ptcore.patch_class", "backbone", backbone)
    if backbone:
        _install_backbone(cls)
    cls._ptcore_backbone = backbone
    if _original(cls.__dict__.get("forward")) is None:
        cls.forward = make_forward(cls.forward)
    return cls


def unpatch_class(name: str) -> type:
    """Undo :func:`patch_class` (models given to :func:`patch` stay patched)."""
    cls = causal_lm_class(name)
    original = _original(cls.__dict__.get("forward"))
    if original is not None:
        cls.forward = original
    if "_ptcore_backbone" in cls.__dict__:
        delattr(cls, "_ptcore_backbone")
    return cls
