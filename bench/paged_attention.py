"""Paged attention, decode: one new token for each of B sequences of L positions, over a paged KV
cache with shuffled pages, through ``layers`` layers (one step = one decode step of a small model's
attention: ``paged_attention_decode`` once per layer): DECODE below; EXTEND times the extend op
(prefill: Q new tokens per sequence) with the same code.

Shapes of a small model: 8 query heads, 2 KV heads (GQA 4), head dim 64, ``layers`` = 8; sizes
``B`` sequences, ``L`` positions each (prefix + new tokens), ``Q`` new tokens per sequence (1: the
decode op), ``S`` page size. The interface is bench/registry.py's.

Rows: ``ptcore[cpu]`` (C++ kernel), ``ptcore[torch]`` (the gather-then-attend reference),
``ptcore[triton]`` and ``ptcore[flash_attn]`` (flash-attn) on CUDA, and ``torch SDPA (contiguous)``:
``scaled_dot_product_attention`` on K/V already contiguous per sequence, the no-paging anchor and
the baseline of the ``of GEMM`` column (here: the fraction of SDPA's rate). GFLOP/s counts the
attention's useful work, ``4 * Hq * D`` per (query, visible key) pair.
``python -m bench.paged_attention [B L Q S]`` prints the decode and extend comparison in-process.
"""
from __future__ import annotations

import sys
import time

import torch

import ptcore
from ptcore.ops import dispatch, paged_attention_decode, paged_attention_extend

from .registry import Benchmark, Headline

SIZE_KEYS = ("B", "L", "Q", "S")
DEFAULT_SIZES = {"cpu": {"B": 64, "L": 512, "Q": 1, "S": 16}, "cuda": {"B": 128, "L": 4096, "Q": 1, "S": 256}}
EXTEND_SIZES = {"cpu": {"B": 4, "L": 512, "Q": 256, "S": 16}, "cuda": {"B": 16, "L": 4096, "Q": 2048, "S": 256}}
BASELINE = "torch SDPA (contiguous)"
REPEATS = {"cpu": 5, "cuda": 20}
NOTES = {"ptcore[torch]": "reference: gathers the pages into padded K/V, then attends",
         BASELINE: "K/V contiguous per sequence (no paging, no gather): the anchor"}
HQ, HKV, D, LAYERS = 8, 2, 64, 8


def flops(s: dict) -> int:
    B, L, Q = s["B"], s["L"], s["Q"]
    pairs = Q * (L - Q) + Q * (Q + 1) // 2  # (query, visible key) pairs per sequence, causal
    return 4 * HQ * D * B * pairs * LAYERS


def _backends(device: str, dtype: torch.dtype, page_size: int) -> list[tuple[str, str | None]]:
    out = []
    names = ("cpu", "torch") if device == "cpu" else ("triton", "flash_attn", "torch")
    dev = torch.device(device)
    for b in names:
        if b == "triton" and device == "cpu":
            why = "Triton runs only in its interpreter on the CPU"
        else:  # decode and extend have the same table entries
            why = dispatch.cannot_run(b, dev, dtype, op="paged_attention_decode", page_size=page_size, tree_mask=False)
        out.append((f"ptcore[{b}]", why))
    return out


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    S = DEFAULT_SIZES[device]["S"]
    return _backends(device, dtype, S) + [(BASELINE, None)]


