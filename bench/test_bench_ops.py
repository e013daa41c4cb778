"""pytest-benchmark cases at small sizes, for quick local comparisons:

    pytest bench/ --benchmark-only

They live in bench/, outside the default test path (pyproject's testpaths = ["tests"]), so
``pytest tests`` never collects them. The inputs and steps are the benchmark modules' (bench/linear_ce.py,
bench/logprobs.py, bench/grpo.py).
"""
import pytest
import torch

from . import registry

pytest.importorskip("pytest_benchmark")

SIZES = {"N": 256, "H": 128, "V": 4096}


def _fwd_bwd(benchmark, name, case):
    bench = registry.load(name)
    why = dict(bench.cases("cpu", torch.float32))[case]
    if why:
        pytest.skip(why)
    step, reset = bench.build(case, SIZES, torch.float32, "cpu")
    benchmark.group = f"{name} fwd+bwd N={SIZES['N']} H={SIZES['H']} V={SIZES['V']} fp32"
    benchmark.pedantic(step, setup=reset, rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("case", ["ptcore[cpu]", "ptcore[torch]", "eager"])
def test_linear_cross_entropy_fwd_bwd(benchmark, case):
    _fwd_bwd(benchmark, "linear_cross_entropy", case)


@pytest.mark.parametrize("case", ["ptcore[cpu]", "ptcore[torch]", "eager"])
def test_linear_logprobs_fwd_bwd(benchmark, case):
    _fwd_bwd(benchmark, "linear_logprobs", case)


@pytest.mark.parametrize("case", ["ptcore[cpu]", "ptcore[torch]", "eager"])
def test_linear_policy_loss_fwd_bwd(benchmark, case):
    _fwd_bwd(benchmark, "linear_policy_loss", case)


@pytest.mark.parametrize("name,sizes", [("paged_attention_decode", {"B": 4, "L": 300, "Q": 1, "S": 16}),
                                        ("paged_attention_extend", {"B": 2, "L": 40, "Q": 24, "S": 16})])
@pytest.mark.parametrize("case", ["ptcore[cpu]", "ptcore[torch]", "torch SDPA (contiguous)"])
def test_paged_attention(benchmark, name, sizes, case):
    bench = registry.load(name)
    why = dict(bench.cases("cpu", torch.float32))[case]
    if why:
        pytest.skip(why)
    step, reset = bench.build(case, sizes, torch.float32, "cpu")
    benchmark.group = f"{name} " + " ".join(f"{k}={v}" for k, v in sizes.items()) + " fp32"
    benchmark.pedantic(step, setup=reset, rounds=3, warmup_rounds=1)
