"""Fused linear cross-entropy: ``cross_entropy(softcap(input @ weight.T + bias), target)`` plus
``z_loss * lse^2``, without ever materializing the ``[N, V]`` logits.

Design (docs/kernels.md §3, "token chunks, gradient in the forward"):
per chunk of rows, one GEMM for the chunk's logits, one fused per-row pass (the backend's kernel)
that computes the loss and writes the gradient in place over the logits, then the two gradient
GEMMs. GEMMs stay in the vendor BLAS, which is what bounds this op on a CPU. For ``mean``/``sum``
the backward only scales the stored gradients by ``grad_output`` (6NHV FLOPs in all); for
``none`` the per-row ``grad_output`` is only known in backward, so the backward recomputes the
logits chunk by chunk (8NHV in all). ``grad_weight`` accumulates in fp32 (fp64 for fp64 inputs).

Deviation from ``F.cross_entropy``: when every row is ignored (or N = 0), ``mean`` returns 0 with
zero gradients instead of NaN.
"""
from typing import Optional

import torch

from ptcore.ops import checks
from ptcore.ops.lm_head_chunks import acc_dtype, empty_head_grads, head_plan, run_chunks, scatter_rows, valid_rows
from ptcore.ops.rows import CROSS_ENTROPY_ROWS

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
MAX_Z_LOSS = 1e4  # z_loss * lse^2 stays finite in fp32; typical values are 1e-4


def _chunked(x, w, t, b, *, ignore_index, label_smoothing, z_loss, softcap, backend, chunk, scale,
             need_gx, need_gw, need_gb):
    """Returns (loss_rows [N], lse [N], gx, gw, gb): loss and lse in the accumulation dtype,
    gradients those of ``sum_i scale_i * loss_i`` (empty where not needed)."""
    N = x.shape[0]
    idx = valid_rows(t, ignore_index)
    if idx is not None:  # ignored rows cost no GEMM work
        x, t = x.index_select(0, idx), t.index_select(0, idx)
        if scale is not None and scale.numel() > 1:
            scale = scale.index_select(0, idx)
    acc = acc_dtype(x.dtype)
    loss = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    lse = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    rows = CROSS_ENTROPY_ROWS[backend]
    write_grad = need_gx or need_gw or need_gb

    def row_pass(z, s, e):
        sc = scale[s:e] if scale is not None and scale.numel() > 1 else scale
        rows(z, t[s:e], loss[s:e], lse[s:e], sc, ignore_index=ignore_index,
             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, write_grad=write_grad)

    gx, gw, gb = run_chunks(x, w, b, row_pass, chunk=chunk, need_gx=need_gx, need_gw=need_gw,
                            need_gb=need_gb)
    gx = scatter_rows(idx, N, gx) if need_gx else gx
    return scatter_rows(idx, N, loss), scatter_rows(idx, N, lse), gx, gw, gb


# ---- torch custom ops: opaque to torch.compile, with fake (meta) implementations and autograd ----

