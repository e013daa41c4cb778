"""Fused per-token log-probs and entropy from hidden states: the RL head, without the [N, V] logits.

``logp_i = log softmax(softcap(x_i W^T + b) / T)[y_i]`` and ``H_i`` the entropy of that
distribution (docs/kernels.md §2). Forward: per chunk, the logits GEMM and the
backend's stats pass (one sweep gives lse, the mean of z' under p, logp and H). The incoming
gradients are unknown until backward, so the backward recomputes the logits by chunks and writes
``d(g_logp logp + g_H H)/dlogits`` in one pass (8NHV FLOPs in all; the fused losses in
``fused_losses.py`` know their gradients in the forward and stay at 6NHV).
"""
from typing import Optional

import torch

from ptcore.ops import checks
from ptcore.ops.lm_head_chunks import acc_dtype, empty_head_grads, head_plan, run_chunks, scatter_rows, valid_rows
from ptcore.ops.rows import LOGPROB_GRAD, LOGPROB_STATS, check_temperature

OP = "linear_logprobs"
# Rows per logits GEMM in deterministic mode: a constant, so no row's result depends on the batch
# it shares or on the memory budget (a BLAS may reduce differently for a different M).
DETERMINISTIC_ROWS = 256


def compute_stats(x, w, t, b, *, ignore_index, softcap, temperature, backend, chunk,
                  deterministic, want_entropy, row_pass_hook=None, need_gx=False, need_gw=False,
                  need_gb=False):
    """Chunked forward: returns (logp, entropy or None, lse, mu) per row in the accumulation dtype,
    plus (gx, gw, gb) when ``row_pass_hook(z, s, e, stats)`` turns each chunk's logits into its
    gradient (the fused losses); ignored rows are 0 and cost no GEMM work on the CPU."""
    N = x.shape[0]
    idx = valid_rows(t, ignore_index)
    if idx is not None:
        x, t = x.index_select(0, idx), t.index_select(0, idx)
    acc = acc_dtype(x.dtype)
    n = x.shape[0]
    logp, lse, mu = (torch.zeros(n, dtype=acc, device=x.device) for _ in range(3))
    ent = torch.zeros(n, dtype=acc, device=x.device) if want_entropy else None
    stats = LOGPROB_STATS[backend]
    opts = dict(ignore_index=ignore_index, softcap=softcap, temperature=temperature)

    def row_pass(z, s, e):
        stats(z, t[s:e], logp[s:e], None if ent is None else ent[s:e], lse[s:e], mu[s:e], **opts)
        if row_pass_hook is not None:
            row_pass_hook(z, t[s:e], (idx[s:e] if idx is not None else torch.arange(s, e, device=x.device)),
                          logp[s:e], None if ent is None else ent[s:e], lse[s:e], mu[s:e])

    gx, gw, gb = run_chunks(x, w, b, row_pass, chunk=DETERMINISTIC_ROWS if deterministic else chunk,
                            need_gx=need_gx, need_gw=need_gw, need_gb=need_gb, fixed_shape=deterministic)
    out = [scatter_rows(idx, N, v) if v is not None else None for v in (logp, ent, lse, mu)]
    return out, (scatter_rows(idx, N, gx) if need_gx else gx, gw, gb)


def compute_grads(x, w, t, b, lse, mu, g_logp, g_entropy, *, ignore_index, softcap, temperature,
                  backend, chunk, deterministic, need_gx, need_gw, need_gb):
    """Chunked backward by recomputation: gradients of ``sum g_logp logp + g_entropy H``."""
    N = x.shape[0]
    idx = valid_rows(t, ignore_index)
    if idx is not None:
        pick = lambda v: None if v is None else v.index_select(0, idx)
        x, t, lse, mu, g_logp, g_entropy = pick(x), pick(t), pick(lse), pick(mu), pick(g_logp), pick(g_entropy)
    grad = LOGPROB_GRAD[backend]
    # fp16: incoming gradients of 1/N size would underflow once multiplied into the fp16 logits
    # buffer, so they are scaled to O(1) first and the results unscaled in fp32 (no host sync).
    unscale = None
    if x.dtype == torch.float16:
        peak = torch.stack([g.abs().max() if g is not None and g.numel() else torch.zeros((), device=x.device)
                            for g in (g_logp, g_entropy)]).max()
        unscale = torch.where(peak > 0, peak, torch.ones_like(peak))
        g_logp, g_entropy = (None if g is None else g / unscale for g in (g_logp, g_entropy))

    def row_pass(z, s, e):
        grad(z, t[s:e], lse[s:e], mu[s:e], None if g_logp is None else g_logp[s:e],
             None if g_entropy is None else g_entropy[s:e], ignore_index=ignore_index,
             softcap=softcap, temperature=temperature)

    gx, gw, gb = run_chunks(x, w, b, row_pass, chunk=DETERMINISTIC_ROWS if deterministic else chunk,
                            need_gx=need_gx, need_gw=need_gw, need_gb=need_gb, fixed_shape=deterministic)
    if unscale is not None:
        gx = (gx.float() * unscale).to(gx.dtype) if need_gx else gx
        gw, gb = gw * unscale if need_gw else gw, gb * unscale if need_gb else gb
    return (scatter_rows(idx, N, gx) if need_gx else gx), gw, gb


