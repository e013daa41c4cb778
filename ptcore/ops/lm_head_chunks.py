"""The chunk loop shared by the fused LM-head ops (docs/kernels.md §3); how many rows a chunk
holds comes from :mod:`ptcore.ops.logits_budget`.

For each chunk of rows: one GEMM for the chunk's logits into a reused buffer, the op's per-row
pass over that buffer (which, when gradients are wanted, leaves dL/dlogits in it), then the two
gradient GEMMs ``grad_input[chunk] = G W`` and ``grad_weight += G^T X[chunk]`` (fp32 or fp64
accumulation) and ``grad_bias += sum G``. GEMMs stay in the vendor BLAS.
"""
from __future__ import annotations

from typing import Callable

import torch

from ptcore.ops import dispatch, logits_budget


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_head_grads(hidden: torch.Tensor, weight: torch.Tensor, need_gx: bool, need_gw: bool,
                     need_gb: bool):
    """Uninitialized (grad_hidden, grad_weight, grad_bias) as the fused ops return them: the
    hidden's shape and dtype, fp32/fp64 accumulators for weight and bias, empty where not needed
    (the fake implementations that torch.compile traces with)."""
    acc = acc_dtype(hidden.dtype)
    V, H = weight.shape
    return (hidden.new_empty(hidden.shape) if need_gx else hidden.new_empty(0),
            hidden.new_empty(V, H, dtype=acc) if need_gw else hidden.new_empty(0),
            hidden.new_empty(V, dtype=acc) if need_gb else hidden.new_empty(0))


def valid_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows to compute when some rows are ignored (they then cost no GEMM work),
    else None. A host decision, so CPU only: on CUDA it would synchronize."""
    if target.device.type != "cpu" or target.numel() == 0:
        return None
    valid = target != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _add_weight_grad(gw: torch.Tensor, g: torch.Tensor, x: torch.Tensor, first: bool) -> None:
    """gw += g.T @ x (``first``: gw = g.T @ x, sparing a zero fill and a read of gw); products of
    low-precision inputs are summed in gw's dtype."""
    if g.dtype == gw.dtype:
        if first:
            torch.mm(g.t(), x, out=gw)
        else:
            gw.addmm_(g.t(), x)
        return
    prod = torch.mm(g.t(), x, out_dtype=gw.dtype) if g.is_cuda else torch.mm(g.t(), x)
    gw.copy_(prod) if first else gw.add_(prod)


def run_chunks(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               row_pass: Callable[[torch.Tensor, int, int], None], *, chunk: int,
               need_gx: bool = False, need_gw: bool = False, need_gb: bool = False,
               fixed_shape: bool = False, bounds: list[tuple[int, int]] | None = None):
    """Runs the loop; ``row_pass(z, start, end)`` gets the logits of rows [start, end) and must
    overwrite them with dL/dlogits when any gradient is needed. Returns (gx, gw, gb), each empty
    where not needed.

    ``fixed_shape``: every logits GEMM has exactly ``chunk`` rows (the last chunk is zero-padded),
    so that a row's results do not depend on how many rows share its batch (BLAS kernels may pick
    a different reduction order for a different M).
    ``bounds``: explicit (start, end) row ranges instead of equal chunks (the fused losses keep
    whole sequences together); the buffer is sized for the largest.
    """
    N, H = x.shape
    V = w.shape[0]
    acc = acc_dtype(x.dtype)
    grads = need_gx or need_gw or need_gb
    gx = torch.empty(N, H, dtype=x.dtype, device=x.device) if need_gx else x.new_empty(0)
    gw = torch.empty(V, H, dtype=acc, device=x.device) if need_gw else x.new_empty(0)
    gb = torch.zeros(V, dtype=acc, device=x.device) if need_gb else x.new_empty(0)
    if N == 0:
        return gx, gw.zero_(), gb
    if bounds is None:
        bounds = [(s, min(s + chunk, N)) for s in range(0, N, chunk)]
    elif fixed_shape:
        raise ValueError("run_chunks: 'fixed_shape' takes equal chunks, not 'bounds'")
    rows = chunk if fixed_shape else max(e - s for s, e in bounds)
    buf = torch.empty(rows, V, dtype=x.dtype, device=x.device)
    stage = torch.zeros(rows, H, dtype=x.dtype, device=x.device) if fixed_shape else None
    gx_stage = torch.empty(rows, H, dtype=x.dtype, device=x.device) if fixed_shape and need_gx else None
    wt = w.t()
    first = True
    for s, e in bounds:
        n = e - s
        if n == 0:
            continue
        if fixed_shape:
            stage[:n].copy_(x[s:e])
            stage[n:].zero_()
            xc, z = stage, buf
        else:
            xc, z = x[s:e], buf[:n]
        if b is None:
            torch.mm(xc, wt, out=z)
        else:
            torch.addmm(b, xc, wt, out=z)
        row_pass(z[:n], s, e)
        if not grads:
            continue
        if fixed_shape:
            z[n:].zero_()  # padding rows carry no gradient
        if need_gx:
            if fixed_shape:
                torch.mm(z, w, out=gx_stage)
                gx[s:e].copy_(gx_stage[:n])
            else:
                torch.mm(z, w, out=gx[s:e])
        if need_gw:
            _add_weight_grad(gw, z, xc, first=first)
        first = False
        if need_gb:
            gb.add_(z.sum(0, dtype=acc))
    if first and need_gw:  # no chunk had a row
        gw.zero_()
    return gx, gw, gb


def scatter_rows(idx: torch.Tensor | None, n: int, sub: torch.Tensor) -> torch.Tensor:
    """Puts the per-row results of the compacted rows back at their places (zeros elsewhere)."""
    if idx is None:
        return sub
    full = sub.new_zeros((n,) + tuple(sub.shape[1:]))
    return full.index_copy_(0, idx, sub)


# Under torch.compile these run once at trace time and their results are baked into the graph
# (no graph break): a backend or chunk budget changed later applies to new compilations.
@torch.compiler.assume_constant_result
def _resolve(device: torch.device, dtype: torch.dtype, op: str) -> str:
    return dispatch.resolve(device, dtype, op=op)


@torch.compiler.assume_constant_result
def _chunk_rows(vocab: int, itemsize: int) -> int:
    """Rows per chunk (the loop caps it by N; keeping N out keeps it a trace-time constant)."""
    return logits_budget.chunk_rows(1 << 62, vocab, itemsize)


def head_plan(input: torch.Tensor, weight: torch.Tensor, op: str) -> tuple[str, int]:
    """(backend, rows per chunk) for the LM-head op ``op`` (a key of dispatch.OPS) on these tensors."""
    return _resolve(input.device, input.dtype, op), _chunk_rows(weight.shape[0], input.element_size())
