"""Backend selection: the one place in ptcore that decides which implementation of an op runs.

Five backends: ``triton`` (kernels/, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
``cuda`` (csrc/cuda, ``ptcore._cuda``), ``cpu`` (csrc/cpu, ``ptcore._C``), ``flash_attn`` (the
flash-attn package's paged kernels, CUDA tensors) and ``torch`` (plain PyTorch, the reference; runs
on any device and dtype). :data:`OPS` is the capability table: for each op, the backends that
implement it and what each takes (devices, dtypes, conditions on the arguments). Every op lists
``torch``.

The choice, the same for every op: a backend forced by :func:`use_backend` (per block) or
``PTCORE_BACKEND=name`` (per process) runs if it can, and otherwise raises
:class:`BackendUnavailable` naming why (the op has no kernel there, the module does not load, the
device or dtype or an argument is not one it takes); it never falls back. Without one, the first
backend of :data:`PREFERENCE` for the tensors' device that implements the op and can run it:
CUDA tensors -> flash_attn, triton, cuda, torch; CPU tensors -> cpu, torch; other devices -> torch.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ptcore import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch", "flash_attn")
PREFERENCE = {"cuda": ("flash_attn", "triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
OTHER_DEVICES = ("torch",)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Devices and dtypes each backend's kernels take (the torch reference takes any floating dtype);
# an op's entry may narrow them.
_DTYPES = {
    "triton": _KERNEL_DTYPES,
    "cuda": _KERNEL_DTYPES,
    "cpu": _KERNEL_DTYPES + (torch.float64,),
    "flash_attn": (torch.float16, torch.bfloat16),
}
_WHERE = {
    "triton": "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)",
    "cuda": "CUDA tensors",
    "cpu": "CPU tensors",
    "flash_attn": "CUDA tensors",
    "torch": "any device",
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("ptcore_backend", default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# The modules behind the backends


@functools.cache
def _flash_attn():
    try:
        import flash_attn
        return flash_attn, None
    except Exception as e:  # ImportError, or a build for another torch / CUDA
        return None, f"flash-attn is not installed or cannot load ({type(e).__name__}: {e})"


def flash_attn_module():
    """The flash-attn package, or None when it does not load."""
    return _flash_attn()[0]


def _module(backend: str):
    """The module holding ``backend``'s kernels (None when it does not load)."""
    if backend == "cpu":
        return _ext.cpu_module()
    if backend == "cuda":
        return _ext.cuda_module()
    if backend == "triton":
        return _ext.triton_kernels()
    if backend == "flash_attn":
        return flash_attn_module()
    raise ValueError(f"backend {backend!r} has no module")


_MODULE_NAME = {"cpu": "ptcore._C", "cuda": "ptcore._cuda", "triton": "ptcore.kernels", "flash_attn": "flash_attn"}


def why_not_loaded(backend: str) -> str | None:
    """None when ``backend``'s module loads in this process (device-independent), else why not."""
    if backend == "flash_attn":
        return _flash_attn()[1]
    return _ext.why_not(backend)


# ---------------------------------------------------------------------------------------------
# The capability table


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    ``kernel``: the attribute of the backend's module that the op calls (checked when the op is
    resolved: an old build may lack it), or None for the torch reference; ``source``: where it is
    written; ``dtypes``: narrows the backend's dtypes; ``when``: conditions on the op's arguments,
    ``when(**args) -> None | why not`` (the keyword arguments the op passes to :func:`resolve`);
    ``limits``: those conditions in words, for the table."""
    source: str
    kernel: Optional[str] = None
    dtypes: Optional[tuple] = None
    when: Optional[Callable[..., Optional[str]]] = None
    limits: str = ""


FLASH_PAGE_MULTIPLE = 256


def _flash_paged(page_size: int | None = None, tree_mask: bool = False, **_) -> str | None:
    if page_size is not None and page_size % FLASH_PAGE_MULTIPLE:
        return (f"flash-attn's block table needs a page size that is a multiple of {FLASH_PAGE_MULTIPLE}, "
                f"got {page_size}")
    if tree_mask:
        return "flash-attn has no arbitrary tree mask"
    return None


def _row_op(kernel: str, cpu: str, cuda: str, triton: str, torch_ref: str) -> dict:
    """An LM-head op: the GEMMs in the vendor BLAS, the backend's per-row pass ``kernel``."""
    return {
        "triton": Impl(triton, kernel),
        "cuda": Impl(cuda, kernel),
        "cpu": Impl(cpu, kernel),
        "torch": Impl(torch_ref),
    }


