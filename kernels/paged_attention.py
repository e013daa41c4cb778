"""Triton paged attention (contract and conventions: ptcore/ops/paged_reference.py).

Decode (flash-decoding over a GQA group): one program per (sequence, KV head, split of the keys).
The G query heads that read one KV head are the rows of a ``[BLOCK_G, D]`` query tile (BLOCK_G =
G padded to at least 16, tl.dot's smallest M), so each K/V row gathered through the block table
is loaded once for the whole group and both products (scores, P.V) are ``tl.dot`` tiles. The keys
of a sequence are cut into splits of ``chunk`` positions (a multiple of every BLOCK_N), enough of
them that B x Hkv x splits programs fill the device; each split runs an online softmax in fp32
and writes its normalized partial output and log-sum-exp, and a small merge kernel combines the
splits with weights ``exp(lse_s - max lse)``. With one split the first kernel writes the output
itself. The number of splits comes from the block table's width (no host sync on seq_lens).

Extend: one program per (sequence, query head, block of new tokens); scores and P.V are ``tl.dot``
tiles; keys past the block's causal limit are never visited. Tiles are autotuned (64/128 rows and
keys, and a 16-row tile for speculative-verification-sized extends); the caller passes ``max_q``
(the longest new-token count, or an upper bound) so the launch needs no host sync.

Head dims that are not a power of 2 (80) are padded to the next one with masks. Under the CPU
interpreter (TRITON_INTERPRET=1) each autotuned kernel has one small config (the interpreter's
autotuner cannot benchmark several). Arguments are checked by ptcore.ops; the caches' and q's
last dim is contiguous.
"""
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Decode: splits are multiples of CHUNK_ALIGN keys, so every config's BLOCK_N divides them.
if INTERPRET:
    _DECODE_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    _EXTEND_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    # few configs: each is compiled and timed once per autotune key (a bare machine compiles them all)
    _DECODE_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                       for n, w, s in ((64, 4, 2), (128, 4, 3), (128, 8, 2))]
    _EXTEND_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                       for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (16, 64, 4, 2))]
CHUNK_ALIGN = max(c.kwargs["BLOCK_N"] for c in _DECODE_CONFIGS)
MAX_SPLITS = 64


