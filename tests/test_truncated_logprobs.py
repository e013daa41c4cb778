"""linear_logprobs(..., top_k=, top_p=): the truncated distribution's log-probs (renormalized over
the kept set), against a float64 brute force written from the definition, against the engine's
own sampler on the same logits (kept set including ties and the token that crosses top_p, and
the log-prob it returns), and a float64 gradcheck."""
import math

import pytest
import torch

from ptcore.engine.sampling import SamplingParams, make_generator, sample
from ptcore.ops import linear_logprobs
from tests.reference import assert_rule

F64 = torch.float64


def brute(z_row, top_k, top_p):
    """Kept set and renormalized log-probs of one row of logits (after temperature), by lists."""
    V = len(z_row)
    order = sorted(range(V), key=lambda i: (-z_row[i], i))  # descending, ties: lower id first
    kept = order[:top_k] if top_k else order
    if top_p < 1:
        m = max(z_row[i] for i in kept)
        tot = sum(math.exp(z_row[i] - m) for i in kept)
        out, ahead = [], 0.0
        for j, i in enumerate(kept):
            if j == 0 or ahead < top_p:
                out.append(i)
            ahead += math.exp(z_row[i] - m) / tot
        kept = out
    m = max(z_row[i] for i in kept)
    lse = m + math.log(sum(math.exp(z_row[i] - m) for i in kept))
    return set(kept), {i: z_row[i] - lse for i in kept}


def data(N=12, H=8, V=23, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64)
    if ties:  # duplicate rows of W: tied logits everywhere, including at the top-k boundary
        W[5] = W[2]
        W[11] = W[7]
        W[17] = W[7]
    return x, W


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.7), (5, 0.8), (1, 1.0), (0, 0.05), (7, 0.999)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_equal_the_definition(top_k, top_p, temperature):
    x, W = data()
    z = (x @ W.T) / temperature
    for t in range(W.shape[0]):
        y = torch.full((x.shape[0],), t)
        lp = linear_logprobs(x, W, y, temperature=temperature, top_k=top_k, top_p=top_p)
        for i in range(x.shape[0]):
            kept, logps = brute(z[i].tolist(), top_k, top_p)
            want = logps.get(t, -math.inf)
            got = float(lp[i])
            assert (got == want == -math.inf) or abs(got - want) < 1e-12, (i, t, got, want)


def test_the_token_that_crosses_top_p_stays():
    # probabilities 0.5, 0.3, 0.2 (token ids 2, 0, 1)
    z = torch.log(torch.tensor([[0.3, 0.2, 0.5]], dtype=F64))
    x, W = torch.ones(1, 1, dtype=F64), z.T.contiguous()  # logits = x @ W.T = z
    lp = lambda t, p: float(linear_logprobs(x, W, torch.tensor([t]), top_p=p)[0])
    assert lp(0, 0.75) == pytest.approx(math.log(0.3 / 0.8))  # 0 crosses 0.75: kept
    assert lp(1, 0.75) == -math.inf
    assert lp(0, 0.5) == -math.inf  # the mass ahead of token 0 is 0.5 >= 0.5: dropped
    assert lp(2, 0.5) == 0.0
    assert lp(1, 0.81) == pytest.approx(math.log(0.2))  # 0.8 ahead of it < 0.81


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.7), (5, 0.8), (4, 0.9)])
def test_kept_set_and_logprob_equal_the_engines_sampler(top_k, top_p):
    x, W = data(N=6)
    logits = x @ W.T
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)
    z = logits / 0.9
    seen = [set() for _ in range(x.shape[0])]
    for draw in range(150):
        gens = [make_generator(1000 * draw + i, "cpu") for i in range(x.shape[0])]
        tok, lp = sample(logits, [params] * x.shape[0], gens)
        ours = linear_logprobs(x, W, tok, temperature=0.9, top_k=top_k, top_p=top_p)  # float64 here
        # The engine returns float32: against ours (float64) under the tolerance rule, the naive
        # baseline being the same truncated log-softmax in plain fp32 over the brute force's kept set.
        assert lp.dtype == torch.float32 and ours.dtype == F64 and torch.isfinite(lp).all()
        z32 = logits.float() / 0.9
        naive = torch.stack([z32[i, t] - torch.logsumexp(z32[i, sorted(brute(z[i].tolist(), top_k, top_p)[0])], 0)
                             for i, t in enumerate(tok.tolist())])
        assert_rule(lp, ours, naive, f"sampler log-probs, draw {draw}")
        for i, t in enumerate(tok.tolist()):
            seen[i].add(t)
    for i in range(x.shape[0]):
        kept, logps = brute(z[i].tolist(), top_k, top_p)
        likely = {t for t in kept if logps[t] > math.log(0.05)}  # drawn in 150 tries for sure
        assert likely <= seen[i] <= kept, (i, seen[i], kept)


def test_gradcheck_float64():
    x, W = data(N=5, H=4, V=9, ties=False)  # a tie at the boundary is not differentiable
    b = torch.randn(9, dtype=F64)
    y = torch.tensor([0, 3, 8, -100, 5])
    # targets inside the kept set (a -inf log-prob has no gradient to check)
    z = x @ W.T + b
    for i in range(5):
        if y[i] >= 0:
            y[i] = int(z[i].argmax())
    x.requires_grad_(True)
    W.requires_grad_(True)
    b.requires_grad_(True)
    for top_k, top_p in ((3, 1.0), (0, 0.8), (4, 0.9)):
        f = lambda x, W, b: linear_logprobs(x, W, y, bias=b, temperature=0.8, top_k=top_k, top_p=top_p,
                                            return_entropy=True, softcap=5.0)
        assert torch.autograd.gradcheck(f, (x, W, b), eps=1e-6, atol=1e-7)


def test_no_truncation_is_the_plain_path_and_bad_values_are_named():
    x, W = data()
    y = torch.randint(0, W.shape[0], (x.shape[0],))
    torch.testing.assert_close(linear_logprobs(x, W, y, top_k=W.shape[0]), linear_logprobs(x, W, y))
    for kw, name in ((dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=name):
            linear_logprobs(x, W, y, **kw)
    with pytest.raises(TypeError, match="top_k"):
        linear_logprobs(x, W, y, top_k=2.0)
