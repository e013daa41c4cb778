"""Argument checks shared by the public ops: each failure names the argument."""
from __future__ import annotations

import contextlib
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(op: str, name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
           dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(f"{op}: '{name}' is on meta, a device without data to compute with")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: '{name}' must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: '{name}' must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{op}: '{name}' must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def real(op: str, name: str, value: torch.Tensor, *, allow_bool: bool = False) -> None:
    """A tensor of real numbers (advantages, rewards, masks): complex never, bool only where a
    mask may be one (a bool advantage would silently become 0 / 1)."""
    if value.is_complex() or (value.dtype == torch.bool and not allow_bool):
        raise TypeError(f"{op}: '{name}' must hold real numbers{' (or bools)' if allow_bool else ''}, "
                        f"got dtype {value.dtype}")


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def integer(op: str, name: str, value, *, low=INT64_MIN, high=INT64_MAX) -> int:
    """A Python int (not a bool, not a float like 1.5) in [low, high] (default: an int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: '{name}' must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{op}: '{name}' must be an int in [{low}, {high}], got {value}")
    return value


def same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):  # checked before its own checks
            raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and t.device != reference.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but '{reference_name}' is on {reference.device}")


def number(op: str, name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: '{name}' must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{op}: '{name}' must be a finite number, got {value}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{op}: '{name}' must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and v > high:
        raise ValueError(f"{op}: '{name}' must be <= {high}, got {value}")
    return v


def representable(op: str, name: str, value: float, dtype: torch.dtype, *, reciprocal: bool = False,
                   what: str = "") -> float:
    """Raises when a finite Python float leaves the range of ``dtype`` (the dtype the op computes
    in): above its max it would become inf there, a nonzero value below its smallest normal
    would flush to 0 or lose its digits; ``reciprocal``: ``1 / value`` must fit too."""
    fi = torch.finfo(dtype)
    a = abs(value)
    if a > fi.max or (a != 0 and a < fi.tiny) or (reciprocal and a != 0 and 1 / a > fi.max):
        raise ValueError(f"{op}: '{name}' = {value!r} is outside the range the op computes in "
                         f"({dtype}: magnitudes in [{fi.tiny:.3g}, {fi.max:.3g}]"
                         + (", and so must its reciprocal" if reciprocal else "") + f"){what}")
    return value


def no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """Raises for a tensor written in place whose elements may share memory (an ``expand``-ed or
    stride-0 view, or strides that interleave): one write would land on several positions."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1  # elements spanned by the smaller-stride dimensions
    for st, sz in dims:
        if st < span:
            raise ValueError(f"{op}: '{name}' has overlapping memory (shape {tuple(t.shape)}, strides "
                             f"{tuple(t.stride())}: an expanded or stride-0 view?); it is written in "
                             "place, so it needs memory of its own (e.g. .contiguous())")
        span = st * (sz - 1) + span


def flag(op: str, name: str, value) -> bool:
    """A bool option: True or False only (a string like "no" is truthy and would be read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: '{name}' must be True or False, got {value!r}")
    return value


@contextlib.contextmanager
def as_op(op: str, inner: str):
    """Argument errors raised by ``inner`` (an op that validates on a caller's behalf) are
    reported under ``op``: the caller's name, with the same argument names."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = str(e)
        if msg.startswith(inner + ":"):
            raise type(e)(op + msg[len(inner):]) from None
        raise


def choice(op: str, name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{op}: '{name}' must be one of {tuple(options)}, got {value!r}")


def targets_in_range(op: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises if a target is outside [0, vocab) and not ignore_index. Host check: CPU tensors only
    (on CUDA it would synchronize; the kernels there give such rows a NaN loss instead)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    flat = target.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: 'target' holds {int(flat[i])} at flat position {i}, outside "
                         f"[0, {vocab}) and not ignore_index ({ignore_index})")


def lm_head(op, input, weight, target, bias, ignore_index, softcap, names=("input", "target")):
    """Checks shared by the fused LM-head ops; returns the softcap as a float (0 = off).
    ``names``: what the caller calls its hidden states and targets, for the messages."""
    xn, tn = names
    tensor(op, xn, input, min_ndim=1, dtypes=FLOAT_DTYPES)
    tensor(op, "weight", weight, ndim=2)
    tensor(op, tn, target, dtypes=(torch.int64,))
    same_device(op, xn, input, weight=weight, bias=bias, **{tn: target})
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: 'weight' has dtype {weight.dtype} but '{xn}' has {input.dtype}; "
                        "cast one (under autocast, cast the weight to the activations' dtype)")
    H = input.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"{op}: 'weight' must be (V, {H}) to match {xn}'s last dim {H}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: 'weight' has V = 0 classes")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"{op}: '{tn}' must have shape {tuple(input.shape[:-1])} ('{xn}' without its "
                         f"last dim), got {tuple(target.shape)}")
    if bias is not None:
        tensor(op, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: 'bias' must have length V = {weight.shape[0]}, got {bias.shape[0]}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{op}: 'bias' has dtype {bias.dtype} but '{xn}' has {input.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: 'ignore_index' must be an int, got {type(ignore_index).__name__}")
    integer(op, "ignore_index", ignore_index)  # an int64, as the targets are
    if H == 0:
        raise ValueError(f"{op}: '{xn}' has H = 0 features (its last dim): there is nothing to project")
    return 0.0 if softcap is None else number(op, "softcap", softcap, low=0.0, low_open=True)
