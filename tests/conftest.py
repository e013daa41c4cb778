"""Test set-up: without a GPU, Triton runs in its CPU interpreter (set before ptcore.kernels is
imported); the header says which backends this run exercises and why others are skipped."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU, Triton runs compiled on CUDA tensors (test_gpu.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ptcore.ops import dispatch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--fuzz-scale", type=float, default=1.0,
                     help="tests/test_fuzz.py: cases per op, as a multiple of the default (~25)")


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


# Top-level names a module of the checkout may be imported under. Anything else found inside the
# repository (say its kernels/ folder as `kernels`) shadows an installed package of that name.
_OWN_TOP_LEVEL = {"ptcore", "bench", "tests"}


def checkout_shadows(modules=None) -> list[str]:
    """Imported modules whose top-level name is not ours but whose file lies in the checkout."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.path.realpath(sys.prefix)  # a virtualenv inside the checkout (.venv) is not the checkout
    out = []
    for name, mod in list((modules if modules is not None else sys.modules).items()):
        if name.partition(".")[0] in _OWN_TOP_LEVEL or mod is None:
            continue
        try:  # some modules (torch._classes) have a __path__ that is not a list of paths
            files = [getattr(mod, "__file__", None), *list(getattr(mod, "__path__", None) or [])]
        except TypeError:
            files = [getattr(mod, "__file__", None)]
        for f in files:
            # only absolute paths: torch.ops and torch.classes carry bare names ('_ops.py')
            real = os.path.realpath(f) if isinstance(f, str) and os.path.isabs(f) else ""
            if real.startswith(root + os.sep) and not real.startswith(venv + os.sep):
                out.append(f"{name} -> {f}")
                break
    return out


def pytest_sessionfinish(session, exitstatus):
    """Fails the run when a module the tests imported resolved to a top-level folder of the
    repository by accident (CI's guard against the `kernels` shadowing that broke transformers)."""
    bad = checkout_shadows()
    if bad:
        print("\nmodules imported from the checkout under a foreign top-level name:\n  " + "\n  ".join(bad))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
