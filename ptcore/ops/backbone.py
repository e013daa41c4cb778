"""Fused backbone ops of a decoder layer: RMSNorm with the residual add, RoPE on q and k
together, and the gated MLP activations SwiGLU / GeGLU (math: docs/kernels.md, "Fused backbone
ops"). Each is a torch custom op (opaque to torch.compile, with a fake implementation) whose
backward saves the minimum and recomputes the cheap parts:

- ``rms_norm``: saves the normalized input (``x``, or the residual sum, itself an output) and the
  per-row ``rstd``; the backward recomputes ``x * rstd``.
- ``rope``: saves ``cos`` and ``sin`` only; the backward is the transposed rotation.
- ``swiglu`` / ``geglu``: save ``gate`` and ``up``; the backward recomputes the activation.

The backend (cpu, triton, cuda, torch) is chosen by ptcore.ops.dispatch; every backend computes
in fp32 (fp64 for fp64 inputs) and rounds each output once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ptcore.ops import checks, dispatch
from ptcore.ops.backbone_backends import BACKBONE

FLOATS = checks.FLOAT_DTYPES


@torch.compiler.assume_constant_result
def _backend(device: torch.device, dtype: torch.dtype, op: str) -> str:
    return dispatch.resolve(device, dtype, op=op)


def _impl(backend: str, kind: str, numel: int):
    # An empty input needs no kernel launch (a Triton grid of 0 is an error): the reference.
    return BACKBONE["torch" if numel == 0 else backend][kind]


def _contiguous(op, name, t):
    if not t.is_contiguous():
        raise ValueError(f"{op}: '{name}' must be contiguous (shape {tuple(t.shape)}, strides "
                         f"{tuple(t.stride())}); call .contiguous() on it")


def _like(op, name, t, ref_name, ref, shape=None):
    """``t`` a contiguous tensor on ref's device with ref's dtype (and ``shape`` when given)."""
    checks.tensor(op, name, t)
    checks.same_device(op, ref_name, ref, **{name: t})
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: '{name}' has dtype {t.dtype} but '{ref_name}' has {ref.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: '{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _contiguous(op, name, t)


# ---- RMSNorm (+ residual) ----

@torch.library.custom_op("ptcore::rms_norm", mutates_args=())
def _rms_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
             offset: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd) for x [N, H]; s = x + residual (empty without a residual)."""
    y, s, rstd = _impl(backend, "rms_forward", x.numel())(x, residual, weight, eps, offset)
    return y, (s if s is not None else x.new_empty(0)), rstd


@_rms_fwd.register_fake
def _(x, residual, weight, eps, offset, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            x.new_empty(x.shape[0], dtype=acc))


@torch.library.custom_op("ptcore::rms_norm_backward", mutates_args=())
def _rms_bwd(dy: torch.Tensor, dres: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
             rstd: torch.Tensor, offset: float, backend: str, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ds, dweight): ds the gradient of x (and of the residual), dweight in weight's dtype."""
    ds, dw = _impl(backend, "rms_backward", s.numel())(dy, dres, s, weight, rstd, offset, need_dw)
    if need_dw and dw is None:  # no rows
        dw = torch.zeros_like(weight)
    return ds, (dw.to(weight.dtype) if need_dw else weight.new_empty(0))


@_rms_bwd.register_fake
def _(dy, dres, s, weight, rstd, offset, backend, need_dw):
    return torch.empty_like(s), torch.empty_like(weight) if need_dw else weight.new_empty(0)


def _rms_setup(ctx, inputs, output):
    x, residual, weight, eps, offset, backend = inputs
    _, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.options = (offset, backend)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)
    # The normalized tensor: the residual sum is an output (alive anyway), else the input itself.
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def _rms_backward(ctx, dy, ds_out, _):
    s, weight, rstd = ctx.saved_tensors
    need_x, need_res, need_w = ctx.needs_input_grad[:3]
    if dy is None and ds_out is None:
        return (None,) * 6
    dy = torch.zeros_like(s) if dy is None else dy.contiguous()
    dres = ds_out.contiguous() if ctx.has_residual and ds_out is not None else None
    ds, dw = _rms_bwd(dy, dres, s, weight, rstd, *ctx.options, need_w)
    return (ds if need_x else None, ds if need_res else None, dw if need_w else None, None, None, None)


_rms_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             residual: torch.Tensor | None = None, offset: float = 0.0):
    """RMSNorm over the last dim, ``(s * rsqrt(mean(s^2) + eps)) * (weight + offset)``, with
    ``s = x + residual`` when a residual is given (the decoder's residual add, fused).

    Args:
        x: ``(..., H)`` contiguous, float32 / bfloat16 / float16 / float64.
        weight: ``(H,)``, x's dtype and device.
        eps: added to the mean square (>= 0).
        residual: optional, x's shape, dtype and device.
        offset: added to the weight: 1.0 is Gemma's ``(1 + weight)``.

    Returns ``y`` without a residual, else ``(y, s)``: ``s = x + residual`` (rounded to the
    dtype, as the unfused add) is the new residual stream. Computed in fp32 (fp64 for fp64).

    Example:
        >>> h, res = rms_norm(attn_out, ln.weight, 1e-6, residual=res)
    """
    op = "rms_norm"
    checks.tensor(op, "x", x, min_ndim=1, dtypes=FLOATS)
    _contiguous(op, "x", x)
    H = x.shape[-1]
    if H == 0:
        raise ValueError(f"{op}: 'x' has hidden size 0 (its last dim): there is nothing to normalize")
    _like(op, "weight", weight, "x", x, shape=(H,))
    if residual is not None:
        _like(op, "residual", residual, "x", x, shape=x.shape)
    eps = checks.number(op, "eps", eps, low=0.0)
    offset = checks.number(op, "offset", offset)
    backend = _backend(x.device, x.dtype, op)
    x2 = x.reshape(-1, H)
    r2 = residual.reshape(-1, H) if residual is not None else None
    y, s, _ = _rms_fwd(x2, r2, weight, eps, offset, backend)
    if residual is None:
        return y.reshape(x.shape)
    return y.reshape(x.shape), s.reshape(x.shape)


