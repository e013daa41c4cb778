"""Fused linear cross-entropy, forward + backward (grads for input and weight), side by side: the
bare GEMMs (the limit), ptcore's backends, eager PyTorch, PyTorch's chunked op and the peers
(Cut Cross-Entropy, Liger). The interface is bench/registry.py's; sizes, inputs, the baseline and
the step are bench/lm_head.py's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptcore
from . import lm_head
from .lm_head import BASELINE, bare_gemms, fwd_bwd, head_cases, head_inputs, missing, peer_backend
from .registry import Benchmark, Headline

NAME = "linear_cross_entropy"


def _cce_impl(device: str) -> str:
    return "cce" if device == "cuda" else "torch_compile"  # CCE's Triton kernels need CUDA


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    out = head_cases(device, dtype)
    out.append(("eager", None))
    out.append(("torch chunked", None if hasattr(torch.nn, "LinearCrossEntropyOptions") else
                f"torch {torch.__version__} has no chunked F.linear_cross_entropy (PyTorch >= 2.13)"))
    out.append((f"CCE[{_cce_impl(device)}]", missing("cut_cross_entropy", "cut-cross-entropy")))
    out.append(("Liger", "Liger's kernels are Triton/CUDA-only" if device == "cpu"
                else missing("liger_kernel", "liger-kernel")))
    return out


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    """eager keeps ~3 copies of the [N, V] logits (logits, softmax, its grad), CCE's torch_compile
    path the same in fp32."""
    return lm_head.estimate_bytes(case, s, dtype, {"eager": 3, "CCE[torch_compile]": 3})


def _loss_fn(case: str):
    """(x, w, t) -> mean loss, for every case but the baseline."""
    if case.startswith("ptcore["):
        return ptcore.ops.linear_cross_entropy  # under use_backend (lm_head.fwd_bwd)
    if case == "eager":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if case == "torch chunked":
        opts = torch.nn.LinearCrossEntropyOptions()  # defaults: "auto" chunking and accumulation
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    if case.startswith("CCE["):
        from cut_cross_entropy import linear_cross_entropy as cce
        impl = peer_backend(case, "CCE")
        return lambda x, w, t: cce(x, w, t, impl=impl)  # default filter_eps, as users get it
    if case == "Liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy  # (input, weight, target, ...) -> loss
    raise KeyError(f"{NAME}: unknown case {case!r}")


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    x, w, t = head_inputs(s, dtype, device)
    if case == BASELINE:
        return bare_gemms(x, w)
    fn = _loss_fn(case)

    def loss():
        value = fn(x, w, t)
        return value, value
    return fwd_bwd(loss, [x, w], case)


BENCHMARK = Benchmark(
    name=NAME, title="linear cross-entropy, fwd+bwd", cases=cases, estimate_bytes=estimate_bytes, build=build,
    headlines=(*lm_head.headlines("torch chunked", "eager", of_gemm=0.95, memory=1 / 6),
               Headline("memory vs torch chunked", "extra_peak_mb", "torch chunked", ("<=", 1.0))),
    **lm_head.common())
