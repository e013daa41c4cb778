"""Preference (DPO-family) losses on per-sequence summed log-probs: docs/losses.md §1.

All inputs are ``[B]`` tensors, one entry per (chosen, rejected) pair. The math runs in float32
(float64 when any input is float64) with plain, differentiable PyTorch ops and no host syncs.

Conventions picked where the reference leaves a choice (§1):

* ``rc = logp_c - ref_c`` and ``rr = logp_r - ref_r``; the reference-free types (simpo, orpo) take
  ``ref = 0`` when no reference log-probs are given, so their logged rewards are ``beta * logp``.
* exo_pair needs ``e > 0``: ``label_smoothing = 0`` (the default) is replaced by 1e-3 for exo_pair
  only, as the reference suggests.
* ``label_smoothing`` is used by sigmoid (cDPO), robust and exo_pair, and ignored by the others.
* ipo and sppo_hard need ``beta > 0`` (their target is ``1 / (2 beta)``).
* orpo: ``a = logp / |y|`` (length-averaged log-prob), ``log_odds = a - log(1 - exp(a))`` computed
  as ``a - log(-expm1(a))``; ``NLL(chosen) = -logp_c / |y_c|`` unless ``chosen_nll`` is given
  (e.g. the token-mean cross-entropy of the chosen completion from the LM head). ``beta`` does not
  enter the orpo loss, only its logged rewards; the weight of the odds-ratio term is
  ``orpo_lambda``.
* The batch loss is the mean over pairs (0 for an empty batch); a list of loss types gives
  ``sum_k w_k * mean_batch(loss_k)``.
* ``beta`` must be at most ``MAX_BETA`` (1e6): beyond it ``beta * (rc - rr)`` overflows float32
  for ordinary log-prob sums and the losses turn NaN; ipo and sppo_hard need ``1 / (2 beta)``
  finite in the computation dtype too. orpo needs log-probs ``<= 0`` (probabilities): a positive
  one has no odds (``log(1 - p)`` of ``p > 1``) and raises for CPU tensors.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ptcore.ops import checks

OP = "dpo_loss"
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down", "simpo", "orpo")
LENGTH_NORMALIZED = ("ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
EXO_DEFAULT_SMOOTHING = 1e-3
MAX_BETA = 1e6


class PreferenceLossOutput(NamedTuple):
    """``loss`` (scalar), ``chosen_rewards`` / ``rejected_rewards`` (``[B]``, detached ``beta*rc``,
    ``beta*rr``) and ``metrics``: detached scalars ``accuracy`` (mean of ``rc > rr``), ``margin``
    (mean of ``beta*D``) and ``loss/<type>`` (each type's batch mean, before weighting)."""
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict


def _check_vector(name, value, ref_name, ref, *, floating=True):
    checks.tensor(OP, name, value, ndim=1, dtypes=checks.FLOAT_DTYPES if floating else None)
    if value.shape != ref.shape:
        raise ValueError(f"{OP}: '{name}' must have shape {tuple(ref.shape)} like '{ref_name}', "
                         f"got {tuple(value.shape)}")
    checks.same_device(OP, ref_name, ref, **{name: value})


def _check_lengths(name, value, ref):
    _check_vector(name, value, "policy_chosen_logps", ref, floating=False)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{OP}: '{name}' must hold real token counts, got dtype {value.dtype}")
    # Value check on CPU only (on an accelerator it would be a host sync), and not while
    # torch.compile traces (a data-dependent branch).
    if (value.device.type == "cpu" and not torch.compiler.is_compiling() and value.numel()
            and not bool((value > 0).all())):
        raise ValueError(f"{OP}: '{name}' must be > 0 (token counts), got {value.tolist()}")


def _per_pair(kind, *, beta, e, rc, rr, pc, pr, lc, lr, gamma, orpo_lambda, chosen_nll):
    """Per-pair loss of one type, exactly as in docs/losses.md §1."""
    ls, s = F.logsigmoid, torch.sigmoid
    z = beta * (rc - rr)
    if kind == "sigmoid":
        return -(1 - e) * ls(z) - e * ls(-z)
    if kind == "robust":
        return (-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e)
    if kind == "hinge":
        return torch.relu(1 - z)
    if kind == "ipo":
        return (rc / lc - rr / lr - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        e = e if e > 0 else EXO_DEFAULT_SMOOTHING
        return s(z) * (ls(z) - math.log(1 - e)) + s(-z) * (ls(-z) - math.log(e))
    if kind == "nca_pair":
        return -ls(beta * rc) - 0.5 * ls(-beta * rc) - 0.5 * ls(-beta * rr)
    if kind == "bco_pair":
        return -ls(beta * rc) - ls(-beta * rr)
    if kind == "sppo_hard":
        return (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - s(beta * rc)) + s(beta * rr)
    if kind == "apo_down":
        return s(beta * rc) + (1 - s(z))
    if kind == "simpo":
        return -ls(beta * (pc / lc - pr / lr) - gamma)
    # orpo
    ac, ar = pc / lc, pr / lr
    log_odds = (ac - torch.log(-torch.expm1(ac))) - (ar - torch.log(-torch.expm1(ar)))
    nll = -ac if chosen_nll is None else chosen_nll
    return nll - orpo_lambda * ls(log_odds)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: Optional[torch.Tensor] = None,
             ref_rejected_logps: Optional[torch.Tensor] = None, *, beta: float = 0.1,
             loss_type: Union[str, Sequence[str]] = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[torch.Tensor] = None,
             rejected_lengths: Optional[torch.Tensor] = None, gamma: float = 0.5,
             orpo_lambda: float = 1.0, chosen_nll: Optional[torch.Tensor] = None,
             loss_weights: Optional[Sequence[float]] = None) -> PreferenceLossOutput:
    """DPO-family loss of a batch of preference pairs (docs/losses.md §1).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs of the
            policy (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` same for the frozen reference; required
            unless every loss type is reference-free (simpo, orpo).
        beta: inverse temperature, ``>= 0`` (``> 0`` for ipo and sppo_hard).
        loss_type: one of ``LOSS_TYPES`` or a list/tuple of them (weighted sum of batch means).
        label_smoothing: ``e`` in ``[0, 1)`` (``[0, 0.5)`` for robust); exo_pair uses 1e-3 when 0.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (``> 0``); required by
            the length-normalized types ipo, simpo, orpo.
        gamma: simpo target margin. orpo_lambda: weight of orpo's odds-ratio term (``>= 0``).
        chosen_nll: ``[B]`` orpo NLL of the chosen completion; default ``-logp_c / |y_c|``.
        loss_weights: one weight per loss type (default all 1).

    Returns:
        ``PreferenceLossOutput(loss, chosen_rewards, rejected_rewards, metrics)``.

    Example:
        >>> import torch
        >>> out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
        ...                torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1)
        >>> round(float(out.loss), 6)  # -log(sigmoid(0.1 * 1))
        0.644397
    """
    pc = policy_chosen_logps
    checks.tensor(OP, "policy_chosen_logps", pc, ndim=1, dtypes=checks.FLOAT_DTYPES)
    _check_vector("policy_rejected_logps", policy_rejected_logps, "policy_chosen_logps", pc)
    kinds = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(kinds, (list, tuple)) or not kinds:
        raise ValueError(f"{OP}: 'loss_type' must be one of {LOSS_TYPES} or a non-empty list of "
                         f"them, got {loss_type!r}")
    for k in kinds:
        checks.choice(OP, "loss_type", k, LOSS_TYPES)
    if loss_weights is None:
        weights = [1.0] * len(kinds)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(kinds):
            raise ValueError(f"{OP}: 'loss_weights' must be a list with one weight per loss type "
                             f"({len(kinds)}), got {loss_weights!r}")
        weights = [checks.number(OP, "loss_weights", w) for w in loss_weights]
    beta = checks.number(OP, "beta", beta, low=0, high=MAX_BETA)
    for k in ("ipo", "sppo_hard"):
        if k in kinds and beta == 0:
            raise ValueError(f"{OP}: 'beta' must be > 0 for loss_type '{k}' (target 1/(2 beta)), "
                             f"got {beta}")
        if k in kinds:
            checks.representable(OP, "beta", 2 * beta, torch.float32, reciprocal=True,
                                 what=f" (loss_type '{k}' targets 1/(2 beta))")
    e = checks.number(OP, "label_smoothing", label_smoothing, low=0)
    e_max = 0.5 if "robust" in kinds else 1.0
    if e >= e_max:
        where = " for loss_type robust" if e_max == 0.5 else ""
        raise ValueError(f"{OP}: 'label_smoothing' must be in [0, {e_max}){where}, "
                         f"got {label_smoothing}")
    gamma = checks.number(OP, "gamma", gamma)
    orpo_lambda = checks.number(OP, "orpo_lambda", orpo_lambda, low=0)

    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    needs_ref = [k for k in kinds if k not in REFERENCE_FREE]
    for name, t in refs.items():
        if t is None and (needs_ref or any(v is not None for v in refs.values())):
            why = f"loss_type {needs_ref[0]!r}" if needs_ref else "the other reference log-prob"
            raise ValueError(f"{OP}: '{name}' is required by {why}")
        if t is not None:
            _check_vector(name, t, "policy_chosen_logps", pc)
    needs_len = [k for k in kinds if k in LENGTH_NORMALIZED]
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is None and needs_len:
            raise ValueError(f"{OP}: '{name}' is required by the length-normalized loss_type "
                             f"{needs_len[0]!r}")
        if t is not None:
            _check_lengths(name, t, pc)
    if chosen_nll is not None:
        _check_vector("chosen_nll", chosen_nll, "policy_chosen_logps", pc)

    if ("orpo" in kinds and pc.device.type == "cpu" and not torch.compiler.is_compiling()):
        for name, t in (("policy_chosen_logps", pc), ("policy_rejected_logps", policy_rejected_logps)):
            if t.numel() and bool((t > 0).any()):
                i = int((t > 0).nonzero()[0, 0])
                raise ValueError(f"{OP}: '{name}'[{i}] = {float(t[i])} > 0 is not a log-probability; "
                                 "orpo's odds log(p / (1 - p)) need p <= 1")

    given = [pc, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll]
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in given) \
        else torch.float32
    cast = (lambda t: None if t is None else t.to(acc))
    pc, pr = cast(pc), cast(policy_rejected_logps)
    rc = pc - cast(ref_chosen_logps) if ref_chosen_logps is not None else pc
    rr = pr - cast(ref_rejected_logps) if ref_rejected_logps is not None else pr
    args = dict(beta=beta, e=e, rc=rc, rr=rr, pc=pc, pr=pr, lc=cast(chosen_lengths),
                lr=cast(rejected_lengths), gamma=gamma, orpo_lambda=orpo_lambda,
                chosen_nll=cast(chosen_nll))
    n = max(pc.shape[0], 1)  # mean over pairs; an empty batch gives 0, not NaN
    loss = pc.new_zeros(())
    metrics = {}
    for k, w in zip(kinds, weights):
        lk = _per_pair(k, **args).sum() / n
        metrics[f"loss/{k}"] = lk.detach()
        loss = loss + w * lk
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * rc.detach(), beta * rr.detach()
        metrics["accuracy"] = (rc > rr).to(acc).sum() / n
        metrics["margin"] = (chosen_rewards - rejected_rewards).sum() / n
    return PreferenceLossOutput(loss, chosen_rewards, rejected_rewards, metrics)
