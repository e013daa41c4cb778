"""Paged attention over a block-table KV cache: the attention ops of ptcore's inference engine.

- :func:`write_kv` stores new keys / values at their cache slots (``slot = page * page_size +
  offset``);
- :func:`paged_attention_decode`: one new token per sequence attends to its positions
  ``< seq_lens[b]`` (its own K/V already written);
- :func:`paged_attention_extend`: the new tokens of many sequences (packed, ``cu_seqlens_q``)
  attend to their cached prefix and causally to each other, or by a ``tree_mask``
  (tree-speculative verification);
- :func:`copy_pages`: whole pages on every layer of a pool (copy-on-write of a shared page).

Backends (chosen by ptcore/ops/dispatch.py): ``cpu`` (C++ OpenMP, csrc/cpu/paged_attention.cpp)
for CPU tensors, ``triton`` (kernels/paged_attention.py) and ``flash_attn`` (flash-attn's
``flash_attn_with_kvcache`` / ``flash_attn_varlen_func``; chosen first on CUDA tensors when installed,
the dtype is fp16/bf16, the page size a multiple of 256 and there is no tree mask) for CUDA tensors,
and ``torch`` (ptcore/ops/paged_reference.py), the reference, on any device. Conventions (GQA head order, softcap, rows that see nothing) are in
paged_reference.py.

Argument errors name the argument: shapes, dtypes and devices raise here; the data-dependent
checks (sequence lengths against the block table, page ids, ``cu_seqlens_q``) run here for CPU
tensors on the torch and triton backends and in C++ for the cpu backend (it checks everything
again). On CUDA tensors the data checks are skipped: they would synchronize with the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ptcore.ops import checks, dispatch
from ptcore.ops import paged_backends as backends
from ptcore.ops.paged_reference import copy_pages_torch, write_kv_torch

INDEX_DTYPES = (torch.int32,)


def _cache_pair(op, k_cache, v_cache, ndim, names=("k_cache", "v_cache")):
    kn, vn = names
    checks.tensor(op, kn, k_cache, ndim=ndim, dtypes=checks.FLOAT_DTYPES)
    checks.tensor(op, vn, v_cache, ndim=ndim)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: '{vn}' must have the shape of '{kn}' {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{op}: '{vn}' has dtype {v_cache.dtype} but '{kn}' has {k_cache.dtype}")
    checks.same_device(op, kn, k_cache, **{vn: v_cache})


def _host_any(mask: torch.Tensor) -> bool:
    return bool(mask.any())


def _check_data(op, block_table, seq_lens, q_lens, num_pages, page_size, *, decode):
    """Data-dependent checks (host side; CPU tensors only)."""
    lens = seq_lens.long()
    capacity = block_table.shape[1] * page_size
    low = q_lens if q_lens is not None else torch.ones_like(lens)
    if _host_any(lens < low):
        b = int((lens < low).nonzero()[0, 0])
        need = "at least 1 (the new token)" if decode else f"at least its {int(low[b])} new token(s)"
        raise ValueError(f"{op}: 'seq_lens'[{b}] = {int(lens[b])} must be {need}")
    if _host_any(lens > capacity):
        b = int((lens > capacity).nonzero()[0, 0])
        raise ValueError(f"{op}: 'seq_lens'[{b}] = {int(lens[b])} exceeds the block table's capacity "
                         f"{block_table.shape[1]} pages x {page_size} = {capacity}")
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] < ((lens + page_size - 1) // page_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if _host_any(bad):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{op}: 'block_table'[{b}, {i}] = {int(block_table[b, i])} is not a page id in "
                         f"[0, {num_pages}) (the cache has {num_pages} pages)")


def _check_attention(op, q, k_cache, v_cache, block_table, seq_lens, scale, softcap):
    checks.tensor(op, "q", q, ndim=3, dtypes=checks.FLOAT_DTYPES)
    _cache_pair(op, k_cache, v_cache, 4)
    checks.tensor(op, "block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    checks.tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES)
    checks.same_device(op, "q", q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"{op}: 'k_cache' has dtype {k_cache.dtype} but 'q' has {q.dtype}")
    _, Hq, D = q.shape
    _, S, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"{op}: 'k_cache' head_dim {Dk} differs from 'q' head_dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: 'q' has {Hq} heads, not a multiple of the {Hkv} KV heads of 'k_cache'")
    if D == 0 or S == 0:
        raise ValueError(f"{op}: 'k_cache' {tuple(k_cache.shape)} has an empty page_size or head_dim")
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"{op}: 'block_table' has {block_table.shape[0]} rows but 'seq_lens' has "
                         f"{seq_lens.shape[0]} sequences")
    scale = 1.0 / math.sqrt(D) if scale is None else checks.number(op, "scale", scale)
    softcap = 0.0 if softcap is None else checks.number(op, "softcap", softcap, low=0.0, low_open=True)
    # the kernels compute in float32 (float64 for float64): a scale or softcap (or 1 / softcap)
    # beyond that range would be inf (or 0) there
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    checks.representable(op, "scale", scale, acc)
    if softcap:
        checks.representable(op, "softcap", softcap, acc, reciprocal=True)
    return scale, softcap


def _contiguous_rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                           scale: Optional[float] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    Args:
        q: ``[B, Hq, D]`` queries (any float dtype; the caches share it).
        k_cache, v_cache: one layer of the pool, ``[pages, page_size, Hkv, D]``; ``Hq % Hkv == 0``.
        block_table: int32 ``[B, max_pages]``: page ids of each sequence in order (entries past a
            sequence's last page are never read).
        seq_lens: int32 ``[B]``: positions ``< seq_lens[b]`` are attended (the new token's K/V is
            already written, at position ``seq_lens[b] - 1``).
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: optional Gemma-2 logit soft-capping ``softcap * tanh(s / softcap)``.

    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    op = "paged_attention_decode"
    scale, softcap = _check_attention(op, q, k_cache, v_cache, block_table, seq_lens, scale, softcap)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"{op}: 'q' has {q.shape[0]} sequences but 'seq_lens' has {seq_lens.shape[0]}")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    q, k_cache, v_cache, block_table = (_contiguous_rows(t) for t in (q, k_cache, v_cache, block_table))
    seq_lens = seq_lens.contiguous()
    backend = dispatch.resolve(q.device, q.dtype, op=op, page_size=k_cache.shape[1], tree_mask=False)
    if backend != "cpu" and q.device.type == "cpu":
        _check_data(op, block_table, seq_lens, None, k_cache.shape[0], k_cache.shape[1], decode=True)
    return backends.DECODE[backend](q, k_cache, v_cache, block_table, seq_lens, scale=scale, softcap=softcap)


def paged_attention_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, *, scale: Optional[float] = None,
                           softcap: Optional[float] = None,
                           tree_mask: Optional[torch.Tensor] = None,
                           max_q: Optional[int] = None) -> torch.Tensor:
    """Attention of the new tokens of many sequences over their cached prefixes and each other.

    Args:
        q: ``[T, Hq, D]``: the new tokens of B sequences packed; sequence b owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (``q_len_b`` of them, 0 allowed).
        k_cache, v_cache, block_table, seq_lens, scale, softcap: as in :func:`paged_attention_decode`;
            ``seq_lens[b]`` counts the prefix and the new tokens, whose K/V are already written.
            New token j of sequence b sits at position ``seq_lens[b] - q_len_b + j``.
        cu_seqlens_q: int32 ``[B + 1]``, starts at 0, non-decreasing, ends at T.
        tree_mask: optional bool ``[T, W]`` with ``W >= max q_len``: row t says which new tokens of
            its own sequence it sees (columns past ``q_len_b`` are ignored); without it, attention
            among new tokens is causal. The prefix is always visible.
        max_q: the longest ``q_len`` of the batch, or an upper bound on it (the caller knows it:
            passing it saves the triton and flash-attn backends a host sync per call); None:
            computed from ``cu_seqlens_q``. A value below the longest ``q_len`` raises ValueError
            for CPU tensors (on CUDA it is not checked: rows past it would be left unwritten).

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    op = "paged_attention_extend"
    scale, softcap = _check_attention(op, q, k_cache, v_cache, block_table, seq_lens, scale, softcap)
    checks.tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES)
    checks.same_device(op, "q", q, cu_seqlens_q=cu_seqlens_q, tree_mask=tree_mask)
    B, T = seq_lens.shape[0], q.shape[0]
    if max_q is not None and (isinstance(max_q, bool) or not isinstance(max_q, int) or max_q < 0):
        raise ValueError(f"{op}: 'max_q' must be an int >= 0 (an upper bound on the longest q_len) or None, "
                         f"got {max_q!r}")
    if cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"{op}: 'cu_seqlens_q' must have B + 1 = {B + 1} entries, got {cu_seqlens_q.shape[0]}")
    if tree_mask is not None:
        checks.tensor(op, "tree_mask", tree_mask, ndim=2, dtypes=(torch.bool,))
        if tree_mask.shape[0] != T:
            raise ValueError(f"{op}: 'tree_mask' must have T = {T} rows (one per new token), got {tuple(tree_mask.shape)}")
        tree_mask = tree_mask.contiguous()
    q, k_cache, v_cache, block_table = (_contiguous_rows(t) for t in (q, k_cache, v_cache, block_table))
    seq_lens, cu_seqlens_q = seq_lens.contiguous(), cu_seqlens_q.contiguous()
    backend = dispatch.resolve(q.device, q.dtype, op=op, page_size=k_cache.shape[1], tree_mask=tree_mask is not None)
    if q.device.type == "cpu" and backend != "cpu":
        cu = cu_seqlens_q.long()
        q_lens = cu[1:] - cu[:-1]
        # checked with no sequences too ([3] is rejected, as the cpu backend does)
        if int(cu[0]) != 0 or int(cu[-1]) != T or _host_any(q_lens < 0):
            raise ValueError(f"{op}: 'cu_seqlens_q' must start at 0, never decrease and end at T = {T}, "
                             f"got {cu_seqlens_q.tolist()}")
        if B == 0 and T != 0:
            raise ValueError(f"{op}: 'q' has {T} tokens but there are no sequences")
        if tree_mask is not None and B and tree_mask.shape[1] < int(q_lens.max()):
            raise ValueError(f"{op}: 'tree_mask' has {tree_mask.shape[1]} columns, fewer than the longest "
                             f"q_len {int(q_lens.max())}")
        _check_data(op, block_table, seq_lens, q_lens, k_cache.shape[0], k_cache.shape[1], decode=False)
    if max_q is not None and q.device.type == "cpu" and B:  # every backend alike (cpu ignores it)
        longest = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if max_q < longest:
            raise ValueError(f"{op}: 'max_q' = {max_q} is below the longest q_len {longest}")
    if T == 0 and backend != "cpu":
        return torch.empty_like(q)
    return backends.EXTEND[backend](q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                    scale=scale, softcap=softcap, tree_mask=tree_mask, max_q=max_q)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store ``k``, ``v`` ``[T, Hkv, D]`` at ``slots`` (int64 ``[T]``, ``page * page_size + offset``)
    of one layer's caches ``[pages, page_size, Hkv, D]``, in place."""
    op = "write_kv"
    _cache_pair(op, k_cache, v_cache, 4)
    checks.tensor(op, "slots", slots, ndim=1, dtypes=(torch.int64,))
    checks.tensor(op, "k", k, ndim=3)
    checks.tensor(op, "v", v, ndim=3)
    checks.same_device(op, "k_cache", k_cache, v_cache=v_cache, slots=slots, k=k, v=v)
    P, S, Hkv, D = k_cache.shape
    checks.no_overlap(op, "k_cache", k_cache)  # an expanded cache would take every write at once
    checks.no_overlap(op, "v_cache", v_cache)
    for name, t in (("k", k), ("v", v)):
        if t.shape != (slots.shape[0], Hkv, D):
            raise ValueError(f"{op}: '{name}' must be [T, Hkv, D] = {(slots.shape[0], Hkv, D)}, got {tuple(t.shape)}")
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{op}: '{name}' has dtype {t.dtype} but the cache has {k_cache.dtype}")
    if slots.shape[0] == 0:
        return
    if slots.device.type == "cpu":
        lo, hi = torch.aminmax(slots)  # one reduction: this runs once per layer per engine step
        if int(lo) < 0 or int(hi) >= P * S:
            bad = (slots < 0) | (slots >= P * S)
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: 'slots'[{i}] = {int(slots[i])} is outside the cache's [0, {P * S}) slots")
    if k_cache.stride(0) == S * k_cache.stride(1) and v_cache.stride(0) == S * v_cache.stride(1):
        # One index_copy_ per cache over the flattened (page, offset) slots: the fast path.
        k_cache.view(P * S, Hkv, D).index_copy_(0, slots, k)
        v_cache.view(P * S, Hkv, D).index_copy_(0, slots, v)
    else:
        write_kv_torch(k_cache, v_cache, slots, k, v)


