"""Triton kernels of the fused backbone ops: RMSNorm (+ residual add), RoPE on q and k, and the
gated activations SwiGLU / GeGLU (math: docs/kernels.md, "Fused backbone ops"; contract:
ptcore/ops/backbone_backends.py). fp32 math whatever the storage dtype, each output rounded once.

RMSNorm: one program per row holds the row in registers (BLOCK = the next power of two of H);
its backward runs a fixed number of programs, each over a strided set of rows, keeping its
weight-gradient partial in registers and writing one row of partials (summed by torch after).
RoPE: one program per token, all heads of q and k as one [heads, R/2] tile.
"""
import torch
import triton
import triton.language as tl

GELU_K = 0.7978845608028654  # sqrt(2 / pi)
RMS_BWD_PROGRAMS = 128


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _rms_fwd_kernel(x_ptr, r_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, offset,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * H + cols, x.to(s_ptr.dtype.element_ty), mask=mask)
        x = tl.load(s_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)  # the rounded sum
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(y_ptr + row * H + cols, ((x * rstd) * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_bwd_kernel(dy_ptr, dres_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dw_ptr, N, H, offset,
                    HAS_DRES: tl.constexpr, NEED_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(pid, N, step):
        row = tl.cast(r, tl.int64)
        s = tl.load(s_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        shat = s * rstd
        g = dy * w
        ds = rstd * (g - shat * (tl.sum(g * shat, axis=0) / H))
        if HAS_DRES:
            ds += tl.load(dres_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + row * H + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * shat
    if NEED_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=mask)


def rms_norm_forward(x, residual, weight, eps, offset):
    N, H = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(N, dtype=_acc(x.dtype), device=x.device)
    _rms_fwd_kernel[(N,)](x, residual if residual is not None else x, s if s is not None else y, weight, y,
                          rstd, H, eps, offset, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(H))
    return y, s, rstd


def rms_norm_backward(dy, dres, s, weight, rstd, offset, need_dw):
    N, H = s.shape
    ds = torch.empty_like(s)
    programs = max(1, min(N, RMS_BWD_PROGRAMS))
    dw = torch.empty(programs, H, dtype=torch.float32, device=s.device) if need_dw else ds
    _rms_bwd_kernel[(programs,)](dy, dres if dres is not None else dy, s, weight, rstd, ds, dw, N, H, offset,
                                 HAS_DRES=dres is not None, NEED_DW=need_dw, BLOCK=triton.next_power_of_2(H))
    return ds, (dw.sum(0) if need_dw else None)


@triton.jit
def _rope_one(x_ptr, o_ptr, c1, c2, s1, s2, row, HEADS, D, R, INVERSE: tl.constexpr,
              BH: tl.constexpr, BHALF: tl.constexpr, BPASS: tl.constexpr):
    half = R // 2
    h = tl.arange(0, BH)[:, None]
    j = tl.arange(0, BHALF)[None, :]
    m = (h < HEADS) & (j < half)
    base = row * HEADS * D + h * D
    x1 = tl.load(x_ptr + base + j, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + j, mask=m, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation: the backward
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr + base + j, o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(o_ptr + base + half + j, o2.to(o_ptr.dtype.element_ty), mask=m)
    p = R + tl.arange(0, BPASS)[None, :]
    mp = (h < HEADS) & (p < D)
    tl.store(o_ptr + base + p, tl.load(x_ptr + base + p, mask=mp, other=0.0), mask=mp)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, HQ, HK, D, R, COS_ROWS,
                 INVERSE: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, BHALF: tl.constexpr,
                 BPASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = R // 2
    j = tl.arange(0, BHALF)[None, :]
    mj = j < half
    cbase = (row % COS_ROWS) * R
    c1 = tl.load(cos_ptr + cbase + j, mask=mj, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cbase + half + j, mask=mj, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cbase + j, mask=mj, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cbase + half + j, mask=mj, other=0.0).to(tl.float32)
    _rope_one(q_ptr, qo_ptr, c1, c2, s1, s2, row, HQ, D, R, INVERSE, BHQ, BHALF, BPASS)
    _rope_one(k_ptr, ko_ptr, c1, c2, s1, s2, row, HK, D, R, INVERSE, BHK, BHALF, BPASS)


def rope(q, k, cos, sin, inverse):
    N, HQ, D = q.shape
    HK, R = k.shape[1], cos.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    np2 = triton.next_power_of_2
    _rope_kernel[(N,)](q, k, cos, sin, qo, ko, HQ, HK, D, R, cos.shape[0], INVERSE=inverse, BHQ=np2(HQ),
                       BHK=np2(HK), BHALF=np2(R // 2), BPASS=np2(max(1, D - R)))
    return qo, ko


@triton.jit
def _act(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32; tanh from exp (libdevice tanh is not in the interpreter)."""
    if ACT == 0:
        sg = 1.0 / (1.0 + tl.exp(-g))
        f = g * sg
        df = sg * (1.0 + g * (1.0 - sg))
    else:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
        f = 0.5 * g * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return f, df


@triton.jit
def _gated_fwd_kernel(g_ptr, u_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    f, _ = _act(g, ACT)
    tl.store(y_ptr + i, (f * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    d = tl.load(dy_ptr + i, mask=m, other=0.0).to(tl.float32)
    f, df = _act(g, ACT)
    tl.store(dg_ptr + i, (d * u * df).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + i, (d * f).to(du_ptr.dtype.element_ty), mask=m)


GATED_BLOCK = 1024
_ACTS = {"silu": 0, "gelu_tanh": 1}


def gated_act_forward(gate, up, act):
    y = torch.empty_like(gate)
    n = gate.numel()
    _gated_fwd_kernel[(triton.cdiv(n, GATED_BLOCK),)](gate, up, y, n, ACT=_ACTS[act], BLOCK=GATED_BLOCK)
    return y


def gated_act_backward(dy, gate, up, act):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _gated_bwd_kernel[(triton.cdiv(n, GATED_BLOCK),)](dy, gate, up, dg, du, n, ACT=_ACTS[act], BLOCK=GATED_BLOCK)
    return dg, du
