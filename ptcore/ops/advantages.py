"""Advantage estimators: docs/losses.md §3.

Plain PyTorch in float32 (float64 for float64 input). Conventions picked where the reference
leaves a choice:

* A NaN reward is left out of every statistic (its group's, and the batch's for ``scale="batch"``
  and reinforce_pp) and gets advantage 0.
* A ``±inf`` reward is an error (a broken reward function, not a missing reward; it would make
  its whole group ``-inf``/NaN): ``ValueError`` naming ``'rewards'`` and its index for CPU
  tensors. On an accelerator, where raising would need a host sync, it is left out like NaN.
* A group whose valid rewards are all equal (or that has no valid reward) gets exactly 0
  advantages with every estimator; with reinforce_pp its members still count in the batch
  whitening statistics.
* Standard deviations are unbiased (``n - 1``); with fewer than 2 valid values the std is 0.
* grpo ``scale="batch"`` divides by the unbiased std of the batch's valid raw rewards.
* rloo: a group with one valid member has no leave-one-out baseline; its advantage is 0.
* reinforce_pp: ``d = r - mean_g r``, then ``(d - mean_batch d) / (std_batch d + eps)``.
* ``scale`` only applies to grpo; the other estimators ignore it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ptcore.ops import checks

ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
SCALES = ("group", "batch", "none")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _batch_std(x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) over the valid entries of x; both 0 without enough of them."""
    n = valid.sum()
    mean = torch.where(valid, x, 0).sum() / n.clamp(min=1)
    var = torch.where(valid, x - mean, 0).pow(2).sum() / (n - 1).clamp(min=1)
    return mean, var.sqrt()


def _safe_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return x / torch.where(d > 0, d, torch.ones_like(d))


