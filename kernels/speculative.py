"""Triton kernel for speculative verification (rule and contract: csrc/include/ptcore/speculative.h
and ptcore/ops/speculative.py). One program per sequence: the acceptance walk over the K drafts
(scalar loads; the walk continues past a rejection with ``alive`` = 0 since Triton loops cannot
break), then the stop token by a tiled argmax in float64. Columns past V are masked to a score of
-1, below every real score (>= 0), so a tile tail can never win."""
import triton
import triton.language as tl


@triton.jit
def _row_argmax(row_ptr, V, BLOCK: tl.constexpr):
    """Lowest index of the largest entry of a row (as torch.argmax for rows without NaN)."""
    best = -float("inf")
    idx = tl.zeros((), dtype=tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        v = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float64)
        v = tl.where(mask, v, -float("inf"))  # the tile tail never wins
        m, i = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        idx = tl.where(m > best, start + i, idx)
        best = tl.maximum(m, best)
    return idx


@triton.jit
def _verify_kernel(tokens_ptr, lens_ptr, q_ptr, qs0, qs1, p_ptr, ps0, ps1, u_ptr, e_ptr,
                   n_acc_ptr, emitted_ptr, K, V,
                   HAS_Q: tl.constexpr, GREEDY: tl.constexpr, BLOCK: tl.constexpr, KP1: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = tl.load(lens_ptr + b)
    L = tl.minimum(tl.maximum(L, 0), K)
    P = p_ptr + b * ps0
    alive = tl.full((), 1, tl.int64)
    n = tl.zeros((), dtype=tl.int64)
    for k in range(0, K):
        t = tl.load(tokens_ptr + b * K + k)
        valid = (k < L) & (t >= 0) & (t < V)
        t_safe = tl.where(valid, t, 0)
        if GREEDY:
            ok = _row_argmax(P + k * ps1, V, BLOCK) == t
        else:
            p = tl.load(P + k * ps1 + t_safe).to(tl.float64)
            if HAS_Q:
                q = tl.load(q_ptr + b * qs0 + k * qs1 + t_safe).to(tl.float64)
            else:
                q = 1.0
            u = tl.load(u_ptr + b * K + k)
            ok = u * q < p
        alive = alive * (valid & ok).to(tl.int64)
        n += alive
    row = P + n * ps1
    if GREEDY:
        tok = _row_argmax(row, V, BLOCK)
    else:
        rejected = n < L
        xq = tl.load(tokens_ptr + b * K + n, mask=rejected, other=-1)
        xq = tl.where(rejected, xq, -1)
        q_end = tl.where(rejected, V, 0)  # the residual subtracts q only after a rejection
        best_w = -1.0
        idx_w = tl.zeros((), dtype=tl.int64)
        best_p = -1.0
        idx_p = tl.zeros((), dtype=tl.int64)
        any_w = tl.zeros((), dtype=tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            p = tl.load(row + cols, mask=mask, other=0.0).to(tl.float64)
            if HAS_Q:
                q = tl.load(q_ptr + b * qs0 + n * qs1 + cols, mask=cols < q_end, other=0.0).to(tl.float64)
            else:
                q = tl.where(cols == xq, 1.0, 0.0).to(tl.float64)
            e = tl.load(e_ptr + b * V + cols, mask=mask, other=1.0)
            w = p - q
            w = tl.where(w > 0, w, 0.0)
            s = tl.where(mask, tl.where(w > 0, w / e, 0.0), -1.0)
            m, i = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
            idx_w = tl.where(m > best_w, start + i, idx_w)
            best_w = tl.maximum(m, best_w)
            any_w = any_w | tl.max((w > 0).to(tl.int32), axis=0)
            pp = tl.where(p > 0, p, 0.0)
            s = tl.where(mask, tl.where(pp > 0, pp / e, 0.0), -1.0)
            m, i = tl.max(s, axis=0, return_indices=True, return_indices_tie_break_left=True)
            idx_p = tl.where(m > best_p, start + i, idx_p)
            best_p = tl.maximum(m, best_p)
        tok = tl.where(any_w > 0, idx_w, idx_p)
    offs = tl.arange(0, KP1)
    drafts = tl.load(tokens_ptr + b * K + offs, mask=offs < n, other=-1)
    out = tl.where(offs < n, drafts, tl.where(offs == n, tok, -1))
    tl.store(emitted_ptr + b * (K + 1) + offs, out, mask=offs <= K)
    tl.store(n_acc_ptr + b, n)


def speculative_verify(tokens, lens, draft_probs, target_probs, uniforms, exponentials, greedy,
                       num_accepted, emitted, *, block=None):
    """Fills ``num_accepted`` [B] and ``emitted`` [B, K+1] (contract: ptcore/ops/speculative.py)."""
    B, K = tokens.shape
    V = target_probs.shape[-1]
    if B == 0:
        return
    block = block or min(triton.next_power_of_2(V), 2048)
    has_q = draft_probs is not None and not greedy
    q = draft_probs if has_q else target_probs
    u = uniforms if uniforms is not None else target_probs
    e = exponentials if exponentials is not None else target_probs
    _verify_kernel[(B,)](
        tokens, lens, q, q.stride(0), q.stride(1), target_probs, target_probs.stride(0),
        target_probs.stride(1), u, e, num_accepted, emitted, K, V, HAS_Q=has_q, GREEDY=bool(greedy),
        BLOCK=block, KP1=triton.next_power_of_2(K + 1), num_warps=8 if block >= 2048 else 4)
