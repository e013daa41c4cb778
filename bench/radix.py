"""RadixCache operations per second: ``match_prefix`` then ``insert`` of N random sequences that
share prefixes (a few long "system prompts", then branches off earlier sequences, then random
tails), into an empty cache, with ptcore's C++ tree (through its Python wrapper, argument checks
included), with the brute-force Python model the property tests use (RadixModel, the oracle in
tests/radix_oracle.py: the benchmark runs from the checkout), and, for
scale, with a plain Python radix tree (PythonTrie below: no checks, locks or eviction).

The interface is bench/registry.py's. This is not a FLOP benchmark: ``flops`` counts operations
(UNIT = "op"; 2N: one match and one insert per sequence), so the table shows operations per second
and the rate relative to the baseline row, the Python model:
ptcore's speedup over it (target >= 20). ``python -m bench.radix`` prints the same comparison in
operations per second.

Slots are worked out once in build() (the operation sequence is deterministic), as a paged cache
would: the matched full pages are reused, a partially matched page gets a fresh copy-on-write
page, the rest fresh pages. All rows replay the same calls; each returns the total of insert's
"already cached" lengths, which the runner cross-checks.
"""
from __future__ import annotations

import random
import sys
import time

import torch

from ptcore.cache import RadixCache

from .registry import Benchmark, Headline

SIZE_KEYS = ("N", "T", "P")  # sequences, max tokens per sequence, page size
DEFAULT_SIZES = {"cpu": {"N": 1000, "T": 128, "P": 1}, "cuda": {"N": 1000, "T": 128, "P": 1}}
BASELINE = "python model"
REPEATS = {"cpu": 3, "cuda": 3}
NOTES = {"ptcore[cpp]": "C++ trie (csrc/cpu/radix_cache.cpp) through ptcore.cache.RadixCache",
         "python model": "tests/radix_oracle.py RadixModel: brute force, every operation scans all nodes",
         "python trie": "a plain Python radix tree (dict of children, no checks, no locks): for scale"}
VOCAB = 32000


def flops(s: dict) -> int:
    return 2 * s["N"]  # operations, not FLOPs (see the module docstring)


def _radix_model():
    """The brute-force model, the test suite's oracle (tests/radix_oracle.py): None from a wheel."""
    try:
        from tests.radix_oracle import RadixModel
    except ImportError:
        return None
    return RadixModel


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    model = None if _radix_model() else "needs the checkout's tests/radix_oracle.py (not installed)"
    return [(BASELINE, model), ("python trie", None), ("ptcore[cpp]", None)]


def reference(device: str, dtype: torch.dtype) -> str:
    return "ptcore[cpp]"


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    return 400 * s["N"] * s["T"] + (1 << 28)