def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None, *,
                     groups: Optional[torch.Tensor] = None, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Per-completion advantages from group statistics (docs/losses.md §3).

    Args:
        rewards: ``[B]`` rewards; NaN = missing.
        group_size: consecutive groups of this size (must divide B), or
        groups: ``[B]`` integer group ids (any values, any order; uses ``torch.unique``, one
            host sync on an accelerator, where ``group_size`` has none). Give exactly one.
        estimator: ``grpo`` ``(r - mean_g) / (std_g + eps)``; ``rloo`` ``r_i - mean_{j != i} r_j``;
            ``reinforce_pp`` group-mean baseline then whitened over the batch.
        scale: grpo only: ``group`` (group std), ``batch`` (batch std), ``none`` (Dr. GRPO).
        eps: added to the std (``>= 0``).

    Returns:
        ``[B]`` advantages (float32, or float64 for float64 rewards).

    Example:
        >>> import torch
        >>> group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, estimator="rloo")
        tensor([-1.5000,  0.0000,  1.5000,  0.0000,  0.0000,  0.0000])
    """
    op = "group_advantages"
    checks.tensor(op, "rewards", rewards, ndim=1)
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"{op}: 'rewards' must hold real numbers, got dtype {rewards.dtype}")
    checks.choice(op, "estimator", estimator, ESTIMATORS)
    checks.choice(op, "scale", scale, SCALES)
    eps = checks.number(op, "eps", eps, low=0)
    B = rewards.shape[0]
    if (group_size is None) == (groups is None):
        raise ValueError(f"{op}: give exactly one of 'group_size' and 'groups'")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{op}: 'group_size' must be an int, got {type(group_size).__name__}")
        if group_size < 1 or B % group_size:
            raise ValueError(f"{op}: 'group_size' must be >= 1 and divide the batch size {B}, "
                             f"got {group_size}")
        G = B // group_size
        ids = torch.arange(B, device=rewards.device) // group_size
    else:
        checks.tensor(op, "groups", groups, ndim=1)
        if groups.shape != rewards.shape:
            raise ValueError(f"{op}: 'groups' must have shape {tuple(rewards.shape)} like "
                             f"'rewards', got {tuple(groups.shape)}")
        if groups.is_floating_point() or groups.is_complex():
            raise TypeError(f"{op}: 'groups' must hold integer ids, got dtype {groups.dtype}")
        checks.same_device(op, "rewards", rewards, groups=groups)
        uniq, ids = torch.unique(groups, return_inverse=True)
        G = uniq.numel()

    acc = _acc(rewards)
    r = rewards.to(acc)
    if r.device.type == "cpu" and not torch.compiler.is_compiling():
        inf = torch.isinf(r)
        if bool(inf.any()):
            i = int(inf.nonzero()[0, 0])
            raise ValueError(f"{op}: 'rewards'[{i}] is {float(r[i])}; a reward must be finite "
                             "(NaN marks a missing one)")
    valid = torch.isfinite(r)  # NaN (and, off the CPU, ±inf) = missing
    r0 = torch.where(valid, r, 0)
    zeros = r.new_zeros(G)
    cnt = zeros.index_add(0, ids, valid.to(acc))
    mean = zeros.index_add(0, ids, r0) / cnt.clamp(min=1)
    inf = float("inf")
    gmax = torch.full_like(zeros, -inf).scatter_reduce(0, ids, torch.where(valid, r, -inf), "amax")
    gmin = torch.full_like(zeros, inf).scatter_reduce(0, ids, torch.where(valid, r, inf), "amin")
    live = valid & (gmax > gmin)[ids]  # valid members of groups with some reward spread
    dev = torch.where(live, r0 - mean[ids], 0)

    if estimator == "rloo":
        n = cnt[ids]
        adv = _safe_div(n * dev, n - 1)  # r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean)
    elif estimator == "reinforce_pp":
        m, std = _batch_std(dev, valid)
        adv = _safe_div(dev - m, std + eps)
    elif scale == "none":
        adv = dev
    else:
        if scale == "group":
            std = (zeros.index_add(0, ids, dev * dev) / (cnt - 1).clamp(min=1)).sqrt()[ids]
        else:
            std = _batch_std(r0, valid)[1]
        adv = _safe_div(dev, std + eps)
    return torch.where(live, adv, 0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over token-level rewards (docs/losses.md §3).

    ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``, returns
    ``A + V``, where "next" is the next position with ``mask`` nonzero (masked positions are
    skipped: padding after the end, or tokens inside a completion not produced by the policy),
    and after the last completion token ``V = A = 0``. Rewards and values at masked positions are
    ignored; advantages and returns there are 0.

    Args:
        rewards, values: ``[B, T]``. mask: ``[B, T]`` bool or {0, 1}.
        gamma, lam: discount and GAE lambda, in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``.

    Example:
        >>> import torch
        >>> adv, ret = gae(torch.tensor([[0.0, 1.0, 7.0]]), torch.zeros(1, 3),
        ...                torch.tensor([[1, 1, 0]]), gamma=0.5)
        >>> adv  # the reward at the padded position is ignored
        tensor([[0.5000, 1.0000, 0.0000]])
    """
    op = "gae"
    checks.tensor(op, "rewards", rewards, ndim=2, dtypes=checks.FLOAT_DTYPES)
    for name, t in (("values", values), ("mask", mask)):
        checks.tensor(op, name, t)
        if t.shape != rewards.shape:
            raise ValueError(f"{op}: '{name}' must have shape {tuple(rewards.shape)} like "
                             f"'rewards', got {tuple(t.shape)}")
        checks.same_device(op, "rewards", rewards, **{name: t})
    checks.real(op, "values", values)
    checks.real(op, "mask", mask, allow_bool=True)
    gamma = checks.number(op, "gamma", gamma, low=0, high=1)
    lam = checks.number(op, "lam", lam, low=0, high=1)
    acc = _acc(rewards)
    m = mask if mask.dtype == torch.bool else mask != 0
    r = torch.where(m, rewards.to(acc), 0)
    v = torch.where(m, values.to(acc), 0)
    B, T = r.shape
    next_v, next_a = r.new_zeros(B), r.new_zeros(B)
    out = [None] * T
    for t in reversed(range(T)):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        next_a = torch.where(m[:, t], a, next_a)
        next_v = torch.where(m[:, t], v[:, t], next_v)
        out[t] = torch.where(m[:, t], a, 0)
    adv = torch.stack(out, 1) if T else r.clone()
    return adv, torch.where(m, adv + v, 0)
