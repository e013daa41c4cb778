"""pytest-benchmark cases at small sizes, for quick local comparisons:

    pytest bench/ --benchmark-only

They live in bench/, outside the default test path (pyproject's testpaths = ["tests"]), so
``pytest tests`` never collects them. The inputs and steps are bench/linear_ce.py's.
"""
import pytest
import torch

from bench import linear_ce

pytest.importorskip("pytest_benchmark")

SIZES = {"N": 256, "H": 128, "V": 4096}


@pytest.mark.parametrize("case", ["ptcore[cpu]", "ptcore[torch]", "eager"])
def test_linear_cross_entropy_fwd_bwd(benchmark, case):
    why = dict(linear_ce.cases("cpu", torch.float32))[case]
    if why:
        pytest.skip(why)
    step, reset = linear_ce.build(case, SIZES, torch.float32, "cpu")
    benchmark.group = f"linear_cross_entropy fwd+bwd N={SIZES['N']} H={SIZES['H']} V={SIZES['V']} fp32"
    benchmark.pedantic(step, setup=reset, rounds=20, warmup_rounds=1)
