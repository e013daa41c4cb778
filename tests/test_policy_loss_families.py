"""The newer policy-loss families (sapo, luspo, vespo, gmpo) and options (delta,
top_entropy_quantile, entropy_coef, bias_correction_kl) of policy_loss and the fused
linear_policy_loss.

Oracles: TRL 1.16's own ``GRPOTrainer._compute_loss`` on a minimal stand-in trainer (its static
``get_gamma_weights``, its ``get_high_entropy_mask`` method, TRL's importance-sampling block via
tests/test_rollout_correction.py), run with float64 as torch's default dtype so that TRL's
``torch.where(cond, scalar, scalar)`` (temperatures, VESPO's k and lambda) is float64 too. TRL
rounds the entropies to float32 before its quantile (``.float()``): the float64 draws here hold
float32-representable entropies and dyadic quantiles, so that rounding is exact; float32 draws
check any quantile. GMPO is not in TRL: its oracle is the paper's product formula, token by
token in pure Python. fp32 results are held to the tolerance rule (tests/reference.py).
"""
import collections
import contextlib
import math
import types

import pytest
import torch

import ptcore
from ptcore.ops import linear_policy_loss, policy_loss
from ptcore.ops.policy_families import high_entropy_mask
from tests.reference import assert_rule

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer
from tests.test_rollout_correction import trl_is_ratio  # noqa: E402  (needs TRL too)

F64 = torch.float64


class _Acc:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def trl_loss(lp, old, adv, mask, *, loss_type, ent=None, level="token", eps_low=0.2, eps_high=0.28,
             beta=0.0, ref=None, bias_kl=False, delta=None, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0),
             quantile=1.0, coef=0.0, is_mode=None, samp=None, clip=(None, 3.0), trainer_metrics=None):
    """TRL's ``_compute_loss`` on a stand-in trainer whose model returns ``lp`` and ``ent``."""
    B, T = lp.shape
    ent = torch.zeros_like(lp) if ent is None else ent
    inputs = {"prompt_ids": torch.zeros(B, 0, dtype=torch.long),
              "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if is_mode is not None:
        inputs["sampling_per_token_logps"] = samp
        inputs["importance_sampling_ratio"] = trl_is_ratio(old, samp, mask, is_mode, *clip)
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    args = types.SimpleNamespace(
        delta=delta, use_bias_correction_kl=bias_kl, steps_per_generation=1,
        sapo_temperature_pos=sapo[0], sapo_temperature_neg=sapo[1], vespo_k_pos=vespo[0],
        vespo_lambda_pos=vespo[1], vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3])
    self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None),
        aux_loss_enabled=False, top_entropy_quantile=quantile, off_policy_mask_threshold=None,
        get_gamma_weights=GRPOTrainer.get_gamma_weights, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, args=args,
        use_vllm=is_mode is not None, vllm_importance_sampling_correction=is_mode is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T, accelerator=_Acc(), entropy_coef=coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=coef != 0, _metrics={"train": collections.defaultdict(list)})
    self.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(self, *a)
    with default_dtype(F64):
        loss = GRPOTrainer._compute_loss(self, None, inputs)
    if trainer_metrics is not None:
        trainer_metrics.update(self._metrics["train"])
    return loss


