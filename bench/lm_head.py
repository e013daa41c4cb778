"""What the LM-head benchmarks share (linear_ce, logprobs, grpo, dpo): the sizes, the FLOP count and
its limit (the bare GEMMs, one case for the whole suite), ptcore's backend cases, the inputs, the
memory estimate, and the timed fwd+bwd step. Each benchmark module declares its Benchmark from
:func:`common` plus its own cases (bench/registry.py)."""
from __future__ import annotations

import importlib.util
import math

import torch

import ptcore
from ptcore.ops import dispatch

from .registry import Headline

SIZE_KEYS = ("N", "H", "V")
DEFAULT_SIZES = {"cpu": {"N": 4096, "H": 1024, "V": 32768}, "cuda": {"N": 8192, "H": 2048, "V": 131072}}
# The quick profile: an eighth of the work, with N/H kept (what the memory ratios depend on: the
# logits N x V against the weight gradient V x H) and H halved, so the GEMMs still dominate the row
# passes (what "of GEMM" and the speedups measure) and the chunked ops still chunk.
QUICK_SIZES = {"cpu": {"N": 2048, "H": 512, "V": 8192}, "cuda": {"N": 4096, "H": 1024, "V": 65536}}
LARGE_SIZES = {"N": 16384, "H": 1024, "V": 131072}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
BASELINE = "bare GEMMs"
# Cases whose result depends only on (sizes, dtype), not on the benchmark: the runner measures
# each once per suite run and shows it in every benchmark's table (bench/run.py).
SHARED = {BASELINE: "lm_head_gemms"}
# Timed runs per case on CPU for the benchmarks with slow peers (log-probs, GRPO, DPO), so that the
# whole suite stays near 6 minutes on a 2-core CPU; linear_ce keeps the runner's default (3).
FEW_REPEATS = {"cpu": 2, "cuda": 10}
SEQ_LEN = 512  # tokens per sequence in the sequence-level benchmarks (GRPO, DPO)
FUSED_SCRATCH = 1 << 30  # generous bound on a chunked implementation's logits buffers
# The op whose capability-table entry (ptcore.ops.dispatch.OPS) picks the backend cases; every
# LM-head op has the same backends, devices and dtypes.
OP = "linear_cross_entropy"


def common(repeats: dict | None = None) -> dict:
    """The Benchmark fields the four LM-head benchmarks share (bench/registry.py)."""
    out = dict(size_keys=SIZE_KEYS, default_sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES,
               large_sizes=LARGE_SIZES, default_dtype=DEFAULT_DTYPE, baseline=BASELINE, shared=SHARED,
               flops=flops, reference=reference)
    return out if repeats is None else {**out, "repeats": repeats}


def headlines(peer: str, memory_peer: str, of_gemm: float, memory: float) -> tuple[Headline, ...]:
    """An LM head's scoreboard: ptcore's fraction of the bare-GEMM rate against its target, its
    speed against ``peer`` and its extra memory against ``memory_peer``'s."""
    return (Headline("of GEMM", "frac_of_gemm", None, (">=", of_gemm)),
            Headline(f"speed vs {peer}", "rate", peer, (">=", 1.0)),
            Headline(f"memory vs {memory_peer}", "extra_peak_mb", memory_peer, ("<=", memory)))


def flops(s: dict) -> float:
    """logits = X W^T, grad_input = G W, grad_weight = G^T X: 2NHV each, whatever the head."""
    return 6.0 * s["N"] * s["H"] * s["V"]


def reference(device: str, dtype: torch.dtype) -> str:
    return f"ptcore[{dispatch.resolve(torch.device(device), dtype, op=OP)}]"


