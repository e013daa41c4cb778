"""Backend choice, overrides, and that importing ptcore never fails for a missing backend."""
import os
import subprocess
import sys

import pytest
import torch

import ptcore
from ptcore.ops import dispatch


def test_default_cpu_tensors_use_cpu_backend():
    expected = "cpu" if dispatch.cannot_run("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    assert dispatch.resolve(torch.device("cpu"), torch.float32) == expected


def test_context_manager_overrides_and_restores(monkeypatch):
    monkeypatch.delenv("PTCORE_BACKEND", raising=False)
    before = dispatch.resolve(torch.device("cpu"), torch.float32)
    with ptcore.use_backend("torch"):
        assert dispatch.resolve(torch.device("cpu"), torch.float32) == "torch"
        with ptcore.use_backend(None):
            assert dispatch.resolve(torch.device("cpu"), torch.float32) == before
    assert dispatch.resolve(torch.device("cpu"), torch.float32) == before


def test_env_override(monkeypatch):
    monkeypatch.setenv("PTCORE_BACKEND", "torch")
    assert dispatch.resolve(torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("PTCORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PTCORE_BACKEND"):
        dispatch.resolve(torch.device("cpu"), torch.float32)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="'name' must be one of"):
        with ptcore.use_backend("mkl"):
            pass


def test_explicit_unavailable_backend_raises_with_reason():
    """cuda cannot run on CPU tensors (nor here at all without a GPU): the error says why."""
    x, w, t = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    with ptcore.use_backend("cuda"), pytest.raises(ptcore.BackendUnavailable, match="'cuda' was requested but cannot run: .+"):
        ptcore.ops.linear_cross_entropy(x, w, t)


def test_float64_falls_back_where_kernels_lack_it():
    assert dispatch.cannot_run("triton", torch.device("cpu"), torch.float64) is not None
    assert dispatch.resolve(torch.device("cpu"), torch.float64) in ("cpu", "torch")


def _run_py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_import_never_fails_without_compiled_modules():
    """Block ptcore._C and ptcore._cuda from loading: import works, info explains, torch runs."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('ptcore._C', 'ptcore._cuda'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, ptcore\n"
        "from ptcore.info import report\n"
        "print(report())\n"
        "x, w, t = torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 1, 5])\n"
        "print('loss', float(ptcore.ops.linear_cross_entropy(x, w, t)))\n"
        "try:\n"
        "    with ptcore.use_backend('cpu'):\n"
        "        ptcore.ops.linear_cross_entropy(x, w, t)\n"
        "except ptcore.BackendUnavailable as e:\n"
        "    print('raised', e)\n"
    )
    out = _run_py(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "cpu     unavailable: ptcore._C is not built or cannot load (blocked for the test)" in out.stdout
    assert "loss " in out.stdout
    assert "raised ptcore backend 'cpu' was requested but cannot run" in out.stdout


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "ptcore", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for b in dispatch.BACKENDS:
        assert f"  {b:<7} " in out.stdout
    assert "torch   available" in out.stdout
