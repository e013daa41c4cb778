"""Speculative verification, one call per step: B sequences of K sampled drafts each, draft and
target probabilities over V tokens (float32), side by side: the bare race (the limit), ptcore's
``speculative_verify`` on each backend (its float64 draws included), the same with the CPU input
checks on, and an eager PyTorch implementation as one would write it (rejection test, residual
renormalized, ``torch.multinomial``). The interface is bench/registry.py's.

``python -m bench.speculative`` runs the size sweep of :data:`SWEEP` (each size's table, JSON and
PNG as ``python -m bench --only speculative_verify --sizes B,K,V`` would write them).

"Of GEMM" here is the fraction of the bare race's rate: the one pass over one probability row per
sequence (``max(0, p - q) / E`` and its argmax, E drawn beforehand) that no verification avoids.
GFLOP/s counts 3 operations per entry of that pass (subtract, clamp, divide) whatever a case does.
"""
from __future__ import annotations

import sys

import torch

import ptcore
from ptcore.ops import dispatch

from .registry import Benchmark, Headline

NAME = "speculative_verify"
OP = NAME  # its entry in ptcore.ops.dispatch.OPS
SIZE_KEYS = ("B", "K", "V")
DEFAULT_SIZES = {"cpu": {"B": 8, "K": 5, "V": 151936}, "cuda": {"B": 64, "K": 5, "V": 151936}}
SWEEP = {"cpu": [{"B": 1, "K": 4, "V": 32000}, {"B": 8, "K": 5, "V": 151936}, {"B": 32, "K": 8, "V": 32000}],
         "cuda": [{"B": 1, "K": 4, "V": 32000}, {"B": 64, "K": 5, "V": 151936}, {"B": 256, "K": 8, "V": 32000}]}
BASELINE = "bare race"
NOTES = {
    "bare race": "one row per sequence: argmax(max(0, p - q) / E), E drawn beforehand",
    "ptcore[cpu] + checks": "validate=True (the CPU default): NaN / negative / sums / ids scanned",
    "eager PyTorch": "accept u < p/q, renormalized residual, torch.multinomial",
}


def flops(s: dict) -> int:
    return 3 * s["B"] * s["V"]


def reference(device: str, dtype: torch.dtype) -> str:
    return f"ptcore[{dispatch.resolve(torch.device(device), dtype, op=OP)}]"


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    out = [(BASELINE, None)]
    for b in (("triton", "cuda", "torch") if device == "cuda" else ("cpu", "torch")):
        out.append((f"ptcore[{b}]", dispatch.cannot_run(b, torch.device(device), dtype, op=OP)))
    if device == "cpu":
        out.append(("ptcore[cpu] + checks", dispatch.cannot_run("cpu", torch.device(device), dtype, op=OP)))
    out.append(("eager PyTorch", None))
    return out


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    B, K, V = s["B"], s["K"], s["V"]
    size = torch.finfo(dtype).bits // 8
    inputs = (2 * K + 1) * B * V * size
    return 2 * inputs + 8 * B * V * 8  # float64 draws and eager temporaries


def inputs(s: dict, dtype: torch.dtype, device: str):
    """Target rows p; draft rows q close to p (acceptance ~0.6); drafts sampled from q."""
    B, K, V = s["B"], s["K"], s["V"]
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, K + 1, V, device=device, generator=g) * 2
    p = torch.softmax(logits, -1).to(dtype)
    q = torch.softmax(logits[:, :K] + torch.randn(B, K, V, device=device, generator=g) * 0.7, -1).to(dtype)
    x = torch.multinomial(q.reshape(-1, V).float(), 1, generator=g).reshape(B, K)
    return x, q, p


def eager_verify(x, q, p, generator):
    """Speculative verification as commonly written in plain PyTorch (a batch, no custom kernel)."""
    B, K = x.shape
    px = p[:, :K].gather(2, x.unsqueeze(2)).squeeze(2).float()
    qx = q.gather(2, x.unsqueeze(2)).squeeze(2).float()
    u = torch.rand(B, K, device=x.device, generator=generator)
    accept = u < px / qx
    n = accept.long().cumprod(1).sum(1)
    rows = torch.arange(B, device=x.device)
    pr = p[rows, n].float()
    qr = torch.where((n < K).unsqueeze(1), q[rows, n.clamp(max=K - 1)].float(), 0.0)
    res = (pr - qr).clamp(min=0)
    res = res / res.sum(1, keepdim=True)
    tok = torch.multinomial(res, 1, generator=generator).squeeze(1)
    out = torch.where(torch.arange(K + 1, device=x.device) < n.unsqueeze(1), torch.cat([x, x[:, :1]], 1), -1)
    return n, out.scatter(1, n.unsqueeze(1), tok.unsqueeze(1))


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    x, q, p = inputs(s, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    if case == BASELINE:
        B, V = s["B"], s["V"]
        e = torch.empty(B, V, dtype=torch.float64, device=device).exponential_(generator=g)
        pr, qr = p[:, 0], q[:, 0]

        def step():  # returns None: nothing to cross-check against a verification
            w = (pr.double() - qr.double()).clamp_(min=0)
            w.div_(e).argmax(1)
        return step, lambda: None
    if case == "eager PyTorch":
        def step():  # other random draws than ptcore's: no value to cross-check
            eager_verify(x, q, p, g)
        return step, lambda: None
    backend = case[len("ptcore["):case.index("]")]
    validate = case.endswith("+ checks")

    def step():
        with ptcore.use_backend(backend):
            n, _ = ptcore.ops.speculative_verify(x, q, p, generator=g, validate=validate)
        return float(n.double().mean())
    return step, lambda: None


def main(argv: list[str]) -> int:
    """Runs the size sweep through the suite runner (tables, JSON, PNG per size)."""
    from . import run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = 0
    for s in SWEEP[device]:
        status |= run.main(["--only", NAME, "--sizes", ",".join(str(s[k]) for k in SIZE_KEYS)] + argv)
    return status


BENCHMARK = Benchmark(
    name=NAME, title="speculative verification, one call (sampled drafts)", size_keys=SIZE_KEYS,
    default_sizes=DEFAULT_SIZES, quick_sizes=DEFAULT_SIZES,  # milliseconds per call already
    large_sizes={"B": 64, "K": 8, "V": 151936}, default_dtype={"cpu": "float32", "cuda": "float32"},
    baseline=BASELINE, flops=flops, cases=cases, reference=reference, estimate_bytes=estimate_bytes,
    build=build, notes=NOTES, repeats={"cpu": 20, "cuda": 50}, quick_repeats={"cpu": 10, "cuda": 50},
    headlines=(Headline("speed vs eager PyTorch", "rate", "eager PyTorch", (">=", 1.0)),
               Headline("of the bare race", "frac_of_gemm", None)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