def reference(device: str, dtype: torch.dtype) -> str:
    return "ptcore[cpu]" if device == "cpu" else "ptcore[triton]"


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    item = torch.empty(0, dtype=dtype).element_size()
    kv = 2 * LAYERS * s["B"] * -(-s["L"] // s["S"]) * s["S"] * HKV * D * item
    scores = 4 * s["B"] * HQ * s["Q"] * s["L"] * 3  # the reference's fp32 scores and probabilities
    return 2 * kv + scores + (1 << 28)


def make_inputs(s: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """A pool [layers, pages, S, Hkv, D] whose pages are handed out shuffled, the block table, the
    queries, and the same K/V contiguous per sequence [layers, B, Hkv, L, D] for SDPA."""
    g = torch.Generator().manual_seed(seed)
    B, L, Q, S = s["B"], s["L"], s["Q"], s["S"]
    per_seq = -(-L // S)
    P = B * per_seq
    k_pool = torch.randn(LAYERS, P, S, HKV, D, generator=g).to(dtype)
    v_pool = torch.randn(LAYERS, P, S, HKV, D, generator=g).to(dtype)
    table = torch.randperm(P, generator=g).reshape(B, per_seq).to(torch.int32)
    pos = torch.arange(L)
    pages, offs = table[:, pos // S].long(), pos % S
    k_seq = k_pool[:, pages, offs].permute(0, 1, 3, 2, 4)  # [layers, B, Hkv, L, D]
    v_seq = v_pool[:, pages, offs].permute(0, 1, 3, 2, 4)
    q = torch.randn(LAYERS, B * Q, HQ, D, generator=g).to(dtype)
    out = dict(k_pool=k_pool, v_pool=v_pool, table=table, q=q, k_seq=k_seq.contiguous(), v_seq=v_seq.contiguous(),
               seq_lens=torch.full((B,), L, dtype=torch.int32),
               cu=torch.arange(B + 1, dtype=torch.int32) * Q)
    return {k: v.to(device) for k, v in out.items()}


def make_step(case: str, s: dict, x: dict):
    B, L, Q = s["B"], s["L"], s["Q"]
    if case == BASELINE:
        # bottom-right causal mask of the new tokens (None when Q == 1: all L keys are visible)
        mask = None if Q == 1 else (torch.arange(L, device=x["q"].device)[None, :]
                                    <= torch.arange(L - Q, L, device=x["q"].device)[:, None])
        qs = x["q"].reshape(LAYERS, B, Q, HQ, D).transpose(2, 3)  # [layers, B, Hq, Q, D]

        def step():
            for layer in range(LAYERS):
                torch.nn.functional.scaled_dot_product_attention(qs[layer], x["k_seq"][layer], x["v_seq"][layer],
                                                                 attn_mask=mask, enable_gqa=True)
        return step
    backend = case[len("ptcore["):-1]

    def step():
        with ptcore.use_backend(backend):
            for layer in range(LAYERS):
                if Q == 1:
                    paged_attention_decode(x["q"][layer], x["k_pool"][layer], x["v_pool"][layer], x["table"],
                                           x["seq_lens"])
                else:
                    paged_attention_extend(x["q"][layer], x["k_pool"][layer], x["v_pool"][layer], x["table"],
                                           x["seq_lens"], x["cu"])
    return step


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    step = make_step(case, s, make_inputs(s, dtype, device))
    return step, (lambda: None)


def compare(s: dict, repeats: int = 5) -> None:
    """In-process: median wall and CPU (process) ms per step of each row, and wall-time ratios to
    ptcore[cpu]. On a shared machine the CPU time is the steadier of the two (with one thread it
    is the work done; with more it also counts the threads' spin-waiting)."""
    x = make_inputs(s, torch.float32, "cpu")
    ms, cpu = {}, {}
    for case, why in _backends("cpu", torch.float32, s["S"]) + [(BASELINE, None)]:
        if why:
            print(f"{case}: skipped: {why}")
            continue
        step = make_step(case, s, x)
        step()
        times, cpus = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        ms[case] = sorted(times)[len(times) // 2] * 1e3
        cpu[case] = sorted(cpus)[len(cpus) // 2] * 1e3
    kind = "decode" if s["Q"] == 1 else "extend"
    print(f"paged attention {kind}: B={s['B']} L={s['L']} Q={s['Q']} S={s['S']} fp32, {LAYERS} layers, "
          f"{torch.get_num_threads()} threads")
    print(f"{'implementation':<26} {'ms/step':>9} {'cpu ms':>8} {'GFLOP/s':>8} {'time / ptcore[cpu]':>19}")
    for case, t in ms.items():
        print(f"{case:<26} {t:>9.2f} {cpu[case]:>8.1f} {flops(s) / t / 1e6:>8.1f} {t / ms['ptcore[cpu]']:>19.2f}")


def main(argv: list[str]) -> int:
    """``python -m bench.paged_attention [B L Q S]``: decode and extend at the default sizes, or the given size."""
    if argv:
        compare(dict(zip(SIZE_KEYS, map(int, argv))))
        return 0
    compare(DEFAULT_SIZES["cpu"])
    compare(EXTEND_SIZES["cpu"])
    return 0


def benchmark(kind: str) -> Benchmark:
    """Decode (one new token per sequence) or extend (prefill: Q new tokens attending to their L - Q
    cached positions and causally to each other), same inputs, rows and columns."""
    full = DEFAULT_SIZES if kind == "decode" else EXTEND_SIZES
    # the quick profile: a quarter of the sequences (extend: half), the same lengths and pages
    quick = {d: {**v, "B": max(1, v["B"] // (4 if kind == "decode" else 2))} for d, v in full.items()}
    return Benchmark(
        name=f"paged_attention_{kind}", title=f"Paged attention {kind} ({LAYERS} layers, Hq={HQ}, Hkv={HKV}, D={D})",
        size_keys=SIZE_KEYS, default_sizes=full, quick_sizes=quick,
        large_sizes={"B": 64, "L": 1024, "Q": 1, "S": 16} if kind == "decode" else {"B": 1, "L": 1024, "Q": 1024, "S": 16},
        default_dtype={"cpu": "float32", "cuda": "bfloat16"}, baseline=BASELINE, flops=flops, cases=cases,
        reference=reference, estimate_bytes=estimate_bytes, build=build, notes=NOTES, repeats=REPEATS,
        quick_repeats=REPEATS,
        # paged K/V at least as fast as contiguous K/V
        headlines=(Headline(f"speed vs {BASELINE}", "rate", BASELINE, (">=", 1.0)),
                   Headline("speed vs ptcore[torch] (gather)", "rate", "ptcore[torch]", (">=", 1.0))))


DECODE, EXTEND = benchmark("decode"), benchmark("extend")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
