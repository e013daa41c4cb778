"""Loads the optional compiled and Triton parts of ptcore, remembering why a part is missing.

Importing ptcore never fails because one of these is absent: each loader returns the module or
None, and :func:`why_not` gives the reason, which ``ptcore info`` prints and an explicit request
for that backend raises.

The CPU kernels come in ISA variants (csrc/build.py): ``ptcore._C`` holds everything at the
portable baseline (x86-64-v2), ``ptcore._C_v3`` (AVX2) and ``ptcore._C_v4`` (AVX-512) the
compute-bound kernels again. :func:`cpu_module` asks _C's CPUID check which levels this CPU and
OS run and serves the best variant's kernels under _C's names; ``PTCORE_CPU_ISA=v2|v3|v4`` forces
a lower one (a level the CPU lacks, or one not built, raises). A ``PTCORE_CPU_ARCH=native`` build
is one module with no variants. :func:`cpu_variant` says which was chosen and why.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import types

_reasons: dict[str, str] = {}

CPU_ISAS = ("v2", "v3", "v4")  # x86-64 levels, lowest first; "v2" is ptcore._C itself
CPU_ISA_NAMES = {"v2": "x86-64-v2 (SSE4.2, POPCNT)", "v3": "x86-64-v3 (AVX2, FMA, BMI2)",
                 "v4": "x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)"}
_cpu_choice: dict = {}


class CpuIsaError(RuntimeError):
    """PTCORE_CPU_ISA asks for a CPU variant that this build lacks or this CPU cannot run."""


def _variant_module_name(isa: str) -> str:
    return "ptcore._C" if isa == "v2" else f"ptcore._C_{isa}"


def _built_variants() -> list[str]:
    return ["v2"] + [v for v in CPU_ISAS[1:] if importlib.util.find_spec(_variant_module_name(v)) is not None]


def _missing(base, isa: str) -> list[str]:
    """The features of level ``isa`` and below that this CPU / OS lacks (as __builtin_cpu_supports
    names them); [] when the module predates cpu_features."""
    feats = base.cpu_features() if hasattr(base, "cpu_features") else {}
    names = {"v2": ("popcnt", "sse3", "ssse3", "sse4.1", "sse4.2"),
             "v3": ("avx", "avx2", "bmi", "bmi2", "fma", "f16c"),
             "v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")}
    return [f for lvl in CPU_ISAS[:CPU_ISAS.index(isa) + 1] for f in names[lvl] if not feats.get(f, False)]


def _choose_cpu_variant(base) -> dict:
    """{isa, module, why, built, supported, forced}; raises CpuIsaError for a bad PTCORE_CPU_ISA."""
    forced = os.environ.get("PTCORE_CPU_ISA", "").strip().lower() or None
    if forced == "auto":
        forced = None
    isa = getattr(base, "isa", None)
    arch = getattr(base, "build_arch", "unknown")
    if isa not in CPU_ISAS:  # one module: PTCORE_CPU_ARCH=native or another -march, or not x86-64
        if forced is not None:
            raise CpuIsaError(f"PTCORE_CPU_ISA={forced}: this ptcore._C is one module built for "
                              f"-march={arch} (PTCORE_CPU_ARCH), with no ISA variants to choose from; "
                              "rebuild without PTCORE_CPU_ARCH for the dispatched build")
        what = ("PTCORE_CPU_ARCH=native: one module for the build machine's CPU (not portable)" if arch == "native"
                else "the compiler's default target (not x86-64)" if arch == "default"
                else f"PTCORE_CPU_ARCH={arch}: one module, no run-time dispatch")
        return {"isa": arch, "module": "ptcore._C", "why": f"built with {what}", "built": [arch],
                "supported": [], "forced": None}
    levels = base.cpu_isa_levels()
    built = _built_variants()
    supported = [v for v in CPU_ISAS if levels.get(v, False)]
    if forced is not None:
        if forced not in CPU_ISAS:
            raise CpuIsaError(f"PTCORE_CPU_ISA must be one of {', '.join(CPU_ISAS)} or auto, got {forced!r}")
        if forced not in built:
            raise CpuIsaError(f"PTCORE_CPU_ISA={forced}: {_variant_module_name(forced)} ({CPU_ISA_NAMES[forced]}) "
                              f"is not built (built: {', '.join(built)}); reinstall with "
                              "`pip install -e . --no-build-isolation`")
        if forced not in supported:
            raise CpuIsaError(f"PTCORE_CPU_ISA={forced}: this CPU (or its OS) cannot run {CPU_ISA_NAMES[forced]}: "
                              f"it lacks {', '.join(_missing(base, forced)) or 'a required feature'}; loading "
                              f"{_variant_module_name(forced)} would die with SIGILL "
                              f"(this CPU runs: {', '.join(supported) or 'none'})")
        best = max((v for v in built if v in supported), key=CPU_ISAS.index)
        return {"isa": forced, "module": _variant_module_name(forced), "built": built, "supported": supported,
                "forced": forced, "why": f"forced by PTCORE_CPU_ISA={forced} (the best for this CPU: {best})"}
    runnable = [v for v in built if v in supported] or ["v2"]
    isa = runnable[-1]
    top = CPU_ISAS[-1]
    if isa == top:
        why = f"the CPU and OS run {CPU_ISA_NAMES[isa]}, the highest level built"
    elif top in supported:
        why = f"the CPU runs {CPU_ISA_NAMES[top]} but {', '.join(v for v in CPU_ISAS if v not in built)} is not built"
    else:
        nxt = CPU_ISAS[CPU_ISAS.index(isa) + 1]
        why = (f"the CPU lacks {CPU_ISA_NAMES[nxt]} (missing {', '.join(_missing(base, nxt)) or 'a feature'})"
               if nxt not in supported else f"{_variant_module_name(nxt)} is not built")
    return {"isa": isa, "module": _variant_module_name(isa), "built": built, "supported": supported,
            "forced": None, "why": why}


def _with_variant(base, variant, choice: dict):
    """A module object with every public name of ``base`` and, over them, the variant's kernels."""
    mod = types.ModuleType(f"ptcore._C[{choice['isa']}]",
                           f"ptcore._C with the kernels of {choice['module']} ({CPU_ISA_NAMES[choice['isa']]})")
    mod.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("__")})
    mod.__dict__.update({k: v for k, v in vars(variant).items() if not k.startswith("__")})
    mod.__file__ = getattr(variant, "__file__", None)
    return mod


