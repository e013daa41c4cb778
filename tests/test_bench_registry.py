"""The benchmark registry is consistent: every registered name loads a declaration of that name,
each Benchmark's fields have the documented kinds, its headlines name cases it has, both profiles'
sizes are complete, and its baseline and reference cases build and run one step at a tiny size;
each Standalone has a main."""
import math

import pytest
import torch

from bench import registry
from bench.registry import Benchmark, Headline, Standalone

BENCHMARKS = [n for n in registry.REGISTRY if isinstance(registry.load(n), Benchmark)]
STANDALONE = [n for n in registry.REGISTRY if isinstance(registry.load(n), Standalone)]


def tiny_sizes(bench) -> dict:
    """The cpu quick sizes shrunk ~32x (prompts and completions kept >= 8 tokens, groups >= 2)."""
    return {k: max(8 if k in ("P", "C") else 2, v // 32) for k, v in bench.quick_sizes["cpu"].items()}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown benchmark 'nope'; known: linear_cross_entropy"):
        registry.load("nope")


def test_every_entry_is_a_benchmark_or_a_standalone():
    assert set(BENCHMARKS) | set(STANDALONE) == set(registry.REGISTRY)
    assert BENCHMARKS and STANDALONE


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_declares_the_documented_fields(name):
    bench = registry.load(name)
    assert bench.name == name and isinstance(bench.title, str) and bench.title
    keys = tuple(bench.size_keys)
    assert keys and all(isinstance(k, str) for k in keys)
    for device in ("cpu", "cuda"):
        for profile in registry.PROFILES:
            sizes = bench.sizes(profile, device)
            assert tuple(sizes) == keys and all(isinstance(v, int) and v > 0 for v in sizes.values()), \
                (profile, device, sizes)
        assert isinstance(getattr(torch, bench.default_dtype[device]), torch.dtype)
        assert bench.repeats[device] >= 1 and bench.quick_repeats[device] >= 1
    if bench.large_sizes is not None:
        assert tuple(bench.large_sizes) == keys
    dtype = getattr(torch, bench.default_dtype["cpu"])
    sizes = tiny_sizes(bench)
    flops = bench.flops(sizes)
    assert isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0
    cases = bench.cases("cpu", dtype)
    names = [c for c, _ in cases]
    assert len(set(names)) == len(names) and all(isinstance(c, str) for c in names)
    assert all(why is None or (isinstance(why, str) and why) for _, why in cases)  # None or the reason
    assert bench.baseline in names and bench.reference("cpu", dtype) in names
    for case in names:
        need = bench.estimate_bytes(case, sizes, dtype)
        assert isinstance(need, int) and need > 0, (case, need)
    # the scoreboard: at least one headline, each naming cases the benchmark has and a known figure
    assert bench.headlines and all(isinstance(h, Headline) for h in bench.headlines)
    for h in bench.headlines:
        assert h.figure in ("rate", "extra_peak_mb", "frac_of_gemm"), h
        assert h.peer is None or h.peer in names, (h, names)
        assert h.ptcore is None or h.ptcore in names, (h, names)
        assert h.target is None or (h.target[0] in (">=", "<=") and h.target[1] > 0), h
    # the quick profile runs a subset: the baseline, the reference and the headlines' cases
    quick = bench.case_names("quick", "cpu", dtype)
    assert quick <= set(names) | {h.peer for h in bench.headlines if h.peer}
    assert {bench.baseline, bench.reference("cpu", dtype)} <= quick


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_a_tiny_case(name):
    """The baseline (the 1.0 of every ratio) and ptcore's reference case: build, one step, reset."""
    bench = registry.load(name)
    dtype = getattr(torch, bench.default_dtype["cpu"])
    available = dict(bench.cases("cpu", dtype))
    # loop_dpo's reference computes the reference log-probs of its fixed 256 pairs at build time:
    # minutes on a busy CPU, so there only the baseline runs here (bench/trl_loops.py runs the rest)
    run = [bench.baseline] + ([] if name == "loop_dpo" else [bench.reference("cpu", dtype)])
    for case in dict.fromkeys(run):
        if available[case] is not None:
            continue  # not runnable here (the reason is the declared one)
        step, reset = bench.build(case, tiny_sizes(bench), dtype, "cpu")
        assert callable(step) and callable(reset)
        out = step()
        if isinstance(out, torch.Tensor):  # a loss returned as the cross-check: a finite number
            assert torch.isfinite(out).all(), (case, out)
        reset()


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_has_main(name):
    bench = registry.load(name)
    assert bench.name == name and callable(bench.main) and bench.title
