"""Input checks and random draws shared by the speculative verification ops
(:mod:`ptcore.ops.speculative` for chains, :mod:`ptcore.ops.speculative_tree` for token trees)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ptcore import _ext
from ptcore.ops import checks

OP = "speculative_verify"
OP_TREE = "speculative_verify_tree"
# Rows of probabilities may be off 1 by rounding (bf16 softmax: ~V * 2^-9 relative at worst per
# element, but errors mostly cancel); anything further is not a distribution (e.g. logits).
SUM_TOLERANCE = 1e-2

Lengths = Union[torch.Tensor, Sequence[int], None]


def check_probs(op, name, probs, lens, extra, validate):
    """NaN / negative entries and row sums, on the rows the verification may read: row r of
    sequence b when ``r < lens[b] + extra`` (every row when ``lens`` is None). One C++ pass on CPU
    tensors (the torch fallback elsewhere or without the compiled module)."""
    if not validate or probs.numel() == 0:
        return
    B, R, V = probs.shape
    mod = _ext.cpu_module() if probs.device.type == "cpu" else None
    if mod is not None and probs.stride(-1) == 1:
        lens_c = None if lens is None else lens.contiguous()
        b, r, kind, total = mod.speculative_check_probs(
            str(probs.dtype).removeprefix("torch."), B, R, V, probs.data_ptr(), probs.stride(0), probs.stride(1),
            0 if lens_c is None else lens_c.data_ptr(), extra, SUM_TOLERANCE)
    else:
        rows = torch.arange(R, device=probs.device)
        used = torch.ones(B, R, dtype=torch.bool, device=probs.device) if lens is None else rows < lens.unsqueeze(1) + extra
        sel = probs[used]
        nan, neg = sel.isnan().any(-1), (sel < 0).any(-1)
        sums = sel.sum(-1, dtype=torch.float64)
        kinds = torch.where(nan, 1, torch.where(neg, 2, torch.where((sums - 1).abs() > SUM_TOLERANCE, 3, 0)))
        bad = kinds.nonzero()
        b = r = -1
        kind, total = 0, 0.0
        if bad.numel():
            i = int(bad[0, 0])
            b, r = used.nonzero()[i].tolist()
            kind, total = int(kinds[i]), float(sums[i])
    if kind in (1, 2):
        raise ValueError(f"{op}: '{name}' has {'NaN' if kind == 1 else 'negative'} entries in row [{b}, {r}]; "
                         "probabilities must be finite and >= 0")
    if kind == 3:
        raise ValueError(f"{op}: '{name}' row [{b}, {r}] sums to {total:.6g}, not 1; pass probabilities "
                         "(softmax of the logits after temperature / top-k / top-p), not logits")


def draft_lengths(op, draft_lens: Lengths, B: int, K: int, device, validate: bool) -> torch.Tensor:
    """``draft_lens`` as a contiguous int64 ``[B]`` tensor on ``device`` (all K when None), its
    values checked to lie in [0, K] on CPU (and, with ``validate``, elsewhere)."""
    if draft_lens is None:
        return torch.full((B,), K, dtype=torch.int64, device=device)
    if not isinstance(draft_lens, torch.Tensor):
        try:
            draft_lens = list(draft_lens)
            for i, v in enumerate(draft_lens):  # torch.tensor would truncate 1.5 to 1
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"'draft_lens'[{i}] is {v!r}, not an int")
            draft_lens = torch.tensor(draft_lens, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{op}: 'draft_lens' must be an int64 tensor or a sequence of ints ({e})") from None
    if draft_lens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: 'draft_lens' must have an integer dtype (int64), got {draft_lens.dtype}")
    if draft_lens.shape != (B,):
        raise ValueError(f"{op}: 'draft_lens' must have shape ({B},), got {tuple(draft_lens.shape)}")
    if draft_lens.device.type == "cpu" and draft_lens.numel():
        lo, hi = int(draft_lens.min()), int(draft_lens.max())
        if lo < 0 or hi > K:
            raise ValueError(f"{op}: 'draft_lens' must lie in [0, K={K}], got values in [{lo}, {hi}]")
    elif validate and draft_lens.numel():
        if bool(((draft_lens < 0) | (draft_lens > K)).any()):
            raise ValueError(f"{op}: 'draft_lens' must lie in [0, K={K}]")
    return draft_lens.to(device=device, dtype=torch.int64).contiguous()


def tokens_in_range(op, name, tokens, used, V, validate):
    """With ``validate``: every token where ``used`` is True is a vocabulary id in [0, V)."""
    if not validate or tokens.numel() == 0:
        return
    bad = used & ((tokens < 0) | (tokens >= V))
    if bool(bad.any()):
        b, k = bad.nonzero()[0].tolist()
        raise ValueError(f"{op}: '{name}' holds {int(tokens[b, k])} at [{b}, {k}], outside the "
                         f"vocabulary [0, {V})")


def check_common(op, tokens, draft_probs, target_probs, rows):
    """Types, dtypes and devices shared by both ops; ``rows``: the expected draft-prob rows."""
    checks.tensor(op, "target_probs", target_probs, ndim=3, dtypes=checks.FLOAT_DTYPES)
    checks.tensor(op, "draft_tokens" if op == OP else "tree_tokens", tokens, ndim=2,
                  dtypes=(torch.int64, torch.int32))
    checks.same_device(op, "target_probs", target_probs, draft_probs=draft_probs,
                       **{"draft_tokens" if op == OP else "tree_tokens": tokens})
    B, V = target_probs.shape[0], target_probs.shape[2]
    if V == 0:
        raise ValueError(f"{op}: 'target_probs' has an empty vocabulary (V = 0)")
    if draft_probs is not None:
        checks.tensor(op, "draft_probs", draft_probs, ndim=3, dtypes=checks.FLOAT_DTYPES)
        if draft_probs.dtype != target_probs.dtype:
            raise TypeError(f"{op}: 'draft_probs' has dtype {draft_probs.dtype} but 'target_probs' has "
                            f"{target_probs.dtype}; cast one")
        if draft_probs.shape != (B, rows, V):
            raise ValueError(f"{op}: 'draft_probs' must have shape {(B, rows, V)} to match "
                             f"'target_probs' {tuple(target_probs.shape)}, got {tuple(draft_probs.shape)}")
    return B, V


def unit_stride(t):
    """``t`` (or None) with stride 1 over its last dim, as the backends require."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def draw_randoms(B, K, V, device, generator, greedy):
    """float64 uniforms u [B, K] and exponentials E [B, V], in this order, from ``generator``."""
    if greedy:
        return None, None
    u = torch.rand((B, K), dtype=torch.float64, device=device, generator=generator)
    e = torch.empty((B, V), dtype=torch.float64, device=device).exponential_(generator=generator)
    return u, e

