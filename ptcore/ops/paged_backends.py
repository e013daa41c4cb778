"""The backends of the paged attention ops and the choice among them (arguments already checked by
ptcore/ops/paged_attention.py; contiguous last dims).

``torch``: ptcore/ops/paged_reference.py. ``cpu``: ``ptcore._C.paged_attention`` (pointers, numels,
sizes and strides in; it checks the data again). ``triton``: kernels/paged_attention.py.
``cuda``: flash-attn's paged kernels (``flash_attn_with_kvcache`` for decode,
``flash_attn_varlen_func`` with a block table for extend), which need fp16/bf16 CUDA tensors, a
page size that is a multiple of 256 and no tree mask; otherwise the automatic choice falls back
to triton, then torch.
"""
from __future__ import annotations

import functools

import torch

from ptcore import _ext
from ptcore.ops import dispatch
from ptcore.ops.paged_reference import decode_torch, extend_torch

FLASH_PAGE_MULTIPLE = 256


@functools.cache
def _flash_attn():
    try:
        import flash_attn
        return flash_attn, None
    except Exception as e:  # ImportError, or a build for another torch / CUDA
        return None, f"flash-attn is not installed or cannot load ({type(e).__name__}: {e})"


def flash_why_not(q: torch.Tensor, page_size: int, tree_mask) -> str | None:
    """None when flash-attn can run these paged attention arguments, else why not."""
    if q.device.type != "cuda":
        return f"flash-attn takes CUDA tensors, got {q.device}"
    mod, why = _flash_attn()
    if mod is None:
        return why
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, got {q.dtype}"
    if page_size % FLASH_PAGE_MULTIPLE:
        return f"flash-attn's block table needs a page size that is a multiple of {FLASH_PAGE_MULTIPLE}, got {page_size}"
    if tree_mask is not None:
        return "flash-attn has no arbitrary tree mask"
    return None


def _cpu_kernel():
    mod = _ext.cpu_module()
    return None if mod is None else getattr(mod, "paged_attention", None)


def pick(q: torch.Tensor, page_size: int, tree_mask) -> str:
    """'torch', 'cpu', 'triton' or 'cuda' (flash-attn) for these arguments."""
    forced = dispatch.requested_backend()
    if forced == "cuda" or (forced is None and q.device.type == "cuda"):
        why = flash_why_not(q, page_size, tree_mask)
        if why is None:
            return "cuda"
        if forced == "cuda":
            raise dispatch.BackendUnavailable(f"ptcore backend 'cuda' (flash-attn for paged attention) was requested but cannot run: {why}")
    name = dispatch.resolve(q.device, q.dtype)
    if name == "cuda":  # no ptcore CUDA kernel of its own for these ops
        name = "triton" if dispatch.cannot_run("triton", q.device, q.dtype) is None else "torch"
    if name == "cpu" and _cpu_kernel() is None:
        if forced == "cpu":
            raise dispatch.BackendUnavailable("ptcore backend 'cpu' was requested but ptcore._C has no "
                                              "paged_attention (rebuild: pip install -e . --no-build-isolation)")
        name = "torch"
    return name


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
    fa = _flash_attn()[0]
    out = fa.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens,
                                     block_table=block_table, softmax_scale=scale, causal=True,
                                     softcap=softcap)
    return out.squeeze(1)


def extend_flash(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap, tree_mask, max_q=None):
    fa = _flash_attn()[0]
    cu_k = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(seq_lens, 0)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    # causal=True aligns the mask bottom-right: new token j of b sees keys <= seq_lens[b] - q_len_b + j.
    return fa.flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, cu_k,
                                     int(q_lens.max()) if max_q is None else max_q,
                                     int(seq_lens.max()), softmax_scale=scale, causal=True,
                                     softcap=softcap, block_table=block_table)


DECODE = {"torch": decode_torch, "cpu": decode_cpu, "triton": decode_triton, "cuda": decode_flash}
EXTEND = {"torch": extend_torch, "cpu": extend_cpu, "triton": extend_triton, "cuda": extend_flash}