# ---- RoPE ----

@torch.library.custom_op("ptcore::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool,
          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend, "rope", q.numel() + k.numel())(q, k, cos, sin, inverse)


@_rope.register_fake
def _(q, k, cos, sin, inverse, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, inverse, backend = inputs
    ctx.options = (not inverse, backend)
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    gq, gk = _rope(dq.contiguous(), dk.contiguous(), cos, sin, *ctx.options)
    return gq, gk, None, None, None, None


_rope.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embedding of q and k in one op, Hugging Face Llama's ``rotate_half``
    convention: ``x * cos + rotate_half(x) * sin`` on the first ``R = cos.shape[-1]`` dims of each
    head (the rest pass through, Phi-3's partial rotary).

    Args:
        q: ``(..., Hq, D)`` contiguous (HF's ``[B, T, heads, D]``, i.e. before its transpose).
        k: ``(..., Hk, D)``, q's leading dims, D, dtype and device.
        cos, sin: ``(..., R)``, R even and <= D, q's dtype; their leading dims are q's (``[B, T]``)
            or a suffix of them with leading ones (``[1, T]``, ``[T]``), broadcast over the rest.
            They get no gradient.

    Returns ``(q_embed, k_embed)``, shaped as q and k.
    """
    op = "rope"
    checks.tensor(op, "q", q, min_ndim=3, dtypes=FLOATS)
    _contiguous(op, "q", q)
    lead, D = tuple(q.shape[:-2]), q.shape[-1]
    _like(op, "k", k, "q", q)
    if tuple(k.shape[:-2]) != lead or k.shape[-1] != D or k.dim() != q.dim():
        raise ValueError(f"{op}: 'k' must be (*{lead}, heads, {D}) to match 'q' {tuple(q.shape)}, got {tuple(k.shape)}")
    _like(op, "cos", cos, "q", q)
    _like(op, "sin", sin, "q", q, shape=cos.shape)
    if cos.dim() < 1:
        raise ValueError(f"{op}: 'cos' must have at least 1 dimension")
    R = cos.shape[-1]
    if R == 0 or R % 2 or R > D:
        raise ValueError(f"{op}: 'cos' last dim must be even, > 0 and <= the head dim {D}, got {R}")
    cl = tuple(cos.shape[:-1])
    while cl and cl[0] == 1:
        cl = cl[1:]
    if len(cl) > len(lead) or lead[len(lead) - len(cl):] != cl:
        raise ValueError(f"{op}: 'cos' leading dims {tuple(cos.shape[:-1])} do not broadcast to q's {lead} "
                         "(they must be q's, or a suffix of them after leading ones)")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{op}: 'cos' and 'sin' get no gradient; pass them detached")
    backend = _backend(q.device, q.dtype, op)
    N, Nc = math.prod(lead), math.prod(cl)
    qo, ko = _rope(q.reshape(N, q.shape[-2], D), k.reshape(N, k.shape[-2], D), cos.reshape(Nc, R),
                   sin.reshape(Nc, R), False, backend)
    return qo.reshape(q.shape), ko.reshape(k.shape)


# ---- SwiGLU / GeGLU ----

@torch.library.custom_op("ptcore::gated_act", mutates_args=())
def _gated(gate: torch.Tensor, up: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    return _impl(backend, "gated_forward", gate.numel())(gate, up, act)


@_gated.register_fake
def _(gate, up, act, backend):
    return torch.empty_like(gate)


@torch.library.custom_op("ptcore::gated_act_backward", mutates_args=())
def _gated_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(backend, "gated_backward", gate.numel())(dy, gate, up, act)


@_gated_bwd.register_fake
def _(dy, gate, up, act, backend):
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_setup(ctx, inputs, output):
    gate, up, act, backend = inputs
    ctx.options = (act, backend)
    ctx.save_for_backward(gate, up)


def _gated_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _gated_bwd(dy.contiguous(), gate, up, *ctx.options)
    return dg, du, None, None


_gated.register_autograd(_gated_backward, setup_context=_gated_setup)


def _gated_op(op, act, gate, up):
    checks.tensor(op, "gate", gate, dtypes=FLOATS)
    _contiguous(op, "gate", gate)
    _like(op, "up", up, "gate", gate, shape=gate.shape)
    return _gated(gate, up, act, _backend(gate.device, gate.dtype, op))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the Llama MLP's activation) in one pass; gate and up contiguous, of one
    shape, dtype and device. The backward saves gate and up and recomputes silu."""
    return _gated_op("swiglu", "silu", gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma's MLP activation, GELU's tanh approximation) in one pass."""
    return _gated_op("geglu", "gelu_tanh", gate, up)
