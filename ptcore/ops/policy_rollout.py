"""Rollout correction for :func:`ptcore.ops.policy_loss` (docs/losses.md §2.1): the sampler's
log-probs in the loss, as TRL 1.16 defines it (``vllm_importance_sampling_mode`` and OPSM)."""
import math

import torch

from ptcore.ops import checks

ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_rollout_options(op, rollout_correction, rollout_clip, off_policy_threshold):
    """Validates the rollout-correction options; returns (clip_min, clip_max, threshold)."""
    if rollout_correction is not None:
        checks.choice(op, "rollout_correction", rollout_correction, ROLLOUT_CORRECTIONS)
    if not isinstance(rollout_clip, (tuple, list)) or len(rollout_clip) != 2:
        raise ValueError(f"{op}: 'rollout_clip' must be a pair (min, max) of numbers or None, got "
                         f"{rollout_clip!r}")
    lo, hi = (None if v is None else checks.number(op, "rollout_clip", v, low=0)
              for v in rollout_clip)
    if (rollout_correction is not None and rollout_correction.endswith("truncate") and lo is None
            and hi is None):  # TRL's torch.clamp fails there too
        raise ValueError(f"{op}: 'rollout_clip' needs a min or a max for "
                         f"rollout_correction={rollout_correction!r}, got (None, None)")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{op}: 'rollout_clip' must have min <= max, got {tuple(rollout_clip)}")
    if off_policy_threshold is not None:
        off_policy_threshold = checks.number(op, "off_policy_threshold", off_policy_threshold)
    return lo, hi, off_policy_threshold


def rollout_weight(old, samp, mf, mode, clip_min, clip_max):
    """The detached importance weight of the rollout correction (TRL 1.16's
    ``vllm_importance_sampling_mode``): ``[B, T]`` for token modes, ``[B, 1]`` for sequence
    modes; None without a mode. A NaN sampling log-prob (unscored token) gives a log-ratio of 0."""
    if mode is None or samp is None:
        return None
    with torch.no_grad():
        diff = torch.nan_to_num((old - samp) * mf, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        w = torch.exp(diff)
        if mode.endswith("truncate"):
            return torch.clamp(w, min=clip_min, max=clip_max)
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        return w.masked_fill((w < lo) | (w > hi), 0.0)


def off_policy_keep(adv, logps, samp, mf, threshold):
    """OPSM (DeepSeek-V3.2, TRL's ``off_policy_mask_threshold``): 1 where the advantage is >= 0 or
    the sequence's mean ``samp - logp`` over its completion tokens is <= threshold, else 0;
    ``[B, 1]`` (``[B, T]`` for per-token advantages)."""
    with torch.no_grad():
        kl = torch.nan_to_num(samp - logps.detach(), nan=0.0)
        avg = (kl * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0)
        return ((adv >= 0) | (avg <= threshold)).to(mf.dtype)


def mismatch_metrics(samp, trainer, m) -> dict:
    """Sampler/trainer mismatch over the completion tokens ``m`` (NaN sampling log-probs left
    out): mean and max ``|samp - trainer|`` and the k3 estimate of KL(sampler || trainer)."""
    from ptcore.ops.policy import kl_penalty  # here: policy.py imports this module

    with torch.no_grad():
        ok = m & ~torch.isnan(samp)
        zero = samp.new_zeros(())
        n = ok.sum().clamp(min=1).to(samp.dtype)
        d = torch.where(ok, (samp - trainer).abs(), zero)
        k3 = torch.where(ok, kl_penalty(torch.where(ok, samp, zero), torch.where(ok, trainer, zero),
                                        "k3"), zero)
        return {"rollout/logp_diff_mean": d.sum() / n, "rollout/logp_diff_max": d.amax() if d.numel() else zero,
                "rollout/kl_k3": k3.sum() / n}
