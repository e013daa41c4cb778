"""Argument checks shared by the public ops: each failure names the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(op: str, name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
           dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: '{name}' must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: '{name}' must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{op}: '{name}' must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{op}: '{name}' is on {t.device} but '{reference_name}' is on {reference.device}")


def number(op: str, name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: '{name}' must be a number, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{op}: '{name}' must not be NaN")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{op}: '{name}' must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and v > high:
        raise ValueError(f"{op}: '{name}' must be <= {high}, got {value}")
    return v


def choice(op: str, name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{op}: '{name}' must be one of {tuple(options)}, got {value!r}")


def targets_in_range(op: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises if a target is outside [0, vocab) and not ignore_index. Host check: CPU tensors only
    (on CUDA it would synchronize; the kernels there give such rows a NaN loss instead)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: 'target' holds {int(target[i])} at flat position {i}, outside "
                         f"[0, {vocab}) and not ignore_index ({ignore_index})")
