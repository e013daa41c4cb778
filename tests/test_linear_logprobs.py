"""ptcore.ops.linear_logprobs on every backend here against float64 log_softmax + gather and the
float64 entropy (tolerance rule: tests/reference.py assert_rule, docs/kernels.md
section 4), and its invariances."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_logprobs
from tests.conftest import cpu_backends
from tests.reference import assert_rule, rel_err, rule_bound

BACKENDS = cpu_backends()


def oracle(x, w, t, b=None, *, temperature=1.0, softcap=None, ignore_index=-100):
    """In the inputs' own dtype: float64 for the oracle, bf16 for the naive baseline."""
    z = torch.nn.functional.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logs = torch.log_softmax(z / temperature, dim=-1)
    valid = t != ignore_index
    lp = logs.gather(-1, torch.where(valid, t, 0).unsqueeze(-1)).squeeze(-1)
    p = logs.exp()
    ent = -torch.where(p > 0, p * logs, torch.zeros((), dtype=p.dtype)).sum(-1)  # 0 log 0 = 0
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def inputs(N, H, V, dtype=torch.float32, lead=None, bias=True, scale=2.0):
    shape = lead or (N,)
    x = torch.randn(*shape, H).to(dtype)
    w = (torch.randn(V, H) * scale / H ** 0.5).to(dtype)
    b = (torch.randn(V) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, V, shape)
    t.view(-1)[::3] = -100  # prompt / padding rows
    return x, w, t, b


def run(backend, x, w, t, b, **opts):
    params = [p.detach().clone().requires_grad_() for p in (x, w) + ((b,) if b is not None else ())]
    with ptcore.use_backend(backend):
        lp, ent = linear_logprobs(params[0], params[1], t, bias=params[2] if b is not None else None,
                                  return_entropy=True, **opts)
    g1, g2 = torch.randn_like(lp), torch.randn_like(ent)
    grads = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), params)
    return lp, ent, grads, (g1, g2)


def run_oracle(x, w, t, b, g, dtype=torch.float64, **opts):
    params = [p.detach().to(dtype).requires_grad_() for p in (x, w) + ((b,) if b is not None else ())]
    lp, ent = oracle(params[0], params[1], t, params[2] if b is not None else None, **opts)
    grads = torch.autograd.grad((lp * g[0].to(dtype)).sum() + (ent * g[1].to(dtype)).sum(), params)
    return lp, ent, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7), dict(softcap=5.0, temperature=1.3)],
                         ids=["plain", "temperature", "softcap"])
def test_fp32_against_float64(backend, opts):
    shapes = [(5, 17, 3001), (2, 8, 3)] if backend == "triton" else [(1, 17, 50257), (40, 24, 32001), (9, 8, 3)]
    for N, H, V in shapes:
        x, w, t, b = inputs(N, H, V)
        t[0] = int((x[0].double() @ w.double().T).argmax())  # a row whose target is the argmax
        lp, ent, grads, g = run(backend, x, w, t, b, **opts)
        rlp, rent, rgrads = run_oracle(x, w, t, b, g, **opts)
        nlp, nent, ngrads = run_oracle(x, w, t, b, g, dtype=torch.float32, **opts)
        assert lp.dtype == torch.float32 and lp.shape == t.shape
        assert_rule(lp, rlp, nlp, f"logp V={V}")
        assert_rule(ent, rent, nent, f"entropy V={V}")
        for got, ref, naive in zip(grads, rgrads, ngrads):
            assert_rule(got, ref, naive, f"grad V={V}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"])
def test_bf16_criterion(backend):
    """Error vs float64 <= 2 x the naive bf16 PyTorch error + 1e-2 (the rule)."""
    x, w, t, b = inputs(48, 40, 5003, dtype=torch.bfloat16, lead=(4, 12))
    lp, ent, grads, g = run(backend, x, w, t, b, temperature=0.8)
    rlp, rent, rgrads = run_oracle(x, w, t, b, g, temperature=0.8)
    nlp, nent, ngrads = run_oracle(x, w, t, b, g, dtype=torch.bfloat16, temperature=0.8)
    assert_rule(lp, rlp, nlp, "logp")
    assert_rule(ent, rent, nent, "entropy")
    for got, ref, naive in zip(grads, rgrads, ngrads):
        assert got.dtype == torch.bfloat16
        assert_rule(got, ref, naive, "grad")


