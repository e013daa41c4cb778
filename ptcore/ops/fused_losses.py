"""RL losses straight from hidden states: the [N, V] logits never exist, and the work is 6NHV.

Per chunk of rows: the logits GEMM, the stats pass (log-probs, entropy), the loss of the chunk's
tokens -- their share of the batch loss, with the batch's global normalizer -- and, by autograd on
those few numbers, the per-token gradients; then the gradient pass over the same logits and the two
gradient GEMMs. Losses made of per-token terms chunk anywhere; GSPO's sequence ratio and DPO's
sequence sums need whole sequences (pairs) in a chunk. The gradients are thus known in the forward;
the backward scales them by grad_output (as the fused cross-entropy does). The loss algebra is that
of policy.py and preference.py, so fused and unfused agree by construction.

This module is the machinery both families share (the chunked forward with its per-chunk autograd,
the stored-gradient backward); the ops are fused_policy.py (``linear_policy_loss``) and
fused_dpo.py (``linear_dpo_loss``).
"""
import concurrent.futures
import contextlib
import os

import torch

from ptcore.ops.lm_head_chunks import acc_dtype, run_chunks
from ptcore.ops.rows import LOGPROB_GRAD, LOGPROB_STATS


_worker = (None, None)  # (pid, executor): a forked child makes its own


def _with_autograd(fn, device):
    """``fn()`` where autograd records, for the per-chunk loss gradients (a few small tensors).

    A custom op's implementation runs below autograd: the dispatcher excludes autograd's keys in
    this thread's dispatch state while it runs, and no public API lifts that (``enable_grad`` only
    sets grad mode). A helper thread starts with the default state, so ``fn`` runs there while
    this thread waits: the same ``torch.autograd.grad`` on the same tensors, with the caller's
    intra-op thread count and CUDA stream."""
    global _worker
    pid, pool = _worker
    if pid != os.getpid():
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ptcore-loss-grad")
        _worker = (os.getpid(), pool)
    threads = torch.get_num_threads()
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def call():
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.enable_grad(), (torch.cuda.stream(stream) if stream is not None
                                   else contextlib.nullcontext()):
            return fn()

    return pool.submit(call).result()


def fused_sequence_loss(x, w, b, t, loss_fn, *, seqs_per_chunk, chunk, ignore_index, softcap,
                        temperature, backend, need, want_entropy):
    """x ``[S, T, H]``, t ``[S, T]`` (ignore_index where no log-prob is wanted).

    ``loss_fn(first, logp, entropy)`` returns the loss of the sequences ``first, first + 1, ...``
    whose ``[k, T]`` log-probs (and entropy) it gets, as their share of the batch loss.
    ``seqs_per_chunk``: chunks hold that many whole sequences (losses that need a whole sequence:
    GSPO's ratio, DPO's sums); None: the loss is a sum of per-token terms, so chunks of ``chunk``
    rows cut anywhere, and each chunk's gradients come from the loss of the sequences it touches
    with only its own positions live. When whole sequences would take more than twice the chunk
    budget, two passes keep the memory bounded instead: log-probs for every row, the loss
    gradients once, then the gradient pass over recomputed logits (8NHV instead of 6NHV).
    Returns (loss, logp [S, T], entropy [S, T] or None, gx [S, T, H], gw, gb).
    """
    S, T, H = x.shape
    acc = acc_dtype(x.dtype)
    x_flat, t_flat = x.reshape(-1, H), t.reshape(-1).contiguous()
    order = None
    if x.device.type == "cpu":  # ignored rows cost no GEMM work (a host decision: CPU only)
        valid = t_flat != ignore_index
        if not bool(valid.all()):
            order = valid.nonzero().squeeze(1)  # sorted: sequences stay contiguous
    xs, ts = (x_flat, t_flat) if order is None else (x_flat.index_select(0, order), t_flat.index_select(0, order))
    n = xs.shape[0]
    if seqs_per_chunk is not None and seqs_per_chunk * T > 2 * chunk:
        return _two_pass(x, xs, ts, order, w, b, loss_fn, chunk=chunk, backend=backend, need=need,
                         want_entropy=want_entropy, ignore_index=ignore_index, softcap=softcap,
                         temperature=temperature)
    if seqs_per_chunk is None:
        bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    else:  # cut where a group of sequences starts
        starts = [i * T for i in range(0, S, seqs_per_chunk)]
        if order is not None:  # CPU: where each group's first row landed after compaction
            starts = torch.searchsorted(order, torch.tensor(starts, device=x.device)).tolist()
        cuts = starts + [n]
        bounds = list(zip(cuts[:-1], cuts[1:]))
    first_seq = {s: i * (seqs_per_chunk or 0) for i, (s, _) in enumerate(bounds)}
    logp_all = torch.zeros(S, T, dtype=acc, device=x.device)
    ent_all = torch.zeros(S, T, dtype=acc, device=x.device) if want_entropy else None
    opts = dict(ignore_index=ignore_index, softcap=softcap, temperature=temperature)
    grads = any(need)

    def row_pass(z, s, e):
        rows = torch.arange(s, e, device=x.device) if order is None else order[s:e]
        vec = lambda: torch.empty(e - s, dtype=acc, device=x.device)
        lp, lse, mu = vec(), vec(), vec()
        ent = vec() if want_entropy else None
        LOGPROB_STATS[backend](z, ts[s:e], lp, ent, lse, mu, **opts)
        seq, pos = rows // T, rows % T
        logp_all[seq, pos] = lp
        if ent is not None:
            ent_all[seq, pos] = ent
        if not grads:
            return
        if seqs_per_chunk is None:  # the sequences this chunk touches (rows are sorted)
            lo, hi = (s, e - 1) if order is None else (int(order[s]), int(order[e - 1]))  # CPU only
            first = lo // T
            k = hi // T - first + 1
        else:
            first = first_seq[s]
            k = min(seqs_per_chunk, S - first)
        def share_grads():
            leaves = [v.detach().requires_grad_() for v in (lp, ent) if v is not None]
            dense = [torch.zeros(k, T, dtype=acc, device=x.device).index_put((seq - first, pos), v)
                     for v in leaves]
            share = loss_fn(first, dense[0], dense[1] if ent is not None else None)
            return list(torch.autograd.grad(share, leaves, allow_unused=True)) + [None]

        g = _with_autograd(share_grads, x.device)
        LOGPROB_GRAD[backend](z, ts[s:e], lse, mu, g[0], g[1] if ent is not None else None, **opts)

    gx, gw, gb = run_chunks(xs, w, b, row_pass, chunk=1, bounds=bounds, need_gx=need[0],
                            need_gw=need[1], need_gb=need[2])
    if need[0]:
        if order is not None:
            gx = torch.zeros(S * T, H, dtype=x.dtype, device=x.device).index_copy_(0, order, gx)
        gx = gx.reshape(S, T, H)
    with torch.no_grad():  # the value, from the whole batch (the shares only serve gradients)
        loss = loss_fn(0, logp_all, ent_all)
    return loss, logp_all, ent_all, gx, gw, gb