def make(B=6, T=7, seed=0, per_token_adv=False):
    """float64 log-probs with ratios on both sides of the clips, a partly and a fully masked row,
    entropies that float32 holds exactly."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    samp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    ref = lp + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(F64)
    mask[0] = 1
    mask[1, 2:] = 0
    mask[-1] = 0
    ent = (torch.rand(B, T, generator=g, dtype=F64) * 4).float().double()
    return lp, old, samp, ref, adv, mask, ent


def both(lp, ent, trl_kw, ptc_kw, old, adv, mask, with_entropy_grad=False):
    """(TRL loss, TRL grads, ptcore output, ptcore grads): grads wrt lp (and the entropy)."""
    def leaves():
        return lp.clone().requires_grad_(), ent.clone().requires_grad_(with_entropy_grad)
    a, ea = leaves()
    want = trl_loss(a, old, adv, mask, ent=ea, **trl_kw)
    gw = torch.autograd.grad(want, [a, ea] if with_entropy_grad else [a])
    b, eb = leaves()
    got = policy_loss(b, old, adv, mask, entropy=eb, **ptc_kw)
    gg = torch.autograd.grad(got.loss, [b, eb] if with_entropy_grad else [b])
    return want, gw, got, gg


def assert_same(want, gw, got, gg, mask):
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)
    for w, g in zip(gw, gg):  # TRL's gradient outside the mask is 0 too (it masks the loss)
        torch.testing.assert_close(g * mask, w * mask, rtol=1e-10, atol=1e-12)


SHAPES = [(6, 7, 0), (5, 12, 1), (8, 4, 2)]


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("loss_type,level", [("sapo", "token"), ("sapo", "sequence"), ("luspo", "sequence"),
                                             ("luspo", "token"), ("vespo", "token")])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_families_equal_trl(B, T, seed, loss_type, level, per_token_adv):
    lp, old, _, _, adv, mask, ent = make(B, T, seed, per_token_adv)
    want, gw, got, gg = both(lp, ent, dict(loss_type=loss_type, level=level),
                             dict(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28),
                             old, adv, mask)
    assert_same(want, gw, got, gg, mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_family_parameters_equal_trl(seed):
    """Non-default SAPO temperatures and VESPO k / lambda reach the formula as TRL's do."""
    lp, old, _, _, adv, mask, ent = make(7, 9, seed)
    for tau in [(0.5, 2.0), (3.0, 0.25)]:
        r = both(lp, ent, dict(loss_type="sapo", sapo=tau),
                 dict(loss_type="sapo", sapo_temperature_pos=tau[0], sapo_temperature_neg=tau[1]),
                 old, adv, mask)
        assert_same(*r, mask)
    for kl in [(1.0, 1.5, 4.0, 0.5), (0.0, 2.0, 2.0, 1e-5)]:  # lambda 1e-5: TRL's clamp to 1e-4
        r = both(lp, ent, dict(loss_type="vespo", vespo=kl),
                 dict(loss_type="vespo", vespo_k_pos=kl[0], vespo_lambda_pos=kl[1], vespo_k_neg=kl[2],
                      vespo_lambda_neg=kl[3]), old, adv, mask)
        assert_same(*r, mask)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_vespo_folds_the_rollout_weight_like_trl(mode):
    lp, old, samp, _, adv, mask, ent = make(6, 10, 3)
    clip = (0.8, 1.25)
    r = both(lp, ent, dict(loss_type="vespo", is_mode=mode, samp=samp, clip=clip),
             dict(loss_type="vespo", sampling_logps=samp, rollout_correction=mode, rollout_clip=clip),
             old, adv, mask)
    assert_same(*r, mask)
    plain = policy_loss(lp, old, adv, mask, loss_type="vespo").loss
    assert abs(float(plain) - float(r[2].loss.detach())) > 1e-6  # the weight changed phi


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("delta", [1.1, 1.5])
@pytest.mark.parametrize("B,T,seed", SHAPES[:2])
def test_delta_equals_trl(loss_type, delta, B, T, seed):
    lp, old, _, _, adv, mask, ent = make(B, T, seed)
    r = both(lp, ent, dict(loss_type=loss_type, delta=delta, eps_high=0.28),
             dict(loss_type=loss_type, delta=delta, epsilon_high=0.28), old, adv, mask)
    assert_same(*r, mask)
    assert ((lp - old).exp() * mask > delta).any()  # the cap binds somewhere


def test_delta_caps_a_negative_advantage_token():
    """rho = 3, A = -1: PPO's loss is 3 (unbounded in rho); with delta = 2 it is 2."""
    lp, one = torch.log(torch.tensor([[3.0]], dtype=F64)), torch.ones(1, 1, dtype=F64)
    assert float(policy_loss(lp, 0 * lp, -one[0], one).loss) == pytest.approx(3.0, abs=1e-12)
    assert float(policy_loss(lp, 0 * lp, -one[0], one, delta=2.0).loss) == pytest.approx(2.0, abs=1e-12)


