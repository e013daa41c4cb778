"""Policy-gradient losses (GRPO / PPO family) on per-token log-probs: docs/losses.md §2.

Tensors are ``[B, T]`` (``advantages`` may be ``[B]``, broadcast to the tokens of its sequence).
The math runs in float32 (float64 when ``logps`` is float64), with plain differentiable PyTorch
ops and no host syncs. Positions where ``mask`` is 0 (prompt, padding) are replaced by 0 before
any math, so garbage there (``-inf`` log-probs, NaN advantages) never reaches the loss or the
gradient; such positions get zero gradient.

Conventions picked where the reference leaves a choice (§2):

* cispo caps the stop-gradient ratio at an absolute ``cispo_max`` when given, else at
  ``1 + epsilon_high``; no lower clip.
* gspo always uses the sequence-level ratio; ``importance_sampling_level="sequence"`` selects it
  for the PPO-clip types and cispo too. pg has no ratio.
* ``normalizer`` is the GLOBAL denominator of the aggregation (``AGGREGATION``) over the whole
  optimizer step: total completion tokens (token-mean), total sequences (seq-mean-token-mean),
  ``B_total * L_max`` (seq-mean-token-sum-norm). With it, summing the losses of micro-batches
  equals the loss of the whole batch. Defaults: this call's ``mask.sum()``, ``B``, ``B * T``.
  A zero normalizer (all tokens masked) gives loss 0.
* Metrics (detached, masked means over this call's completion tokens, 0 when all are masked):
  ``clip_ratio/low_mean`` = share of tokens with ``rho < 1 - eps_low`` and ``A < 0``,
  ``clip_ratio/high_mean`` = ``rho > 1 + eps_high`` and ``A > 0`` (cispo: ``rho > cap``, any A;
  pg: 0), ``clip_ratio/region_mean`` = either; ``ratio_mean``; ``approx_kl`` =
  ``rho - 1 - log rho`` with the token-level ratio (k3 with ``old`` in the role of the policy:
  the unbiased estimate of KL(pi_old || pi) over tokens sampled from pi_old); ``kl`` (the chosen
  estimator vs ``ref_logps``, when given, even with ``beta = 0``; with ``bias_correction_kl`` the
  rho-weighted one); ``entropy`` (when given); sapo / vespo have no hard clip (clip ratios 0),
  vespo adds ``vespo/phi_seq_mean``, gmpo counts the tokens clipped in log space;
  ``entropy/kept_fraction`` with ``top_entropy_quantile < 1``; ``entropy_bonus`` (the term
  subtracted) with ``entropy_coef != 0``.
* The newer families (sapo, luspo, vespo, gmpo, ``delta``, ``top_entropy_quantile``,
  ``entropy_coef``, ``bias_correction_kl``) are TRL 1.16's (GMPO: its paper's): policy_families.py
  and docs/losses.md §2.2. An option the chosen loss type would ignore raises.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ptcore.ops import checks
from ptcore.ops.policy_families import (check_family_options, entropy_bonus, gmpo_sequence_loss,
                                        high_entropy_mask, ppo_clip, sapo_loss, vespo_phi)
from ptcore.ops.policy_rollout import (ROLLOUT_CORRECTIONS, check_rollout_options,  # noqa: F401
                                       mismatch_metrics, off_policy_keep, rollout_weight)

OP = "policy_loss"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "pg", "sapo", "luspo", "vespo", "gmpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION = {"grpo": "seq-mean-token-mean", "gspo": "seq-mean-token-mean",
               "bnpo": "token-mean", "dapo": "token-mean", "cispo": "token-mean",
               "pg": "token-mean", "dr_grpo": "seq-mean-token-sum-norm", "sapo": "seq-mean-token-mean",
               "luspo": "seq-mean-token-sum", "vespo": "token-mean",
               "gmpo": "seq-mean-token-mean"}  # gmpo: one term per sequence, spread over its tokens


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    metrics: dict


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference (docs/losses.md §2, KL table).

    ``k1 = logp - ref``, ``k2 = 0.5 (logp - ref)^2``, ``k3 = exp(d) - d - 1`` with
    ``d = clamp(ref - logp, -20, 20)``. Same shape and dtype as the inputs; differentiable.

    Example:
        >>> import torch
        >>> kl_penalty(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]), "k3")
        tensor([0.0000, 0.7183])
    """
    checks.choice("kl_penalty", "estimator", estimator, KL_ESTIMATORS)
    if logps.shape != ref_logps.shape:
        raise ValueError(f"kl_penalty: 'ref_logps' must have shape {tuple(logps.shape)} like "
                         f"'logps', got {tuple(ref_logps.shape)}")
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k2":
        return 0.5 * (logps - ref_logps) ** 2
    d = torch.clamp(ref_logps - logps, -20.0, 20.0)
    return torch.exp(d) - d - 1


