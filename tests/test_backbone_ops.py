"""The fused backbone ops (ptcore.ops.rms_norm / rope / swiglu / geglu) on every backend that runs
here, against float64 oracles taken from the peers' own code: Hugging Face's LlamaRMSNorm and
Gemma2RMSNorm modules, transformers' apply_rotary_pos_emb, and torch's silu / tanh-GELU. Outputs
and every gradient, fp32 / bf16 / fp16 under the tolerance rule (tests/reference.py), float64 to
1e-12; odd sizes; what the backward saves; bad input; torch.compile; the CUDA source compiles."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from ptcore.ops import dispatch, geglu, rms_norm, rope, swiglu, use_backend
from tests.reference import assert_rule, rel_err

ROOT = Path(__file__).resolve().parent.parent
LOW = (torch.float32, torch.bfloat16, torch.float16)


def cases(dtypes):
    """(backend, dtype) params for the backends that take CPU tensors of each dtype here; one that
    cannot run is a printed skip saying why (never silent)."""
    out = []
    for d in dtypes:
        for b in ("torch", "cpu", "triton"):
            why = dispatch.cannot_run(b, torch.device("cpu"), d, op="rms_norm")
            marks = [pytest.mark.skip(reason=f"backend {b}: {why}")] if why else []
            out.append(pytest.param(b, d, id=f"{b}-{str(d)[6:]}", marks=marks))
    return out


def draw(shape, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(grad)


def run(fn, inputs, dtype, upstream):
    """fn on copies of ``inputs`` cast to dtype; returns [outputs..., grads of the inputs that need
    one] for the loss sum(out * upstream) (upstream in the output's dtype)."""
    xs = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad])
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def check(name, fn, peer, inputs, n_out, backend, dtype, naive_peer=None):
    """fn on ``backend`` in ``dtype`` against the peer in float64 (the oracle) and in dtype (the
    tolerance rule's naive baseline; ``naive_peer`` when that is another function)."""
    upstream = [torch.randn_like(o.double()) for o in (peer(*inputs) if n_out > 1 else (peer(*inputs),))]
    ref = run(peer, inputs, torch.float64, upstream)
    with use_backend(backend):
        got = run(fn, inputs, dtype, upstream)
    assert len(got) == len(ref)
    if dtype == torch.float64:
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.dtype == torch.float64 and rel_err(g, r) < 1e-12, f"{name} result {i}"
        return
    naive = run(naive_peer or peer, inputs, dtype, upstream)
    for i, (g, r, n) in enumerate(zip(got, ref, naive)):
        assert g.dtype == dtype, f"{name} result {i}: dtype {g.dtype}"
        assert_rule(g, r, n, f"{name} on {backend}, result {i}")


# ---- the peers ----

def hf_norm(cls, eps):
    """Hugging Face's RMSNorm module (``cls``) with the residual add before it, as the decoder
    layer does it; the naive baseline in each dtype. (Its math runs in fp32 whatever the dtype,
    so the float64 oracle is :func:`norm64`.)"""
    def f(x, w, residual=None):
        s = x + residual if residual is not None else x
        m = cls(x.shape[-1], eps=eps).to(x.dtype)
        del m.weight
        m.weight = w  # a plain tensor: the gradient reaches w
        y = m(s)
        return (y, s) if residual is not None else y
    return f


def norm64(eps, offset):
    """The same RMSNorm written out (float64 in, float64 math): the oracle."""
    def f(x, w, residual=None):
        s = x + residual if residual is not None else x
        y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * (w + offset)
        return (y, s) if residual is not None else y
    return f


def hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb on its [B, heads, T, D] layout (ours is [B, T, heads, D])."""
    qo, ko = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qo.transpose(1, 2), ko.transpose(1, 2)


def hf_rope_partial(q, k, cos, sin):
    """Phi-3's partial rotary: the first R dims rotate, the rest pass through."""
    R = cos.shape[-1]
    qr, kr = hf_rope(q[..., :R], k[..., :R], cos, sin)
    return torch.cat([qr, q[..., R:]], -1), torch.cat([kr, k[..., R:]], -1)


# ---- values against the oracles ----

RMS_SHAPES = [(1, 1), (7, 3), (5, 577), (2, 3, 64)]


def eps_for(H, eps):
    """At H = 1 the norm is x / sqrt(x^2 + eps), whose gradient is eps / x^2-conditioned: with a
    small eps every implementation (HF's included) loses the same digits to cancellation and the
    rule's factor of 2 between two rounding accidents is a coin toss. eps = 1 keeps the one-element
    row well conditioned."""
    return 1.0 if H == 1 else eps