QUANTILES = [0.25, 0.5, 0.75]  # dyadic: TRL's float32 quantile rank is then exact (module docstring)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"])
@pytest.mark.parametrize("q", QUANTILES)
@pytest.mark.parametrize("B,T,seed", SHAPES[:2])
def test_top_entropy_quantile_equals_trl(loss_type, q, B, T, seed):
    lp, old, _, ref, adv, mask, ent = make(B, T, seed)
    cispo = loss_type == "cispo"  # TRL's cispo caps at epsilon_high itself (ptcore: cispo_max)
    eh = 1.5 if cispo else 0.28
    r = both(lp, ent, dict(loss_type=loss_type, quantile=q, eps_high=eh, beta=0.04, ref=ref),
             dict(loss_type=loss_type, top_entropy_quantile=q, epsilon_high=eh, beta=0.04, ref_logps=ref,
                  cispo_max=eh if cispo else None), old, adv, mask)
    assert_same(*r, mask)
    kept = float(r[2].metrics["entropy/kept_fraction"])
    assert 0 < kept < 1


@pytest.mark.parametrize("dtype,quantiles", [(F64, QUANTILES + [1e-9]),
                                             (torch.float32, [0.2, 0.25, 0.3, 0.5, 0.8, 0.9, 1e-9])])
def test_high_entropy_mask_equals_trl(dtype, quantiles):
    """ptcore's sort-based selection against TRL's get_high_entropy_mask (torch.quantile) over
    many draws, ties and tiny batches included; float32 entropies for any quantile."""
    self = types.SimpleNamespace(accelerator=_Acc())
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ent = (torch.rand(B, T, generator=g, dtype=F64) * 3).float().to(dtype)
        if seed % 3 == 0:
            ent = ent.round()  # ties
        mask = torch.rand(B, T, generator=g) > 0.3
        for q in quantiles:
            want = GRPOTrainer.get_high_entropy_mask(self, ent, mask.to(dtype), 1 - q)
            got = high_entropy_mask(torch.where(mask, ent, 0), mask, q)
            assert torch.equal(got, want), (seed, q)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "luspo", "sapo"])
@pytest.mark.parametrize("coef,q", [(0.01, 1.0), (-0.05, 1.0), (0.02, 0.5)])
def test_entropy_bonus_equals_trl(loss_type, coef, q):
    lp, old, _, _, adv, mask, ent = make(6, 8, 4)
    r = both(lp, ent, dict(loss_type=loss_type, coef=coef, quantile=q),
             dict(loss_type=loss_type, entropy_coef=coef, top_entropy_quantile=q, epsilon_high=0.28),
             old, adv, mask, with_entropy_grad=True)
    assert_same(*r, mask)
    base = policy_loss(lp, old, adv, mask, loss_type=loss_type, top_entropy_quantile=q, entropy=ent,
                       epsilon_high=0.28).loss
    torch.testing.assert_close(base - r[2].metrics["entropy_bonus"], r[2].loss, rtol=1e-12, atol=1e-14)


def test_entropy_bonus_is_the_step_token_mean_across_micro_batches():
    """With the step's normalizer, token-mean losses get the step's mean entropy exactly
    (the bonus is scaled by each call's share); TRL's per-micro-batch mean / GA is not that."""
    lp, old, _, _, adv, mask, ent = make(8, 6, 5)
    kw = dict(loss_type="dapo", entropy_coef=0.1)
    whole = policy_loss(lp, old, adv, mask, entropy=ent, **kw).loss
    parts = sum(policy_loss(lp[i], old[i], adv[i], mask[i], entropy=ent[i], normalizer=mask.sum(), **kw).loss
                for i in torch.arange(8).split(3))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("grpo", "sequence"), ("dapo", "token"),
                                             ("cispo", "token"), ("sapo", "token"), ("vespo", "token"),
                                             ("luspo", "sequence")])