def _like(name, value, ref):
    checks.tensor(OP, name, value)
    if value.shape != ref.shape:
        raise ValueError(f"{OP}: '{name}' must have shape {tuple(ref.shape)} like 'logps', got "
                         f"{tuple(value.shape)}")
    checks.same_device(OP, "logps", ref, **{name: value})


def _normalizer(value, default, acc, device, mask):
    """The aggregation's denominator as a 0-d tensor; 0 becomes 1 (the numerator is then 0, which a
    CPU tensor 0 given with unmasked tokens would contradict: that raises)."""
    if value is None:
        value = default
    elif isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{OP}: 'normalizer' must be a number or a one-element tensor, got "
                             f"shape {tuple(value.shape)}")
        value = value.reshape(())
        # Value check on CPU only (elsewhere a host sync), and not while torch.compile traces.
        if (value.device.type == "cpu" and not torch.compiler.is_compiling()
                and not bool(torch.isfinite(value) & (value >= 0))):
            raise ValueError(f"{OP}: 'normalizer' must be a finite number >= 0, got {float(value)}")
    else:
        checks.number(OP, "normalizer", value, low=0, low_open=True)
        # a positive normalizer that flushes to 0 in the math's dtype would be read as "no
        # tokens" (treated as 1), and one that overflows would zero the loss: both rejected
        checks.representable(OP, "normalizer", float(value), acc)
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not torch.compiler.is_compiling():
        v = float(value)
        if v != 0:
            checks.representable(OP, "normalizer", v, acc)
        elif bool(mask.any()):
            raise ValueError(f"{OP}: 'normalizer' is 0 but the mask selects {int(mask.sum())} tokens "
                             "(0 means the whole step has none)")
    value = torch.as_tensor(value, dtype=acc, device=device)
    return torch.where(value == 0, torch.ones_like(value), value)


