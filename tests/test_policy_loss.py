"""policy_loss against an independent float64 oracle written from docs/losses.md §2
(pure Python, token by token), hand-computed values, gradients, micro-batch invariance with the
global normalizer, masking and bad input."""
import doctest
import math

import pytest
import torch

from ptcore.ops import policy
from ptcore.ops.policy import AGGREGATION, kl_penalty, policy_loss
from tests.reference import assert_rule

# The classic types this file's oracle knows; sapo, luspo, vespo and gmpo (and the options
# some of them reject, such as dual_clip) are tested against TRL in test_policy_loss_families.py.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "pg")

F64 = torch.float64


def oracle(lp, old, A, M, *, loss_type, ref=None, beta=0.0, est="k3", el=0.2, eh=0.2, c=None,
           level="token", cap=None):
    """Loss value from the formula, on nested lists."""
    B, T = len(lp), len(lp[0])
    adv = [[A[i][t] if isinstance(A[i], list) else A[i] for t in range(T)] for i in range(B)]
    seq_ratio = loss_type == "gspo" or (level == "sequence" and loss_type != "pg")
    tok, per_seq, n_tok = 0.0, [], 0
    for i in range(B):
        ts = [t for t in range(T) if M[i][t]]
        s = sum(lp[i][t] - old[i][t] for t in ts) / max(len(ts), 1)
        row = 0.0
        for t in ts:
            a = adv[i][t]
            x = s if seq_ratio else lp[i][t] - old[i][t]
            rho = math.exp(min(max(x, -20), 20))
            if loss_type == "pg":
                l = -a * lp[i][t]
            elif loss_type == "cispo":
                l = -min(rho, cap if cap is not None else 1 + eh) * a * lp[i][t]
            else:
                l = -min(rho * a, min(max(rho, 1 - el), 1 + eh) * a)
                if c is not None and a < 0:
                    l = min(l, -c * a)
            if beta > 0:
                d = lp[i][t] - ref[i][t]
                l += beta * {"k1": d, "k2": 0.5 * d * d,
                             "k3": math.exp(min(max(-d, -20), 20)) - min(max(-d, -20), 20) - 1}[est]
            row += l
        tok += row
        n_tok += len(ts)
        per_seq.append(row / max(len(ts), 1))
    agg = {"grpo": "seqmean", "gspo": "seqmean", "dr_grpo": "norm"}.get(loss_type, "tok")
    if agg == "seqmean":
        return sum(per_seq) / B
    if agg == "norm":
        return tok / (B * T)
    return tok / max(n_tok, 1)