@pytest.mark.parametrize("seed", [0, 1])
def test_bias_correction_kl_equals_trl(loss_type, level, seed):
    lp, old, _, ref, adv, mask, ent = make(6, 7, seed)
    cispo = loss_type == "cispo"
    eh = 1.5 if cispo else 0.28
    trl_m = {}
    r = both(lp, ent, dict(loss_type=loss_type, level=level, beta=0.04, ref=ref, bias_kl=True, eps_high=eh,
                           trainer_metrics=trl_m),
             dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, ref_logps=ref,
                  bias_correction_kl=True, epsilon_high=eh, cispo_max=eh if cispo else None), old, adv, mask)
    assert_same(*r, mask)
    assert float(r[2].metrics["kl"]) == pytest.approx(trl_m["kl"][0], rel=1e-10)  # rho-weighted, as TRL logs
    if loss_type == "vespo":
        assert float(r[2].metrics["vespo/phi_seq_mean"]) == pytest.approx(trl_m["vespo/phi_seq_mean"][0], rel=1e-10)
    plain = policy_loss(lp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                        ref_logps=ref, epsilon_high=eh, cispo_max=eh if cispo else None).loss
    assert abs(float(plain) - float(r[2].loss.detach())) > 1e-6


# ---- GMPO: the paper's product form, token by token ----

def gmpo_oracle(lp, old, A, M, el, eh, beta=0.0, ref=None):
    """Zhao et al. 2025, eq. (GMPO objective): per sequence with tokens,
    ``(prod_t |min(rho A, clip(rho, e^-el, e^eh) A)|)^(1/|o|) * sgn(A)``; the loss is minus its
    mean over the sequences, plus ``beta`` times each sequence's mean k3 KL."""
    total, B = 0.0, len(lp)
    for i in range(B):
        ts = [t for t in range(len(lp[i])) if M[i][t]]
        if not ts:
            continue
        a = A[i]
        prod = 1.0
        for t in ts:
            rho = math.exp(lp[i][t] - old[i][t])
            c = min(max(rho, math.exp(-el)), math.exp(eh))
            prod *= abs(min(rho * a, c * a))
        obj = prod ** (1 / len(ts)) * (1 if a > 0 else -1 if a < 0 else 0)
        kl = 0.0
        if beta:
            for t in ts:
                d = ref[i][t] - lp[i][t]
                kl += math.exp(d) - d - 1
            kl = beta * kl / len(ts)
        total += -obj + kl
    return total / B


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.4, 0.4), (0.1, 0.3)])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_gmpo_equals_paper(B, T, seed, el, eh, beta):
    lp, old, _, ref, adv, mask, _ = make(B, T, seed)
    adv[2 % B] = 0.0  # a zero advantage: no objective
    got = policy_loss(lp, old, adv, mask, loss_type="gmpo", epsilon_low=el, epsilon_high=eh, beta=beta,
                      ref_logps=ref if beta else None)
    want = gmpo_oracle(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), el, eh, beta, ref.tolist())
    assert float(got.loss) == pytest.approx(want, rel=1e-11, abs=1e-13)
    low, high = float(got.metrics["clip_ratio/low_mean"]), float(got.metrics["clip_ratio/high_mean"])
    assert low + high > 0  # the draw clips some tokens


def test_gmpo_gradient_and_clip():
    lp, old, _, _, adv, mask, _ = make(4, 5, 6)
    x = lp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: policy_loss(v, old, adv, mask, loss_type="gmpo", epsilon_low=0.1, epsilon_high=0.1).loss, (x,))
    # a token clipped on the side that would grow the objective gets no gradient
    lr = torch.tensor([[0.5, 0.0]], dtype=F64)  # rho = e^0.5 > e^0.1, then on-policy
    y = lr.clone().requires_grad_()
    policy_loss(y, torch.zeros_like(lr), torch.ones(1, dtype=F64), torch.ones(1, 2), loss_type="gmpo",
                epsilon_low=0.1, epsilon_high=0.1).loss.backward()
    assert y.grad[0, 0] == 0 and y.grad[0, 1] != 0


