"""The per-row cross-entropy pass on each backend (math: shared/reference/kernels.md section 1).

Contract, the same for every backend: ``logits`` is a ``[n, V]`` chunk with unit column stride;
``target`` ``[n]`` int64; ``loss`` and ``lse`` ``[n]`` outputs and ``scale`` (None, or broadcast
over rows as ``[1]``, or per row ``[n]``) in the accumulation dtype: float64 for float64 logits,
else float32. Each row gets its log-sum-exp and loss
(0 and 0 for ignored rows), and with ``write_grad`` the row of ``logits`` is overwritten by
``scale * dloss/dlogits`` (the softcap chain rule included; zeros for ignored rows).
"""
from __future__ import annotations

import torch

from ptcore import _ext


def _scale_stride(scale: torch.Tensor | None) -> int:
    return 0 if scale is None or scale.numel() == 1 else scale.stride(0)


def rows_torch(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss, softcap,
               write_grad):
    """Reference implementation in plain PyTorch (fp32 math, fp64 for fp64 logits)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    V = z.shape[1]
    valid = target != ignore_index
    # An out-of-range target gets NaN, as in the CUDA kernels (the op raises for CPU tensors first).
    in_range = (target >= 0) & (target < V)
    safe_t = torch.where(valid & in_range, target, torch.zeros_like(target)).unsqueeze(1)
    row_lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, safe_t).squeeze(1)
    eps = label_smoothing
    row_loss = (1 - eps) * (row_lse - z_y) + eps * (row_lse - z.mean(dim=1)) + z_loss * row_lse * row_lse
    row_loss = torch.where(in_range, row_loss, torch.full_like(row_loss, float("nan")))
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
    lse.copy_(torch.where(valid, row_lse, torch.zeros_like(row_lse)))
    if not write_grad:
        return
    p = torch.softmax(z, dim=1)
    g = (1 + 2 * z_loss * row_lse).unsqueeze(1) * p - eps / V
    g.scatter_add_(1, safe_t, torch.full_like(z_y, -(1 - eps)).unsqueeze(1))
    if scale is not None:
        g = g * scale.to(acc).reshape(-1, 1)
    if softcap:
        g = g * (1 - (z / softcap) ** 2)
    g = torch.where(in_range.unsqueeze(1), g, float("nan"))
    logits.copy_(torch.where(valid.unsqueeze(1), g, 0.0))


def rows_cpu(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss, softcap,
             write_grad):
    _ext.cpu_module().cross_entropy_rows(
        logits.data_ptr(), str(logits.dtype).removeprefix("torch."), logits.shape[0], logits.shape[1],
        logits.stride(0), target.data_ptr(), target.stride(0), loss.data_ptr(), lse.data_ptr(),
        0 if scale is None else scale.data_ptr(), _scale_stride(scale), ignore_index,
        label_smoothing, z_loss, softcap or 0.0, write_grad)


def rows_cuda(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss, softcap,
              write_grad):
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    with torch.cuda.device(logits.device):
        _ext.cuda_module().cross_entropy_rows(
            logits.data_ptr(), str(logits.dtype).removeprefix("torch."), logits.shape[0],
            logits.shape[1], logits.stride(0), target.data_ptr(), target.stride(0), loss.data_ptr(),
            lse.data_ptr(), 0 if scale is None else scale.data_ptr(), _scale_stride(scale),
            ignore_index, label_smoothing, z_loss, softcap or 0.0, write_grad, stream)


def rows_triton(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss, softcap,
                write_grad):
    _ext.triton_kernels().cross_entropy_rows(
        logits, target, loss, lse, scale, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap or 0.0, write_grad=write_grad)


CROSS_ENTROPY_ROWS = {"torch": rows_torch, "cpu": rows_cpu, "cuda": rows_cuda, "triton": rows_triton}