def default_normalizer(loss_type: str, mask: torch.Tensor):
    """The aggregation's denominator of one whole batch: its completion tokens (token-mean), its
    sequences (seq-mean-token-mean, seq-mean-token-sum) or ``B * T`` (dr_grpo). Pass the value for the whole
    optimizer step as ``normalizer`` when the batch is split."""
    agg = AGGREGATION[loss_type]
    if agg == "token-mean":
        return (mask if mask.dtype == torch.bool else mask != 0).sum()
    return mask.shape[0] if agg.startswith("seq-mean-token-") and not agg.endswith("-norm") \
        else mask.shape[0] * mask.shape[1]


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, ref_logps: Optional[torch.Tensor] = None,
                beta: float = 0.0, kl_estimator: str = "k3", epsilon_low: float = 0.2,
                epsilon_high: Optional[float] = None, dual_clip: Optional[float] = None,
                importance_sampling_level: str = "token", loss_type: str = "dapo",
                normalizer: Union[None, float, torch.Tensor] = None,
                entropy: Optional[torch.Tensor] = None,
                cispo_max: Optional[float] = None,
                sampling_logps: Optional[torch.Tensor] = None,
                rollout_correction: Optional[str] = None,
                rollout_clip: tuple = (None, 3.0),
                off_policy_threshold: Optional[float] = None,
                delta: Optional[float] = None,
                sapo_temperature_pos: Optional[float] = None,
                sapo_temperature_neg: Optional[float] = None,
                vespo_k_pos: Optional[float] = None, vespo_lambda_pos: Optional[float] = None,
                vespo_k_neg: Optional[float] = None, vespo_lambda_neg: Optional[float] = None,
                top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
                bias_correction_kl: bool = False) -> PolicyLossOutput:
    """Clipped policy-gradient loss of one micro-batch (docs/losses.md §2).

    Per token: PPO clip ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)`` (grpo, bnpo, dr_grpo,
    dapo, gspo, luspo), with dual clip ``min(., -c A)`` for ``A < 0`` when ``dual_clip=c`` (``c > 1``)
    and ``rho`` capped at ``delta`` in the unclipped branch when given;
    cispo ``-sg(min(rho, cap)) A logp``; pg ``-A logp``; sapo ``-sigmoid(tau (rho-1)) 4/tau A``;
    vespo ``-sg(phi(w_seq)) A logp``; gmpo ``-A_i`` times the geometric mean of the token ratios,
    each clipped in log space to ``[-eps_low, eps_high]`` (policy_families.py); plus
    ``beta * KL_t`` (times ``rho`` with ``bias_correction_kl``) when ``beta > 0``.
    ``rho = exp(clamp(logp - old, -20, 20))`` (gspo: the sequence's masked mean log-ratio).
    Aggregated as ``AGGREGATION[loss_type]`` with the global ``normalizer`` (module docstring).

    Args:
        logps: ``[B, T]`` policy log-probs of the sampled tokens (differentiable).
        old_logps: ``[B, T]`` log-probs of the sampling policy. advantages: ``[B]`` or ``[B, T]``.
        mask: ``[B, T]`` bool or {0, 1}; nonzero = completion token.
        ref_logps: ``[B, T]`` reference log-probs; required when ``beta > 0``.
        beta (``>= 0``), kl_estimator (k1/k2/k3), epsilon_low (in ``[0, 1]``), epsilon_high
        (``>= 0``, default epsilon_low), dual_clip (``> 1``), importance_sampling_level
        (token/sequence), loss_type (``LOSS_TYPES``), normalizer (``> 0``), entropy (``[B, T]``
        per-token entropies: logged, and used by the two entropy options), cispo_max (``> 0``).
        delta (``> 1``, PPO-clip types), sapo_temperature_pos / _neg (``> 0``, sapo; default
        1.0 / 1.05), vespo_k_pos / _k_neg (``>= 0``) and vespo_lambda_pos / _neg (``> 0``)
        (vespo; default 2, 3, 3, 2): TRL 1.16's; given with another loss type they raise.
        top_entropy_quantile (in ``(0, 1]``): only the tokens whose entropy is in this top
            quantile of the call's completion tokens get the policy loss (not the KL).
        entropy_coef: subtracts ``coef`` times the mean entropy over those tokens, scaled by this
            call's share of the step's normalizer (``entropy_bonus``; TRL's bonus).
        bias_correction_kl: multiply the KL term by ``rho`` (TRL's ``use_bias_correction_kl``;
            default False here, True in TRL); needs ``beta > 0``.
        sampling_logps: ``[B, T]`` log-probs of the rollout engine that sampled the tokens (the
            behaviour policy). With it, ``rollout_correction`` (None, ``ROLLOUT_CORRECTIONS``)
            multiplies the per-token policy loss by a detached importance weight
            ``exp(old - sampling_logps)`` per token or per sequence, truncated into or masked
            outside ``rollout_clip = (min, max)`` (either may be None: unbounded), and
            ``off_policy_threshold`` drops the negative-advantage sequences whose mean
            ``sampling_logps - logps`` exceeds it (OPSM). TRL 1.16's definitions (module
            docstring; docs/losses.md §2.1).

    Returns:
        ``PolicyLossOutput(loss, metrics)``: scalar loss and a dict of detached scalars.

    Example:
        >>> import torch
        >>> logps = torch.log(torch.tensor([[1.5]]))  # rho = 1.5 against old = 0
        >>> out = policy_loss(logps, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))
        >>> round(float(out.loss), 4)  # -min(1.5, 1.2) * A
        -1.2
    """
    checks.tensor(OP, "logps", logps, ndim=2, dtypes=checks.FLOAT_DTYPES)
    B, T = logps.shape
    _like("old_logps", old_logps, logps)
    _like("mask", mask, logps)
    checks.tensor(OP, "advantages", advantages)
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"{OP}: 'advantages' must have shape ({B},) or ({B}, {T}) like 'logps', "
                         f"got {tuple(advantages.shape)}")
    checks.same_device(OP, "logps", logps, advantages=advantages)
    checks.real(OP, "advantages", advantages)
    checks.real(OP, "mask", mask, allow_bool=True)
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("entropy", entropy)):
        if t is not None:
            checks.real(OP, name, t)
    for name, t in (("ref_logps", ref_logps), ("entropy", entropy)):
        if t is not None:
            _like(name, t, logps)
    checks.choice(OP, "loss_type", loss_type, LOSS_TYPES)
    checks.choice(OP, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    checks.choice(OP, "importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    beta = checks.number(OP, "beta", beta, low=0)
    eps_low = checks.number(OP, "epsilon_low", epsilon_low, low=0, high=1)
    eps_high = eps_low if epsilon_high is None else checks.number(OP, "epsilon_high", epsilon_high,
                                                                  low=0)
    if dual_clip is not None:
        dual_clip = checks.number(OP, "dual_clip", dual_clip, low=1, low_open=True)
    if cispo_max is not None:
        cispo_max = checks.number(OP, "cispo_max", cispo_max, low=0, low_open=True)
    if beta > 0 and ref_logps is None:
        raise ValueError(f"{OP}: 'ref_logps' is required when 'beta' > 0 (got beta={beta})")
    clip_lo, clip_hi, off_thr = check_rollout_options(OP, rollout_correction, rollout_clip,
                                                      off_policy_threshold)
    fam = check_family_options(
        OP, loss_type, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
        top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef,
        bias_correction_kl=bias_correction_kl, beta=beta, has_entropy=entropy is not None,
        importance_sampling_level=importance_sampling_level, rollout_correction=rollout_correction,
        dual_clip=dual_clip, cispo_max=cispo_max)
    if sampling_logps is not None:
        checks.real(OP, "sampling_logps", sampling_logps)
        _like("sampling_logps", sampling_logps, logps)
    elif rollout_correction is not None:
        raise ValueError(f"{OP}: 'sampling_logps' is required when 'rollout_correction' is "
                         f"{rollout_correction!r}")

    acc = torch.float64 if logps.dtype == torch.float64 else torch.float32
    m = mask if mask.dtype == torch.bool else mask != 0
    mf = m.to(acc)
    zero = logps.new_zeros((), dtype=acc)
    lp = torch.where(m, logps.to(acc), zero)
    old = torch.where(m, old_logps.to(acc), zero)
    adv = advantages.to(acc)
    adv = torch.where(m, adv[:, None] if adv.dim() == 1 else adv, zero)

    log_ratio = lp - old
    if loss_type == "gspo" or (importance_sampling_level == "sequence" and loss_type != "pg"):
        seq = log_ratio.sum(-1) / mf.sum(-1).clamp(min=1)
        log_ratio = seq[:, None].expand(B, T)
    rho = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))

    cap = (cispo_max if cispo_max is not None else 1 + eps_high)
    samp = None if sampling_logps is None else torch.where(m, sampling_logps.to(acc), zero)
    is_weight = rollout_weight(old, samp, mf, rollout_correction, clip_lo, clip_hi)
    phi = None
    if loss_type == "pg":
        per_token = -adv * lp
    elif loss_type == "cispo":
        per_token = -torch.clamp(rho, max=cap).detach() * adv * lp
    elif loss_type == "sapo":
        per_token = sapo_loss(rho, adv, *fam.sapo)
    elif loss_type == "vespo":  # the rollout weight goes into phi, not onto the loss (TRL)
        adv_seq = advantages.to(acc)[:, None] if advantages.dim() == 1 else adv  # unmasked sign
        phi = vespo_phi(log_ratio, mf, adv_seq, is_weight, *fam.vespo)
        per_token = -phi * adv * lp
        is_weight = None
    elif loss_type == "gmpo":
        per_token = gmpo_sequence_loss(log_ratio, adv, mf, eps_low, eps_high)[:, None].expand(B, T)
    else:
        per_token = ppo_clip(rho, adv, eps_low, eps_high, fam.delta)
        if dual_clip is not None:
            per_token = torch.where(adv < 0, torch.min(per_token, -dual_clip * adv), per_token)
    keep = None
    if off_thr is not None:
        # OPSM on the sampler's log-probs (the old ones without them), as TRL
        raw_adv = advantages.to(acc)
        keep = off_policy_keep(raw_adv[:, None] if raw_adv.dim() == 1 else raw_adv, lp,
                               old if samp is None else samp, mf, off_thr)
        per_token = per_token * keep.to(acc)
    ent = None if entropy is None else torch.where(m, entropy.to(acc), zero)
    high = high_entropy_mask(ent, m, fam.top_entropy_quantile) if fam.top_entropy_quantile < 1 else None
    if high is not None:
        per_token = per_token * high.to(acc)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = None
    if ref_logps is not None:
        kl = kl_penalty(lp, torch.where(m, ref_logps.to(acc), zero), kl_estimator)
        if fam.bias_correction_kl:
            kl = kl * rho
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, zero)

    default = default_normalizer(loss_type, m)
    denom = _normalizer(normalizer, default, acc, logps.device, m)
    if AGGREGATION[loss_type] == "seq-mean-token-mean":
        loss = (per_token.sum(-1) / mf.sum(-1).clamp(min=1)).sum() / denom
    else:
        loss = per_token.sum() / denom
    bonus = None
    if fam.entropy_coef != 0:
        share = torch.as_tensor(default, dtype=acc, device=logps.device) / denom
        bonus = entropy_bonus(ent, m if high is None else high, fam.entropy_coef, share)
        loss = loss - bonus

    with torch.no_grad():
        n_tok = mf.sum().clamp(min=1)

        def mean(x):
            return torch.where(m, x.to(acc), zero).sum() / n_tok

        if loss_type in ("pg", "sapo", "vespo"):  # no hard clip
            low = up = torch.zeros_like(m)
        elif loss_type == "cispo":
            low, up = torch.zeros_like(m), rho > cap
        elif loss_type == "gmpo":  # clipped in log space
            low = (log_ratio < -eps_low) & (adv < 0)
            up = (log_ratio > eps_high) & (adv > 0)
        else:
            low = (rho < 1 - eps_low) & (adv < 0)
            up = (rho > 1 + eps_high) & (adv > 0)
        metrics = {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(up),
                   "clip_ratio/region_mean": mean(low | up), "ratio_mean": mean(rho),
                   "approx_kl": mean(kl_penalty(old, lp, "k3"))}
        if kl is not None:
            metrics["kl"] = mean(kl)
        if ent is not None:
            metrics["entropy"] = mean(ent)
        if high is not None:
            metrics["entropy/kept_fraction"] = mean(high)
        if bonus is not None:
            metrics["entropy_bonus"] = bonus.detach()
        if phi is not None:  # TRL's: over sequences (per-token advantages: over tokens)
            metrics["vespo/phi_seq_mean"] = phi.mean() if phi.shape[-1] == 1 else mean(phi)
        if samp is not None:
            metrics.update(mismatch_metrics(samp, old, m))
        seqs = m.any(-1)
        n_seq = seqs.sum().clamp(min=1).to(acc)
        if is_weight is not None:
            if is_weight.shape[-1] == 1:  # one weight per sequence
                w = is_weight[:, 0]
                metrics["rollout/masked_fraction"] = ((w == 0) & seqs).sum() / n_seq
                metrics["rollout/is_ratio_mean"] = torch.where(seqs, w, 0).sum() / n_seq
            else:
                metrics["rollout/masked_fraction"] = mean(is_weight == 0)
                metrics["rollout/is_ratio_mean"] = mean(is_weight)
        if keep is not None:
            dropped = (keep == 0).expand(B, T) & m
            metrics["rollout/off_policy_masked_fraction"] = (dropped.any(-1)).sum() / n_seq
    return PolicyLossOutput(loss, metrics)