# ---- invariances and masking ----

FAMILY_CASES = [dict(loss_type="sapo"), dict(loss_type="sapo", importance_sampling_level="sequence"),
                dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.4),
                dict(loss_type="vespo"), dict(loss_type="gmpo", epsilon_low=0.3, epsilon_high=0.3),
                dict(loss_type="dapo", delta=1.3, beta=0.05, bias_correction_kl=True)]
CASE_IDS = ["sapo", "sapo-seq", "luspo-delta", "vespo", "gmpo", "dapo-delta-biaskl"]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=CASE_IDS)
def test_micro_batch_invariance(case):
    from ptcore.ops.policy import default_normalizer
    lp, old, _, ref, adv, mask, _ = make(8, 6, 7)
    x = lp.clone().requires_grad_()
    whole = policy_loss(x, old, adv, mask, ref_logps=ref, **case).loss
    (gw,) = torch.autograd.grad(whole, x)
    y = lp.clone().requires_grad_()
    norm = default_normalizer(case["loss_type"], mask)
    total = sum(policy_loss(y[i], old[i], adv[i], mask[i], ref_logps=ref[i], normalizer=norm, **case).loss
                for i in torch.arange(8).split(3))
    (gp,) = torch.autograd.grad(total, y)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gp, gw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["sapo", "luspo", "vespo", "gmpo"])
def test_all_masked_is_finite_zero(loss_type):
    lp = torch.full((3, 4), -math.inf, dtype=F64).requires_grad_()
    old = torch.full((3, 4), math.nan, dtype=F64)
    M = torch.zeros(3, 4, dtype=torch.bool)
    q = 1.0 if loss_type == "gmpo" else 0.5
    out = policy_loss(lp, old, torch.randn(3, dtype=F64), M, ref_logps=old, beta=0.1, entropy=old,
                      loss_type=loss_type, top_entropy_quantile=q, entropy_coef=0.1, bias_correction_kl=True)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.equal(lp.grad, torch.zeros_like(lp))


# ---- fused ----

FUSED_CASES = FAMILY_CASES + [dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02),
                              dict(loss_type="grpo", top_entropy_quantile=0.25),
                              dict(loss_type="vespo", entropy_coef=-0.01)]
FUSED_IDS = CASE_IDS + ["dapo-quantile-bonus", "grpo-quantile", "vespo-bonus"]


def head_batch(dtype, B=4, T=6, H=8, V=23, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    lp0 = torch.log_softmax(h @ W.T, -1).gather(-1, y[..., None])[..., 0]
    old = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    return h.to(dtype), W.to(dtype), y, mask, old, ref, adv


def unfused(h, W, y, mask, old, ref, adv, dtype, **case):
    """policy_loss on the log-probs and entropies of full logits in ``dtype``, and d/d(h, W)."""
    hh, ww = h.detach().to(dtype).requires_grad_(), W.detach().to(dtype).requires_grad_()
    logs = torch.log_softmax(hh @ ww.T, -1)
    lp = logs.gather(-1, y[..., None])[..., 0]
    ent = -(logs.exp() * logs).sum(-1)
    out = policy_loss(lp, old.to(dtype), adv.to(dtype), mask, ref_logps=ref.to(dtype), entropy=ent, **case)
    return out, torch.autograd.grad(out.loss, (hh, ww)), lp.detach(), ent.detach()


@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
@pytest.mark.parametrize("budget", [None, 6 * 23 * 8])  # default, and one sequence a chunk (two passes)
def test_fused_equals_unfused_float64(case, budget):
    h, W, y, mask, old, ref, adv = head_batch(F64)
    hf, wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    with ptcore.chunk_budget(budget) if budget else contextlib.nullcontext():
        out = linear_policy_loss(hf, wf, y, old, adv, mask, ref_logps=ref, **case)
    g = torch.autograd.grad(out.loss, (hf, wf))
    want, gw, _, _ = unfused(h, W, y, mask, old, ref, adv, F64, **case)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-9, atol=1e-12)
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for k, v in want.metrics.items():
        torch.testing.assert_close(out.metrics[k], v, rtol=1e-8, atol=1e-10, msg=k)


