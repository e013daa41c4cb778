"""The newer policy-loss families and token selections of :func:`ptcore.ops.policy_loss`
(docs/losses.md §2.2): SAPO's soft gate, VESPO's gamma weight, GMPO's geometric mean, the
two-sided (``delta``) clip, the high-entropy token mask and the entropy bonus.

TRL 1.16's ``GRPOTrainer`` defines sapo, luspo, vespo, delta, ``top_entropy_quantile``,
``entropy_coef`` and ``use_bias_correction_kl``; GMPO follows its paper (Zhao et al. 2025). An
option that the chosen loss type would ignore raises instead (``check_family_options``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ptcore.ops import checks

PPO_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "luspo")  # -min(rho A, clip(rho) A)
SAPO_DEFAULTS = (1.0, 1.05)  # (positive, non-positive advantage): TRL 1.16's
VESPO_DEFAULTS = (2.0, 3.0, 3.0, 2.0)  # (k_pos, lambda_pos, k_neg, lambda_neg): TRL 1.16's
LOG_1E8 = math.log(1e-8)  # VESPO's lower clamp of log-weights (TRL, after the paper's code)


class FamilyOptions(NamedTuple):
    delta: Optional[float]
    sapo: Optional[tuple]  # (tau_pos, tau_neg) when loss_type is sapo
    vespo: Optional[tuple]  # (k_pos, lambda_pos, k_neg, lambda_neg) when loss_type is vespo
    top_entropy_quantile: float
    entropy_coef: float
    bias_correction_kl: bool


def check_family_options(op, loss_type, *, delta, sapo_temperature_pos, sapo_temperature_neg,
                         vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                         top_entropy_quantile, entropy_coef, bias_correction_kl, beta, has_entropy,
                         importance_sampling_level, rollout_correction, dual_clip, cispo_max,
                         beta_name="beta"):
    """Validates the family options against ``loss_type``; returns a ``FamilyOptions``.
    ``beta_name``: what the caller calls the KL weight (the GRPO config's ``kl_coef``)."""
    def only_for(name, value, types):
        if value is not None and loss_type not in types:
            raise ValueError(f"{op}: '{name}' applies to loss_type {' / '.join(types)} only, got "
                             f"loss_type={loss_type!r} (it would be ignored)")

    sapo_given = {"sapo_temperature_pos": sapo_temperature_pos, "sapo_temperature_neg": sapo_temperature_neg}
    vespo_given = {"vespo_k_pos": vespo_k_pos, "vespo_lambda_pos": vespo_lambda_pos,
                   "vespo_k_neg": vespo_k_neg, "vespo_lambda_neg": vespo_lambda_neg}
    for name, value in sapo_given.items():
        only_for(name, value, ("sapo",))
    for name, value in vespo_given.items():
        only_for(name, value, ("vespo",))
    only_for("delta", delta, PPO_CLIP_TYPES)
    if delta is not None:
        # a cap at or below 1 would clip the on-policy ratio itself; TRL recommends > 1 + epsilon
        delta = checks.number(op, "delta", delta, low=1, low_open=True)
    sapo = vespo = None
    if loss_type == "sapo":
        sapo = tuple(d if v is None else checks.number(op, n, v, low=0, low_open=True)
                     for (n, v), d in zip(sapo_given.items(), SAPO_DEFAULTS))
    if loss_type == "vespo":  # k: the power of w (>= 0); lambda: the decay rate (> 0)
        vespo = tuple(d if v is None else checks.number(op, n, v, low=0, low_open=n.startswith("vespo_lambda"))
                      for (n, v), d in zip(vespo_given.items(), VESPO_DEFAULTS))
    q = checks.number(op, "top_entropy_quantile", top_entropy_quantile, low=0, low_open=True, high=1)
    coef = checks.number(op, "entropy_coef", entropy_coef)
    for name, used in (("top_entropy_quantile", q < 1), ("entropy_coef", coef != 0)):
        if used and not has_entropy:
            raise ValueError(f"{op}: 'entropy' (per-token entropies [B, T]) is required when '{name}' "
                             f"is set (got {name}={q if name.startswith('top') else coef})")
    bias = checks.flag(op, "bias_correction_kl", bias_correction_kl)
    if bias and beta == 0:
        raise ValueError(f"{op}: 'bias_correction_kl' weights the KL term, which {beta_name}=0 leaves "
                         f"out; set {beta_name} > 0 or bias_correction_kl=False")
    if loss_type in ("sapo", "vespo", "gmpo") and dual_clip is not None:
        raise ValueError(f"{op}: 'dual_clip' applies to the PPO-clip loss types, got loss_type={loss_type!r}")
    if loss_type in ("vespo", "gmpo"):
        if importance_sampling_level != "token":
            raise ValueError(f"{op}: loss_type={loss_type!r} builds its own sequence weight from the "
                             "token ratios; 'importance_sampling_level' must be 'token', got "
                             f"{importance_sampling_level!r}")
        if cispo_max is not None:
            raise ValueError(f"{op}: 'cispo_max' applies to loss_type 'cispo' only, got {loss_type!r}")
    if loss_type == "vespo" and rollout_correction is not None and not rollout_correction.startswith("token"):
        raise ValueError(f"{op}: loss_type='vespo' folds the rollout weight into its sequence weight "
                         "token by token (as TRL): 'rollout_correction' must be token_truncate or "
                         f"token_mask, got {rollout_correction!r}")
    if loss_type == "gmpo":
        if rollout_correction is not None and rollout_correction.startswith("token"):
            raise ValueError(f"{op}: loss_type='gmpo' is a per-sequence loss: 'rollout_correction' must "
                             f"be sequence_truncate or sequence_mask, got {rollout_correction!r}")
        if q < 1:
            raise ValueError(f"{op}: 'top_entropy_quantile' selects tokens of a per-token loss; "
                             "loss_type='gmpo' has one term per sequence")
    return FamilyOptions(delta, sapo, vespo, q, coef, bias)


def ppo_clip(rho, adv, eps_low, eps_high, delta):
    """``-min(min(rho, delta) A, clip(rho, 1 - eps_low, 1 + eps_high) A)``: the PPO clip, with
    the unclipped branch also capped at ``delta`` when given (INTELLECT-2's two-sided clip)."""
    coef = rho if delta is None else torch.clamp(rho, max=delta)
    return -torch.min(coef * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)


def sapo_loss(rho, adv, tau_pos, tau_neg):
    """SAPO's soft gate: ``-sigmoid(tau (rho - 1)) * 4 / tau * A`` with ``tau = tau_pos`` where
    ``A > 0``, else ``tau_neg`` (Gao et al. 2025); its gradient ``sigmoid' * 4 * rho`` is ``rho``
    on-policy and decays smoothly off it."""
    tau = torch.where(adv > 0, adv.new_tensor(tau_pos), adv.new_tensor(tau_neg))
    return -torch.sigmoid(tau * (rho - 1)) * 4 / tau * adv


def vespo_phi(log_ratio, mf, adv, is_weight, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's detached gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` (so
    ``phi(1) = 1``) of the sequence ratio ``w = exp(sum_t m_t log rho_t)`` times the token
    rollout weights, ``k, lambda`` by the sign of ``A`` (``A >= 0``: the positive pair); log-ratios
    clamped to ``[log 1e-8, 20]`` and a non-finite phi read as 0, all as TRL 1.16.
    ``adv`` ``[B, 1]`` or ``[B, T]``; returns that shape."""
    with torch.no_grad():
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mf).sum(-1, keepdim=True)
        if is_weight is not None:  # TRL sums these over every position (1 outside the mask)
            seq = seq + torch.clamp(torch.log(is_weight), LOG_1E8, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, LOG_1E8, 20.0)
        pos = adv >= 0
        k = torch.where(pos, adv.new_tensor(k_pos), adv.new_tensor(k_neg))
        lam = torch.where(pos, adv.new_tensor(lambda_pos), adv.new_tensor(lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def gmpo_sequence_loss(log_ratio, adv, mf, eps_low, eps_high):
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization"): per sequence
    ``-A_i exp(mean_t sgn(A) min(sgn(A) l_t, sgn(A) clip(l_t, -eps_low, eps_high)))`` with
    ``l_t = log rho_t``, i.e. ``A_i`` times the geometric mean of the token ratios, each clipped
    in log space on the side that would grow the objective. ``A_i`` is the sequence's mean
    advantage; returns ``[B]`` (0 for a sequence without tokens)."""
    sgn = torch.sign(adv)
    clipped = torch.clamp(log_ratio, -eps_low, eps_high)
    lmin = sgn * torch.min(sgn * log_ratio, sgn * clipped)
    n = mf.sum(-1).clamp(min=1)
    ratio = torch.exp((lmin * mf).sum(-1) / n)
    return -(adv * mf).sum(-1) / n * ratio


def high_entropy_mask(entropy, m, quantile):
    """``top_entropy_quantile`` (Wang et al. 2025, "Beyond the 80/20 Rule"; TRL's
    ``get_high_entropy_mask``): the completion tokens whose entropy is at least the
    ``1 - quantile`` quantile (torch.quantile's linear interpolation) of this call's completion
    tokens' entropies. Sort-based, so no host sync and no data-dependent shape; all False when no
    token is selected by ``m``."""
    with torch.no_grad():
        e = entropy.detach()
        s = torch.where(m, e, torch.full_like(e, math.inf)).flatten().sort().values
        rank = (m.sum().to(e.dtype) - 1) * (1 - quantile)
        lo, hi = rank.to(torch.long), rank.ceil().to(torch.long)  # rank < 0 (no tokens): 0, inf
        at = lambda i: s.gather(0, i.reshape(1))  # a tensor index: no host sync, compile-traceable
        threshold = torch.lerp(at(lo), at(hi), rank - lo.to(e.dtype))
        return (e >= threshold) & m


def entropy_bonus(entropy, keep, coef, share):
    """``coef * H`` with ``H`` the mean entropy over the tokens the policy loss acts on (``keep``),
    scaled by ``share`` = this call's part of the step's normalizer (1 for a whole batch), as TRL
    1.16 does (its bonus is a token mean for every loss type; the share plays its ``1 / GA``)."""
    kf = keep.to(entropy.dtype)
    return coef * (entropy * kf).sum() / kf.sum().clamp(min=1) * share
