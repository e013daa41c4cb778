"""Fused linear cross-entropy, forward + backward (grads for input and weight), side by side: the
bare GEMMs (the limit), ptcore's backends, eager PyTorch, PyTorch's chunked op and the peers
(Cut Cross-Entropy, Liger). The interface is bench/registry.py's."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import ptcore
from ptcore.ops import dispatch

NAME = "linear_cross_entropy"
TITLE = "linear cross-entropy, fwd+bwd"
SIZE_KEYS = ("N", "H", "V")
DEFAULT_SIZES = {"cpu": {"N": 4096, "H": 1024, "V": 32768}, "cuda": {"N": 8192, "H": 2048, "V": 131072}}
LARGE_SIZES = {"N": 16384, "H": 1024, "V": 131072}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
BASELINE = "bare GEMMs"
_FUSED_SCRATCH = 1 << 30  # generous bound on a chunked implementation's logits buffers


def flops(s: dict) -> float:
    """logits = X W^T, grad_input = G W, grad_weight = G^T X: 2NHV each."""
    return 6.0 * s["N"] * s["H"] * s["V"]


def reference(device: str, dtype: torch.dtype) -> str:
    return f"ptcore[{dispatch.resolve(torch.device(device), dtype)}]"


def _missing(module: str, package: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{package} not installed"


def _cce_impl(device: str) -> str:
    return "cce" if device == "cuda" else "torch_compile"  # CCE's Triton kernels need CUDA


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    dev = torch.device(device)
    default = dispatch.resolve(dev, dtype)
    out = [(BASELINE, None)]
    for b in sorted(dispatch.BACKENDS, key=lambda b: b != default):  # ptcore's default first
        why = dispatch.cannot_run(b, dev, dtype)
        if b == "triton" and device == "cpu":
            why = "Triton on CPU runs only under TRITON_INTERPRET=1, an interpreter far too slow to benchmark"
        out.append((f"ptcore[{b}]", why))
    out.append(("eager", None))
    out.append(("torch chunked", None if hasattr(torch.nn, "LinearCrossEntropyOptions") else
                f"torch {torch.__version__} has no chunked F.linear_cross_entropy (PyTorch >= 2.13)"))
    out.append((f"CCE[{_cce_impl(device)}]", _missing("cut_cross_entropy", "cut-cross-entropy")))
    out.append(("Liger", "Liger's kernels are Triton/CUDA-only" if device == "cpu"
                else _missing("liger_kernel", "liger-kernel")))
    return out


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    """Inputs and their grads (grad_weight possibly fp32), plus what the case keeps of [N, V]:
    eager ~3 copies (logits, softmax, its grad), CCE's torch_compile path the same in fp32."""
    size = torch.empty((), dtype=dtype).element_size()
    nv = s["N"] * s["V"]
    inputs = 2 * (s["N"] + s["V"]) * s["H"] * size + s["V"] * s["H"] * 4
    logits = {BASELINE: nv * size, "eager": 3 * nv * size, "CCE[torch_compile]": 3 * nv * 4}
    return inputs + logits.get(case, min(nv * size, _FUSED_SCRATCH))


def _loss_fn(case: str):
    """(x, w, t) -> mean loss, for every case but the baseline."""
    if case.startswith("ptcore["):
        backend = case[len("ptcore["):-1]

        def fn(x, w, t):
            with ptcore.use_backend(backend):
                return ptcore.ops.linear_cross_entropy(x, w, t)
        return fn
    if case == "eager":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if case == "torch chunked":
        opts = torch.nn.LinearCrossEntropyOptions()  # defaults: "auto" chunking and accumulation
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=opts)
    if case.startswith("CCE["):
        from cut_cross_entropy import linear_cross_entropy as cce
        impl = case[len("CCE["):-1]
        return lambda x, w, t: cce(x, w, t, impl=impl)  # default filter_eps, as users get it
    if case == "Liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy  # (input, weight, target, ...) -> loss
    raise KeyError(f"{NAME}: unknown case {case!r}")


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    N, H, V = (s[k] for k in SIZE_KEYS)
    x = torch.randn(N, H, dtype=dtype, device=device)
    w = torch.randn(V, H, dtype=dtype, device=device).mul_(H ** -0.5)  # logits ~ N(0, 1); in place:
    t = torch.randint(0, V, (N,), device=device)  # no transient copy to inflate the peak RSS
    if case == BASELINE:
        # Outputs allocated once (first touched in the warm-up) so only the GEMMs are timed: the
        # strictest denominator. Its extra memory is then the full logits plus the two grads.
        g = torch.empty(N, V, dtype=dtype, device=device)
        gx, gw = torch.empty_like(x), torch.empty_like(w)

        def step():
            torch.mm(x, w.t(), out=g)
            torch.mm(g, w, out=gx)
            torch.mm(g.t(), x, out=gw)
        return step, lambda: None

    fn = _loss_fn(case)
    x.requires_grad_()
    w.requires_grad_()

    def step():
        loss = fn(x, w, t)
        loss.backward()
        return loss.detach()

    def reset():
        x.grad = w.grad = None
    return step, reset