TRL_FUSED = [0, 2, 3, 4, 5, 8]  # no quantile: TRL's float32 rounding of the entropies stays out


@pytest.mark.parametrize("case", [FUSED_CASES[i] for i in TRL_FUSED], ids=[FUSED_IDS[i] for i in TRL_FUSED])
def test_fused_equals_trl(case):
    """The fused loss against TRL's _compute_loss on the log-probs and entropies of the same
    logits (as TRL's model would return them); GMPO against the paper's formula."""
    h, W, y, mask, old, ref, adv = head_batch(F64)
    out = linear_policy_loss(h, W, y, old, adv, mask, ref_logps=ref, **case)
    _, _, lp, ent = unfused(h, W, y, mask, old, ref, adv, F64, **case)
    lt = case["loss_type"]
    if lt == "gmpo":
        want = gmpo_oracle(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.3, 0.3)
        assert float(out.loss) == pytest.approx(want, rel=1e-9)
        return
    want = trl_loss(lp, old, adv, mask, ent=ent, loss_type=lt, level=case.get("importance_sampling_level", "token"),
                    eps_high=0.2, delta=case.get("delta"), coef=case.get("entropy_coef", 0.0),
                    beta=case.get("beta", 0.0), ref=ref, bias_kl=case.get("bias_correction_kl", False))
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_IDS)
def test_fused_float32_under_the_rule(case):
    """fp32 fused loss and gradients vs the float64 unfused oracle, held to 2x the error of the
    naive fp32 unfused computation (full fp32 logits) plus slack."""
    h, W, y, mask, old, ref, adv = head_batch(torch.float32, B=6, T=8, V=41, seed=9)
    hf, wf = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = linear_policy_loss(hf, wf, y, old.float(), adv.float(), mask, ref_logps=ref.float(), **case)
    g = torch.autograd.grad(out.loss, (hf, wf))
    want, gw, _, _ = unfused(h, W, y, mask, old, ref, adv, F64, **case)
    naive, gn, _, _ = unfused(h, W, y, mask, old.float(), ref.float(), adv.float(), torch.float32, **case)
    assert out.loss.dtype == torch.float32
    assert_rule(out.loss, want.loss, naive.loss, "loss")
    for a, b, c, name in zip(g, gw, gn, ("grad_hidden", "grad_weight")):
        assert_rule(a, b, c, name)


def test_fused_compiles_with_the_family_options():
    """The options travel to the custom op as one string: torch.compile traces it, no graph break."""
    torch._dynamo.reset()
    h, W, y, mask, old, ref, adv = head_batch(torch.float32, B=3, T=5, V=30)
    h.requires_grad_()
    kw = dict(loss_type="sapo", sapo_temperature_neg=2.0, entropy_coef=0.01, top_entropy_quantile=0.5)

    def f(x):
        return linear_policy_loss(torch.tanh(x), W, y, old.float(), adv.float(), mask, **kw).loss

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h)
    g = torch.autograd.grad(out, h)[0]

    def plain(dtype):
        x = h.detach().to(dtype).requires_grad_()
        logs = torch.log_softmax(torch.tanh(x) @ W.to(dtype).T, -1)
        lp, ent = logs.gather(-1, y[..., None])[..., 0], -(logs.exp() * logs).sum(-1)
        loss = policy_loss(lp, old.to(dtype), adv.to(dtype), mask, entropy=ent, **kw).loss
        return loss, torch.autograd.grad(loss, x)[0]

    (ref_l, ref_g), (nv_l, nv_g) = plain(F64), plain(torch.float32)
    assert_rule(out, ref_l, nv_l, "compiled loss")
    assert_rule(g, ref_g, nv_g, "compiled grad")