def test_triton_fp16():
    why = ptcore.ops.dispatch.cannot_run("triton", torch.device("cpu"), torch.float16)
    if why:
        pytest.skip(f"backend triton: {why}")
    x, w, t, b = inputs(6, 16, 257, dtype=torch.float16)
    lp, ent, grads, g = run("triton", x, w, t, b, softcap=10.0)
    rlp, rent, rgrads = run_oracle(x, w, t, b, g, softcap=10.0)
    nlp, nent, ngrads = run_oracle(x, w, t, b, g, dtype=torch.float16, softcap=10.0)
    assert_rule(lp, rlp, nlp, "logp")
    for got, ref, naive in zip(grads, rgrads, ngrads):
        assert_rule(got, ref, naive, "grad")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_float64(backend):
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 10, 0, 3])

    def f(x, w, b):
        with ptcore.use_backend(backend), ptcore.chunk_budget(2 * 11 * 8):
            lp, ent = linear_logprobs(x, w, t, bias=b, temperature=0.8, softcap=4.0, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_are_zero_and_only_logp_grad(backend):
    x, w, t, b = inputs(9, 8, 50)
    t[:] = -100
    t[4] = 7
    xg = x.clone().requires_grad_()
    with ptcore.use_backend(backend):
        lp = linear_logprobs(xg, w, t)
    assert torch.all(lp[t == -100] == 0) and lp[4] < 0
    lp.sum().backward()
    assert torch.all(xg.grad[t == -100] == 0) and xg.grad[4].abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_deterministic_rows_are_batch_invariant(backend):
    """deterministic=True: a row's log-prob and entropy are bitwise the same whatever other rows
    share the batch (permuted, padded with other rows) and whatever the chunk budget."""
    N, H, V = 300, 64, 4001
    x, w, t, _ = inputs(N, H, V, bias=False)

    def lp_ent(x, t, budget=1 << 26):
        with ptcore.use_backend(backend), ptcore.chunk_budget(budget):
            return linear_logprobs(x, w, t, return_entropy=True, deterministic=True)

    base_lp, base_ent = lp_ent(x, t)
    perm = torch.randperm(N)
    lp, ent = lp_ent(x[perm], t[perm])
    assert torch.equal(lp, base_lp[perm]) and torch.equal(ent, base_ent[perm])
    extra_x, extra_t = torch.randn(77, H), torch.randint(0, V, (77,))
    lp, ent = lp_ent(torch.cat([extra_x, x]), torch.cat([extra_t, t]))
    assert torch.equal(lp[77:], base_lp) and torch.equal(ent[77:], base_ent)
    lp, ent = lp_ent(x[:5], t[:5], budget=V * 4 * 3)
    assert torch.equal(lp, base_lp[:5]) and torch.equal(ent, base_ent[:5])


def test_bad_input():
    x, w, t, _ = inputs(4, 8, 10, bias=False)
    with pytest.raises(ValueError, match="'temperature'"):
        linear_logprobs(x, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="'target' must have shape"):
        linear_logprobs(x, w, t[:2])
    with pytest.raises(ValueError, match="'target' holds 10"):
        linear_logprobs(x, w, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(TypeError, match="'weight' has dtype"):
        linear_logprobs(x, w.double(), t)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, t, b = inputs(6, 8, 40)
    x.requires_grad_()

    def f(x):
        lp, ent = linear_logprobs(x, w, t, bias=b, temperature=0.9, return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    g = torch.autograd.grad(out, x)[0]
    eager = f(x)
    eager_g = torch.autograd.grad(eager, x)[0]

    def plain(x, dtype):  # the float64 oracle and the naive fp32 computation
        lp, ent = oracle(x.to(dtype), w.to(dtype), t, b.to(dtype), temperature=0.9)
        return lp.sum() + 0.1 * ent.sum()

    x64, x32 = x.detach().double().requires_grad_(), x.detach().clone().requires_grad_()
    ref, naive = plain(x64, torch.float64), plain(x32, torch.float32)
    ref_g, naive_g = torch.autograd.grad(ref, x64)[0], torch.autograd.grad(naive, x32)[0]
    for got in (out, eager):
        assert_rule(got, ref, naive, "loss")
    for got in (g, eager_g):
        assert_rule(got, ref_g, naive_g, "grad")
    assert rel_err(out, eager) <= rule_bound(naive, ref) / 2
    assert rel_err(g, eager_g) <= rule_bound(naive_g, ref_g) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_targets_and_minus_inf_logits(backend):
    """Targets that are a strided view or an expanded scalar; a -inf logit has probability 0."""
    x, w = torch.randn(6, 8, dtype=torch.float64).float(), torch.randn(13, 8)
    b = torch.zeros(13)
    b[5] = float("-inf")
    big = torch.randint(0, 13, (12,))
    big[big == 5] = 4
    for t in (big[::2], torch.tensor(3).expand(6)):
        with ptcore.use_backend(backend):
            lp, ent = linear_logprobs(x, w, t, bias=b, return_entropy=True)
        rlp, rent = oracle(x.double(), w.double(), t, b.double())
        nlp, nent = oracle(x, w, t, b)
        assert_rule(lp, rlp, nlp, "logp")
        assert_rule(ent, rent, nent, "entropy")


def test_fp16_small_incoming_gradients_do_not_underflow():
    """A mean over many tokens sends gradients of 1/N: scaled to O(1) before the fp16 buffer
    (unscaled, they underflowed there: 3e-2 / 7e-2 relative error; scaled: 1e-3 / 3e-4)."""
    N, H, V = 16384, 16, 2048
    x, w, t = torch.randn(N, H), torch.randn(V, H) / 4, torch.randint(0, V, (N,))
    ref = [p.double().requires_grad_() for p in (x, w)]
    ref_g = torch.autograd.grad(oracle(*ref, t)[0].mean(), ref)
    ours = [p.half().requires_grad_() for p in (x, w)]
    with ptcore.use_backend("cpu"):
        got = torch.autograd.grad(linear_logprobs(*ours, t).mean(), ours)
    # A bound from fp16's epsilon: the naive fp16 computation underflows here too (the rule's
    # naive baseline would be as bad as the bug this test catches).
    for g, r in zip(got, ref_g):
        assert rel_err(g, r) <= 10 * torch.finfo(torch.float16).eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_below_the_bound_is_refused(backend):
    """Below 1e-2 fp32 log-probs lose their digits (inf / NaN entropies at 1e-10 on cpu before):
    refused on every backend, with the bound itself computed to the rule."""
    x, w, t, b = inputs(6, 16, 301)
    with ptcore.use_backend(backend):
        for bad in (1e-3, 1e-10, 1e-30):
            with pytest.raises(ValueError, match="'temperature' must be >= 0.01"):
                linear_logprobs(x, w, t, bias=b, temperature=bad, return_entropy=True)
    t[0] = int((x[0].double() @ w.double().T + b.double()).argmax())
    lp, ent, grads, g = run(backend, x, w, t, b, temperature=1e-2)
    rlp, rent, rgrads = run_oracle(x, w, t, b, g, temperature=1e-2)
    nlp, nent, ngrads = run_oracle(x, w, t, b, g, dtype=torch.float32, temperature=1e-2)
    assert lp[0] <= 0 and torch.all(ent >= 0)
    assert_rule(lp, rlp, nlp, "logp")
    for got, ref, naive in zip(grads, rgrads, ngrads):
        assert_rule(got, ref, naive, "grad")
