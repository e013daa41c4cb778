"""Backend choice, overrides, and that importing ptcore never fails for a missing backend."""
import os
import subprocess
import sys

import pytest
import torch

import ptcore
from ptcore.ops import dispatch

LCE = "linear_cross_entropy"


def test_default_cpu_tensors_use_cpu_backend():
    expected = "cpu" if dispatch.cannot_run("cpu", torch.device("cpu"), torch.float32) is None else "torch"
    assert dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE) == expected


def test_context_manager_overrides_and_restores(monkeypatch):
    monkeypatch.delenv("PTCORE_BACKEND", raising=False)
    before = dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE)
    with ptcore.use_backend("torch"):
        assert dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE) == "torch"
        with ptcore.use_backend(None):
            assert dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE) == before
    assert dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE) == before


def test_env_override(monkeypatch):
    monkeypatch.setenv("PTCORE_BACKEND", "torch")
    assert dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE) == "torch"
    monkeypatch.setenv("PTCORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PTCORE_BACKEND"):
        dispatch.resolve(torch.device("cpu"), torch.float32, op=LCE)


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
    assert dispatch.resolve(torch.device("cpu"), torch.float64, op=LCE) in ("cpu", "torch")


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


# ---- the capability table: one dispatch for every op ----

# Every op of ptcore.ops that has more than the torch implementation, i.e. chooses a backend.
DISPATCHED_OPS = ("linear_cross_entropy", "linear_logprobs", "linear_policy_loss", "linear_dpo_loss",
                  "paged_attention_decode", "paged_attention_extend", "speculative_verify",
                  "speculative_verify_tree", "rms_norm", "rope", "swiglu", "geglu")
# The documented automatic order (README "Backends", ptcore/ops/dispatch.py).
DOCUMENTED_ORDER = {"cuda": ("flash_attn", "triton", "cuda", "torch"), "cpu": ("cpu", "torch"), "meta": ("torch",)}


def _op_calls():
    """A small valid CPU call of each dispatched op."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 3, 4, 6
    x, w = torch.randn(B * T, H, generator=g), torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (B * T,), generator=g)
    h3, t3 = x.reshape(B, T, H), t.reshape(B, T)
    S, Hkv, D = 4, 1, 8
    kc, vc = torch.randn(3, S, Hkv, D, generator=g), torch.randn(3, S, Hkv, D, generator=g)
    table, lens = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([5, 2], dtype=torch.int32)
    p = torch.softmax(torch.randn(B, 3, V, generator=g), -1)
    ops = ptcore.ops
    return {
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(x, w, t),
        "linear_logprobs": lambda: ops.linear_logprobs(x, w, t),
        "linear_policy_loss": lambda: ops.linear_policy_loss(h3, w, t3, torch.zeros(B, T), torch.ones(B),
                                                             torch.ones(B, T)),
        "linear_dpo_loss": lambda: ops.linear_dpo_loss(h3, h3, w, t3, t3, torch.zeros(B), torch.zeros(B)),
        "paged_attention_decode": lambda: ops.paged_attention_decode(torch.randn(B, 2, D, generator=g), kc, vc,
                                                                     table, lens),
        "paged_attention_extend": lambda: ops.paged_attention_extend(
            torch.randn(3, 2, D, generator=g), kc, vc, table, lens, torch.tensor([0, 2, 3], dtype=torch.int32)),
        "speculative_verify": lambda: ops.speculative_verify(torch.zeros(B, 2, dtype=torch.int64), None, p),
        "speculative_verify_tree": lambda: ops.speculative_verify_tree(torch.zeros(B, 2, dtype=torch.int64),
                                                                       torch.tensor([-1, 0]), None, p),
        "rms_norm": lambda: ops.rms_norm(x, torch.ones(H), residual=x),
        "rope": lambda: ops.rope(kc, kc, torch.ones(S, D), torch.zeros(S, D)),
        "swiglu": lambda: ops.swiglu(x, x),
        "geglu": lambda: ops.geglu(x, x),
    }


def test_table_lists_every_op():
    assert set(dispatch.OPS) == set(DISPATCHED_OPS) == set(_op_calls())
    table = dispatch.table()
    assert set(table) == set(DISPATCHED_OPS)
    for op in DISPATCHED_OPS:
        assert callable(getattr(ptcore.ops, op)), op
        assert "torch" in dispatch.OPS[op], f"{op} has no torch reference"
        assert set(dispatch.OPS[op]) <= set(dispatch.BACKENDS)
        assert list(table[op]) == list(dispatch.BACKENDS)  # every backend, with yes or why not
        assert table[op]["torch"] is None
        for b, why in table[op].items():
            assert why is None or why.strip(), (op, b)
    assert dispatch.table()["speculative_verify_tree"]["triton"] is not None  # no tree kernel
    assert "flash_attn" not in dispatch.OPS[LCE] and "cuda" not in dispatch.OPS["paged_attention_decode"]
    lines = dispatch.table_lines()
    for op in DISPATCHED_OPS:
        i = lines.index(f"  {op}")
        block = lines[i + 1:i + 1 + len(dispatch.BACKENDS)]
        assert [ln.split()[0] for ln in block] == list(dispatch.BACKENDS)
        assert all(ln.split()[1] in ("yes", "no") for ln in block)


def test_info_prints_the_table_per_op():
    out = subprocess.run([sys.executable, "-m", "ptcore", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for op in DISPATCHED_OPS:
        assert f"\n  {op}\n" in out.stdout
    assert "    torch       yes | any device" in out.stdout
    assert "    flash_attn  no (linear_cross_entropy has no flash_attn kernel" in out.stdout
    assert "    cuda        no (ptcore has no CUDA paged attention kernel of its own; flash-attn's paged kernels are " \
           "the 'flash_attn' backend" in out.stdout


@pytest.mark.parametrize("op", DISPATCHED_OPS)
def test_forcing_a_backend_that_cannot_run_raises_with_the_reason(op):
    """Every backend that cannot run the op on these CPU tensors raises BackendUnavailable with
    cannot_run's reason when forced (never a silent fallback); the rest, torch included, run."""
    call = _op_calls()[op]
    unavailable = 0
    for b in dispatch.BACKENDS:
        why = dispatch.cannot_run(b, torch.device("cpu"), torch.float32, op=op, page_size=4, tree_mask=False)
        if why is None:
            continue
        unavailable += 1
        with ptcore.use_backend(b), pytest.raises(ptcore.BackendUnavailable) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"ptcore backend {b!r} was requested but cannot run: ") and why in msg and op in msg
    assert unavailable >= 2  # cuda and flash_attn never run on CPU tensors
    with ptcore.use_backend("torch"):
        call()