def make(B=6, T=7, seed=0, per_token_adv=False, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.3  # ratios both sides of the clip
    ref = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    A = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=F64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[1] = 0  # an all-masked sequence
    M = torch.arange(T)[None, :] < lengths[:, None]
    ent = torch.rand(B, T, generator=g, dtype=F64)
    return [t.to(dtype) for t in (lp, old, ref, A)] + [M, ent]


CONFIGS = [dict(), dict(dual_clip=3.0), dict(beta=0.05, kl_estimator="k1"),
           dict(beta=0.1, kl_estimator="k2", epsilon_high=0.28),
           dict(beta=0.1, kl_estimator="k3", importance_sampling_level="sequence"),
           dict(cispo_max=1.1)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_matches_oracle(loss_type, cfg, per_token_adv):
    lp, old, ref, A, M, _ = make(per_token_adv=per_token_adv)
    out = policy_loss(lp, old, A, M, ref_logps=ref, loss_type=loss_type, **cfg)
    expected = oracle(lp.tolist(), old.tolist(), A.tolist(), M.tolist(), loss_type=loss_type,
                      ref=ref.tolist(), beta=cfg.get("beta", 0.0),
                      est=cfg.get("kl_estimator", "k3"), eh=cfg.get("epsilon_high", 0.2),
                      c=cfg.get("dual_clip"), level=cfg.get("importance_sampling_level", "token"),
                      cap=cfg.get("cispo_max"))
    assert out.loss.dtype == F64
    assert out.loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def one(x):
    return torch.tensor([[x]], dtype=F64)


@pytest.mark.parametrize("rho, a, kw, expected", [
    (1.5, 1.0, {}, -1.2),                    # clipped at 1 + eps
    (0.5, 1.0, {}, -0.5),                    # unclipped side
    (0.5, -1.0, {}, 0.8),                    # -min(-0.5, -0.8)
    (1.5, -1.0, {}, 1.5),
    (5.0, -1.0, {"dual_clip": 3.0}, 3.0),    # min(5, 3)
    (5.0, -1.0, {}, 5.0),
    (1.5, 1.0, {"epsilon_high": 0.28}, -1.28),
])
def test_ppo_clip_hand_values(rho, a, kw, expected):
    out = policy_loss(one(math.log(rho)), one(0.0), torch.tensor([a], dtype=F64),
                      torch.ones(1, 1), loss_type="dapo", **kw)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_kl_penalty_hand_values():
    lp64, ref64 = torch.tensor([-1.0, -1.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64)
    lp, ref = lp64.float(), ref64.float()
    d = ref - lp
    # (hand value, the estimator's formula in plain fp32: the tolerance rule's naive baseline)
    hand = {"k3": ([0.0, math.e - 2], d.exp() - d - 1), "k1": ([0.0, -1.0], lp - ref),
            "k2": ([0.0, 0.5], 0.5 * (lp - ref) ** 2)}
    for est, (want, naive) in hand.items():
        want = torch.tensor(want, dtype=F64)
        torch.testing.assert_close(kl_penalty(lp64, ref64, est), want, rtol=1e-12, atol=1e-12)
        got = kl_penalty(lp, ref, est)
        assert got.dtype == torch.float32
        assert_rule(got, want, naive, f"fp32 {est}")
    assert torch.isfinite(kl_penalty(torch.tensor([-1000.0]), torch.tensor([0.0]), "k3")).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_aggregation_hand_values(dtype):
    # ratio 1, per-token advantages 1, 2, 3 | 4: per-token loss = -A
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, float("-inf"), float("-inf")]], dtype=dtype)
    A = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("nan")]], dtype=dtype)
    M = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a, alp = A[M.bool()], (A * lp)[M.bool()]  # the kept tokens' A and A logp
    # (hand value, the same aggregation in plain ``dtype``: the tolerance rule's naive baseline)
    hand = {"grpo": (-(2 + 4) / 2, -(a[:3].mean() + a[3:].mean()) / 2), "dapo": (-10 / 4, -a.sum() / 4),
            "dr_grpo": (-10 / 6, -a.sum() / 6), "pg": (10 / 4, -alp.sum() / 4)}  # pg: -A logp
    for k, (want, naive) in hand.items():
        got = policy_loss(lp, lp, A, M, loss_type=k).loss
        assert got.dtype == dtype
        if dtype == F64:
            assert got.item() == pytest.approx(want, abs=1e-12), k
        else:
            assert_rule(got, torch.tensor(want, dtype=F64), naive, f"fp32 {k}")
    assert AGGREGATION["bnpo"] == "token-mean" and AGGREGATION["gspo"] == "seq-mean-token-mean"


def test_gspo_uses_sequence_ratio():
    lp = torch.tensor([[0.1, 0.3, 5.0]], dtype=F64)
    M = torch.tensor([[True, True, False]])
    out = policy_loss(lp, torch.zeros_like(lp), torch.ones(1, dtype=F64), M, loss_type="gspo",
                      epsilon_low=0.5, epsilon_high=0.5)
    assert out.loss.item() == pytest.approx(-math.exp(0.2), abs=1e-12)
    assert out.metrics["ratio_mean"].item() == pytest.approx(math.exp(0.2))


