"""dpo_loss against an independent float64 oracle written from docs/losses.md §1 (pure
Python math, one pair at a time), hand-computed values, gradients, and bad input."""
import doctest
import math

import pytest
import torch

from ptcore.ops import preference
from ptcore.ops.preference import LOSS_TYPES, dpo_loss
from tests.reference import assert_rule


def ls(x):  # log-sigmoid, stable
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(ls(x))


def oracle_pair(kind, pc, pr, refc, refr, lc, lr, *, beta, e, gamma, lam, nll):
    rc, rr = pc - refc, pr - refr
    D = rc - rr
    if kind == "sigmoid":
        return -(1 - e) * ls(beta * D) - e * ls(-beta * D)
    if kind == "robust":
        return (-(1 - e) * ls(beta * D) + e * ls(-beta * D)) / (1 - 2 * e)
    if kind == "hinge":
        return max(0.0, 1 - beta * D)
    if kind == "ipo":
        return (rc / lc - rr / lr - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        e = e or 1e-3
        return (sig(beta * D) * (ls(beta * D) - math.log(1 - e))
                + sig(-beta * D) * (ls(-beta * D) - math.log(e)))
    if kind == "nca_pair":
        return -ls(beta * rc) - 0.5 * ls(-beta * rc) - 0.5 * ls(-beta * rr)
    if kind == "bco_pair":
        return -ls(beta * rc) - ls(-beta * rr)
    if kind == "sppo_hard":
        return (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * rc)) + sig(beta * rr)
    if kind == "apo_down":
        return sig(beta * rc) + (1 - sig(beta * D))
    if kind == "simpo":
        return -ls(beta * (pc / lc - pr / lr) - gamma)
    assert kind == "orpo"
    odds = [a - math.log(1 - math.exp(a)) for a in (pc / lc, pr / lr)]
    return (-pc / lc if nll is None else nll) - lam * ls(odds[0] - odds[1])


