"""Triton kernels for the per-row log-prob / entropy passes (math and contract:
csrc/include/ptcore/logprob_rows.h and ptcore/ops/rows.py). One program per row, fp32 math; the
stats pass is one online sweep (running max, rescaled sum of exp and of exp * z), the grad pass
one sweep that overwrites the row. Each row's reduction order is fixed: batch-invariant."""
import triton
import triton.language as tl

from .cross_entropy import _capped


@triton.jit
def _logprob_stats_kernel(logits_ptr, row_stride, target_ptr, ignore_index, vocab, cap, inv_cap,
                          inv_t, logp_ptr, entropy_ptr, lse_ptr, mu_ptr,
                          HAS_CAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    m = -float("inf")
    d = 0.0
    s1 = 0.0  # sum of exp(z - m) * (z - m), rescaled with m
    sum_z = 0.0
    z_y = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP) * inv_t
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, -float("inf")), axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        # s1 is relative to the running max: shifting it to m_new subtracts (m_new - m) * d
        # (nothing on the first tile, where m = -inf and d = 0).
        shift = (m_new - tl.where(d > 0, m, m_new)) * d
        s1 = alpha * (s1 - shift) + tl.sum(tl.where(e > 0, e * (z - m_new), 0.0), axis=0)
        d = d * alpha + tl.sum(e, axis=0)
        sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z_y += tl.sum(tl.where(mask & (cols == y), z, 0.0), axis=0)
        m = m_new
    bad = (sum_z != sum_z) | (sum_z == float("inf")) | ~(in_range | ~valid)  # -inf logits are fine
    poison = tl.where(bad, float("nan"), 0.0)
    lse = m + tl.log(d) + poison
    mu = m + s1 / d + poison
    lp = z_y - lse
    tl.store(logp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(mu_ptr + row, tl.where(valid, mu, 0.0))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, lse - mu, 0.0))


@triton.jit
def _logprob_grad_kernel(logits_ptr, row_stride, target_ptr, ignore_index, vocab, cap, inv_cap,
                         inv_t, lse_ptr, mu_ptr, glp_ptr, gh_ptr,
                         HAS_CAP: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    y = tl.load(target_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    lse = tl.load(lse_ptr + row)
    mu = tl.load(mu_ptr + row)
    glp = 0.0
    gh = 0.0
    if HAS_GLP:
        glp = tl.load(glp_ptr + row).to(tl.float32) * inv_t
    if HAS_GH:
        gh = tl.load(gh_ptr + row).to(tl.float32) * inv_t
    poison = tl.where(in_range | ~valid, 0.0, float("nan"))
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        u = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
        z = u * inv_t
        p = tl.exp(z - lse)
        g = tl.where(cols == y, glp, 0.0) - glp * p - tl.where(p > 0, gh * p * (z - mu), 0.0) + poison
        if HAS_CAP:
            g = g * (1.0 - (u * inv_cap) * (u * inv_cap))
        g = tl.where(valid, g, 0.0)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _common(logits, softcap, temperature, block):
    n, vocab = logits.shape
    block = block or min(triton.next_power_of_2(vocab), 4096)
    cap = float(softcap or 0.0)
    return n, vocab, block, cap, (1.0 / cap if cap else 0.0), 1.0 / float(temperature)


def logprob_rows_stats(logits, target, logp, entropy, lse, mu, *, ignore_index, softcap,
                       temperature, block=None):
    n, vocab, block, cap, inv_cap, inv_t = _common(logits, softcap, temperature, block)
    if n == 0:
        return
    _logprob_stats_kernel[(n,)](
        logits, logits.stride(0), target, ignore_index, vocab, cap, inv_cap, inv_t, logp,
        entropy if entropy is not None else logp, lse, mu, HAS_CAP=bool(cap),
        HAS_ENTROPY=entropy is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)


def logprob_rows_grad(logits, target, lse, mu, g_logp, g_entropy, *, ignore_index, softcap,
                      temperature, block=None):
    n, vocab, block, cap, inv_cap, inv_t = _common(logits, softcap, temperature, block)
    if n == 0:
        return
    _logprob_grad_kernel[(n,)](
        logits, logits.stride(0), target, ignore_index, vocab, cap, inv_cap, inv_t, lse, mu,
        g_logp if g_logp is not None else lse, g_entropy if g_entropy is not None else lse,
        HAS_CAP=bool(cap), HAS_GLP=g_logp is not None, HAS_GH=g_entropy is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