def missing(module: str, package: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{package} not installed"


def head_cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """The bare GEMMs, then ptcore's backends (its default first), each with why it cannot run."""
    dev = torch.device(device)
    default = dispatch.resolve(dev, dtype, op=OP)
    out = [(BASELINE, None)]
    for b in sorted(dispatch.OPS[OP], key=lambda b: b != default):
        why = dispatch.cannot_run(b, dev, dtype, op=OP)
        if b == "triton" and device == "cpu":
            why = "Triton on CPU runs only under TRITON_INTERPRET=1, an interpreter far too slow to benchmark"
        out.append((f"ptcore[{b}]", why))
    return out


def ptcore_backend(case: str) -> str | None:
    """'ptcore[cpu]' -> 'cpu'; None for other cases."""
    return case[len("ptcore["):-1] if case.startswith("ptcore[") else None


def peer_backend(case: str, name: str) -> str | None:
    """'CCE[torch_compile]' -> 'torch_compile' for name 'CCE'."""
    return case[len(name) + 1:-1] if case.startswith(name + "[") else None


def estimate_bytes(case: str, s: dict, dtype: torch.dtype, full_logits: dict[str, float]) -> int:
    """Inputs and their grads (grad_weight possibly fp32) plus what the case keeps of [N, V]:
    ``full_logits[case]`` copies of it in fp32 for the cases that materialize it (the baseline
    one in ``dtype``), else a chunked implementation's scratch."""
    size = torch.empty((), dtype=dtype).element_size()
    nv = s["N"] * s["V"]
    inputs = 2 * (s["N"] + s["V"]) * s["H"] * size + s["V"] * s["H"] * 4
    if case == BASELINE:
        return inputs + nv * size
    if case in full_logits:
        return inputs + int(full_logits[case] * nv * 4)
    return inputs + min(nv * size, FUSED_SCRATCH)


def typical_logp(V: int) -> float:
    """The mean log-prob of a random target under logits ~ N(0, 1): -(log V + 1/2)."""
    return -(math.log(V) + 0.5)


def head_inputs(s: dict, dtype: torch.dtype, device: str, lead: tuple[int, ...] | None = None):
    """``x ~ N(0, 1)`` of shape ``lead + (H,)`` (default ``(N,)``), ``w ~ N(0, 1/H)`` ``[V, H]`` (logits
    of order 1), ``t`` uniform in ``[0, V)`` of shape ``lead``; all tokens are targets."""
    N, H, V = (s[k] for k in SIZE_KEYS)
    lead = (N,) if lead is None else lead
    assert math.prod(lead) == N, f"lead shape {lead} does not hold N={N} tokens"
    x = torch.randn(*lead, H, dtype=dtype, device=device)
    w = torch.randn(V, H, dtype=dtype, device=device).mul_(H ** -0.5)  # in place: no transient
    t = torch.randint(0, V, lead, device=device)  # copy to inflate the peak RSS
    return x, w, t


def sequences(s: dict, per_group: int = 1) -> tuple[int, int]:
    """(groups, T): N tokens as ``groups`` groups of ``per_group`` sequences of T tokens, T =
    SEQ_LEN or, for small N, as many as fit (a DPO pair is a group of 2)."""
    T = min(SEQ_LEN, s["N"] // per_group)
    if T < 1 or s["N"] % (per_group * T):
        raise ValueError(f"N={s['N']} is not a whole number of {per_group} x {T}-token sequences")
    return s["N"] // (per_group * T), T


def bare_gemms(x: torch.Tensor, w: torch.Tensor):
    """(step, reset) of the three GEMMs no implementation avoids, into outputs allocated once
    (first touched in the warm-up) so only the GEMMs are timed: the strictest denominator (fresh
    outputs each step cost 5% more on the 2-core CPU). Its extra memory is these outputs, the full
    logits plus the two grads (``held_bytes``: they exist before the baseline), plus any peak above."""
    x = x.reshape(-1, x.shape[-1])
    g = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    gx, gw = torch.empty_like(x), torch.empty_like(w)

    def step():
        torch.mm(x, w.t(), out=g)
        torch.mm(g, w, out=gx)
        torch.mm(g.t(), x, out=gw)
    step.held_bytes = sum(b.numel() * b.element_size() for b in (g, gx, gw))
    return step, lambda: None


def fwd_bwd(fn, leaves, case: str = ""):
    """(step, reset) for ``fn() -> (objective, value)``: step runs the forward, the backward of
    ``objective`` into ``leaves`` (which it marks as requiring grad) and returns ``value``, the
    number compared across cases; reset drops the grads (untimed). For a ``ptcore[...]`` case the
    step runs under ``ptcore.use_backend`` of that backend."""
    backend = ptcore_backend(case)
    for p in leaves:
        p.requires_grad_()

    def step():
        with ptcore.use_backend(backend):
            objective, value = fn()
            objective.backward()
        return value.detach()

    def reset():
        for p in leaves:
            p.grad = None
    return step, reset


def rl_loss_cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """The RL-loss benchmarks' rows: the LM-head cases, eager, and Liger's chunked loss."""
    return head_cases(device, dtype) + [("eager", None), ("Liger", missing("liger_kernel", "liger-kernel"))]


def rl_loss_estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    """eager keeps ~3 fp32 copies of the [N, V] logits (logits, log-softmax, its grad), one more
    in low precision (the logits before .float())."""
    return estimate_bytes(case, s, dtype, {"eager": 3 if dtype == torch.float32 else 4})