@pytest.mark.parametrize("backend,dtype", cases(LOW + (torch.float64,)))
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
def test_rms_norm_llama(backend, dtype, shape):
    H = shape[-1]
    x, w, eps = draw(shape), draw((H,), scale=0.5), eps_for(H, 1e-6)
    check("rms_norm", lambda x, w: rms_norm(x, w, eps), norm64(eps, 0.0), [x, w], 1, backend, dtype,
          naive_peer=hf_norm(LlamaRMSNorm, eps))


@pytest.mark.parametrize("backend,dtype", cases(LOW + (torch.float64,)))
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
def test_rms_norm_residual_gemma_offset(backend, dtype, shape):
    """The fused residual add, with Gemma's (1 + w): (y, x + residual), gradients to all three."""
    H = shape[-1]
    x, r, w, eps = draw(shape), draw(shape), draw((H,), scale=0.3), eps_for(H, 1e-5)
    check("rms_norm+residual", lambda x, w, r: rms_norm(x, w, eps, residual=r, offset=1.0),
          norm64(eps, 1.0), [x, w, r], 2, backend, dtype, naive_peer=hf_norm(Gemma2RMSNorm, eps))


ROPE_CASES = {  # (q shape [B, T, Hq, D], k heads, cos shape)
    "one": ((1, 1, 1, 2), 1, (1, 1, 2)),
    "batch_cos": ((2, 5, 3, 8), 1, (2, 5, 8)),
    "broadcast_cos": ((3, 4, 9, 64), 3, (1, 4, 64)),  # SmolLM2's heads, position_ids [1, T]
    "odd_head_dim": ((1, 3, 2, 6), 2, (1, 3, 6)),
}


@pytest.mark.parametrize("backend,dtype", cases(LOW + (torch.float64,)))
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_matches_transformers(backend, dtype, case):
    qs, hk, cs = ROPE_CASES[case]
    q, k = draw(qs), draw(qs[:2] + (hk, qs[3]))
    ang = torch.rand(*cs, dtype=torch.float64) * 6.3
    check("rope", rope, hf_rope, [q, k, ang.cos(), ang.sin()], 2, backend, dtype)


@pytest.mark.parametrize("backend,dtype", cases((torch.float32, torch.float64)))
def test_rope_partial_rotary(backend, dtype):
    q, k = draw((2, 3, 4, 10)), draw((2, 3, 2, 10))
    ang = torch.rand(2, 3, 4, dtype=torch.float64) * 6.3
    check("rope partial", rope, hf_rope_partial, [q, k, ang.cos(), ang.sin()], 2, backend, dtype)


GATED_SHAPES = [(1,), (3, 37), (2, 5, 577)]


@pytest.mark.parametrize("backend,dtype", cases(LOW + (torch.float64,)))
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=str)
@pytest.mark.parametrize("which", ["swiglu", "geglu"])
def test_gated_activations(backend, dtype, shape, which):
    fn = swiglu if which == "swiglu" else geglu
    peer = (lambda g, u: F.silu(g) * u) if which == "swiglu" else (lambda g, u: F.gelu(g, approximate="tanh") * u)
    g, u = draw(shape, scale=3.0), draw(shape)
    g.data.view(-1)[0] = -30.0  # the saturated tails: sigmoid / tanh near 0 and 1
    if g.numel() > 1:
        g.data.view(-1)[1] = 30.0
    check(which, fn, peer, [g, u], 1, backend, dtype)


def test_empty_rows():
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))
    assert swiglu(torch.randn(0, 3), torch.randn(0, 3)).shape == (0, 3)


# ---- what the backward keeps ----

def saved_tensors(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*inputs)
    return out, saved


def _same(a, b):
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def test_backward_saves_the_minimum():
    x, r, w = draw((4, 16)).float(), draw((4, 16)).float(), draw((16,)).float().requires_grad_()
    x.requires_grad_()
    (y, s), saved = saved_tensors(lambda: rms_norm(x, w, residual=r))
    assert len(saved) == 3 and _same(saved[0], s) and _same(saved[1], w) and saved[2].shape == (4,)
    y, saved = saved_tensors(lambda: rms_norm(x, w))
    assert len(saved) == 3 and _same(saved[0], x)
    q, k = draw((1, 3, 2, 8)).float().requires_grad_(), draw((1, 3, 1, 8)).float().requires_grad_()
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    _, saved = saved_tensors(lambda: rope(q, k, cos, sin))
    assert len(saved) == 2 and _same(saved[0], cos) and _same(saved[1], sin)
    g, u = draw((3, 5)).float().requires_grad_(), draw((3, 5)).float().requires_grad_()
    for fn in (swiglu, geglu):
        _, saved = saved_tensors(lambda: fn(g, u))
        assert len(saved) == 2 and _same(saved[0], g) and _same(saved[1], u)