def naive_loss(kind, pc, pr, refc, refr, lc, lr, *, beta, e, gamma, lam):
    """oracle_pair written with plain PyTorch ops on tensors, mean over pairs, in the inputs' dtype:
    the naive baseline of the tolerance rule for the float32 loss."""
    F, lc, lr = torch.nn.functional, lc.to(pc.dtype), lr.to(pc.dtype)
    ls, sig = F.logsigmoid, torch.sigmoid
    rc, rr = pc - refc, pr - refr
    D = rc - rr
    if kind == "sigmoid":
        per = -(1 - e) * ls(beta * D) - e * ls(-beta * D)
    elif kind == "robust":
        per = (-(1 - e) * ls(beta * D) + e * ls(-beta * D)) / (1 - 2 * e)
    elif kind == "hinge":
        per = (1 - beta * D).clamp(min=0)
    elif kind == "ipo":
        per = (rc / lc - rr / lr - 1 / (2 * beta)) ** 2
    elif kind == "exo_pair":
        e = e or 1e-3
        per = sig(beta * D) * (ls(beta * D) - math.log(1 - e)) + sig(-beta * D) * (ls(-beta * D) - math.log(e))
    elif kind == "nca_pair":
        per = -ls(beta * rc) - 0.5 * ls(-beta * rc) - 0.5 * ls(-beta * rr)
    elif kind == "bco_pair":
        per = -ls(beta * rc) - ls(-beta * rr)
    elif kind == "sppo_hard":
        per = (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    elif kind == "apo_zero":
        per = (1 - sig(beta * rc)) + sig(beta * rr)
    elif kind == "apo_down":
        per = sig(beta * rc) + (1 - sig(beta * D))
    elif kind == "simpo":
        per = -ls(beta * (pc / lc - pr / lr) - gamma)
    else:
        assert kind == "orpo"
        odds = [a - torch.log(-torch.expm1(a)) for a in (pc / lc, pr / lr)]
        per = -pc / lc - lam * ls(odds[0] - odds[1])
    return per.mean()


def batch(B=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(2, 12, (B,), generator=g)
    lr = torch.randint(2, 12, (B,), generator=g)
    pc = -(torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.05) * lc  # mean logp < 0
    pr = -(torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.05) * lr
    refc = pc + torch.randn(B, generator=g, dtype=torch.float64) * 3
    refr = pr + torch.randn(B, generator=g, dtype=torch.float64) * 3
    return [t.to(dtype) for t in (pc, pr, refc, refr)] + [lc, lr]


@pytest.mark.parametrize("kind", LOSS_TYPES)
@pytest.mark.parametrize("beta, e", [(0.1, 0.0), (0.7, 0.2)])
def test_matches_oracle(kind, beta, e):
    pc, pr, refc, refr, lc, lr = batch()
    out = dpo_loss(pc, pr, refc, refr, beta=beta, loss_type=kind, label_smoothing=e,
                   chosen_lengths=lc, rejected_lengths=lr, gamma=0.8, orpo_lambda=0.3)
    per = [oracle_pair(kind, *map(float, (pc[i], pr[i], refc[i], refr[i], lc[i], lr[i])),
                       beta=beta, e=e, gamma=0.8, lam=0.3, nll=None) for i in range(len(pc))]
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(sum(per) / len(per), rel=1e-10, abs=1e-12)
    # float32 inputs compute in float32: against the float64 loss under the tolerance rule, the
    # naive baseline being the same formulas in plain float32 PyTorch from the same float32 inputs
    in32 = [t.float() for t in (pc, pr, refc, refr)]
    out32 = dpo_loss(*in32, beta=beta, loss_type=kind, label_smoothing=e, chosen_lengths=lc,
                     rejected_lengths=lr, gamma=0.8, orpo_lambda=0.3)
    assert out32.loss.dtype == torch.float32
    naive = naive_loss(kind, *in32, lc, lr, beta=beta, e=e, gamma=0.8, lam=0.3)
    assert naive.dtype == torch.float32
    assert_rule(out32.loss, out.loss, naive, f"{kind} float32 loss")


@pytest.mark.parametrize("kind, args, kw, expected", [
    ("sigmoid", (-1.0, -2.0, 0.0, 0.0), {}, 0.6443966600735709),  # -ls(0.1)
    ("sigmoid", (0.0, 0.0, 0.0, 0.0), {"label_smoothing": 0.3}, math.log(2)),
    ("robust", (0.0, 0.0, 0.0, 0.0), {"label_smoothing": 0.25}, math.log(2)),  # 0.5 log2 / 0.5
    ("hinge", (-1.0, -6.0, 0.0, 0.0), {}, 0.5),  # 1 - 0.1 * 5
    ("hinge", (-1.0, -21.0, 0.0, 0.0), {}, 0.0),
    ("ipo", (-2.0, -4.0, -4.0, -4.0), {"beta": 1.0, "lengths": (2, 1)}, 0.25),  # (1 - 0 - .5)^2
    ("ipo", (-2.0, -4.0, -4.0, -4.0), {"beta": 0.5, "lengths": (2, 1)}, 0.0),
    ("sppo_hard", (0.0, 0.0, 0.0, 0.0), {"beta": 0.5}, 2.0),
    ("apo_zero", (0.0, 0.0, 0.0, 0.0), {}, 1.0),
    ("apo_down", (0.0, 0.0, 0.0, 0.0), {}, 1.0),
    ("bco_pair", (0.0, 0.0, 0.0, 0.0), {}, 2 * math.log(2)),
    ("nca_pair", (0.0, 0.0, 0.0, 0.0), {}, 2 * math.log(2)),
    ("exo_pair", (0.0, 0.0, 0.0, 0.0), {"label_smoothing": 0.5}, 0.0),  # KL(0.5 || 0.5)
    ("simpo", (-2.0, -4.0, None, None), {"beta": 2.0, "lengths": (2, 2)}, 0.20141327798275246),
    ("orpo", (-math.log(2), -math.log(2), None, None), {"lengths": (1, 1)}, math.log(2) * 2),
])
def test_hand_values(kind, args, kw, expected):
    kw = dict(kw)
    lengths = kw.pop("lengths", None)
    t = [None if a is None else torch.tensor([a], dtype=torch.float64) for a in args]
    if lengths:
        kw.update(chosen_lengths=torch.tensor([lengths[0]]),
                  rejected_lengths=torch.tensor([lengths[1]]))
    out = dpo_loss(*t, loss_type=kind, **kw)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orpo_log_odds_and_nll_override(dtype):
    # a_c = log 0.5 -> odds 1 (log 0); a_r = log 0.2 -> log odds log(0.25)
    pc, pr = torch.tensor([math.log(0.5)], dtype=dtype), torch.tensor([math.log(0.2)], dtype=dtype)
    one = torch.ones(1)
    out = dpo_loss(pc, pr, loss_type="orpo", chosen_lengths=one, rejected_lengths=one,
                   orpo_lambda=2.0, chosen_nll=torch.tensor([0.25], dtype=dtype))
    want = 0.25 - 2 * ls(-math.log(0.25))
    assert out.loss.dtype == dtype
    if dtype == torch.float64:
        assert out.loss.item() == pytest.approx(want, abs=1e-12)
    else:  # the tolerance rule, naive: the log-odds formula in plain fp32
        log_odds = lambda a: a - torch.log1p(-torch.exp(a))
        naive = 0.25 - 2 * torch.nn.functional.logsigmoid(log_odds(pc) - log_odds(pr))
        assert_rule(out.loss, torch.tensor(want, dtype=torch.float64), naive.reshape(out.loss.shape), "fp32 orpo")


def test_weighted_combination_and_rewards():
    pc, pr, refc, refr, lc, lr = batch()
    kw = dict(chosen_lengths=lc, rejected_lengths=lr, beta=0.3)
    a = dpo_loss(pc, pr, refc, refr, loss_type="sigmoid", **kw).loss
    b = dpo_loss(pc, pr, refc, refr, loss_type="ipo", **kw).loss
    out = dpo_loss(pc, pr, refc, refr, loss_type=["sigmoid", "ipo"], loss_weights=[0.5, 2.0], **kw)
    assert out.loss.item() == pytest.approx(0.5 * a.item() + 2 * b.item(), rel=1e-12)
    assert out.metrics["loss/ipo"].item() == pytest.approx(b.item(), rel=1e-12)
    default = dpo_loss(pc, pr, refc, refr, loss_type=("sigmoid", "ipo"), **kw).loss
    assert default.item() == pytest.approx(a.item() + b.item(), rel=1e-12)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - refc))
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (pr - refr))
    D = (pc - refc) - (pr - refr)
    assert out.metrics["accuracy"].item() == pytest.approx((D > 0).double().mean().item())
    assert out.metrics["margin"].item() == pytest.approx((0.3 * D).mean().item())