def test_cispo_and_pg_gradients():
    lp, old, _, A, M, _ = make()
    for loss_type, cap in (("cispo", None), ("cispo", 1.1), ("pg", None)):
        x = lp.clone().requires_grad_()
        policy_loss(x, old, A, M, loss_type=loss_type, cispo_max=cap).loss.backward()
        w = torch.ones_like(lp) if loss_type == "pg" else \
            torch.exp(lp - old).clamp(max=cap if cap else 1.2)
        expected = torch.where(M, -w * A[:, None], 0) / M.sum()
        torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("loss_type, cfg", [
    ("grpo", dict()), ("dapo", dict(dual_clip=2.0, beta=0.1, ref=True)),
    ("bnpo", dict(beta=0.2, kl_estimator="k2", ref=True)), ("dr_grpo", dict(beta=0.1, ref=True)),
    ("gspo", dict()), ("grpo", dict(importance_sampling_level="sequence")), ("pg", dict())])
def test_gradcheck(loss_type, cfg):
    lp, old, ref, A, M, _ = make(B=3, T=4, seed=3)
    cfg = dict(cfg)
    if cfg.pop("ref", False):
        cfg["ref_logps"] = ref
    lp.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, old, A, M, loss_type=loss_type, **cfg).loss, (lp,))


def global_normalizer(loss_type, M):
    agg = AGGREGATION[loss_type]
    if agg == "token-mean":
        return M.sum()
    return M.shape[0] if agg == "seq-mean-token-mean" else M.numel()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("cfg", [dict(), dict(dual_clip=3.0, beta=0.1, per_token_adv=True),
                                 dict(importance_sampling_level="sequence", beta=0.05)],
                         ids=["plain", "dual_kl_gae", "seqlevel"])
def test_micro_batch_invariance(loss_type, cfg):
    cfg = dict(cfg)
    lp, old, ref, A, M, ent = make(B=8, T=5, seed=7, per_token_adv=cfg.pop("per_token_adv", False))
    kw = dict(loss_type=loss_type, ref_logps=ref, **cfg)
    whole_x = lp.clone().requires_grad_()
    whole = policy_loss(whole_x, old, A, M, **kw).loss  # default normalizer = the whole batch's
    whole.backward()
    acc_x = lp.clone().requires_grad_()
    norm = global_normalizer(loss_type, M)
    total = 0.0
    for idx in torch.arange(8).split(2):
        r = ref[idx]
        part = policy_loss(acc_x[idx], old[idx], A[idx], M[idx], normalizer=norm,
                           **{**kw, "ref_logps": r}).loss
        part.backward()  # gradient accumulation
        total = total + part.detach()
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(acc_x.grad, whole_x.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_per_micro_batch_normalization_differs(loss_type):
    """The trap the global normalizer avoids (docs/losses.md §2): local denominators change the loss."""
    lp, old, _, A, M, _ = make(B=8, T=5, seed=7)
    whole = policy_loss(lp, old, A, M, loss_type=loss_type).loss
    local = sum(policy_loss(lp[i], old[i], A[i], M[i], loss_type=loss_type).loss
                for i in torch.arange(8).split(2))
    assert abs(local.item() - whole.item()) > 1e-3


def test_normalizer_accepts_tensor():
    lp, old, _, A, M, _ = make()
    a = policy_loss(lp, old, A, M, normalizer=torch.tensor(13.0)).loss
    b = policy_loss(lp, old, A, M, normalizer=13).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_a_zero_tensor_normalizer_with_unmasked_tokens_raises():
    """0 means "the whole step has no tokens"; given with tokens it would silently divide by 1."""
    lp, old, _, A, M, _ = make()
    with pytest.raises(ValueError, match="'normalizer' is 0 but the mask selects"):
        policy_loss(lp, old, A, M, normalizer=torch.tensor(0.0))
    none = torch.zeros_like(M, dtype=torch.bool)
    assert policy_loss(lp, old, A, none, normalizer=torch.tensor(0.0)).loss.item() == 0


def test_all_masked_is_finite_zero():
    lp = torch.full((3, 4), float("-inf"), dtype=F64).requires_grad_()
    old = torch.full((3, 4), float("nan"), dtype=F64)
    M = torch.zeros(3, 4, dtype=torch.bool)
    for loss_type in LOSS_TYPES:
        out = policy_loss(lp, old, torch.randn(3, dtype=F64), M, ref_logps=old, beta=0.1,
                          entropy=old, loss_type=loss_type, dual_clip=3.0)
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert all(torch.isfinite(v) and v.item() == 0.0 for v in out.metrics.values())
        assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_metrics():
    # tokens: rho = 1.5 (A>0, high clip), 0.5 (A<0, low clip), 1.0, then one masked token
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]], dtype=F64))
    A = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=F64)
    M = torch.tensor([[1, 1, 1, 0]])
    ref = torch.zeros_like(lp)
    ent = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=F64)
    m = policy_loss(lp, torch.zeros_like(lp), A, M, ref_logps=ref, entropy=ent,
                    kl_estimator="k1").metrics
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert m["kl"].item() == pytest.approx(math.log(0.75) / 3)  # k1 mean, beta = 0
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.0)) / 3
    assert m["approx_kl"].item() == pytest.approx(k3)
    assert not any(v.requires_grad for v in m.values())
    pg = policy_loss(lp, torch.zeros_like(lp), A, M, loss_type="pg").metrics
    assert pg["clip_ratio/region_mean"].item() == 0.0 and "kl" not in pg and "entropy" not in pg