def copy_pages(k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole pages ``src[i] -> dst[i]`` on every layer of a pool ``[L, pages, page_size, Hkv, D]``,
    in place. ``src``/``dst``: int64 or int32 ``[n]``; ``dst`` without repeats. Any overlap between the
    two sets is fine: every source page is read before any page is written."""
    op = "copy_pages"
    _cache_pair(op, k_pool, v_pool, 5, names=("k_pool", "v_pool"))
    checks.tensor(op, "src", src, ndim=1, dtypes=(torch.int64, torch.int32))
    checks.tensor(op, "dst", dst, ndim=1, dtypes=(torch.int64, torch.int32))
    checks.same_device(op, "k_pool", k_pool, v_pool=v_pool, src=src, dst=dst)
    if src.shape != dst.shape:
        raise ValueError(f"{op}: 'src' has {src.shape[0]} pages but 'dst' has {dst.shape[0]}")
    checks.no_overlap(op, "k_pool", k_pool)
    checks.no_overlap(op, "v_pool", v_pool)
    if src.shape[0] == 0:
        return
    P = k_pool.shape[1]
    src, dst = src.long(), dst.long()
    if src.device.type == "cpu":
        for name, t in (("src", src), ("dst", dst)):
            bad = (t < 0) | (t >= P)
            if _host_any(bad):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{op}: '{name}'[{i}] = {int(t[i])} is not a page id in [0, {P})")
        if dst.unique().shape[0] != dst.shape[0]:
            raise ValueError(f"{op}: 'dst' repeats a page id ({dst.tolist()}); each page can be written once")
    copy_pages_torch(k_pool, v_pool, src, dst)