def workload(N: int, T: int, P: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(tokens, slots) of N sequences sharing prefixes, with the slots a paged cache would pass."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(T // 2)] for _ in range(8)]
    seqs = []
    for i in range(N):
        if seqs and rng.random() < 0.6:  # branch off an earlier sequence
            base = rng.choice(seqs)
            base = base[:rng.randint(1, len(base))]
        else:
            base = rng.choice(prompts)[:rng.randint(T // 8, T // 2)]
        tail = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max(1, T - len(base))))]
        seqs.append((base + tail)[:T])
    oracle = _radix_model()
    model, next_page, out = oracle(P) if oracle and N * T <= 4096 else None, 0, []
    cache = RadixCache(P)
    for tokens in seqs:
        m = cache.match_prefix(tokens)
        keep = m.length // P * P  # full pages reused; a partial one is copied into a fresh page
        pages = -(-len(tokens) // P) - m.length // P
        fresh = list(range(next_page, next_page + pages))
        next_page += pages
        slots = m.slots[:keep] + [fresh[d // P - m.length // P] * P + d % P for d in range(keep, len(tokens))]
        cache.insert(tokens, slots)
        if model is not None:  # small sizes: the model agrees
            assert model.match_prefix(tokens).length == m.length
            model.insert(tokens, slots)
        out.append((tokens, slots))
    return out


class PythonTrie:
    """What a radix tree in plain Python looks like (match_prefix and insert only, the same
    splits and page reporting, no argument checks, locks or eviction): the scale of the gain."""

    def __init__(self, page_size: int):
        self.P = page_size
        self.root = [[], [], {}]  # node: [tokens, slots, children by first token]

    def _walk(self, tokens):
        node, i, n, out = self.root, 0, len(tokens), []
        while i < n:
            child = node[2].get(tokens[i])
            if child is None:
                break
            key = child[0]
            k = 1
            while k < len(key) and i + k < n and key[k] == tokens[i + k]:
                k += 1
            if k < len(key):  # split: a new upper node takes the first k tokens
                upper = [key[:k], child[1][:k], {key[k]: child}]
                child[0], child[1] = key[k:], child[1][k:]
                node[2][tokens[i]] = child = upper
            out += child[1]
            node, i = child, i + k
        return i, out, node

    def match_prefix(self, tokens):
        length, slots, _ = self._walk(tokens)
        P = self.P
        if P > 1:
            for start in range(0, length, P):
                end = min(start + P, length)
                page = slots[end - 1] // P
                slots[start:end] = [page * P + d % P for d in range(start, end)]
        return length, slots

    def insert(self, tokens, slots):
        length, _, node = self._walk(tokens)
        if length < len(tokens):
            node[2][tokens[length]] = [tokens[length:], slots[length:], {}]
        return length


def replay(cache, work) -> int:
    total = 0
    for tokens, slots in work:
        cache.match_prefix(tokens)
        total += cache.insert(tokens, slots)
    return total


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    work = workload(s["N"], s["T"], s["P"])
    impl = {"ptcore[cpp]": RadixCache, BASELINE: _radix_model(), "python trie": PythonTrie}[case]
    state = {"cache": impl(s["P"])}

    def step():
        return replay(state["cache"], work)

    def reset():
        state["cache"] = impl(s["P"])
    return step, reset


def main(argv: list[str]) -> int:
    """``python -m bench.radix [N T P]``: operations per second of both, in-process."""
    s = dict(zip(SIZE_KEYS, map(int, argv))) if argv else dict(DEFAULT_SIZES["cpu"])
    rates = {}
    for case, _ in cases("cpu", torch.float32):
        step, reset = build(case, s, torch.float32, "cpu")
        times = []
        for _ in range(REPEATS["cpu"]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            reset()
        rates[case] = flops(s) / sorted(times)[len(times) // 2]
    print(f"{BENCHMARK.title}: N={s['N']} T={s['T']} P={s['P']}")
    print(f"{'implementation':<14} {'ops/s':>12} {'us/op':>9} {'x model':>8} {'x trie':>7}")
    for case, r in rates.items():
        print(f"{case:<14} {r:>12,.0f} {1e6 / r:>9.2f} {r / rates[BASELINE]:>8.1f} {r / rates['python trie']:>7.2f}")
    return 0


BENCHMARK = Benchmark(
    name="radix_cache", title="RadixCache match_prefix + insert", size_keys=SIZE_KEYS,
    default_sizes=DEFAULT_SIZES, quick_sizes=DEFAULT_SIZES,  # already a second's work
    large_sizes={"N": 1000, "T": 512, "P": 16},
    default_dtype={"cpu": "float32", "cuda": "float32"},  # unused: no tensors
    baseline=BASELINE, flops=flops, cases=cases, reference=reference, estimate_bytes=estimate_bytes,
    build=build, notes=NOTES, repeats=REPEATS, quick_repeats={"cpu": 1, "cuda": 1}, unit="op",
    headlines=(Headline("speed vs python model", "rate", BASELINE, (">=", 20.0)),))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