@torch.library.custom_op("ptcore::linear_cross_entropy", mutates_args=())
def _lce_fwd(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             bias: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
             softcap: float, reduction: str, backend: str, chunk: int, need_gx: bool,
             need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
    """Returns (loss, lse, grad_input, grad_weight, grad_bias); the gradients are those of the
    reduced loss with grad_output = 1 (empty for ``none``, whose backward recomputes)."""
    checks.targets_in_range(OP, target, weight.shape[0], ignore_index)
    acc = acc_dtype(input.dtype)
    inv_n = scale = None
    if reduction == "mean":
        inv_n = (1.0 / _n_valid(target, ignore_index).to(acc)).reshape(1)
        # fp16 gradients of 1/N size underflow in the fp16 logits buffer: for fp16 the backward
        # applies 1/N (with grad_output, in fp32) instead.
        scale = None if input.dtype == torch.float16 else inv_n
    grads = reduction != "none"
    loss_rows, lse, gx, gw, gb = _chunked(
        input, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, backend=backend, chunk=chunk, scale=scale,
        need_gx=grads and need_gx, need_gw=grads and need_gw, need_gb=grads and need_gb)
    if reduction == "none":
        loss = loss_rows.to(input.dtype)
    else:
        total = loss_rows.sum()
        loss = (total * inv_n.squeeze(0) if reduction == "mean" else total).to(input.dtype)
    return loss, lse.float(), gx, gw, gb


@_lce_fwd.register_fake
def _(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
      backend, chunk, need_gx, need_gw, need_gb):
    N = input.shape[0]
    grads = reduction != "none"
    loss = input.new_empty(N) if reduction == "none" else input.new_empty(())
    lse = input.new_empty(N, dtype=torch.float32)
    return (loss, lse, *empty_head_grads(input, weight, grads and need_gx, grads and need_gw,
                                         grads and need_gb))


@torch.library.custom_op("ptcore::linear_cross_entropy_backward", mutates_args=())
def _lce_bwd(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             bias: Optional[torch.Tensor], grad_loss: torch.Tensor, ignore_index: int,
             label_smoothing: float, z_loss: float, softcap: float, backend: str, chunk: int,
             need_gx: bool, need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """Gradients for reduction='none' with per-row grad_loss: recomputes the logits by chunks."""
    _, _, gx, gw, gb = _chunked(
        input, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, backend=backend, chunk=chunk,
        scale=grad_loss.to(acc_dtype(input.dtype)).contiguous(), need_gx=need_gx, need_gw=need_gw,
        need_gb=need_gb)
    return gx, gw, gb


@_lce_bwd.register_fake
def _(input, weight, target, bias, grad_loss, ignore_index, label_smoothing, z_loss, softcap,
      backend, chunk, need_gx, need_gw, need_gb):
    return empty_head_grads(input, weight, need_gx, need_gw, need_gb)


def _n_valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index).sum().clamp(min=1)


def _scale_(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """g *= factor in place, the product computed in fp32 (fp64) and rounded once."""
    if g.dtype in (torch.float32, torch.float64):
        return g.mul_(factor.to(g.dtype))
    return g.copy_(g.float().mul_(factor.float()))


def _is_one_on_cpu(t: torch.Tensor) -> bool:
    """True for a CPU tensor equal to 1; never inspects a CUDA tensor (a host sync) nor a traced one."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and bool(t == 1)


def _setup_context(ctx, inputs, output):
    (x, w, t, b, ignore_index, ls, zl, cap, reduction, backend, chunk, need_gx, need_gw, need_gb) = inputs
    ctx.reduction = reduction
    ctx.need = (need_gx, need_gw, need_gb)
    ctx.options = (ignore_index, ls, zl, cap, backend, chunk)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled V x H "gradients" for the non-differentiable outputs
    ctx.save_for_backward(x, w, t, b)  # alive anyway while the graph is
    # The gradients computed in the forward (mean/sum) are held as a plain attribute, not saved
    # tensors: the first backward scales them in place and hands them on, which the saved-tensor
    # version check would reject; it drops them, so a second backward recomputes.
    ctx.stored = output[2:] if reduction != "none" else None
    ctx.defer_mean = reduction == "mean" and x.dtype == torch.float16  # 1/N left to the backward


def _backward(ctx, grad_loss, *_):
    need_gx, need_gw, need_gb = ctx.need
    if grad_loss is None:  # the loss did not reach the output
        return (None,) * 14
    if ctx.stored is not None:
        # The common case: scale the gradients computed in the forward, in place (no second V x H
        # buffer) and by a tensor (no host check of grad_output == 1).
        stored, ctx.stored = ctx.stored, None
        factor = grad_loss
        if ctx.defer_mean:
            factor = grad_loss.float() / _n_valid(ctx.saved_tensors[2], ctx.options[0])
        elif _is_one_on_cpu(grad_loss):  # loss.backward(): nothing to scale (free to check on CPU)
            factor = None
        gx, gw, gb = ((g if factor is None else _scale_(g, factor)) if need else None
                      for g, need in zip(stored, ctx.need))
        return (gx, gw, None, gb) + (None,) * 10
    x, w, t, b = ctx.saved_tensors
    if ctx.reduction == "none":
        row_grad = grad_loss
    else:  # a second backward through this graph (retain_graph): recompute instead
        ignore_index = ctx.options[0]
        n = _n_valid(t, ignore_index) if ctx.reduction == "mean" else 1
        row_grad = (grad_loss.to(acc_dtype(x.dtype)) / n).reshape(1)
    gx, gw, gb = _lce_bwd(x, w, t, b, row_grad, *ctx.options, need_gx, need_gw, need_gb)
    return (gx if need_gx else None, gw if need_gw else None, None,
            gb if need_gb else None) + (None,) * 10


_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ----

def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``softcap(input @ weight.T + bias)`` against ``target``, plus
    ``z_loss * logsumexp^2``, without materializing the logits.

    Args:
        input: ``(..., H)`` hidden states, float32 / bfloat16 / float16 / float64.
        weight: ``(V, H)`` LM-head weight, same dtype and device as ``input``.
        target: ``(...)`` int64 class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)``.
        ignore_index: target value whose rows add nothing (loss 0, zero gradients).
        label_smoothing: in ``[0, 1]``, PyTorch's definition.
        z_loss: coefficient of the PaLM z-loss ``lse^2`` (0 <= z_loss <= 1e4; PaLM used 1e-4).
        softcap: Gemma-2 logit soft-capping ``c * tanh(z / c)``; None disables it.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (shape of target).

    Returns the loss in ``input``'s dtype (computed in fp32). When no row is valid, ``mean`` gives
    0 rather than ``F.cross_entropy``'s NaN. On CUDA an out-of-range target yields NaN (raising
    would need a host sync); on the CPU it raises ValueError.

    Example:
        >>> x = torch.randn(8, 64, requires_grad=True); w = torch.randn(1000, 64, requires_grad=True)
        >>> y = torch.randint(0, 1000, (8,))
        >>> linear_cross_entropy(x, w, y).backward()
    """
    cap = checks.lm_head(OP, input, weight, target, bias, ignore_index, softcap)
    ls = checks.number(OP, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    # z_loss * lse^2 must stay finite in fp32 (1e39 overflowed to inf): the PaLM value is 1e-4.
    zl = checks.number(OP, "z_loss", z_loss, low=0.0, high=MAX_Z_LOSS)
    checks.choice(OP, "reduction", reduction, REDUCTIONS)

    backend, chunk = head_plan(input, weight, OP)
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (input, weight, bias)]
    loss = _lce_fwd(x, weight, t, bias, ignore_index, ls, zl, cap, reduction, backend, chunk, *need)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
