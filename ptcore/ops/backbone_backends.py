"""The fused backbone ops on each backend: the torch reference (the oracle; any device and dtype)
and the launchers of the cpu (csrc/cpu/backbone.cpp), cuda (csrc/cuda/backbone.cu) and triton
(kernels/backbone.py) kernels. Math: docs/kernels.md, "Fused backbone ops".

Contract, the same for every backend (ptcore/ops/backbone.py has checked the tensors: contiguous,
one dtype, matching shapes): rows are flattened, ``x`` / ``s`` / ``dy`` ``[N, H]``, ``q`` ``[N, Hq, D]``,
``k`` ``[N, Hk, D]``, ``cos`` / ``sin`` ``[Nc, R]`` (row n uses row ``n % Nc``); ``rstd`` and the
weight gradient hold the accumulation dtype (float32; float64 for float64).
"""
from __future__ import annotations

import math

import torch

from ptcore import _ext

GELU_K = math.sqrt(2.0 / math.pi)
ACTS = {"silu": 0, "gelu_tanh": 1}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- torch reference ----

def rms_forward_torch(x, residual, weight, eps, offset):
    """(y, s, rstd): s = x + residual rounded to the dtype (as the unfused add), None without one."""
    s = x + residual if residual is not None else None
    src = (s if s is not None else x).to(acc_dtype(x.dtype))
    rstd = torch.rsqrt(src.square().mean(-1) + eps)
    y = (src * rstd.unsqueeze(-1)) * (weight.to(src.dtype) + offset)
    return y.to(x.dtype), s, rstd


def rms_backward_torch(dy, dres, s, weight, rstd, offset, need_dw):
    a = acc_dtype(s.dtype)
    shat = s.to(a) * rstd.unsqueeze(-1)
    dya = dy.to(a)
    g = dya * (weight.to(a) + offset)
    ds = rstd.unsqueeze(-1) * (g - shat * (g * shat).mean(-1, keepdim=True))
    if dres is not None:
        ds = ds + dres.to(a)
    dw = (dya * shat).sum(0) if need_dw else None
    return ds.to(s.dtype), dw


def rope_torch(q, k, cos, sin, inverse):
    R = cos.shape[-1]
    a = acc_dtype(q.dtype)
    c, sn = cos.to(a), sin.to(a)
    c1, c2, s1, s2 = c[:, : R // 2], c[:, R // 2:], sn[:, : R // 2], sn[:, R // 2:]

    def one(x):
        N, H, D = x.shape
        xr = x.to(a).reshape(N // c.shape[0], c.shape[0], H, D)
        x1, x2 = xr[..., : R // 2], xr[..., R // 2: R]
        b = lambda t: t[None, :, None, :]  # noqa: E731  (cos rows broadcast over blocks and heads)
        if inverse:
            o1, o2 = x1 * b(c1) + x2 * b(s2), x2 * b(c2) - x1 * b(s1)
        else:
            o1, o2 = x1 * b(c1) - x2 * b(s1), x2 * b(c2) + x1 * b(s2)
        return torch.cat([o1, o2, xr[..., R:]], -1).reshape(N, H, D).to(x.dtype)

    return one(q), one(k)


def _act_and_grad(g, act):
    if act == "silu":
        sg = torch.sigmoid(g)
        return g * sg, sg * (1 + g * (1 - sg))
    t = torch.tanh(GELU_K * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * GELU_K * (1 + 3 * 0.044715 * g * g)


def gated_forward_torch(gate, up, act):
    a = acc_dtype(gate.dtype)
    return (_act_and_grad(gate.to(a), act)[0] * up.to(a)).to(gate.dtype)


def gated_backward_torch(dy, gate, up, act):
    a = acc_dtype(gate.dtype)
    f, df = _act_and_grad(gate.to(a), act)
    d = dy.to(a)
    return (d * up.to(a) * df).to(gate.dtype), (d * f).to(gate.dtype)


# ---- native (cpu, cuda) ----

def _dt(t):
    return str(t.dtype).removeprefix("torch.")


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _native(module):
    def rms_forward(x, residual, weight, eps, offset):
        N, H = x.shape
        y = torch.empty_like(x)
        s = torch.empty_like(x) if residual is not None else None
        rstd = torch.empty(N, dtype=acc_dtype(x.dtype), device=x.device)
        module().rms_norm_forward(x.data_ptr(), _ptr(residual), _ptr(s), weight.data_ptr(), y.data_ptr(),
                                  rstd.data_ptr(), _dt(x), N, H, eps, offset, _stream(x))
        return y, s, rstd

    def rms_backward(dy, dres, s, weight, rstd, offset, need_dw):
        N, H = s.shape
        ds = torch.empty_like(s)
        mod = module()
        # The CUDA kernel writes per-block partial weight gradients, summed here.
        parts = mod.rms_norm_partial_rows_cuda(N) if s.is_cuda else 1
        dw = torch.empty(parts, H, dtype=acc_dtype(s.dtype), device=s.device) if need_dw and N else None
        mod.rms_norm_backward(dy.data_ptr(), _ptr(dres), s.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                              ds.data_ptr(), _ptr(dw), _dt(s), N, H, offset, _stream(s))
        if need_dw and dw is None:
            dw = torch.zeros(1, H, dtype=acc_dtype(s.dtype), device=s.device)
        return ds, (dw.sum(0) if need_dw else None)

    def rope(q, k, cos, sin, inverse):
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        module().rope(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(), ko.data_ptr(),
                      _dt(q), q.shape[0], q.shape[1], k.shape[1], q.shape[2], cos.shape[1], cos.shape[0],
                      inverse, _stream(q))
        return qo, ko

    def gated_forward(gate, up, act):
        y = torch.empty_like(gate)
        module().gated_act_forward(gate.data_ptr(), up.data_ptr(), y.data_ptr(), _dt(gate), gate.numel(),
                                   ACTS[act], _stream(gate))
        return y

    def gated_backward(dy, gate, up, act):
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        module().gated_act_backward(dy.data_ptr(), gate.data_ptr(), up.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                    _dt(gate), gate.numel(), ACTS[act], _stream(gate))
        return dg, du

    return {"rms_forward": rms_forward, "rms_backward": rms_backward, "rope": rope,
            "gated_forward": gated_forward, "gated_backward": gated_backward}


def _triton():
    def k():
        return _ext.triton_kernels()
    return {
        "rms_forward": lambda *a: k().rms_norm_forward(*a),
        "rms_backward": lambda *a: k().rms_norm_backward(*a),
        "rope": lambda *a: k().rope(*a),
        "gated_forward": lambda *a: k().gated_act_forward(*a),
        "gated_backward": lambda *a: k().gated_act_backward(*a),
    }


BACKBONE = {
    "torch": {"rms_forward": rms_forward_torch, "rms_backward": rms_backward_torch, "rope": rope_torch,
              "gated_forward": gated_forward_torch, "gated_backward": gated_backward_torch},
    "cpu": _native(_ext.cpu_module),
    "cuda": _native(_ext.cuda_module),
    "triton": _triton(),
}
