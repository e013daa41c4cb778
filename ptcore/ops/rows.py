"""The per-row cross-entropy pass on each backend (math: docs/kernels.md §1).

Contract, the same for every backend: ``logits`` is a ``[n, V]`` chunk with unit column stride;
``target`` ``[n]`` int64; ``loss`` and ``lse`` ``[n]`` outputs and ``scale`` (None, or broadcast
over rows as ``[1]``, or per row ``[n]``) in the accumulation dtype: float64 for float64 logits,
else float32. Each row gets its log-sum-exp and loss
(0 and 0 for ignored rows), and with ``write_grad`` the row of ``logits`` is overwritten by
``scale * dloss/dlogits`` (the softcap chain rule included; zeros for ignored rows).
"""
from __future__ import annotations

import contextlib

import torch

from ptcore import _ext


def _scale_stride(scale: torch.Tensor | None) -> int:
    return 0 if scale is None or scale.numel() == 1 else scale.stride(0)


def softcap_torch(z, cap):
    """``cap * tanh(z / cap)``, also for caps beyond the dtype's range (1e300 in fp32: z, not NaN):
    where |z / cap| < 1e-3 it is ``z * (1 - (z / cap)^2 / 3)``, exact to below an ulp."""
    x = z / cap
    return torch.where(x.abs() < 1e-3, z * (1 - x * x / 3), cap * torch.tanh(x))