def test_tree_verify_forced_to_a_backend_without_a_tree_kernel_raises():
    call = _op_calls()["speculative_verify_tree"]
    for b in ("triton", "cuda", "flash_attn"):
        with ptcore.use_backend(b), pytest.raises(ptcore.BackendUnavailable, match=f"'{b}' was requested"):
            call()
    with ptcore.use_backend("triton"), pytest.raises(ptcore.BackendUnavailable, match="no triton tree kernel"):
        call()


def test_paged_attention_cuda_names_flash_attn():
    why = dispatch.cannot_run("cuda", torch.device("cuda"), torch.float16, op="paged_attention_extend")
    assert "'flash_attn' backend" in why
    assert dispatch.cannot_run("flash_attn", torch.device("cpu"), torch.float16, op="paged_attention_decode")


def _pretend_available(monkeypatch, available):
    """cannot_run as if exactly ``available`` backends loaded (the ops' tables still apply)."""
    real = dispatch.cannot_run

    def fake(backend, device, dtype, *, op=None, **args):
        impl = dispatch.OPS[op].get(backend) if op else None
        if op is not None and impl is None:
            return real(backend, device, dtype, op=op, **args)
        if backend not in available:
            return f"{backend} pretended unavailable"
        return impl.when(**args) if impl is not None and impl.when else None

    monkeypatch.setattr(dispatch, "cannot_run", fake)


def _documented_choice(op, device, runs):
    return next(b for b in DOCUMENTED_ORDER[device] if b in dispatch.OPS[op] and runs(b))


@pytest.mark.parametrize("device", sorted(DOCUMENTED_ORDER))
def test_default_choice_per_device_matches_the_documented_preference(device, monkeypatch):
    monkeypatch.delenv("PTCORE_BACKEND", raising=False)
    dev = torch.device(device)
    assert dispatch.preference(dev) == DOCUMENTED_ORDER[device]
    for op in DISPATCHED_OPS:  # what runs here
        for dtype in (torch.float32, torch.float16, torch.float64):
            want = _documented_choice(op, device, lambda b: dispatch.cannot_run(b, dev, dtype, op=op, page_size=256) is None)
            assert dispatch.resolve(dev, dtype, op=op, page_size=256) == want, (op, dtype)
    # and with every backend, or only some, loading
    for available in (set(dispatch.BACKENDS), {"cuda", "cpu", "torch"}, {"triton", "torch"}, {"torch"}):
        _pretend_available(monkeypatch, available)
        for op in DISPATCHED_OPS:
            for args in (dict(page_size=256), dict(page_size=16), dict(page_size=256, tree_mask=True)):
                want = _documented_choice(op, device, lambda b: dispatch.cannot_run(b, dev, torch.float16, op=op, **args) is None)
                assert dispatch.resolve(dev, torch.float16, op=op, **args) == want, (op, available, args)
        monkeypatch.undo()
    _pretend_available(monkeypatch, set(dispatch.BACKENDS))
    if device == "cuda":
        assert dispatch.resolve(dev, torch.float16, op="paged_attention_decode", page_size=256) == "flash_attn"
        assert dispatch.resolve(dev, torch.float16, op="paged_attention_decode", page_size=16) == "triton"
        assert dispatch.resolve(dev, torch.float16, op="paged_attention_extend", page_size=256, tree_mask=True) == "triton"
        assert dispatch.resolve(dev, torch.float16, op=LCE) == "triton"
        assert dispatch.resolve(dev, torch.float16, op="speculative_verify_tree") == "torch"
    elif device == "cpu":
        assert all(dispatch.resolve(dev, torch.float32, op=op, page_size=16) == "cpu" for op in DISPATCHED_OPS)
    else:
        assert all(dispatch.resolve(dev, torch.float32, op=op) == "torch" for op in DISPATCHED_OPS)


def test_readme_documents_the_preference():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    readme = " ".join(readme.split())
    assert "CUDA tensors → flash_attn, triton, cuda, torch; CPU tensors → cpu, torch; other devices → torch" in readme
