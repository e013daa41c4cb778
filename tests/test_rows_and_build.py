"""The per-row kernels directly (poisoned outputs), the memory bound, and the CUDA build."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptcore.ops.rows import CROSS_ENTROPY_ROWS
from tests.conftest import cpu_backends
from tests.reference import assert_rule

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_write_every_output(backend, dtype):
    """Outputs start as NaN, so any element a kernel forgets to write fails the comparison; the
    values against the float64 rows under the tolerance rule, the naive baseline being the torch
    rows in ``dtype`` (fp32 math, the gradient stored in ``dtype``). The slack is fp32's for both
    dtypes: fp16 only rounds the stored gradient, which the naive fp16 error already measures."""
    n, V = 5, 77
    z = (torch.randn(n, V) * 3).to(dtype)
    t = torch.tensor([3, -100, 76, 0, 40])
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=8.0, write_grad=True)
    scale = torch.rand(n)
    ref_z, ref_loss, ref_lse = z.double(), torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    CROSS_ENTROPY_ROWS["torch"](ref_z, t, ref_loss, ref_lse, scale.double(), **opts)
    naive_z, naive_loss, naive_lse = z.clone(), torch.empty(n), torch.empty(n)
    CROSS_ENTROPY_ROWS["torch"](naive_z, t, naive_loss, naive_lse, scale, **opts)
    got_z = z.clone()
    got_loss, got_lse = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    CROSS_ENTROPY_ROWS[backend](got_z, t, got_loss, got_lse, scale, **opts)
    for what, got, ref, naive in (("loss", got_loss, ref_loss, naive_loss), ("lse", got_lse, ref_lse, naive_lse),
                                  ("grad", got_z, ref_z, naive_z)):
        assert got.dtype == naive.dtype and torch.isfinite(got).all(), what
        assert_rule(got, ref, naive, f"{backend} {dtype} {what}", dtype=torch.float32)
    assert torch.all(got_z[1] == 0) and got_loss[1] == 0


def test_memory_is_bounded_by_the_chunk_budget():
    """N=8192, V=32768 fp32 logits would take 1 GiB; with an 8 MiB budget the op's extra peak
    memory stays near the gradients' own size (measured in a fresh process)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    code = (
        "import torch, ptcore\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "N, H, V = 8192, 64, 32768\n"
        "x = torch.randn(N, H, requires_grad=True); w = torch.randn(V, H, requires_grad=True)\n"
        "t = torch.randint(0, V, (N,))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS\n"
        "base = hwm()\n"
        "with ptcore.chunk_budget(8 << 20):\n"
        "    ptcore.ops.linear_cross_entropy(x, w, t).backward()\n"
        "print((hwm() - base) / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mb = float(out.stdout.strip().splitlines()[-1])
    # grad_weight (8 MiB) + grad_input (2 MiB) + one chunk (8 MiB) + allocator slack; logits: 1024 MiB.
    assert extra_mb < 120, extra_mb


def _load_builder():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ptcore_csrc_build", ROOT / "csrc" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The CUDA module builds (sm_80, sm_90 + PTX, static runtime) and loads without a GPU."""
    builder = _load_builder()
    if builder.find_cuda_home() is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here (set CUDA_HOME)")
    built = builder.build(tmp_path, cuda=True)
    assert "_cuda" in built and built["_cuda"].exists()
    deps = subprocess.run(["ldd", str(built["_cuda"])], capture_output=True, text=True).stdout
    assert "libcudart" not in deps, "the CUDA runtime must be linked statically"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_cuda', {str(built['_cuda'])!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "n, why = m.device_count(); print(n, why, m.runtime_version())\n"
        "try:\n"
        "    m.cross_entropy_rows(1, 'int8', 1, 4, 4, 1, 1, 1, 1, 0, 0, -100, 0.0, 0.0, 0.0, False, 0)\n"
        "except ValueError as e: print('raised', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised cross_entropy_rows: 'logits' dtype 'int8'" in out.stdout
    print("CUDA module:", out.stdout.splitlines()[0])


def test_build_without_cuda_when_disabled(tmp_path):
    builder = _load_builder()
    env_before = os.environ.get("PTCORE_CUDA")
    os.environ["PTCORE_CUDA"] = "0"
    try:
        assert builder.want_cuda() == (False, "PTCORE_CUDA=0")
    finally:
        if env_before is None:
            del os.environ["PTCORE_CUDA"]
        else:
            os.environ["PTCORE_CUDA"] = env_before
    built = builder.build(tmp_path, cuda=False)
    assert set(built) == set(builder.cpu_modules()) and all(p.exists() for p in built.values())
