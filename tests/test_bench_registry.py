"""The benchmark registry is consistent: each registered module answers to its registry name (the
runner's worker processes load a benchmark by its NAME), declares the interface bench/registry.py
documents with values of the documented kinds, and its baseline and reference cases build and run
one step at a tiny size."""
import math

import pytest
import torch

from bench import registry

INTERFACE = ("NAME", "TITLE", "SIZE_KEYS", "DEFAULT_SIZES", "DEFAULT_DTYPE", "BASELINE", "flops", "cases",
             "reference", "estimate_bytes", "build")


def tiny_sizes(bench) -> dict:
    """The cpu default sizes shrunk ~32x (prompts and completions kept >= 8 tokens, groups >= 2)."""
    return {k: max(8 if k in ("P", "C") else 2, v // 32) for k, v in bench.DEFAULT_SIZES["cpu"].items()}


@pytest.mark.parametrize("name", list(registry.BENCHMARKS))
def test_registered_benchmark_answers_to_its_name(name):
    bench = registry.load(name)
    assert bench.NAME == name
    missing = [a for a in INTERFACE if not hasattr(bench, a)]
    assert not missing, f"{name} lacks {missing}"


@pytest.mark.parametrize("name", list(registry.BENCHMARKS))
def test_registered_benchmark_declares_the_documented_interface(name):
    bench = registry.load(name)
    assert isinstance(bench.TITLE, str) and bench.TITLE
    keys = tuple(bench.SIZE_KEYS)
    assert keys and all(isinstance(k, str) for k in keys)
    for device in ("cpu", "cuda"):
        sizes = bench.DEFAULT_SIZES[device]
        assert tuple(sizes) == keys and all(isinstance(v, int) and v > 0 for v in sizes.values()), (device, sizes)
        assert isinstance(getattr(torch, bench.DEFAULT_DTYPE[device]), torch.dtype)
    if hasattr(bench, "LARGE_SIZES"):
        assert tuple(bench.LARGE_SIZES) == keys
    for option, kind in (("REPEATS", dict), ("NOTES", dict), ("SHARED", dict), ("UNIT", str)):
        assert isinstance(getattr(bench, option, kind()), kind), option
    dtype = getattr(torch, bench.DEFAULT_DTYPE["cpu"])
    sizes = tiny_sizes(bench)
    flops = bench.flops(sizes)
    assert isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0
    cases = bench.cases("cpu", dtype)
    names = [c for c, _ in cases]
    assert len(set(names)) == len(names) and all(isinstance(c, str) for c in names)
    assert all(why is None or (isinstance(why, str) and why) for _, why in cases)  # None or the reason
    assert bench.BASELINE in names and bench.reference("cpu", dtype) in names
    for case in names:
        need = bench.estimate_bytes(case, sizes, dtype)
        assert isinstance(need, int) and need > 0, (case, need)


@pytest.mark.parametrize("name", list(registry.BENCHMARKS))
def test_registered_benchmark_runs_a_tiny_case(name):
    """The baseline (the 1.0 of every ratio) and ptcore's reference case: build, one step, reset."""
    bench = registry.load(name)
    dtype = getattr(torch, bench.DEFAULT_DTYPE["cpu"])
    available = dict(bench.cases("cpu", dtype))
    # loop_dpo's reference computes the reference log-probs of its fixed 256 pairs at build time:
    # minutes on a busy CPU, so there only the baseline runs here (bench/trl_loops.py runs the rest)
    run = [bench.BASELINE] + ([] if name == "loop_dpo" else [bench.reference("cpu", dtype)])
    for case in dict.fromkeys(run):
        if available[case] is not None:
            continue  # not runnable here (the reason is the declared one)
        step, reset = bench.build(case, tiny_sizes(bench), dtype, "cpu")
        assert callable(step) and callable(reset)
        out = step()
        if isinstance(out, torch.Tensor):  # a loss returned as the cross-check: a finite number
            assert torch.isfinite(out).all(), (case, out)
        reset()


@pytest.mark.parametrize("name", list(registry.STANDALONE))
def test_standalone_benchmark_has_main(name):
    assert callable(registry.load(name).main)
