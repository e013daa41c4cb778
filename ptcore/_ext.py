"""Loads the optional compiled and Triton parts of ptcore, remembering why a part is missing.

Importing ptcore never fails because one of these is absent: each loader returns the module or
None, and :func:`why_not` gives the reason, which ``ptcore info`` prints and an explicit request
for that backend raises.
"""
from __future__ import annotations

import functools
import importlib
import os

_reasons: dict[str, str] = {}


@functools.cache
def cpu_module():
    """ptcore._C (C++ CPU kernels) or None."""
    try:
        return importlib.import_module("ptcore._C")
    except ImportError as e:
        _reasons["cpu"] = f"ptcore._C is not built or cannot load ({e}); reinstall with `pip install -e . --no-build-isolation`"
        return None


@functools.cache
def cuda_module():
    """ptcore._cuda (CUDA kernels) when it loads and a CUDA device is visible, else None."""
    import torch

    try:
        mod = importlib.import_module("ptcore._cuda")
    except ImportError as e:
        _reasons["cuda"] = f"ptcore._cuda is not built or cannot load ({e}); it is built when nvcc is found (PTCORE_CUDA=1 forces it)"
        return None
    if not torch.cuda.is_available():
        _reasons["cuda"] = "torch.cuda.is_available() is False (no GPU or a CPU-only torch build)"
        return None
    count, why = mod.device_count()
    if count == 0:
        _reasons["cuda"] = f"the CUDA runtime sees no device ({why})"
        return None
    return mod


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_kernels():
    """ptcore.kernels (Triton) when Triton can run here: a CUDA device, or the interpreter."""
    import torch

    try:
        import triton  # noqa: F401
    except ImportError as e:
        _reasons["triton"] = f"triton is not installed ({e})"
        return None
    if not (torch.cuda.is_available() or triton_interpreting()):
        _reasons["triton"] = "no CUDA device, and TRITON_INTERPRET=1 (the CPU interpreter) is not set"
        return None
    try:
        return importlib.import_module("ptcore.kernels")
    except Exception as e:  # a broken triton install must not break `import ptcore`
        _reasons["triton"] = f"ptcore.kernels failed to import ({type(e).__name__}: {e})"
        return None


_LOADERS = {"cpu": cpu_module, "cuda": cuda_module, "triton": triton_kernels}


def why_not(backend: str) -> str | None:
    """None when ``backend`` is usable in this process, else the reason it is not."""
    if backend == "torch":
        return None
    if backend not in _LOADERS:
        return f"unknown backend {backend!r}"
    return None if _LOADERS[backend]() is not None else _reasons.get(backend, "unavailable")
