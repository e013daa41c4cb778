"""The backends of the paged attention ops (arguments already checked by
ptcore/ops/paged_attention.py; contiguous last dims). The choice among them is
:func:`ptcore.ops.dispatch.resolve`'s (its table: ``OPS["paged_attention_decode"]`` / ``_extend``).

``torch``: ptcore/ops/paged_reference.py. ``cpu``: ``ptcore._C.paged_attention`` (pointers, numels,
sizes and strides in; it checks the data again). ``triton``: kernels/paged_attention.py.
``flash_attn``: flash-attn's paged kernels (``flash_attn_with_kvcache`` for decode,
``flash_attn_varlen_func`` with a block table for extend), which need fp16/bf16 CUDA tensors, a
page size that is a multiple of 256 and no tree mask (the automatic choice then takes triton, then
torch; forcing it raises).
"""
from __future__ import annotations

import torch

from ptcore import _ext
from ptcore.ops import dispatch
from ptcore.ops.paged_reference import decode_torch, extend_torch


def _cpu_kernel():
    mod = _ext.cpu_module()
    return None if mod is None else getattr(mod, "paged_attention", None)


# ---- cpu ----

def _cpu_call(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask):
    out = torch.empty(q.shape, dtype=q.dtype)
    P, S, Hkv, D = k_cache.shape
    _cpu_kernel()(
        str(q.dtype).removeprefix("torch."), q.data_ptr(), q.shape[0], q.shape[1], D, q.stride(0), q.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), P, S, Hkv,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.data_ptr(), block_table.shape[0], block_table.shape[1], block_table.stride(0),
        seq_lens.data_ptr(), 0 if cu_seqlens_q is None else cu_seqlens_q.data_ptr(),
        0 if tree_mask is None else tree_mask.data_ptr(), 0 if tree_mask is None else tree_mask.shape[1],
        scale, softcap, out.data_ptr(),
        # each buffer's numel: the C++ side checks every offset it can reach against them
        *(_storage_numel(t) for t in (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, tree_mask, out)))
    return out


def _storage_numel(t) -> int:
    """Elements reachable from ``t.data_ptr()`` in its storage (0 for None)."""
    if t is None:
        return 0
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def decode_cpu(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap):
    return _cpu_call(q, k_cache, v_cache, block_table, seq_lens, None, scale=scale, softcap=softcap, tree_mask=None)


def extend_cpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask, max_q=None):
    return _cpu_call(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale=scale, softcap=softcap,
                     tree_mask=tree_mask)


# ---- triton ----

def decode_triton(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap):
    return _ext.triton_kernels().paged_attention_decode(q, k_cache, v_cache, block_table, seq_lens,
                                                        scale=scale, softcap=softcap)


def extend_triton(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask, max_q=None):
    return _ext.triton_kernels().paged_attention_extend(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                        scale=scale, softcap=softcap, tree_mask=tree_mask,
                                                        max_q=max_q)


# ---- flash-attn (CUDA) ----

def decode_flash(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap):
    fa = dispatch.flash_attn_module()
    out = fa.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens,
                                     block_table=block_table, softmax_scale=scale, causal=True,
                                     softcap=softcap)
    return out.squeeze(1)


def extend_flash(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask, max_q=None):
    fa = dispatch.flash_attn_module()
    cu_k = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(seq_lens, 0)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    # causal=True aligns the mask bottom-right: new token j of b sees keys <= seq_lens[b] - q_len_b + j.
    return fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, cu_k,
                                     int(q_lens.max()) if max_q is None else max_q,
                                     int(seq_lens.max()), softmax_scale=scale, causal=True,
                                     softcap=softcap, block_table=block_table)


DECODE = {"torch": decode_torch, "cpu": decode_cpu, "triton": decode_triton, "flash_attn": decode_flash}
EXTEND = {"torch": extend_torch, "cpu": extend_cpu, "triton": extend_triton, "flash_attn": extend_flash}