# ---- bad input ----

def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="rms_norm: 'x' must be contiguous"):
        rms_norm(torch.randn(8, 4).t(), w)
    with pytest.raises(TypeError, match="rms_norm: 'weight' has dtype torch.float64 but 'x'"):
        rms_norm(x, w.double())
    with pytest.raises(ValueError, match=r"rms_norm: 'weight' must have shape \(8,\)"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match=r"rms_norm: 'residual' must have shape \(4, 8\)"):
        rms_norm(x, w, residual=torch.randn(4, 7))
    with pytest.raises(ValueError, match="rms_norm: 'residual' must be contiguous"):
        rms_norm(x, w, residual=torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="rms_norm: 'eps' must be >= 0"):
        rms_norm(x, w, -1.0)
    with pytest.raises(TypeError, match="rms_norm: 'x' must have dtype in"):
        rms_norm(x.long(), w.long())
    with pytest.raises(ValueError, match="rms_norm: 'x' has hidden size 0"):
        rms_norm(torch.randn(3, 0), torch.randn(0))
    q, k, c = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="rope: 'q' must be contiguous"):
        rope(q.transpose(1, 2), k, c, c)
    with pytest.raises(ValueError, match="rope: 'k' must be contiguous"):
        rope(q, torch.randn(1, 2, 3, 8).transpose(1, 2), c, c)
    with pytest.raises(ValueError, match="rope: 'k' must be"):
        rope(q, torch.randn(1, 3, 2, 6), c, c)
    with pytest.raises(TypeError, match="rope: 'cos' has dtype torch.float16 but 'q'"):
        rope(q, k, c.half(), c)
    with pytest.raises(ValueError, match="rope: 'sin' must have shape"):
        rope(q, k, c, c[..., :4])
    with pytest.raises(ValueError, match="rope: 'cos' last dim must be even"):
        rope(q, k, c[..., :3].contiguous(), c[..., :3].contiguous())
    with pytest.raises(ValueError, match="rope: 'cos' leading dims"):
        rope(q, k, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="rope: 'cos' and 'sin' get no gradient"):
        rope(q, k, c.requires_grad_(), c.detach())
    g = torch.randn(3, 5)
    with pytest.raises(ValueError, match="swiglu: 'gate' must be contiguous"):
        swiglu(torch.randn(5, 3).t(), g)
    with pytest.raises(ValueError, match=r"geglu: 'up' must have shape \(3, 5\)"):
        geglu(g, torch.randn(3, 4))
    with pytest.raises(TypeError, match="swiglu: 'up' has dtype torch.bfloat16"):
        swiglu(g, g.bfloat16())
    with pytest.raises(TypeError, match="geglu: 'gate' must be a torch.Tensor"):
        geglu([1.0], g)


def test_forced_backend_that_cannot_run_raises():
    with use_backend("cuda"), pytest.raises(dispatch.BackendUnavailable, match="op rms_norm"):
        rms_norm(torch.randn(2, 4), torch.randn(4))


# ---- torch.compile ----

def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, r, w = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16), torch.randn(16, requires_grad=True)
    q = torch.randn(2, 3, 2, 8, requires_grad=True)
    ang = torch.rand(1, 3, 8)

    def f(x, r, w, q):
        h, s = rms_norm(x, w, 1e-6, residual=r, offset=1.0)
        qo, ko = rope(q, q * 2, ang.cos(), ang.sin())
        return (swiglu(h, s) + geglu(s, h)).sum() + (qo * ko).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, r, w, q)
    grads_c = torch.autograd.grad(out_c, (x, w, q))
    out_e = f(x, r, w, q)
    grads_e = torch.autograd.grad(out_e, (x, w, q))
    # The same custom ops run in both: the same kernels, so the same numbers.
    assert torch.equal(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        assert torch.equal(gc, ge)


def test_custom_ops_opcheck():
    x, w, r = torch.randn(5, 8), torch.randn(8), torch.randn(5, 8)
    torch.library.opcheck(torch.ops.ptcore.rms_norm.default, (x, r, w, 1e-6, 1.0, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    q, k, c = torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 8)
    torch.library.opcheck(torch.ops.ptcore.rope.default, (q, k, c, c, False, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ptcore.gated_act.default, (x, r, "silu", "torch"),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the CUDA source (compiled only: no GPU here) ----

def test_cuda_backbone_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found: csrc/cuda/backbone.cu cannot be compiled here")
    out = subprocess.run([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                          "-gencode=arch=compute_80,code=sm_80", f"-I{ROOT / 'csrc' / 'include'}", "-c",
                          str(ROOT / "csrc" / "cuda" / "backbone.cu"), "-o", str(tmp_path / "backbone.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