# ---- bad input ----

def _callers():
    lp, old, samp, ref, adv, mask, ent = make()
    B, T = lp.shape
    h, W, y = torch.randn(B, T, 4, dtype=F64), torch.randn(9, 4, dtype=F64), torch.randint(0, 9, (B, T))
    return {"policy_loss": lambda **k: policy_loss(lp, old, adv, mask, **{"entropy": ent, **k}),
            "linear_policy_loss": lambda **k: linear_policy_loss(h, W, y, old, adv, mask, **k)}, samp, ref


BAD = [  # (options, exception, what the message must name)
    (dict(loss_type="sapo", sapo_temperature_pos=-1.0), ValueError, "sapo_temperature_pos"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg"),
    (dict(loss_type="sapo", sapo_temperature_neg=math.inf), ValueError, "sapo_temperature_neg"),
    (dict(loss_type="dapo", sapo_temperature_pos=1.0), ValueError, "sapo_temperature_pos"),
    (dict(loss_type="vespo", vespo_k_pos=-0.5), ValueError, "vespo_k_pos"),
    (dict(loss_type="vespo", vespo_lambda_neg=0.0), ValueError, "vespo_lambda_neg"),
    (dict(loss_type="vespo", vespo_k_neg=math.nan), ValueError, "vespo_k_neg"),
    (dict(loss_type="grpo", vespo_lambda_pos=3.0), ValueError, "vespo_lambda_pos"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), ValueError, "importance_sampling_level"),
    (dict(loss_type="gmpo", importance_sampling_level="sequence"), ValueError, "importance_sampling_level"),
    (dict(loss_type="dapo", delta=1.0), ValueError, "delta"),
    (dict(loss_type="dapo", delta=math.nan), ValueError, "delta"),
    (dict(loss_type="cispo", delta=2.0), ValueError, "delta"),
    (dict(loss_type="sapo", delta=2.0), ValueError, "delta"),
    (dict(loss_type="gmpo", delta=2.0), ValueError, "delta"),
    (dict(loss_type="sapo", dual_clip=3.0), ValueError, "dual_clip"),
    (dict(loss_type="gmpo", dual_clip=3.0), ValueError, "dual_clip"),
    (dict(loss_type="vespo", cispo_max=2.0), ValueError, "cispo_max"),
    (dict(top_entropy_quantile=0.0), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=-0.2), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=math.nan), ValueError, "top_entropy_quantile"),
    (dict(loss_type="gmpo", top_entropy_quantile=0.5), ValueError, "top_entropy_quantile"),
    (dict(entropy_coef=math.inf), ValueError, "entropy_coef"),
    (dict(entropy_coef="0.1"), TypeError, "entropy_coef"),
    (dict(bias_correction_kl=True), ValueError, "bias_correction_kl"),  # beta = 0: ignored
    (dict(bias_correction_kl="yes"), TypeError, "bias_correction_kl"),
    (dict(loss_type="ppo2"), ValueError, "loss_type"),
]


@pytest.mark.parametrize("fn", ["policy_loss", "linear_policy_loss"])
def test_bad_options_named(fn):
    calls, samp, _ = _callers()
    call = calls[fn]
    for opts, exc, name in BAD:
        with pytest.raises(exc, match=f"^{fn}: .*'{name}'"):
            call(**opts)
    with pytest.raises(ValueError, match=f"{fn}: loss_type='vespo'.*'rollout_correction'"):
        call(loss_type="vespo", sampling_logps=samp, rollout_correction="sequence_mask")
    with pytest.raises(ValueError, match=f"{fn}: loss_type='gmpo'.*'rollout_correction'"):
        call(loss_type="gmpo", sampling_logps=samp, rollout_correction="token_truncate")


