"""Test set-up: without a GPU, Triton runs in its CPU interpreter (set before ptcore.kernels is
imported); the header says which backends this run exercises and why others are skipped."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU, Triton runs compiled on CUDA tensors (test_gpu.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ptcore.ops import dispatch  # noqa: E402


def pytest_report_header(config):
    return ["ptcore backends: " + ", ".join(
        f"{b}={'yes' if why is None else 'no (' + why + ')'}" for b, why in dispatch.status().items())]


def cpu_backends():
    """Backends that run on CPU tensors here; a missing one is a printed skip, never silent."""
    out = []
    for b in ("torch", "cpu", "triton"):
        why = dispatch.cannot_run(b, torch.device("cpu"), torch.float32)
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=f"backend {b}: {why}")) if why else b)
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
