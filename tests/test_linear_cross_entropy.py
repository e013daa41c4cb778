"""ptcore.ops.linear_cross_entropy on every backend here against the float64 oracle
(tolerance rule: tests/reference.py assert_rule, docs/kernels.md section 4)."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy
from tests.conftest import cpu_backends
from tests.reference import assert_rule, linear_cross_entropy_ref, rel_err, rule_bound

BACKENDS = cpu_backends()


def make_inputs(N, H, V, *, dtype=torch.float32, bias=False, ignore_frac=0.2, ignore_index=-100,
                scale=1.0, lead=None):
    shape = lead if lead is not None else (N,)
    x = torch.randn(*shape, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (scale / H ** 0.5)
    b = torch.randn(V, dtype=torch.float64) * 0.1 if bias else None
    t = torch.randint(0, V, shape)
    if t.numel():
        t[torch.rand(shape) < ignore_frac] = ignore_index
        flat = t.reshape(-1)
        logits = x.reshape(-1, H) @ w.T
        flat[0] = int(logits[0].argmax())            # a row whose target is the argmax
        if flat.numel() > 1:
            flat[-1] = int(logits[-1].argmin())      # and one whose target is the argmin
    cast = lambda a: None if a is None else a.to(dtype)
    return cast(x), cast(w), t, cast(b)


def run_op(backend, x, w, t, b, grad_seed=0, **opts):
    """Forward + backward with a random incoming gradient; returns (loss, grads, incoming grad)."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    with ptcore.use_backend(backend):
        loss = linear_cross_entropy(x, w, t, bias=b, **opts)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    params = [p for p in (x, w, b) if p is not None]
    grads = torch.autograd.grad(loss, params, g.to(loss.dtype)) if loss.numel() else [torch.zeros_like(p) for p in params]
    return loss, grads, g


def run_ref(x, w, t, b, g, dtype=torch.float64, **opts):
    x = x.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    b = None if b is None else b.detach().to(dtype).requires_grad_()
    loss = linear_cross_entropy_ref(x, w, t, bias=b, **opts)
    params = [p for p in (x, w, b) if p is not None]
    grads = torch.autograd.grad(loss, params, g.to(dtype)) if loss.numel() else [torch.zeros_like(p) for p in params]
    return loss, grads


def assert_fp32_close(backend, x, w, t, b, **opts):
    """The op in x's dtype against the float64 oracle, under the rule (2 x the naive same-dtype
    PyTorch error + slack): loss and every gradient."""
    loss, grads, g = run_op(backend, x, w, t, b, **opts)
    ref_loss, ref_grads = run_ref(x, w, t, b, g, **opts)
    naive_loss, naive_grads = run_ref(x, w, t, b, g, dtype=x.dtype, **opts)
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all()
    assert_rule(loss, ref_loss, naive_loss, "loss")
    for name, got, ref, naive in zip(("input", "weight", "bias"), grads, ref_grads, naive_grads):
        assert got.shape == ref.shape and got.dtype == x.dtype, name
        assert_rule(got, ref, naive, f"grad_{name}")


SHAPES_CPU = [(1, 17, 50257), (37, 24, 301), (64, 100, 32001), (5, 8, 3)]
SHAPES_TRITON = [(1, 17, 50257), (6, 24, 301), (3, 8, 3)]


def shapes_for(backend):
    return SHAPES_TRITON if backend == "triton" else SHAPES_CPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_shapes(backend, reduction):
    for N, H, V in shapes_for(backend):
        x, w, t, b = make_inputs(N, H, V)
        assert_fp32_close(backend, x, w, t, b, reduction=reduction)


