"""group_advantages and gae against independent pure-Python oracles written from
docs/losses.md §3, hand values, NaN / constant groups and bad input."""
import doctest
import math
import statistics

import pytest
import torch

from ptcore.ops import advantages as advantages_module
from ptcore.ops.advantages import gae, group_advantages

F64 = torch.float64


def oracle_groups(rewards, ids, estimator, scale="group", eps=1e-4):
    """One group at a time; NaN rewards are left out and get 0; constant groups get 0."""
    out = [0.0] * len(rewards)
    valid = [i for i, r in enumerate(rewards) if not math.isnan(r)]
    batch_r = [rewards[i] for i in valid]
    dev = {}
    for g in set(ids):
        mem = [i for i in valid if ids[i] == g]
        rs = [rewards[i] for i in mem]
        if not rs or max(rs) == min(rs):
            for i in mem:
                dev[i] = None  # constant group
            continue
        mu = sum(rs) / len(rs)
        sd = statistics.stdev(rs) if len(rs) > 1 else 0.0
        for i in mem:
            if estimator == "rloo":
                dev[i] = rewards[i] - (sum(rs) - rewards[i]) / (len(rs) - 1)
            elif estimator == "reinforce_pp" or scale == "none":
                dev[i] = rewards[i] - mu
            elif scale == "group":
                dev[i] = (rewards[i] - mu) / (sd + eps)
            else:
                dev[i] = (rewards[i] - mu) / (statistics.stdev(batch_r) + eps)
    if estimator == "reinforce_pp":
        d = [dev[i] or 0.0 for i in valid]
        mu, sd = sum(d) / len(d), statistics.stdev(d)
        dev = {i: None if dev[i] is None else (dev[i] - mu) / (sd + eps) for i in valid}
    for i in valid:
        out[i] = dev[i] or 0.0
    return out


@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"),
                                              ("grpo", "none"), ("rloo", "group"),
                                              ("reinforce_pp", "group")])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle(estimator, scale, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(24, generator=g, dtype=F64)
    r[3] = r[17] = float("nan")           # missing rewards
    r[8:12] = 0.5                         # a constant group
    r[12:15] = float("nan")               # a group with a single valid member
    r[20:24] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)  # binary rewards
    ids = [i // 4 for i in range(24)]
    got = group_advantages(r, 4, estimator=estimator, scale=scale)
    expected = oracle_groups(r.tolist(), ids, estimator, scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(got).all()
    assert (got[[3, 17]] == 0).all() and (got[8:15] == 0).all()


def test_hand_values():
    r = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(group_advantages(r, 3, estimator="rloo"),
                               torch.tensor([-1.5, 0.0, 1.5], dtype=F64))
    torch.testing.assert_close(group_advantages(r, 3),  # group std (unbiased) = 1
                               torch.tensor([-1.0, 0.0, 1.0], dtype=F64) / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(r, 3, scale="none"),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=F64))
    # NaN left out: [1, nan, 3] has mean 2, std sqrt(2); rloo baseline is the other valid member
    rn = torch.tensor([1.0, float("nan"), 3.0], dtype=F64)
    torch.testing.assert_close(group_advantages(rn, 3),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=F64) / (math.sqrt(2) + 1e-4))
    torch.testing.assert_close(group_advantages(rn, 3, estimator="rloo"),
                               torch.tensor([-2.0, 0.0, 2.0], dtype=F64))


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_constant_and_degenerate_groups_are_exact_zero(estimator):
    r = torch.tensor([0.1, 0.1, 0.1, 7.0, 7.0, float("nan"), float("nan"), float("nan")])
    a = group_advantages(r, groups=torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), estimator=estimator)
    assert torch.equal(a, torch.zeros(8))
    single = group_advantages(torch.tensor([1.0, float("nan"), 2.0, 5.0]), 2, estimator=estimator)
    assert single[0] == 0 and single[1] == 0 and torch.isfinite(single).all()


def test_explicit_group_ids_equal_consecutive_groups():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(12, generator=g)
    perm = torch.randperm(12, generator=g)
    ids = torch.arange(12) // 3 * 10 + 5  # arbitrary id values
    for est in ("grpo", "rloo", "reinforce_pp"):
        base = group_advantages(r, 3, estimator=est)
        shuffled = group_advantages(r[perm], groups=ids[perm], estimator=est)
        torch.testing.assert_close(shuffled, base[perm])


def test_dtypes():
    assert group_advantages(torch.tensor([1, 2, 3, 4]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=F64), 2).dtype == F64
    assert group_advantages(torch.zeros(0), 1).shape == (0,)


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(group_size=3), ValueError, "'group_size' must be >= 1 and divide the batch size 4"),
    (dict(group_size=0), ValueError, "'group_size'"),
    (dict(group_size=2.0), TypeError, "'group_size' must be an int"),
    (dict(), ValueError, "exactly one of 'group_size' and 'groups'"),
    (dict(group_size=2, groups=torch.zeros(4, dtype=torch.long)), ValueError, "exactly one"),
    (dict(groups=torch.zeros(3, dtype=torch.long)), ValueError, "'groups' must have shape"),
    (dict(groups=torch.zeros(4)), TypeError, "'groups' must hold integer ids"),
    (dict(group_size=2, estimator="ppo"), ValueError, "'estimator' must be one of"),
    (dict(group_size=2, scale="global"), ValueError, "'scale' must be one of"),
    (dict(group_size=2, eps=-1.0), ValueError, "'eps' must be >= 0"),
])
def test_group_advantages_bad_input(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        group_advantages(torch.randn(4), **kw)
    with pytest.raises(ValueError, match="'rewards' must be 1-D"):
        group_advantages(torch.randn(2, 2), 2)


def oracle_gae(r, v, gamma, lam):
    """Backward recursion on one unpadded sequence; V and A after the end are 0."""
    adv, nxt_v, nxt_a = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        nxt_a = r[t] + gamma * nxt_v - v[t] + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


def test_gae_hand_values():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.full((1, 3), 0.5)
    m = torch.ones(1, 3, dtype=torch.bool)
    a, ret = gae(r, v, m)  # gamma = lam = 1: reward-to-go minus V
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.ones(1, 3))
    a0, _ = gae(r, v, m, lam=0.0)  # one-step TD errors
    torch.testing.assert_close(a0, torch.tensor([[0.0, 0.0, 0.5]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_oracle_with_padding_and_gaps(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    r, v = torch.randn(B, T, generator=g, dtype=F64), torch.randn(B, T, generator=g, dtype=F64)
    lengths = [9, 4, 0, 1, 7]
    m = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    m[4, 2] = False  # a token inside the completion not produced by the policy: skipped
    a, ret = gae(r, v, m, gamma=gamma, lam=lam)
    for i in range(B):
        keep = [t for t in range(T) if m[i, t]]
        exp = oracle_gae([r[i, t].item() for t in keep], [v[i, t].item() for t in keep], gamma, lam)
        torch.testing.assert_close(a[i, keep], torch.tensor(exp, dtype=F64))
        torch.testing.assert_close(ret[i, keep], a[i, keep] + v[i, keep])
    assert (a[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_bad_input():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'values' must have shape"):
        gae(r, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="'mask' must have shape"):
        gae(r, r, torch.ones(3, 3))
    with pytest.raises(ValueError, match="'gamma' must be <= 1"):
        gae(r, r, torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="'lam' must be >= 0"):
        gae(r, r, torch.ones(2, 3), lam=-0.1)
    with pytest.raises(ValueError, match="'rewards' must be 2-D"):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3))


def test_doctest():
    assert doctest.testmod(advantages_module).failed == 0
