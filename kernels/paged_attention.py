"""Triton paged attention (contract and conventions: ptcore/ops/paged_reference.py).

Decode: one program per (sequence, query head); it walks the sequence's positions in blocks,
gathering each block's K/V rows through the block table, with an online softmax in fp32.
Extend: one program per (sequence, query head, block of new tokens); scores and P.V are
``tl.dot`` tiles; keys past the block's causal limit are never visited.
Arguments are checked by ptcore.ops; the caches' and q's last dim is contiguous.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _softcap(s, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        # cap * tanh(s / cap) from exp (libdevice's tanh is unavailable in the interpreter)
        x = s / cap
        t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
        s = cap * tl.where(x < 0, -t, t)
    return s


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
                   sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_bt, so_b, so_h,
                   scale, cap, G, D, PAGE,
                   HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g = h // G
    L = tl.load(lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
    m = -float("inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < L
        page = tl.load(bt_ptr + b * s_bt + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + page[:, None] * sk_p + off[:, None] * sk_s + g * sk_h + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = _softcap(tl.sum(k * q[None, :], axis=1) * scale, cap, HAS_CAP)
        s = tl.where(pmask, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + page[:, None] * sv_p + off[:, None] * sv_s + g * sv_h + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    tl.store(out_ptr + b * so_b + h * so_h + d, (acc / l).to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cu_ptr, mask_ptr, out_ptr,
                   sq_t, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_bt, so_t, so_h, s_mask,
                   scale, cap, G, D, PAGE,
                   HAS_CAP: tl.constexpr, HAS_TREE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    j0 = tl.program_id(2) * BLOCK_M
    g = h // G
    t0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - t0
    L = tl.load(lens_ptr + b)
    prefix = L - n
    rows = j0 + tl.arange(0, BLOCK_M)
    rmask = rows < n
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    tok = (t0 + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sq_t + h * sq_h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    # Keys this block can see: causal -> up to its last row's position; tree mask -> all of L.
    if HAS_TREE:
        kend = L
    else:
        kend = tl.minimum(L, prefix + j0 + BLOCK_M)
    kend = tl.where(j0 < n, kend, 0)
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kend, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < L
        page = tl.load(bt_ptr + b * s_bt + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + page[:, None] * sk_p + off[:, None] * sk_s + g * sk_h + d[None, :], mask=kv_mask, other=0.0)
        s = _softcap(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, cap, HAS_CAP)
        rel = pos[None, :] - prefix  # < 0: the prefix, always visible
        if HAS_TREE:
            new_vis = tl.load(mask_ptr + tok[:, None] * s_mask + tl.maximum(rel, 0),
                              mask=rmask[:, None] & (rel >= 0) & pmask[None, :], other=0) != 0
        else:
            new_vis = rel <= rows[:, None]
        visible = ((rel < 0) | new_vis) & pmask[None, :] & rmask[:, None]
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(v_ptr + page[:, None] * sv_p + off[:, None] * sv_s + g * sv_h + d[None, :], mask=kv_mask, other=0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row that saw nothing is zeros
    tl.store(out_ptr + tok[:, None] * so_t + h * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def paged_attention_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    _decode_kernel[(B, Hq)](
        q, k_cache, v_cache, block_table, seq_lens, out,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(1), float(scale), float(softcap or 1.0), Hq // Hkv, D, k_cache.shape[1],
        HAS_CAP=bool(softcap), BLOCK_N=32, BLOCK_D=_block_d(D))
    return out


def paged_attention_extend(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap,
                           tree_mask=None, block_m=16, block_n=32):
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    B = seq_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    mask = tree_mask.view(torch.uint8) if tree_mask is not None else out  # any pointer without a tree
    _extend_kernel[(B, Hq, triton.cdiv(max_q, block_m))](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, mask, out,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(1), tree_mask.stride(0) if tree_mask is not None else 0,
        float(scale), float(softcap or 1.0), Hq // Hkv, D, k_cache.shape[1],
        HAS_CAP=bool(softcap), HAS_TREE=tree_mask is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D))
    return out
