"""Shared by the tests/test_train_*.py files: tiny models and data, run configs, metric compare."""
import pytest
import torch

from ptcore.train import TrainConfig
from ptcore.train.loop import TIMING_KEYS
from ptcore.train.tiny import load_model_and_tokenizer

# Smaller than the demo's tiny model: these tests check the math of the loop, not learning.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny GEMMs on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0, dtype=None):
    return load_model_and_tokenizer("tiny", seed=seed, dtype=dtype, **SMALL)


def config(tmp_path, name="run", cls=TrainConfig, **kw):
    """A small run's config: a TrainConfig, or the objective's ``cls`` with its options in ``kw``."""
    base = dict(output_dir=str(tmp_path / name), max_steps=3, batch_size=2, max_length=48, lr=1e-3,
                progress=False, save_final=False, log_every=100)
    base.update(kw)
    return cls(**base)


def sft_rows(n=12, seed=0):
    from ptcore.train.tasks import TASKS
    return [{"prompt": p.prompt, "completion": p.solution} for p in TASKS["addition"].problems(n, seed)]


def math_of(metrics):
    """Metrics lines without the wall-clock fields (those differ between any two runs)."""
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def same_params(a, b, *, exact=True, atol=0.0):
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        if exact:
            assert torch.equal(p1, p2), n1
        else:
            torch.testing.assert_close(p1, p2, rtol=0, atol=atol, msg=n1)
