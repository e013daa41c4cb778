"""Paged attention in plain PyTorch: gather each sequence's pages, then softmax attention.

The oracle of the tests and the fallback backend (any device, any float dtype). Math in fp32
(fp64 for fp64 inputs). Arguments are already validated by ptcore/ops/paged_attention.py.

Conventions shared by every backend:
- the KV cache of one layer is ``[pages, page_size, kv_heads, head_dim]``; position ``p`` of
  sequence ``b`` lives at page ``block_table[b, p // page_size]``, offset ``p % page_size``;
- GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)`` (Hugging Face ``repeat_kv`` order);
- scores are ``scale * q.k``, then ``softcap * tanh(s / softcap)`` when a softcap is given;
- a query row that sees no key at all (only possible with a ``tree_mask`` and an empty prefix)
  gets an output of zeros.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_positions(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Positions [0, length) of one sequence: [length, kv_heads, head_dim]."""
    S = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    pages = block_table_row[pos // S].long()
    return cache[pages, pos % S]


def _attend(q, k, v, visible, scale, softcap):
    """q [n, Hq, D], k/v [L, Hkv, D], visible bool [n, L] -> [n, Hq, D] in q's accumulation dtype."""
    acc = acc_dtype(q.dtype)
    n, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.to(acc).reshape(n, Hkv, G, D)
    s = torch.einsum("nhgd,lhd->nhgl", qg, k.to(acc)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("nhgl,lhd->nhgd", p, v.to(acc)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(n, Hq, D)


def extend_torch(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask, max_q=None):
    """[T, Hq, D]: new tokens of each sequence over their cached prefix and causally (or by
    ``tree_mask``) over each other. ``max_q`` (a bound on the new-token counts) is not needed here."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lens = seq_lens.tolist()
    cu = cu_seqlens_q.tolist()
    for b, L in enumerate(lens):
        t0, t1 = cu[b], cu[b + 1]
        n = t1 - t0
        if n == 0:
            continue
        prefix = L - n
        k = gather_positions(k_cache, block_table[b], L)
        v = gather_positions(v_cache, block_table[b], L)
        key = torch.arange(L, device=q.device)
        row = torch.arange(n, device=q.device)
        if tree_mask is None:
            new_visible = key[None, :] - prefix <= row[:, None]
        else:
            cols = (key - prefix).clamp(min=0, max=tree_mask.shape[1] - 1)
            new_visible = tree_mask[t0:t1][:, cols]
        visible = (key[None, :] < prefix) | new_visible
        out[t0:t1] = _attend(q[t0:t1], k, v, visible, scale, softcap).to(q.dtype)
    return out


def decode_torch(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap):
    """[B, Hq, D]: one new token per sequence over positions < seq_lens[b], batched by padding."""
    B, Hq, D = q.shape
    if B == 0:
        return torch.empty_like(q)
    S = k_cache.shape[1]
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, L]
    pages = torch.where(valid, block_table[:, pos // S].long(), 0)
    # Padding positions read page 0; zeroed so that whatever is there (even NaN) cannot leak in.
    pad = ~valid[:, :, None, None]
    k = k_cache[pages, pos % S].masked_fill(pad, 0)  # [B, L, Hkv, D]
    v = v_cache[pages, pos % S].masked_fill(pad, 0)
    acc = acc_dtype(q.dtype)
    Hkv = k.shape[2]
    qg = q.to(acc).reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k.to(acc)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v.to(acc)).reshape(B, Hq, D).to(q.dtype)


def write_kv_torch(k_cache, v_cache, slots, k, v):
    """Scatter k, v [T, Hkv, D] to ``slots`` (page * page_size + offset) of one layer's cache."""
    S = k_cache.shape[1]
    pages, offsets = slots // S, slots % S
    k_cache[pages, offsets] = k
    v_cache[pages, offsets] = v


def copy_pages_torch(k_pool, v_pool, src, dst):
    """Pages ``src`` -> ``dst`` on every layer; src is read in full before anything is written, so
    overlapping src/dst sets (e.g. a rotation of pages) are copied as if from a snapshot."""
    for pool in (k_pool, v_pool):
        pool.index_copy_(1, dst, pool.index_select(1, src))
