"""The fused backbone ops against the eager Hugging Face code they replace, forward + backward, at
SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 query / 3 key-value heads of 64): per op,
ptcore's (the dispatch's backend) beside eager, tokens per second and extra peak memory.

- ``rms_norm``: the decoder's ``residual + x`` then LlamaRMSNorm (fp32 math, cast, times weight),
  against ptcore's one fused op returning (y, the new residual).
- ``rope``: transformers' ``apply_rotary_pos_emb`` on q and k in its ``[B, heads, T, D]`` layout
  (views of the projections, as in the model), against ptcore's rope on ``[B, T, heads, D]``.
- ``swiglu``: ``silu(gate) * up`` against ptcore's swiglu.

The interface is bench/registry.py's. Each op is its own pair of cases; its headlines compare
them (the table's "vs baseline" column is relative to the eager RMSNorm, for scale only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptcore
from .registry import Benchmark, Headline

NAME = "backbone_ops"
OPS = ("rms_norm", "rope", "swiglu")
SIZE_KEYS = ("N", "H", "I", "HQ", "HK", "D")
SMOLLM2 = {"H": 576, "I": 1536, "HQ": 9, "HK": 3, "D": 64}
DEFAULT_SIZES = {"cpu": {"N": 2048, **SMOLLM2}, "cuda": {"N": 16384, **SMOLLM2}}
QUICK_SIZES = {"cpu": {"N": 1024, **SMOLLM2}, "cuda": {"N": 8192, **SMOLLM2}}
EPS = 1e-5


def _case(op: str, impl: str) -> str:
    return f"{op}[{impl}]"


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    return [(_case(op, impl), None) for op in OPS for impl in ("ptcore", "eager")]


def reference(device: str, dtype: torch.dtype) -> str:
    return _case("rms_norm", "ptcore")


def flops(s: dict) -> float:
    return float(s["N"])  # tokens: the unit of every rate


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    """Inputs, their grads and the upstream gradients, plus eager's intermediates: generous."""
    width = max(s["H"], s["I"], (s["HQ"] + s["HK"]) * s["D"])
    return 24 * s["N"] * width * 4


def _rms(s, dtype, device, impl):
    N, H = s["N"], s["H"]
    x, r = (torch.randn(N, H, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(H, dtype=dtype, device=device)).requires_grad_()
    if impl == "ptcore":
        return (x, r, w), lambda: ptcore.ops.rms_norm(x, w, EPS, residual=r)

    def eager():  # the decoder layer's add, then LlamaRMSNorm.forward
        h = r + x
        f = h.to(torch.float32)
        f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + EPS)
        return w * f.to(dtype), h
    return (x, r, w), eager


def _rope(s, dtype, device, impl):
    N, HQ, HK, D = s["N"], s["HQ"], s["HK"], s["D"]
    q = torch.randn(1, N, HQ, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(1, N, HK, D, dtype=dtype, device=device, requires_grad=True)
    ang = torch.arange(N, device=device, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=device)
    ang = torch.cat([ang, ang], -1)[None]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if impl == "ptcore":
        return (q, k), lambda: ptcore.ops.rope(q, k, cos, sin)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return (q, k), lambda: apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def _swiglu(s, dtype, device, impl):
    g, u = (torch.randn(s["N"], s["I"], dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    if impl == "ptcore":
        return (g, u), lambda: ptcore.ops.swiglu(g, u)
    return (g, u), lambda: F.silu(g) * u


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    op, impl = case[:-1].split("[")
    torch.manual_seed(0)  # the same inputs for both implementations of an op
    leaves, fn = {"rms_norm": _rms, "rope": _rope, "swiglu": _swiglu}[op](s, dtype, device, impl)
    probe = fn()
    probe = probe if isinstance(probe, tuple) else (probe,)
    upstream = [torch.randn_like(o) for o in probe]  # fixed output gradients, made once
    del probe

    def step():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, upstream)
        # No loss returned: the runner cross-checks one value across all cases, and each op's
        # outputs differ (tests/test_backbone_ops.py checks the values).

    def reset():
        for p in leaves:
            p.grad = None
    reset()
    return step, reset


HEADLINES = tuple(h for op in OPS for h in (
    Headline(f"{op} speed vs eager", "rate", _case(op, "eager"), (">=", 1.0), ptcore=_case(op, "ptcore")),
    Headline(f"{op} memory vs eager", "extra_peak_mb", _case(op, "eager"), ("<=", 1.0), ptcore=_case(op, "ptcore")),
))

BENCHMARK = Benchmark(
    name=NAME, title="fused backbone ops vs eager HF code, fwd+bwd (SmolLM2 shapes)", size_keys=SIZE_KEYS,
    default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES, default_dtype={"cpu": "float32", "cuda": "bfloat16"},
    baseline=_case("rms_norm", "eager"), flops=flops, cases=cases, reference=reference,
    estimate_bytes=estimate_bytes, build=build, headlines=HEADLINES, unit="token",
    notes={_case("rms_norm", "eager"): "the table's 1.0; compare each op's pair (headlines)"})