# ---- torch custom ops ----

@torch.library.custom_op("ptcore::linear_logprobs", mutates_args=())
def _logprobs_fwd(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: Optional[torch.Tensor], ignore_index: int, softcap: float,
                  temperature: float, return_entropy: bool, backend: str, chunk: int,
                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp, entropy or empty, lse, mu), per row, in the accumulation dtype."""
    checks.targets_in_range(OP, target, weight.shape[0], ignore_index)
    (logp, ent, lse, mu), _ = compute_stats(
        input, weight, target, bias, ignore_index=ignore_index, softcap=softcap,
        temperature=temperature, backend=backend, chunk=chunk, deterministic=deterministic,
        want_entropy=return_entropy)
    return logp, (ent if ent is not None else logp.new_empty(0)), lse, mu


@_logprobs_fwd.register_fake
def _(input, weight, target, bias, ignore_index, softcap, temperature, return_entropy, backend,
      chunk, deterministic):
    n, acc = input.shape[0], acc_dtype(input.dtype)
    vec = lambda: input.new_empty(n, dtype=acc)
    return vec(), (vec() if return_entropy else input.new_empty(0, dtype=acc)), vec(), vec()


@torch.library.custom_op("ptcore::linear_logprobs_backward", mutates_args=())
def _logprobs_bwd(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: Optional[torch.Tensor], lse: torch.Tensor, mu: torch.Tensor,
                  g_logp: Optional[torch.Tensor], g_entropy: Optional[torch.Tensor],
                  ignore_index: int, softcap: float, temperature: float, backend: str, chunk: int,
                  deterministic: bool, need_gx: bool, need_gw: bool,
                  need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(input.dtype)
    cast = lambda g: None if g is None else g.to(acc).contiguous()
    return compute_grads(input, weight, target, bias, lse, mu, cast(g_logp), cast(g_entropy),
                         ignore_index=ignore_index, softcap=softcap, temperature=temperature,
                         backend=backend, chunk=chunk, deterministic=deterministic,
                         need_gx=need_gx, need_gw=need_gw, need_gb=need_gb)


@_logprobs_bwd.register_fake
def _(input, weight, target, bias, lse, mu, g_logp, g_entropy, ignore_index, softcap, temperature,
      backend, chunk, deterministic, need_gx, need_gw, need_gb):
    return empty_head_grads(input, weight, need_gx, need_gw, need_gb)


def _setup_context(ctx, inputs, output):
    x, w, t, b, ignore_index, cap, temp, _, backend, chunk, det = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w, t, b, output[2], output[3])
    ctx.options = (ignore_index, cap, temp, backend, chunk, det)
    ctx.need = tuple(ctx.needs_input_grad[:2]) + (b is not None and ctx.needs_input_grad[3],)


def _backward(ctx, g_logp, g_entropy, *_):
    if (g_logp is None and g_entropy is None) or not any(ctx.need):
        return (None,) * 11
    x, w, t, b, lse, mu = ctx.saved_tensors
    if g_entropy is not None and g_entropy.numel() == 0:
        g_entropy = None
    gx, gw, gb = _logprobs_bwd(x, w, t, b, lse, mu, g_logp, g_entropy, *ctx.options, *ctx.need)
    need_gx, need_gw, need_gb = ctx.need
    return (gx if need_gx else None, gw if need_gw else None, None,
            gb if need_gb else None) + (None,) * 7


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    softcap: float | None = None, ignore_index: int = -100,
                    return_entropy: bool = False, deterministic: bool = False,
                    top_k: int = 0, top_p: float = 1.0):
    """Per-token log-prob of ``target`` under ``softmax(softcap(input @ weight.T + bias) / T)``,
    and with ``return_entropy`` the per-token entropy of that distribution, without materializing
    the logits.

    Args:
        input: ``(..., H)`` hidden states; weight ``(V, H)``; target ``(...)`` int64.
        temperature: the sampler's temperature (old log-probs must use the sampler's distribution);
            >= 1e-2 (ptcore.ops.rows.MIN_TEMPERATURE): below it fp32 log-probs lose their precision.
        softcap: Gemma-2 logit soft-capping, applied before the temperature.
        ignore_index: rows with this target (prompt, padding) return 0 and cost no GEMM work (CPU).
        deterministic: each row's results are bitwise independent of the other rows in the batch
            and of the chunk budget (logits GEMMs of a fixed 256 rows; per-row reductions in a
            fixed order) -- the batch invariance that keeps trainer and sampler log-probs equal.
        top_k (0: off), top_p (1: off): the sampler's truncation. The log-probs (and entropy) are
            then those of the truncated distribution, renormalized over the kept set exactly as
            the engine's sampler chooses it (:mod:`ptcore.ops.truncation`: ties, the token that
            crosses ``top_p``): ``log p - log S`` with ``S`` the kept mass, whose gradient
            involves only the kept logits; a target outside the kept set gets -inf. Computed on
            the torch reference path (chunks of rows, each recomputed in the backward by
            activation checkpointing), whatever the backend.

    Returns ``logp`` (shape of target; float32, float64 for float64 inputs) or ``(logp, entropy)``.
    Both are differentiable w.r.t. input, weight and bias for any mix of incoming gradients.

    Example:
        >>> h = torch.randn(2, 5, 16, requires_grad=True); W = torch.randn(100, 16)
        >>> y = torch.randint(0, 100, (2, 5)); y[:, :2] = -100
        >>> logp, ent = linear_logprobs(h, W, y, temperature=0.7, return_entropy=True)
        >>> (logp.sum() + 0.01 * ent.sum()).backward()
    """
    cap = checks.lm_head(OP, input, weight, target, bias, ignore_index, softcap)
    temp = checks.number(OP, "temperature", temperature, low=0.0, low_open=True)
    check_temperature(OP, temp)
    checks.flag(OP, "return_entropy", return_entropy)  # "no" would be truthy
    checks.flag(OP, "deterministic", deterministic)
    top_k = checks.integer(OP, "top_k", top_k, low=0)
    top_p = checks.number(OP, "top_p", top_p, low=0, low_open=True, high=1)
    if top_k or top_p < 1:
        x = input.reshape(-1, input.shape[-1])
        logp, ent = _truncated(x, weight, target.reshape(-1), bias, ignore_index=ignore_index,
                               softcap=cap, temperature=temp, top_k=top_k, top_p=top_p,
                               want_entropy=bool(return_entropy))
        logp = logp.reshape(target.shape)
        return (logp, ent.reshape(target.shape)) if return_entropy else logp
    backend, chunk = head_plan(input, weight, OP)
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).contiguous()  # the row kernels read targets contiguously
    logp, ent, _, _ = _logprobs_fwd(x, weight, t, bias, ignore_index, cap, temp, bool(return_entropy),
                                    backend, chunk, bool(deterministic))
    logp = logp.reshape(target.shape)
    return (logp, ent.reshape(target.shape)) if return_entropy else logp


TRUNCATED_ROWS = 256  # rows per chunk of the truncated path (its logits are materialized per chunk)


def _truncated_rows(x, w, b, t, *, ignore_index, softcap, temperature, top_k, top_p, want_entropy):
    from ptcore.ops.truncation import kept_mask
    acc = acc_dtype(x.dtype)
    z = torch.nn.functional.linear(x, w, b).to(acc)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    keep = kept_mask(z.detach(), top_k, top_p)
    logp_all = torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
    valid = t != ignore_index
    lp = logp_all.gather(-1, torch.where(valid, t, 0)[:, None])[:, 0]
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    if not want_entropy:
        return lp, lp.new_zeros(0)
    safe = torch.where(keep, logp_all, torch.zeros_like(logp_all))  # no 0 * -inf, in value or gradient
    ent = -(safe.exp() * safe).sum(-1)
    return lp, torch.where(valid, ent, torch.zeros_like(ent))


def _truncated(x, w, t, b, *, ignore_index, softcap, temperature, top_k, top_p, want_entropy):
    """The truncation-aware log-probs (and entropy) by chunks of rows; the backward recomputes
    each chunk's logits (non-reentrant checkpointing) instead of keeping them."""
    from torch.utils.checkpoint import checkpoint
    checks.targets_in_range(OP, t, w.shape[0], ignore_index)
    opts = dict(ignore_index=ignore_index, softcap=softcap, temperature=temperature, top_k=top_k,
                top_p=top_p, want_entropy=want_entropy)
    grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, w, b))
    lps, ents = [], []
    for s in range(0, x.shape[0], TRUNCATED_ROWS):
        xs, ts = x[s:s + TRUNCATED_ROWS], t[s:s + TRUNCATED_ROWS]
        fn = lambda xs, ts: _truncated_rows(xs, w, b, ts, **opts)
        lp, ent = checkpoint(fn, xs, ts, use_reentrant=False) if grad else fn(xs, ts)
        lps.append(lp)
        ents.append(ent)
    acc = acc_dtype(x.dtype)
    logp = torch.cat(lps) if lps else x.new_zeros(0, dtype=acc)
    ent = torch.cat(ents) if want_entropy and ents else x.new_zeros(x.shape[0] if want_entropy else 0, dtype=acc)
    return logp, ent