OPTION_SETS = [
    dict(bias=True),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=30.0),
    dict(softcap=2.0, label_smoothing=0.3, z_loss=0.01, bias=True),
    dict(ignore_index=7),
    dict(ignore_index=0, label_smoothing=1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fp32_options(backend, reduction, opts):
    opts = dict(opts)
    bias = opts.pop("bias", False)
    N, H, V = (4, 12, 257) if backend == "triton" else (29, 36, 1001)
    x, w, t, b = make_inputs(N, H, V, bias=bias, ignore_index=opts.get("ignore_index", -100),
                             scale=4.0)
    assert_fp32_close(backend, x, w, t, b, reduction=reduction, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_noncontiguous_input(backend):
    """(B, T, H) input that is a transposed view, (B, T) targets, per-token losses."""
    B, T, H, V = 3, 5, 20, 403
    base = torch.randn(T, B, H)
    x = base.transpose(0, 1)  # non-contiguous (B, T, H)
    w = (torch.randn(H, V) / H ** 0.5).t()  # non-contiguous (V, H)
    t = torch.randint(0, V, (B, T))
    assert not x.is_contiguous() and not w.is_contiguous()
    assert_fp32_close(backend, x, w, t, None, reduction="none")
    assert_fp32_close(backend, x, w, t, None, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    H, V = 16, 33
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        x = torch.randn(0, H, requires_grad=True)
        w = torch.randn(V, H, requires_grad=True)
        with ptcore.use_backend(backend):
            loss = linear_cross_entropy(x, w, torch.empty(0, dtype=torch.long), reduction=reduction)
        assert loss.shape == shape and torch.all(loss == 0)
        loss.sum().backward()
        assert x.grad.shape == (0, H) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(backend, reduction):
    """Documented deviation from F.cross_entropy: loss 0 and zero gradients, never NaN."""
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(50, 10, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.full((6,), -100)
    with ptcore.use_backend(backend):
        loss = linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=0.1)
    assert torch.all(loss == 0)
    loss.sum().backward()
    for p in (x, w, b):
        assert torch.all(p.grad == 0), p.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """|logits| ~ 1e4: the online max keeps everything finite and exact to fp32 rounding."""
    N, H, V = 8, 16, 129
    x, w, t, _ = make_inputs(N, H, V, ignore_frac=0.0)
    x = x * (1e4 / (x.reshape(-1, H) @ w.T).abs().max())
    for opts in (dict(), dict(label_smoothing=0.1, z_loss=1e-6)):
        loss, grads, g = run_op(backend, x, w, t, None, reduction="none", **opts)
        assert torch.isfinite(loss).all() and all(torch.isfinite(gr).all() for gr in grads)
        assert_fp32_close(backend, x, w, t, None, reduction="none", **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_logits(backend):
    """A row whose logits are all very negative (a peer started the running max at 0 and broke here)."""
    H, V = 8, 40
    x = torch.randn(4, H).abs()
    w = -torch.rand(V, H) * 50 - 10
    t = torch.randint(0, V, (4,))
    assert_fp32_close(backend, x, w, t, None, reduction="none")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_criterion(backend, dtype):
    """Kernel error vs float64 <= 2 x the naive PyTorch error in the same dtype + 1e-2 (the rule)."""
    for (N, H, V), opts in (((64, 96, 32001), dict()), ((33, 40, 5003), dict(softcap=20.0, z_loss=1e-4, label_smoothing=0.1))):
        x, w, t, b = make_inputs(N, H, V, dtype=dtype, bias=True, scale=3.0)
        for reduction in ("mean", "none"):
            loss, grads, g = run_op(backend, x, w, t, b, reduction=reduction, **opts)
            ref_loss, ref_grads = run_ref(x, w, t, b, g, reduction=reduction, **opts)
            naive_loss, naive_grads = run_ref(x, w, t, b, g, dtype=dtype, reduction=reduction, **opts)
            assert loss.dtype == dtype
            assert_rule(loss, ref_loss, naive_loss, "loss")
            for got, ref, naive in zip(grads, ref_grads, naive_grads):
                assert got.dtype == dtype
                assert_rule(got, ref, naive, "grad")


def test_triton_low_precision_fp16():
    """Triton's bf16 path runs on the GPU backends; under the interpreter fp16 is checked."""
    pytest.importorskip("triton")
    backend = "triton"
    why = ptcore.ops.dispatch.cannot_run(backend, torch.device("cpu"), torch.float16)
    if why:
        pytest.skip(f"backend triton: {why}")
    x, w, t, b = make_inputs(6, 24, 513, dtype=torch.float16, bias=True, scale=3.0)
    loss, grads, g = run_op(backend, x, w, t, b, reduction="none", softcap=15.0)
    ref_loss, ref_grads = run_ref(x, w, t, b, g, reduction="none", softcap=15.0)
    naive_loss, naive_grads = run_ref(x, w, t, b, g, dtype=torch.float16, reduction="none", softcap=15.0)
    assert_rule(loss, ref_loss, naive_loss, "loss")
    for got, ref, naive in zip(grads, ref_grads, naive_grads):
        assert_rule(got, ref, naive, "grad")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(backend, reduction):
    if ptcore.ops.dispatch.cannot_run(backend, torch.device("cpu"), torch.float64):
        pytest.skip(f"backend {backend} cannot run float64 here")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 10, 0, 3])

    def f(x, w, b):
        with ptcore.use_backend(backend), ptcore.chunk_budget(2 * 11 * 8):
            return linear_cross_entropy(x, w, t, bias=b, reduction=reduction, softcap=3.0,
                                        label_smoothing=0.1, z_loss=0.01)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_invariance_and_repeatability(backend):
    """Results do not depend on the chunk size beyond rounding, and a repeat is bitwise equal."""
    N, H, V = (7, 12, 130) if backend == "triton" else (50, 32, 777)
    x, w, t, b = make_inputs(N, H, V, bias=True)
    results = []
    for budget in (V * 4, 3 * V * 4, 1 << 30):
        with ptcore.chunk_budget(budget):
            results.append(run_op(backend, x, w, t, b, reduction="sum", label_smoothing=0.05))
    base_loss, base_grads, g = results[-1]
    # Two chunkings differ by rounding only: each within the rule of the float64 oracle, and from
    # each other by less than the naive fp32 error against float64 (+ slack).
    ref_loss, ref_grads = run_ref(x, w, t, b, g, reduction="sum", label_smoothing=0.05)
    naive_loss, naive_grads = run_ref(x, w, t, b, g, dtype=x.dtype, reduction="sum", label_smoothing=0.05)
    for loss, grads, _ in results:
        assert_rule(loss, ref_loss, naive_loss, "loss")
        assert rel_err(loss, base_loss) <= rule_bound(naive_loss, ref_loss) / 2
        for got, base, ref, naive in zip(grads, base_grads, ref_grads, naive_grads):
            assert_rule(got, ref, naive, "grad")
            assert rel_err(got, base) <= rule_bound(naive, ref) / 2
    again_loss, again_grads, _ = run_op(backend, x, w, t, b, reduction="sum", label_smoothing=0.05)
    assert torch.equal(again_loss, base_loss)
    assert all(torch.equal(a, c) for a, c in zip(again_grads, base_grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_input(backend):
    """Only the needed gradients are computed; the others stay None."""
    x, w, t, _ = make_inputs(9, 8, 64)
    w.requires_grad_(False)
    xg = x.clone().requires_grad_()
    with ptcore.use_backend(backend):
        linear_cross_entropy(xg, w, t).backward()
    assert xg.grad is not None and w.grad is None
    wg = w.clone().requires_grad_()
    with ptcore.use_backend(backend):
        linear_cross_entropy(x, wg, t).backward()
    assert wg.grad is not None and wg.grad.dtype == wg.dtype


def test_no_grad_forward_matches():
    x, w, t, b = make_inputs(20, 16, 300, bias=True)
    with torch.no_grad():
        a = linear_cross_entropy(x, w, t, bias=b)
    c = linear_cross_entropy(x.requires_grad_(), w, t, bias=b)
    ref = linear_cross_entropy_ref(x.double(), w.double(), t, bias=b.double())
    naive = linear_cross_entropy_ref(x.detach(), w, t, bias=b)
    assert_rule(a, ref, naive, "no_grad loss")
    assert_rule(c, ref, naive, "loss")
    assert rel_err(a, c) <= rule_bound(naive, ref) / 2


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_recomputes(reduction):
    """retain_graph: the first backward scales the stored gradients in place, a second one
    recomputes them, so both are right."""
    x, w, t, b = make_inputs(9, 8, 20, bias=True)
    params = [p.requires_grad_() for p in (x, w, b)]
    loss = linear_cross_entropy(x, w, t, bias=b, reduction=reduction)
    first = torch.autograd.grad(loss, params, torch.tensor(2.0), retain_graph=True)
    second = torch.autograd.grad(loss, params, torch.tensor(-3.0))
    # The same stored gradient scaled by 2 and by -3: they differ by a few roundings at most.
    for a, c in zip(first, second):
        assert rel_err(c, a * -1.5) <= 4 * torch.finfo(a.dtype).eps


def test_module_matches_functional():
    x, w, t, b = make_inputs(12, 16, 100, bias=True)
    mod = ptcore.nn.LinearCrossEntropyLoss(label_smoothing=0.1, softcap=10.0, reduction="sum")
    assert "softcap=10.0" in repr(mod)
    expected = linear_cross_entropy(x, w, t, bias=b, label_smoothing=0.1, softcap=10.0, reduction="sum")
    assert torch.equal(mod(x, w, t, b), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_like_torch(backend):
    """A -inf logit (a masked vocabulary entry through the bias) has probability 0, as in
    F.cross_entropy; only NaN or +inf poisons a row."""
    x, w = torch.randn(5, 8), torch.randn(20, 8)
    b = torch.zeros(20)
    b[3] = float("-inf")
    t = torch.tensor([0, 1, 2, 4, 5])
    for ls in (0.0, 0.1):
        with ptcore.use_backend(backend):
            got = linear_cross_entropy(x, w, t, bias=b, label_smoothing=ls, reduction="none")
        want = torch.nn.functional.cross_entropy(x.double() @ w.double().T + b.double(), t,
                                                 label_smoothing=ls, reduction="none")
        naive = torch.nn.functional.cross_entropy(x @ w.T + b, t, label_smoothing=ls, reduction="none")
        fin = torch.isfinite(want)  # label smoothing over a -inf logit: inf, as in torch
        assert torch.equal(got[~fin], want[~fin].to(got.dtype)) and fin.any() == (ls == 0), (ls, got, want)
        if fin.any():
            assert_rule(got[fin], want[fin], naive[fin], f"loss ls={ls}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fp16_gradients_survive_loss_scaling(backend):
    """mean over many rows with a large grad_output (GradScaler): 1/N is not applied inside the
    fp16 logits buffer, where it would underflow."""
    N, H, V = 16384, 16, 512
    x, w, t = torch.randn(N, H), torch.randn(V, H) / 4, torch.randint(0, V, (N,))
    scale = torch.tensor(16384.0)
    ref = [p.double().requires_grad_() for p in (x, w)]
    ref_g = torch.autograd.grad(torch.nn.functional.cross_entropy(ref[0] @ ref[1].T, t), ref, scale.double())
    naive = [p.half().requires_grad_() for p in (x, w)]
    naive_g = torch.autograd.grad(torch.nn.functional.cross_entropy(naive[0] @ naive[1].T, t), naive, scale.half())
    ours = [p.half().requires_grad_() for p in (x, w)]
    with ptcore.use_backend(backend):
        got = torch.autograd.grad(linear_cross_entropy(*ours, t), ours, scale.half())
    for g, r, n in zip(got, ref_g, naive_g):
        assert_rule(g, r, n, "grad")



def lm_head_like_logits(N=128, V=49152, seed=0):
    """Rows like a real LM head's (SmolLM2-135M: V = 49152): logits ~ N(0, 3^2) with four tokens
    12-18 above the rest, targets drawn from the softmax (mean loss ~1.6 nats)."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(N, V, generator=gen)
    z.scatter_add_(1, torch.randint(0, V, (N, 4), generator=gen), 12 + 6 * torch.rand(N, 4, generator=gen))
    t = torch.multinomial(torch.softmax(z.double(), 1), 1, generator=gen).squeeze(1)
    return z, t


def test_cpu_rows_fp32_as_accurate_as_eager_on_lm_head_rows():
    """The cpu row pass (loss and dloss/dlogits) against float64 on LM-head-like rows, under the
    rule. The naive fp32 baseline is lse - z_y and exp(z - lse) - onehot with torch.logsumexp
    (pairwise sums); F.cross_entropy's CPU log_softmax sums each SIMD lane sequentially and has
    the very bias this test catches. The old kernel (one fp32 simd reduction over V, ~3000 terms
    per lane) summed exp ~5e-6 low: mean loss 2.9e-6 and gradient 7.3e-6 relative error against
    bounds of 1.1e-6 and 2.4e-6; blocked sums give 5e-8 and 1.2e-7."""
    from ptcore.ops import dispatch
    from ptcore.ops.rows import CROSS_ENTROPY_ROWS
    if dispatch.cannot_run("cpu", torch.device("cpu"), torch.float32):
        pytest.skip("the cpu backend is not built")
    z, t = lm_head_like_logits()
    N, V = z.shape
    z64, onehot = z.double(), torch.nn.functional.one_hot(t, V)
    lse64 = torch.logsumexp(z64, 1, keepdim=True)
    ref_loss, ref_grad = lse64[:, 0] - z64.gather(1, t[:, None])[:, 0], torch.exp(z64 - lse64) - onehot
    lse32 = torch.logsumexp(z, 1, keepdim=True)
    naive_loss, naive_grad = lse32[:, 0] - z.gather(1, t[:, None])[:, 0], torch.exp(z - lse32) - onehot
    grad, loss, lse = z.clone(), torch.full((N,), float("nan")), torch.full((N,), float("nan"))
    CROSS_ENTROPY_ROWS["cpu"](grad, t, loss, lse, None, ignore_index=-100, label_smoothing=0.0,
                              z_loss=0.0, softcap=None, write_grad=True)
    assert_rule(loss, ref_loss, naive_loss, "per-row loss")
    assert_rule(loss.mean(), ref_loss.mean(), naive_loss.mean(), "mean loss")  # a bias does not average out
    assert_rule(lse, lse64[:, 0], lse32[:, 0], "lse")
    assert_rule(grad, ref_grad, naive_grad, "dloss/dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_softcaps_are_exact(backend):
    """cap * tanh(z / cap) for caps up to beyond the fp32 range: the cpu kernel's tanh was
    1 - 2 / (exp(2x) + 1), which cancels for small x (loss 2.55 instead of 6.14 at cap 1e8, NaN at
    1e300 on every backend)."""
    x, w, t, _ = make_inputs(16, 24, 301, ignore_frac=0.0, scale=3.0)
    for cap in (1e3, 1e6, 1e8, 1e30, 1e300):
        loss, grads, g = run_op(backend, x, w, t, None, reduction="none", softcap=cap)
        ref_loss, ref_grads = run_ref(x, w, t, None, g, reduction="none", softcap=cap)
        # the naive fp32 computation is NaN at 1e300 (inf * 0): no cap is the same function there
        naive_cap = cap if cap < 1e38 else None
        naive_loss, naive_grads = run_ref(x, w, t, None, g, dtype=x.dtype, reduction="none", softcap=naive_cap)
        assert_rule(loss, ref_loss, naive_loss, f"loss cap={cap:g}")
        for got, ref, naive in zip(grads, ref_grads, naive_grads):
            assert_rule(got, ref, naive, f"grad cap={cap:g}")


def test_z_loss_that_overflows_is_refused():
    x, w, t, _ = make_inputs(4, 8, 20)
    with pytest.raises(ValueError, match="'z_loss' must be <= 10000"):
        linear_cross_entropy(x, w, t, z_loss=1e39)
    linear_cross_entropy(x, w, t, z_loss=1e4)  # the bound itself is fine