_CE_ROWS = ("cross_entropy_rows", "csrc/cpu/cross_entropy_rows.cpp", "csrc/cuda/cross_entropy_rows.cu",
            "kernels/cross_entropy.py", "ptcore/ops/rows.py (rows_torch)")
_LOGPROB_ROWS = ("logprob_rows_stats", "csrc/cpu/logprob_rows.cpp", "csrc/cuda/logprob_rows.cu",
                 "kernels/logprobs.py", "ptcore/ops/rows.py (logprob_stats_torch)")


def _paged(kernel: str) -> dict:
    return {
        "triton": Impl("kernels/paged_attention.py", kernel),
        "cpu": Impl("csrc/cpu/paged_attention.cpp", "paged_attention"),
        "flash_attn": Impl("flash-attn (flash_attn_with_kvcache / flash_attn_varlen_func)", None, when=_flash_paged,
                           limits=f"page size a multiple of {FLASH_PAGE_MULTIPLE}, no tree mask"),
        "torch": Impl("ptcore/ops/paged_reference.py"),
    }


def _backbone(kernel: str, torch_ref: str) -> dict:
    """A fused backbone op (ptcore/ops/backbone.py): one elementwise / per-row kernel per backend."""
    return {
        "triton": Impl("kernels/backbone.py", kernel),
        "cuda": Impl("csrc/cuda/backbone.cu", kernel),
        "cpu": Impl("csrc/cpu/backbone.cpp", kernel),
        "torch": Impl(f"ptcore/ops/backbone_backends.py ({torch_ref})"),
    }


OPS: dict[str, dict[str, Impl]] = {
    "linear_cross_entropy": _row_op(*_CE_ROWS),
    "linear_logprobs": _row_op(*_LOGPROB_ROWS),
    "linear_policy_loss": _row_op(*_LOGPROB_ROWS),
    "linear_dpo_loss": _row_op(*_LOGPROB_ROWS),
    "paged_attention_decode": _paged("paged_attention_decode"),
    "paged_attention_extend": _paged("paged_attention_extend"),
    "speculative_verify": {
        "triton": Impl("kernels/speculative.py", "speculative_verify"),
        "cuda": Impl("csrc/cuda/speculative_verify.cu", "speculative_verify"),
        "cpu": Impl("csrc/cpu/speculative_verify.cpp", "speculative_verify"),
        "torch": Impl("ptcore/ops/speculative.py (verify_torch)"),
    },
    "rms_norm": _backbone("rms_norm_forward", "rms_forward_torch"),
    "rope": _backbone("rope", "rope_torch"),
    "swiglu": _backbone("gated_act_forward", "gated_forward_torch"),
    "geglu": _backbone("gated_act_forward", "gated_forward_torch"),
    "speculative_verify_tree": {
        "cpu": Impl("csrc/cpu/speculative_verify.cpp", "speculative_verify_tree"),
        "torch": Impl("ptcore/ops/speculative_tree.py (verify_tree_torch)"),
    },
}

# Why an op lacks a backend, where there is more to say than "no kernel".
_MISSING = {
    ("paged_attention_decode", "cuda"): "ptcore has no CUDA paged attention kernel of its own; flash-attn's paged "
                                        "kernels are the 'flash_attn' backend, triton runs on CUDA tensors too",
    ("paged_attention_extend", "cuda"): "ptcore has no CUDA paged attention kernel of its own; flash-attn's paged "
                                        "kernels are the 'flash_attn' backend, triton runs on CUDA tensors too",
    ("speculative_verify_tree", "triton"): "there is no triton tree kernel (the tree verify runs on cpu and torch)",
    ("speculative_verify_tree", "cuda"): "there is no CUDA tree kernel (the tree verify runs on cpu and torch)",
}


def _check_op(op: str) -> dict[str, Impl]:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; the ops with backends are {sorted(OPS)}") from None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")


def _missing(op: str, backend: str) -> str:
    return _MISSING.get((op, backend)) or f"{op} has no {backend} kernel (its backends: {', '.join(OPS[op])})"


def _device_why(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device}"
    if backend == "flash_attn" and device.type != "cuda":
        return f"flash-attn takes CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _ext.triton_interpreting()):
        return f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
    return None


def _dtype_why(backend: str, dtypes: tuple, dtype: torch.dtype) -> str | None:
    if dtype in dtypes:
        return None
    if backend == "flash_attn":
        return f"flash-attn takes float16/bfloat16, got {dtype}"
    return f"the {backend} backend takes {[str(d) for d in dtypes]}, got {dtype}"


