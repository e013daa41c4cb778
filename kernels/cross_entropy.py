"""Triton kernel for the fused per-row cross-entropy pass (math: docs/kernels.md §1).

Why the per-row pass rather than a blockwise recompute kernel: the chunked design keeps the three
GEMMs in cuBLAS (the best GEMMs on the device) and leaves Triton only the memory-bound part, which
it does at bandwidth in two sweeps over a row: an online max / sum-of-exp / sum sweep, then the
gradient write. One program per row; fp32 math whatever the storage dtype.

Contract (same as every backend): see ptcore/ops/rows.py. An out-of-range target or a NaN / inf
logit gives the row a NaN loss and NaN gradient, since a kernel cannot raise.
"""
import triton
import triton.language as tl


@triton.jit
def _capped(z, cap, inv_cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        # cap * tanh(z / cap) from exp (libdevice tanh is unavailable in the interpreter).
        # 1 - 2 / (exp(2|x|) + 1) cancels for small |x| (4.5e-6 loss error at cap 1e3, garbage at
        # 1e8): below |x| = 0.55 the odd Taylor series of tanh (to x^17, < 1e-8 relative there)
        # as z * tanh(x) / x, which is also exact when inv_cap rounds to 0 (caps beyond fp32).
        x = z * inv_cap
        ax = tl.abs(x)
        x2 = x * x
        q = 5.90027440e-4
        q = q * x2 - 1.45583438e-3
        q = q * x2 + 3.59212803e-3
        q = q * x2 - 8.86323552e-3
        q = q * x2 + 2.18694885e-2
        q = q * x2 - 5.39682540e-2
        q = q * x2 + 1.33333333e-1
        q = q * x2 - 3.33333333e-1
        small = z * (q * x2 + 1.0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
        z = tl.where(ax < 0.55, small, cap * tl.where(x < 0, -t, t))
    return z


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, row_stride, target_ptr, target_stride, loss_ptr, lse_ptr, scale_ptr, scale_stride,
    vocab, ignore_index, eps, z_loss, cap, inv_cap,
    HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    y = tl.load(target_ptr + row * target_stride)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    y_safe = tl.where(in_range, y, 0)

    # Sweep 1: online max and sum of exp (rescaled per tile), plus the sum for label smoothing.
    m = -float("inf")
    d = 0.0
    sum_z = 0.0
    z_y = 0.0  # gathered in the sweep: no separate load that the gradient writes could race
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, -float("inf")), axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), axis=0)
        sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z_y += tl.sum(tl.where(mask & (cols == y_safe), z, 0.0), axis=0)
        m = m_new
    # 0 when the row is sound, NaN for a NaN / +inf logit or an out-of-range target (-inf is fine).
    bad = (sum_z != sum_z) | (sum_z == float("inf")) | ~(in_range | (y == ignore_index))
    poison = tl.where(bad, float("nan"), 0.0)
    lse = m + tl.log(d) + poison
    loss = tl.where(eps < 1.0, (1.0 - eps) * (lse - z_y), 0.0) \
        + tl.where(eps > 0.0, eps * (lse - sum_z / vocab), 0.0) + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))

    if WRITE_GRAD:
        s = 1.0
        if HAS_SCALE:
            s = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        p_coef = s * (1.0 + 2.0 * z_loss * lse) / d
        uniform = s * eps / vocab
        onehot = s * (1.0 - eps)
        # Sweep 2: the gradient, written over the logits (each element read before it is written).
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), cap, inv_cap, HAS_CAP)
            g = p_coef * tl.exp(z - m) - uniform - tl.where(cols == y_safe, onehot, 0.0)
            if HAS_CAP:
                g = g * (1.0 - (z * inv_cap) * (z * inv_cap))
            g = tl.where(valid, g, 0.0)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss,
                       softcap, write_grad, block=None):
    """Launches the kernel over the rows of a ``[n, V]`` logits chunk (contract: ptcore/ops/rows.py)."""
    n, vocab = logits.shape
    if n == 0:
        return
    if block is None:
        block = min(triton.next_power_of_2(vocab), 4096)
    has_scale = scale is not None
    _cross_entropy_rows_kernel[(n,)](
        logits, logits.stride(0), target, target.stride(0), loss, lse,
        scale if has_scale else loss, (0 if scale.numel() == 1 else scale.stride(0)) if has_scale else 0,
        vocab, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0),
        1.0 / softcap if softcap else 0.0,
        HAS_SCALE=has_scale, HAS_CAP=bool(softcap), WRITE_GRAD=bool(write_grad), BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