@functools.cache
def _cpu_base():
    try:
        return importlib.import_module("ptcore._C")
    except ImportError as e:
        _reasons["cpu"] = f"ptcore._C is not built or cannot load ({e}); reinstall with `pip install -e . --no-build-isolation`"
        return None


@functools.cache
def _cpu_module_cached():
    base = _cpu_base()
    if base is None:
        return None
    choice = _choose_cpu_variant(base)
    mod = base
    if choice["module"] != "ptcore._C":
        try:
            mod = _with_variant(base, importlib.import_module(choice["module"]), choice)
        except ImportError as e:
            if choice["forced"]:
                raise CpuIsaError(f"PTCORE_CPU_ISA={choice['forced']}: {choice['module']} cannot load ({e})") from e
            choice = {**choice, "isa": "v2", "module": "ptcore._C",
                      "why": f"{choice['module']} cannot load ({e}); the baseline instead"}
    _cpu_choice.clear()
    _cpu_choice.update(choice)
    return mod


def cpu_module():
    """The C++ CPU kernels (ptcore._C, with the chosen ISA variant's kernels) or None when
    ptcore._C is missing. Raises CpuIsaError when PTCORE_CPU_ISA asks for a variant that is not
    built or that this CPU cannot run (never silently another one)."""
    return _cpu_module_cached()


def cpu_variant() -> dict | None:
    """Which CPU variant :func:`cpu_module` serves: {"isa", "module", "why", "built", "supported",
    "forced"}; None when ptcore._C is missing. Raises CpuIsaError as cpu_module does."""
    return dict(_cpu_choice) if cpu_module() is not None else None


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


def cpu_variant_text() -> str:
    """One line for ``ptcore info``: the CPU variant chosen and why."""
    choice = cpu_variant()
    if choice is None:
        return f"none ({_reasons.get('cpu', 'ptcore._C unavailable')})"
    if choice["isa"] not in CPU_ISAS:
        return f"{choice['module']}, {choice['why']}"
    return (f"{choice['isa']} = {choice['module']}, {CPU_ISA_NAMES[choice['isa']]}: {choice['why']} "
            f"(built: {', '.join(choice['built'])}; this CPU runs: {', '.join(choice['supported']) or 'none'}; "
            "PTCORE_CPU_ISA=v2|v3|v4 forces one)")