def _two_pass(x, xs, ts, order, w, b, loss_fn, *, chunk, backend, need, want_entropy, **opts):
    """fused_sequence_loss when whole sequences do not fit the budget (see there)."""
    S, T, H = x.shape
    acc = acc_dtype(x.dtype)
    n = xs.shape[0]
    vec = lambda: torch.zeros(n, dtype=acc, device=x.device)
    lp, lse, mu = vec(), vec(), vec()
    ent = vec() if want_entropy else None
    pick = lambda v, s, e: None if v is None else v[s:e]

    def stats(z, s, e):
        LOGPROB_STATS[backend](z, ts[s:e], lp[s:e], pick(ent, s, e), lse[s:e], mu[s:e], **opts)

    run_chunks(xs, w, b, stats, chunk=chunk)
    rows = torch.arange(n, device=x.device) if order is None else order
    where = (rows // T, rows % T)
    def loss_and_grads():
        leaves = [v.detach().requires_grad_(any(need)) for v in (lp, ent) if v is not None]
        dense = [torch.zeros(S, T, dtype=acc, device=x.device).index_put(where, v) for v in leaves]
        loss = loss_fn(0, dense[0], dense[1] if ent is not None else None)
        return loss, dense, list(torch.autograd.grad(loss, leaves, allow_unused=True)) if any(need) else []

    loss, dense, g = _with_autograd(loss_and_grads, x.device) if any(need) else loss_and_grads()
    logp_all = dense[0].detach()
    ent_all = dense[1].detach() if ent is not None else None
    if not any(need):
        return loss.detach(), logp_all, ent_all, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    g_lp = g[0]
    g_ent = g[1] if ent is not None and len(g) > 1 else None

    def grad(z, s, e):
        LOGPROB_GRAD[backend](z, ts[s:e], lse[s:e], mu[s:e], pick(g_lp, s, e), pick(g_ent, s, e), **opts)

    gx, gw, gb = run_chunks(xs, w, b, grad, chunk=chunk, need_gx=need[0], need_gw=need[1], need_gb=need[2])
    if need[0]:
        if order is not None:
            gx = torch.zeros(S * T, H, dtype=x.dtype, device=x.device).index_copy_(0, order, gx)
        gx = gx.reshape(S, T, H)
    return loss.detach(), logp_all, ent_all, gx, gw, gb


def _no_fp16(op, name, hidden):
    # The per-token loss gradients (of size 1/N) would underflow once written into fp16 logits;
    # refuse rather than return a quietly wrong gradient.
    if hidden.dtype == torch.float16:
        raise TypeError(f"{op}: '{name}' is float16, whose logit gradients underflow in this fused "
                        "loss; use bfloat16 (same speed, fp32's range) or float32")


class _StoredGradients:
    """Autograd for ops whose forward already computed d(loss)/d(input, weight, bias): the first
    backward scales them in place by grad_output; another backward through the same graph
    (retain_graph) reruns the forward for fresh ones."""

    @staticmethod
    def setup_context(ctx, inputs, output, rerun):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.stored = output[-3:]
        ctx.inputs = inputs
        ctx.rerun = rerun

    @staticmethod
    def backward(ctx, grad_loss, n_inputs, slots):
        """``slots``: positions of (input, weight, bias) among the op's inputs."""
        out = [None] * n_inputs
        if grad_loss is None:
            return tuple(out)
        stored, ctx.stored = ctx.stored, None
        if stored is None:
            stored = ctx.rerun(*ctx.inputs)[-3:]
        for slot, g in zip(slots, stored):
            if ctx.needs_input_grad[slot]:
                out[slot] = g.mul_(grad_loss.to(g.dtype))
        return tuple(out)