def test_low_precision_inputs_compute_in_float32():
    lp, old, ref, A, M, _ = make(dtype=torch.bfloat16)
    out = policy_loss(lp, old, A, M, ref_logps=ref, beta=0.1)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def _call(**over):
    lp, old, ref, A, M, ent = make(B=3, T=4)
    kw = dict(logps=lp, old_logps=old, advantages=A, mask=M)
    kw.update(over)
    return policy_loss(**kw)


@pytest.mark.parametrize("over, exc, pattern", [
    ({"old_logps": torch.zeros(3, 5)}, ValueError, r"'old_logps' must have shape \(3, 4\)"),
    ({"mask": torch.ones(3, 3)}, ValueError, "'mask' must have shape"),
    ({"mask": torch.ones(4, 4)}, ValueError, "'mask' must have shape"),
    ({"advantages": torch.zeros(4)}, ValueError, "'advantages' must have shape"),
    ({"advantages": torch.zeros(3, 5)}, ValueError, "'advantages' must have shape"),
    ({"ref_logps": torch.zeros(3, 5)}, ValueError, "'ref_logps' must have shape"),
    ({"entropy": torch.zeros(2, 4)}, ValueError, "'entropy' must have shape"),
    ({"logps": torch.zeros(3)}, ValueError, "'logps' must be 2-D"),
    ({"logps": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "'logps' must have dtype"),
    ({"loss_type": "ppo"}, ValueError, r"'loss_type' must be one of \('grpo'"),
    ({"kl_estimator": "k4", "beta": 0.1}, ValueError, "'kl_estimator'"),
    ({"importance_sampling_level": "seq"}, ValueError, "'importance_sampling_level'"),
    ({"beta": -0.1}, ValueError, "'beta' must be >= 0"),
    ({"beta": 0.1}, ValueError, "'ref_logps' is required when 'beta' > 0"),
    ({"dual_clip": 1.0}, ValueError, "'dual_clip' must be > 1"),
    ({"dual_clip": 0.5}, ValueError, "'dual_clip' must be > 1"),
    ({"epsilon_low": -0.1}, ValueError, "'epsilon_low'"),
    ({"epsilon_high": -0.1}, ValueError, "'epsilon_high'"),
    ({"cispo_max": 0.0, "loss_type": "cispo"}, ValueError, "'cispo_max' must be > 0"),
    ({"normalizer": 0}, ValueError, "'normalizer' must be > 0"),
    ({"normalizer": torch.ones(2)}, ValueError, "'normalizer' must be a number or a one-element"),
])
def test_bad_input_names_argument(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match="'estimator'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k5")
    with pytest.raises(ValueError, match="'ref_logps' must have shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


def test_doctest():
    assert doctest.testmod(policy).failed == 0
