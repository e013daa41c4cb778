"""Backend selection: the one place in ptcore that decides which implementation runs.

Four backends: ``triton`` (kernels/, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
``cuda`` (csrc/cuda), ``cpu`` (csrc/cpu) and ``torch`` (plain PyTorch, the reference; runs on any
device and dtype). Defaults: CUDA tensors -> triton, then cuda, then torch; CPU tensors -> cpu, then
torch. ``PTCORE_BACKEND=name`` overrides per process, :func:`use_backend` per block; an explicit
request for a backend that cannot run raises :class:`BackendUnavailable` with the reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ptcore import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch")
# dtypes each backend's kernels take (the torch reference takes any floating dtype).
_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("ptcore_backend", default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops in this block on backend ``name`` (None restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: 'name' must be one of {BACKENDS} or None, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str | None:
    """The backend forced by use_backend() or PTCORE_BACKEND, if any."""
    name = _forced.get()
    if name is None:
        name = os.environ.get("PTCORE_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"PTCORE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def cannot_run(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` can run on tensors of this device and dtype, else why not."""
    why = _ext.why_not(backend)
    if why is not None:
        return why
    if backend == "torch":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _ext.triton_interpreting()):
        return f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    if dtype not in _DTYPES[backend]:
        return f"the {backend} backend takes {[str(d) for d in _DTYPES[backend]]}, got {dtype}"
    return None


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on tensors of ``device`` and ``dtype``."""
    name = requested_backend()
    if name is not None:
        why = cannot_run(name, device, dtype)
        if why is not None:
            raise BackendUnavailable(f"ptcore backend {name!r} was requested but cannot run: {why}")
        return name
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    return next(b for b in order if cannot_run(b, device, dtype) is None)


def status() -> dict[str, str | None]:
    """{backend: None if usable in this process else the reason} (device-independent)."""
    return {b: _ext.why_not(b) for b in BACKENDS}