def _kernel_why(op: str, backend: str, impl: Impl) -> str | None:
    """Why the loaded module lacks ``impl``'s kernel (an older build), else None."""
    if impl.kernel is None or backend == "torch":
        return None
    mod = _module(backend)
    if mod is not None and not hasattr(mod, impl.kernel):
        return (f"{_MODULE_NAME[backend]} has no {impl.kernel} (an older build; rebuild: "
                "pip install -e . --no-build-isolation)")
    return None


def cannot_run(backend: str, device: torch.device, dtype: torch.dtype, *, op: str | None = None,
               **args) -> str | None:
    """None if ``backend`` can run ``op`` on tensors of this device and dtype (and these op
    arguments, see :class:`Impl`), else why not. Without ``op``: whether the backend's module
    loads and takes this device and dtype at all."""
    _check_backend(backend)
    impl = None
    if op is not None:
        impl = _check_op(op).get(backend)
        if impl is None:
            return _missing(op, backend)
    why = why_not_loaded(backend)
    if why is not None:
        return why
    if backend == "torch":
        return None
    why = _device_why(backend, device) or _dtype_why(backend, (impl and impl.dtypes) or _DTYPES[backend], dtype)
    if why is not None or impl is None:
        return why
    return _kernel_why(op, backend, impl) or (impl.when(**args) if impl.when else None)


def preference(device: torch.device) -> tuple[str, ...]:
    """The automatic order of backends for tensors on ``device``."""
    return PREFERENCE.get(device.type, OTHER_DEVICES)


def resolve(device: torch.device, dtype: torch.dtype, *, op: str, **args) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype`` (``args``: the facts
    about the op's arguments its table entry looks at, e.g. ``page_size``, ``tree_mask``)."""
    impls = _check_op(op)
    name = requested_backend()
    if name is not None:
        why = cannot_run(name, device, dtype, op=op, **args)
        if why is not None:
            raise BackendUnavailable(f"ptcore backend {name!r} was requested but cannot run: {why} (op {op})")
        return name
    for b in preference(device):
        if b in impls and cannot_run(b, device, dtype, op=op, **args) is None:
            return b
    return "torch"


# ---------------------------------------------------------------------------------------------
# Overrides


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


# ---------------------------------------------------------------------------------------------
# Reports


def status() -> dict[str, str | None]:
    """{backend: None if its module loads in this process else the reason} (device-independent)."""
    return {b: why_not_loaded(b) for b in BACKENDS}


def capability(op: str, backend: str) -> str:
    """What ``backend``'s implementation of ``op`` takes, in words."""
    impl = _check_op(op)[backend]
    if backend == "torch":
        return f"any device, any float dtype [{impl.source}]"
    dtypes = impl.dtypes or _DTYPES[backend]
    text = f"{_WHERE[backend]}; {'/'.join(str(d).removeprefix('torch.') for d in dtypes)}"
    return text + (f"; {impl.limits}" if impl.limits else "") + f" [{impl.source}]"


def table() -> dict[str, dict[str, str | None]]:
    """{op: {backend: None if it implements the op and its module (and kernel) loads here, else
    why not}}, device-independent (device, dtype and argument conditions: :func:`capability`)."""
    out = {}
    for op, impls in OPS.items():
        row = {}
        for b in BACKENDS:
            impl = impls.get(b)
            if impl is None:
                row[b] = _missing(op, b)
            else:
                row[b] = why_not_loaded(b) or _kernel_why(op, b, impl)
        out[op] = row
    return out


def table_lines() -> list[str]:
    """The table as ``ptcore info`` prints it: per op, each backend ``yes`` or ``no (why)``, then,
    where the backend implements the op, what it takes (devices; dtypes; conditions [source])."""
    lines = []
    width = max(map(len, BACKENDS))
    for op, row in table().items():
        lines.append(f"  {op}")
        for b, why in row.items():
            line = f"    {b:<{width}}  " + ("yes" if why is None else f"no ({why})")
            if b in OPS[op]:
                line += f" | {capability(op, b)}"
            lines.append(line)
    return lines


def preference_text() -> str:
    """The automatic order, in words."""
    parts = [f"{dev.upper()} tensors: {' > '.join(order)}" for dev, order in PREFERENCE.items()]
    return "; ".join(parts) + f"; other devices: {' > '.join(OTHER_DEVICES)} (each op takes the first it has)"
