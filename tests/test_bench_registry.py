"""The benchmark registry is consistent: each registered module answers to its registry name (the
runner's worker processes load a benchmark by its NAME) and has the interface the runner uses."""
import pytest

from bench import registry

INTERFACE = ("NAME", "TITLE", "SIZE_KEYS", "DEFAULT_SIZES", "DEFAULT_DTYPE", "BASELINE", "flops", "cases",
             "reference", "estimate_bytes", "build")


@pytest.mark.parametrize("name", list(registry.BENCHMARKS))
def test_registered_benchmark_answers_to_its_name(name):
    bench = registry.load(name)
    assert bench.NAME == name
    missing = [a for a in INTERFACE if not hasattr(bench, a)]
    assert not missing, f"{name} lacks {missing}"


@pytest.mark.parametrize("name", list(registry.STANDALONE))
def test_standalone_benchmark_has_main(name):
    assert callable(registry.load(name).main)