@triton.jit
def _softcap(s, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        # cap * tanh(s / cap) from exp (libdevice's tanh is unavailable in the interpreter)
        x = s / cap
        t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
        s = cap * tl.where(x < 0, -t, t)
    return s


@triton.autotune(configs=_DECODE_CONFIGS, key=["G", "D", "PAGE", "SPLIT", "HAS_CAP"])
@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
                   sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_bt, so_b, so_h,
                   scale, cap, G, D, PAGE, chunk,
                   HAS_CAP: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    Hq = G * tl.num_programs(1)
    NS = tl.num_programs(2)
    L = tl.load(lens_ptr + b)
    rows = tl.arange(0, BLOCK_G)
    rmask = rows < G
    h = g * G + rows  # the query heads of KV head g (int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :], mask=qmask, other=0.0)
    start = sp * chunk
    end = tl.minimum(L, start + chunk)
    m = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_N):  # every block holds at least one key below `end`
        pos = s0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(bt_ptr + b * s_bt + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        off = (pos % PAGE).to(tl.int64)
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + page[:, None] * sk_p + off[:, None] * sk_s + g * sk_h + d[None, :],
                    mask=kv_mask, other=0.0)
        s = _softcap(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, cap, HAS_CAP)
        s = tl.where(pmask[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + page[:, None] * sv_p + off[:, None] * sv_s + g * sv_h + d[None, :],
                    mask=kv_mask, other=0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if SPLIT:
        # a split past the sequence's end saw nothing: lse -inf, output 0 (weight 0 in the merge)
        seen = l > 0
        o = acc / tl.where(seen, l, 1.0)[:, None]
        lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), -float("inf"))
        row = (b * Hq + h) * NS + sp
        tl.store(plse_ptr + row, lse, mask=rmask)
        tl.store(po_ptr + row[:, None] * D + d[None, :], o, mask=qmask)
    else:
        o = acc / l[:, None]
        tl.store(out_ptr + b * so_b + h[:, None] * so_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _decode_merge_kernel(po_ptr, plse_ptr, out_ptr, so_b, so_h, Hq, NS, D,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    smask = s < NS
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    row = (b * Hq + h) * NS + s
    lse = tl.load(plse_ptr + row, mask=smask, other=-float("inf"))
    top = tl.max(lse, axis=0)  # finite: split 0 holds position 0 (seq_lens >= 1)
    w = tl.exp(lse - top)
    o = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.autotune(configs=_EXTEND_CONFIGS, key=["G", "D", "PAGE", "q_bucket", "HAS_CAP", "HAS_TREE"])
@triton.jit
def _extend_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cu_ptr, mask_ptr, out_ptr,
                   sq_t, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, s_bt, so_t, so_h, s_mask,
                   scale, cap, G, D, PAGE, q_bucket,
                   HAS_CAP: tl.constexpr, HAS_TREE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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


def _precision(dtype):
    # fp32 stays exact fp32 (the project's tolerance for fp32 has no room for tf32); fp16/bf16
    # inputs take the tensor cores whatever this says
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch, kv_heads, capacity, device, num_splits=None):
    """``(splits, chunk)``: the number of key splits per (sequence, KV head) and the keys per
    split (a multiple of CHUNK_ALIGN), for a block table of ``capacity`` positions. Default: enough
    splits for about two programs per SM (4 "SMs" on the CPU), at most MAX_SPLITS."""
    blocks = max(1, triton.cdiv(capacity, CHUNK_ALIGN))
    if num_splits is None:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 4
        num_splits = triton.cdiv(2 * sms, max(1, batch * kv_heads))
    splits = max(1, min(int(num_splits), blocks, MAX_SPLITS))
    chunk = triton.cdiv(blocks, splits) * CHUNK_ALIGN
    return triton.cdiv(blocks * CHUNK_ALIGN, chunk), chunk


def paged_attention_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale, softcap, num_splits=None):
    """``num_splits``: override the number of key splits (tests); the default fills the device."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    PAGE = k_cache.shape[1]
    out = torch.empty_like(q)
    if B == 0:
        return out
    splits, chunk = decode_splits(B, Hkv, block_table.shape[1] * PAGE, q.device, num_splits)
    BLOCK_D = _block_d(D)
    if splits > 1:
        po = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        plse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # unused
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, po, plse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(1), float(scale), float(softcap or 1.0), G, D, PAGE, chunk,
        HAS_CAP=bool(softcap), SPLIT=splits > 1, PRECISION=_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=BLOCK_D)
    if splits > 1:
        _decode_merge_kernel[(B, Hq)](po, plse, out, out.stride(0), out.stride(1), Hq, splits, D,
                                      BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=BLOCK_D)
    return out


def paged_attention_extend(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale, softcap,
                           tree_mask=None, max_q=None):
    """``max_q``: the longest new-token count of the batch, or an upper bound (extra row blocks
    exit at once); None computes it, which synchronizes with the device."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    B = seq_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    if max_q is None:
        max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    max_q = min(int(max_q), T)  # no sequence has more new tokens than there are
    if max_q <= 0:
        return out
    mask = tree_mask.view(torch.uint8) if tree_mask is not None else out  # any pointer without a tree
    grid = lambda meta: (B, Hq, triton.cdiv(max_q, meta["BLOCK_M"]))  # noqa: E731
    _extend_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, mask, out,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(1), tree_mask.stride(0) if tree_mask is not None else 0,
        float(scale), float(softcap or 1.0), Hq // Hkv, D, k_cache.shape[1], min(triton.next_power_of_2(max_q), 4096),
        HAS_CAP=bool(softcap), HAS_TREE=tree_mask is not None, PRECISION=_precision(q.dtype),
        BLOCK_D=_block_d(D))
    return out