def test_rewards_and_metrics_are_detached():
    pc, pr, refc, refr, _, _ = (t.requires_grad_() if t.is_floating_point() else t
                                for t in batch())
    out = dpo_loss(pc, pr, refc, refr)
    assert out.loss.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert not any(v.requires_grad for v in out.metrics.values())


def test_reference_free_rewards_use_policy_logps():
    pc, pr, _, _, lc, lr = batch()
    out = dpo_loss(pc, pr, loss_type="simpo", beta=2.0, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(out.chosen_rewards, 2.0 * pc)


def test_exo_pair_default_smoothing():
    pc, pr, refc, refr, _, _ = batch()
    a = dpo_loss(pc, pr, refc, refr, loss_type="exo_pair").loss
    b = dpo_loss(pc, pr, refc, refr, loss_type="exo_pair", label_smoothing=1e-3).loss
    assert torch.isfinite(a) and a.item() == b.item()


def test_empty_batch_is_zero():
    e = torch.zeros(0)
    out = dpo_loss(e, e, e, e)
    assert out.loss.item() == 0.0 and out.metrics["accuracy"].item() == 0.0


@pytest.mark.parametrize("kind", ["sigmoid", "robust", "ipo", "exo_pair", "nca_pair", "simpo",
                                  "orpo", "apo_down"])
def test_gradcheck(kind):
    pc, pr, refc, refr, lc, lr = batch(B=3)
    pc.requires_grad_(), pr.requires_grad_()

    def f(a, b):
        return dpo_loss(a, b, refc, refr, loss_type=kind, beta=0.4, label_smoothing=0.1,
                        chosen_lengths=lc, rejected_lengths=lr).loss
    assert torch.autograd.gradcheck(f, (pc, pr))


def test_bf16_inputs_compute_in_float32():
    pc, pr, refc, refr, _, _ = batch(dtype=torch.bfloat16)
    out = dpo_loss(pc, pr, refc, refr)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def _bad(**over):
    pc, pr, refc, refr, lc, lr = batch(B=4)
    kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=refc,
              ref_rejected_logps=refr, chosen_lengths=lc, rejected_lengths=lr)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, exc, pattern", [
    ({"policy_rejected_logps": torch.zeros(3)}, ValueError, "'policy_rejected_logps' must have shape"),
    ({"ref_chosen_logps": torch.zeros(5)}, ValueError, "'ref_chosen_logps' must have shape"),
    ({"ref_rejected_logps": torch.zeros(4, 1)}, ValueError, "'ref_rejected_logps' must be 1-D"),
    ({"chosen_lengths": torch.ones(3), "loss_type": "ipo"}, ValueError, "'chosen_lengths' must have shape"),
    ({"chosen_nll": torch.zeros(2), "loss_type": "orpo"}, ValueError, "'chosen_nll' must have shape"),
    ({"policy_chosen_logps": [0.0]}, TypeError, "'policy_chosen_logps' must be a torch.Tensor"),
    ({"policy_chosen_logps": torch.zeros(4, dtype=torch.long)}, TypeError, "'policy_chosen_logps' must have dtype"),
    ({"loss_type": "dpo"}, ValueError, r"'loss_type' must be one of \('sigmoid', 'robust'"),
    ({"loss_type": ["sigmoid", "kto"]}, ValueError, "'loss_type' must be one of"),
    ({"loss_type": []}, ValueError, "'loss_type'"),
    ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, ValueError, "'loss_weights'"),
    ({"beta": -1}, ValueError, "'beta' must be >= 0, got -1"),
    ({"beta": 0.0, "loss_type": "ipo"}, ValueError, "'beta' must be > 0 for loss_type 'ipo'"),
    ({"label_smoothing": 1.0}, ValueError, r"'label_smoothing' must be in \[0, 1.0\)"),
    ({"label_smoothing": -0.1}, ValueError, "'label_smoothing' must be >= 0"),
    ({"label_smoothing": 0.5, "loss_type": "robust"}, ValueError, "'label_smoothing' must be in .*robust"),
    ({"chosen_lengths": None, "loss_type": "ipo"}, ValueError, "'chosen_lengths' is required .* 'ipo'"),
    ({"rejected_lengths": None, "loss_type": "simpo"}, ValueError, "'rejected_lengths' is required"),
    ({"chosen_lengths": None, "loss_type": "orpo"}, ValueError, "'chosen_lengths' is required"),
    ({"chosen_lengths": torch.tensor([1, 0, 2, 3]), "loss_type": "ipo"}, ValueError, "'chosen_lengths' must be > 0"),
    ({"ref_chosen_logps": None}, ValueError, "'ref_chosen_logps' is required by loss_type 'sigmoid'"),
    ({"ref_rejected_logps": None, "loss_type": ["simpo", "hinge"]}, ValueError, "'ref_rejected_logps' is required"),
    ({"ref_rejected_logps": None, "loss_type": "simpo"}, ValueError, "'ref_rejected_logps' is required"),
    ({"orpo_lambda": -1.0, "loss_type": "orpo"}, ValueError, "'orpo_lambda' must be >= 0"),
    ({"gamma": float("nan"), "loss_type": "simpo"}, ValueError, "'gamma'"),
])
def test_bad_input_names_argument(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        dpo_loss(**_bad(**over))


def test_doctest():
    assert doctest.testmod(preference).failed == 0