def rows_torch(logits, target, loss, lse, scale, *, ignore_index, label_smoothing, z_loss, softcap,
               write_grad):
    """Reference implementation in plain PyTorch (fp32 math, fp64 for fp64 logits)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    if softcap:
        z = softcap_torch(z, softcap)
    V = z.shape[1]
    valid = target != ignore_index
    # An out-of-range target gets NaN, as in the CUDA kernels (the op raises for CPU tensors first).
    in_range = (target >= 0) & (target < V)
    safe_t = torch.where(valid & in_range, target, torch.zeros_like(target)).unsqueeze(1)
    row_lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, safe_t).squeeze(1)
    eps = label_smoothing
    row_loss = z_loss * row_lse * row_lse
    if eps < 1:  # each term only when weighted: 0 * inf is NaN for a -inf logit
        row_loss = row_loss + (1 - eps) * (row_lse - z_y)
    if eps > 0:
        row_loss = row_loss + eps * (row_lse - z.mean(dim=1))
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


# ---- log-prob / entropy rows (math: csrc/include/ptcore/logprob_rows.h) ----
# stats(logits, target, logp, entropy|None, lse, mu) fills the per-row vectors;
# grad(logits, target, lse, mu, g_logp|None, g_entropy|None) overwrites logits with
# d(g_logp * logp + g_entropy * entropy)/dlogits. Per-row vectors: accumulation dtype, contiguous.

def _tempered(logits, softcap, temperature):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    u = logits.to(acc)
    if softcap:
        u = softcap_torch(u, softcap)
    return u, u / temperature


def logprob_stats_torch(logits, target, logp, entropy, lse, mu, *, ignore_index, softcap, temperature):
    """Reference implementation in plain PyTorch."""
    _, z = _tempered(logits, softcap, temperature)
    V = z.shape[1]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    safe_t = torch.where(valid & in_range, target, torch.zeros_like(target)).unsqueeze(1)
    row_lse = torch.logsumexp(z, dim=1)
    p = torch.softmax(z, dim=1)
    row_mu = torch.where(p > 0, p * z, 0.0).sum(dim=1)  # -inf logits have p = 0
    row_lp = z.gather(1, safe_t).squeeze(1) - row_lse
    nan = torch.full_like(row_lse, float("nan"))
    for out, val in ((logp, row_lp), (lse, row_lse), (mu, row_mu), (entropy, row_lse - row_mu)):
        if out is not None:
            out.copy_(torch.where(valid, torch.where(in_range, val, nan), torch.zeros_like(val)))


def logprob_grad_torch(logits, target, lse, mu, g_logp, g_entropy, *, ignore_index, softcap, temperature):
    u, z = _tempered(logits, softcap, temperature)
    V = z.shape[1]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    # From the row itself, shifted by its max, rather than from the saved fp32 lse and mu: both
    # are rounded at the magnitude of the logits (~1e-6 for |z| ~ 15), and mu's rounding error
    # times p does not cancel in the entropy gradient (2.5x the naive autograd error before).
    zc = z - z.amax(dim=1, keepdim=True)
    p = torch.softmax(z, dim=1)
    g = torch.zeros_like(z)
    if g_logp is not None:
        glp = g_logp.to(z.dtype).unsqueeze(1) / temperature
        g = g - glp * p
        safe_t = torch.where(valid & in_range, target, torch.zeros_like(target)).unsqueeze(1)
        g.scatter_add_(1, safe_t, glp)
    if g_entropy is not None:
        mu_c = torch.where(p > 0, p * zc, 0.0).sum(dim=1, keepdim=True)  # mu - max z
        g = g - (g_entropy.to(z.dtype).unsqueeze(1) / temperature) * torch.where(p > 0, p * (zc - mu_c), 0.0)
    if softcap:
        g = g * (1 - (u / softcap) ** 2)
    g = torch.where(in_range.unsqueeze(1), g, float("nan"))
    logits.copy_(torch.where(valid.unsqueeze(1), g, 0.0))


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _native_logprob(module, name, logits, target, ignore_index, softcap, temperature, *vectors):
    stream = torch.cuda.current_stream(logits.device).cuda_stream if logits.is_cuda else 0
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        getattr(module, name)(
            logits.data_ptr(), str(logits.dtype).removeprefix("torch."), logits.shape[0],
            logits.shape[1], logits.stride(0), target.data_ptr(), ignore_index, softcap or 0.0,
            temperature, *(_ptr(v) for v in vectors), stream)


def logprob_stats_native(module):
    def stats(logits, target, logp, entropy, lse, mu, *, ignore_index, softcap, temperature):
        _native_logprob(module(), "logprob_rows_stats", logits, target, ignore_index, softcap,
                        temperature, logp, entropy, lse, mu, None, None)
    return stats


def logprob_grad_native(module):
    def grad(logits, target, lse, mu, g_logp, g_entropy, *, ignore_index, softcap, temperature):
        _native_logprob(module(), "logprob_rows_grad", logits, target, ignore_index, softcap,
                        temperature, None, None, lse, mu, g_logp, g_entropy)
    return grad


def logprob_stats_triton(logits, target, logp, entropy, lse, mu, **kw):
    _ext.triton_kernels().logprob_rows_stats(logits, target, logp, entropy, lse, mu, **kw)


def logprob_grad_triton(logits, target, lse, mu, g_logp, g_entropy, **kw):
    _ext.triton_kernels().logprob_rows_grad(logits, target, lse, mu, g_logp, g_entropy, **kw)


# The lowest temperature the log-prob rows take, on every backend: below it z = u / T is so
# large that fp32 loses the log-probs' digits (the saved lse = max z + log d rounds at ulp(max z),
# 1e-4 relative in every p at T = 1e-2 with |u| ~ 15), and below ~1e-10 results became inf / NaN
# (a policy loss of 3.8e8 instead of 2.12 at T = 1e-30). Greedy decoding has no log-probs to train on.
MIN_TEMPERATURE = 1e-2


def check_temperature(op: str, temperature: float) -> None:
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"{op}: 'temperature' must be >= {MIN_TEMPERATURE} (fp32 log-probs lose their "
                         f"precision below it), got {temperature}")


def _checked(name, fn):
    def rows(*args, temperature, **kw):
        check_temperature(name, temperature)
        return fn(*args, temperature=temperature, **kw)
    return rows


LOGPROB_STATS = {k: _checked("logprob rows", f) for k, f in (
    ("torch", logprob_stats_torch), ("cpu", logprob_stats_native(_ext.cpu_module)),
    ("cuda", logprob_stats_native(_ext.cuda_module)), ("triton", logprob_stats_triton))}
LOGPROB_GRAD = {k: _checked("logprob rows", f) for k, f in (
    ("torch", logprob_grad_torch), ("cpu", logprob_grad_native(_ext.cpu_module)),
    ("cuda", logprob_grad_native(_ext.cuda_module)), ("triton", logprob_grad_triton))}