def test_entropy_options_need_the_entropy():
    lp, old, _, _, adv, mask, _ = make()
    for opts in (dict(top_entropy_quantile=0.5), dict(entropy_coef=0.1)):
        with pytest.raises(ValueError, match="policy_loss: 'entropy'.*required"):
            policy_loss(lp, old, adv, mask, **opts)


# ---- the GRPO loop and the CLI ----

def test_grpo_config_carries_the_family_options():
    from ptcore.train import GRPOConfig
    c = GRPOConfig(loss_type="sapo", sapo_temperature_neg=2.0, top_entropy_quantile=0.5, entropy_coef=0.01,
                   kl_coef=0.04, bias_correction_kl=True)
    opts = c.loss_options()
    assert (opts["sapo_temperature_neg"], opts["top_entropy_quantile"], opts["entropy_coef"],
            opts["bias_correction_kl"], opts["beta"]) == (2.0, 0.5, 0.01, True, 0.04)
    lp, old, _, ref, adv, mask, ent = make()
    direct = policy_loss(lp, old, adv, mask, ref_logps=ref, entropy=ent, loss_type="sapo", beta=0.04,
                         sapo_temperature_neg=2.0, top_entropy_quantile=0.5, entropy_coef=0.01,
                         bias_correction_kl=True)
    via = policy_loss(lp, old, adv, mask, ref_logps=ref, entropy=ent, **opts)
    assert float(via.loss) == float(direct.loss)
    for bad, name in [(dict(loss_type="dapo", sapo_temperature_pos=1.0), "sapo_temperature_pos"),
                      (dict(loss_type="vespo", vespo_lambda_neg=-1.0), "vespo_lambda_neg"),
                      (dict(loss_type="cispo", delta=2.0), "delta"), (dict(top_entropy_quantile=0.0),
                                                                       "top_entropy_quantile"),
                      (dict(bias_correction_kl=True), "bias_correction_kl.*kl_coef"),
                      (dict(loss_type="vespo", rollout_correction="sequence_mask"), "rollout_correction")]:
        with pytest.raises(ValueError, match=f"^run_grpo: .*'{name}"):
            GRPOConfig(**bad)


def test_cli_flags_reach_the_grpo_config():
    from tests.test_train_config import parse
    g = parse("grpo", "--loss-type", "vespo", "--vespo-k-pos", "1.5", "--vespo-lambda-neg", "2.5",
              "--top-entropy-quantile", "0.2", "--entropy-coef", "0.001")
    assert (g.loss_type, g.vespo_k_pos, g.vespo_lambda_neg, g.top_entropy_quantile, g.entropy_coef) == \
        ("vespo", 1.5, 2.5, 0.2, 0.001)
    g = parse("grpo", "--loss-type", "luspo", "--delta", "1.5", "--kl-coef", "0.1", "--bias-correction-kl")
    assert (g.loss_type, g.delta, g.bias_correction_kl) == ("luspo", 1.5, True)
    assert parse("grpo", "--loss-type", "gmpo").loss_options()["loss_type"] == "gmpo"


def test_run_grpo_trains_with_the_new_options(tmp_path):
    """Two optimizer steps of the tiny GRPO loop with sapo + the entropy options: the loss's own
    metrics (entropy bonus, kept fraction) show up in the run's metrics, so the options reached
    the fused loss."""
    from ptcore.train import GRPOConfig, run_grpo
    from tests.train_helpers import config, tiny
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)]
    model, tok = tiny()
    c = config(tmp_path, "g", GRPOConfig, max_steps=2, group_size=2, max_new_tokens=3, loss_type="sapo",
               sapo_temperature_neg=2.0, top_entropy_quantile=0.5, entropy_coef=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs on a shared machine (as tests/train_helpers.py)
    try:
        result = run_grpo(model, tok, rows, c)
    finally:
        torch.set_num_threads(threads)
    last = result.metrics[-1]
    assert len(result.metrics) == 2 and math.isfinite(last["loss"])
    assert "entropy_bonus" in last and "entropy/kept_fraction" in last, sorted(last)
    assert 0 < last["entropy/kept_fraction"] <= 1
