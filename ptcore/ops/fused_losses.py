"""RL losses straight from hidden states: the [N, V] logits never exist, and the work is 6NHV.

Per chunk of rows: the logits GEMM, the stats pass (log-probs, entropy), the loss of the chunk's
tokens -- their share of the batch loss, with the batch's global normalizer -- and, by autograd on
those few numbers, the per-token gradients; then the gradient pass over the same logits and the two
gradient GEMMs. Losses made of per-token terms chunk anywhere; GSPO's sequence ratio and DPO's
sequence sums need whole sequences (pairs) in a chunk. The gradients are thus known in the forward;
the backward scales them by grad_output (as the fused cross-entropy does). The loss algebra is that
of policy.py and preference.py, so fused and unfused agree by construction.
"""
import ast
import concurrent.futures
import contextlib
import os
from typing import Optional

import torch

from ptcore.ops import checks
from ptcore.ops.lm_head_chunks import acc_dtype, empty_head_grads, head_plan, run_chunks
from ptcore.ops.policy import PolicyLossOutput, default_normalizer, policy_loss
from ptcore.ops.preference import LENGTH_NORMALIZED, PreferenceLossOutput, dpo_loss
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


# ---- policy-gradient family ----

@torch.library.custom_op("ptcore::linear_policy_loss", mutates_args=())
def _policy_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
               old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               bias: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
               sampling_logps: Optional[torch.Tensor], normalizer: torch.Tensor, temperature: float,
               softcap: float, ignore_index: int, options: str, backend: str, chunk: int,
               need_gx: bool, need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp [B, T], entropy [B, T], grad_hidden, grad_weight, grad_bias). ``options``: the
    scalar options of :func:`policy_loss` in one string (``_encode_options``), one schema argument
    instead of one per option, None staying None."""
    B, T = target.shape
    m = mask if mask.dtype == torch.bool else mask != 0
    t = torch.where(m, target, torch.full_like(target, ignore_index))  # outside the mask: ignored
    checks.targets_in_range("linear_policy_loss", t, weight.shape[0], ignore_index)
    opts = _decode_options(options)

    def loss_fn(first, logp, entropy):
        sel = lambda v: None if v is None else v[first:first + logp.shape[0]]
        return policy_loss(logp, sel(old_logps), sel(advantages), sel(m), ref_logps=sel(ref_logps),
                           sampling_logps=sel(sampling_logps), normalizer=normalizer,
                           entropy=entropy, **opts).loss

    loss_type, level = opts["loss_type"], opts["importance_sampling_level"]
    # A sequence-level ratio ties a sequence's tokens together, and so do OPSM's mean of the
    # current log-probs, VESPO's sequence weight and GMPO's geometric mean; the entropy quantile
    # and the entropy bonus's mean need the whole batch (two passes once it exceeds the budget).
    batch = opts["top_entropy_quantile"] < 1 or opts["entropy_coef"] != 0
    whole = (loss_type in ("gspo", "vespo", "gmpo") or (level == "sequence" and loss_type != "pg")
             or opts["off_policy_threshold"] is not None)
    seqs = B if batch else (max(1, chunk // T) if whole else None)
    loss, logp, ent, gx, gw, gb = fused_sequence_loss(
        hidden, weight, bias, t, loss_fn, seqs_per_chunk=seqs,
        chunk=chunk, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        backend=backend, need=(need_gx, need_gw, need_gb), want_entropy=True)
    return loss, logp, ent, gx, gw, gb


@_policy_op.register_fake
def _(hidden, weight, target, old_logps, advantages, mask, bias, ref_logps, sampling_logps, normalizer, *args):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(target.shape, dtype=acc),
            hidden.new_empty(target.shape, dtype=acc), *empty_head_grads(hidden, weight, *args[-3:]))


_policy_op.register_autograd(
    lambda ctx, g, *_: _StoredGradients.backward(ctx, g, 19, (0, 1, 6)),
    setup_context=lambda ctx, inputs, output: _StoredGradients.setup_context(ctx, inputs, output, _policy_op))


def _encode_options(**opts) -> str:
    """The validated scalar options (finite numbers, None, bools, strings) as ``k=repr(v);...``:
    an f-string, which torch.compile traces as a constant (json.dumps it cannot). Numbers become
    floats, so a 0-d tensor or an int reaches the op as the same number."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (str, bool)) else float(v)

    return ";".join(f"{k}={plain(v)!r}" for k, v in sorted(opts.items()))


def _decode_options(text: str) -> dict:
    opts = {}
    for item in text.split(";"):
        k, v = item.split("=", 1)
        opts[k] = ast.literal_eval(v)
    opts["rollout_clip"] = tuple(opts["rollout_clip"])
    return opts


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                       old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, softcap: Optional[float] = None,
                       ignore_index: int = -100, beta: float = 0.0, kl_estimator: str = "k3",
                       epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                       dual_clip: Optional[float] = None, importance_sampling_level: str = "token",
                       loss_type: str = "dapo", normalizer=None,
                       cispo_max: Optional[float] = None,
                       sampling_logps: Optional[torch.Tensor] = None,
                       rollout_correction: Optional[str] = None, rollout_clip=(None, 3.0),
                       off_policy_threshold: Optional[float] = None, delta: Optional[float] = None,
                       sapo_temperature_pos: Optional[float] = None,
                       sapo_temperature_neg: Optional[float] = None,
                       vespo_k_pos: Optional[float] = None, vespo_lambda_pos: Optional[float] = None,
                       vespo_k_neg: Optional[float] = None, vespo_lambda_neg: Optional[float] = None,
                       top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
                       bias_correction_kl: bool = False) -> PolicyLossOutput:
    """GRPO / PPO-family loss (:func:`ptcore.ops.policy_loss`) computed from the last hidden states:
    ``logps`` are ``log softmax(softcap(hidden @ weight.T + bias) / temperature)[target]`` over the
    completion tokens (``mask``), fused so that the logits never exist.

    Args:
        hidden: ``[B, T, H]``; weight ``[V, H]``; target ``[B, T]`` next-token ids (ignored where
            ``mask`` is 0); old_logps, mask, ref_logps: ``[B, T]``; advantages ``[B]`` or ``[B, T]``.
        The other options are :func:`policy_loss`'s (``sampling_logps`` ``[B, T]``,
        ``rollout_correction``, ``rollout_clip``, ``off_policy_threshold`` included: the rollout
        correction; and the newer families: sapo, luspo, vespo, gmpo, ``delta``,
        ``top_entropy_quantile``, ``entropy_coef``, ``bias_correction_kl``); the entropy the two
        entropy options use is the per-token entropy of the same tempered distribution, computed
        in the same pass (its gradient included). ``normalizer`` defaults to this batch's.
        ``top_entropy_quantile < 1`` or ``entropy_coef != 0`` make the loss depend on the whole
        batch at once: two passes over the logits (8NHV) once the batch exceeds the chunk budget.

    Returns ``PolicyLossOutput(loss, metrics)``; metrics add ``entropy`` (at no extra pass).

    Example:
        >>> h = torch.randn(2, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (2, 6)); mask = torch.zeros(2, 6); mask[:, 3:] = 1
        >>> out = linear_policy_loss(h, W, y, torch.zeros(2, 6) - 4, torch.tensor([1.0, -1.0]), mask)
        >>> out.loss.backward()
    """
    op = "linear_policy_loss"
    checks.tensor(op, "hidden", hidden, ndim=3)
    _no_fp16(op, "hidden", hidden)
    cap = checks.lm_head(op, hidden, weight, target, bias, ignore_index, softcap, names=("hidden", "target"))
    temp = checks.number(op, "temperature", temperature, low=0.0, low_open=True)
    for name, value in (("mask", mask), ("old_logps", old_logps), ("ref_logps", ref_logps),
                        ("sampling_logps", sampling_logps)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != target.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{op}: '{name}' must have the shape of 'target' {tuple(target.shape)}, got {got}")
    checks.tensor(op, "old_logps", old_logps, ndim=2, dtypes=checks.FLOAT_DTYPES)  # before the
    # stand-in below, which would call it 'logps'
    checks.tensor(op, "advantages", advantages)
    checks.real(op, "advantages", advantages)
    checks.real(op, "mask", mask, allow_bool=True)
    checks.same_device(op, "hidden", hidden, mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                       advantages=advantages, sampling_logps=sampling_logps)
    options = dict(beta=beta, kl_estimator=kl_estimator, epsilon_low=epsilon_low,
                   epsilon_high=epsilon_high, dual_clip=dual_clip,
                   importance_sampling_level=importance_sampling_level, loss_type=loss_type,
                   cispo_max=cispo_max, rollout_correction=rollout_correction,
                   rollout_clip=rollout_clip, off_policy_threshold=off_policy_threshold, delta=delta,
                   sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                   vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                   vespo_lambda_neg=vespo_lambda_neg, top_entropy_quantile=top_entropy_quantile,
                   entropy_coef=entropy_coef, bias_correction_kl=bias_correction_kl)
    # policy_loss validates the options and the advantages on a stand-in batch (the entropy is
    # the op's own, so a stand-in for it too).
    with checks.as_op(op, "policy_loss"):
        stand_in = old_logps.detach()
        policy_loss(stand_in, old_logps, advantages, mask, ref_logps=ref_logps, normalizer=normalizer,
                    sampling_logps=sampling_logps, entropy=torch.zeros_like(stand_in), **options)
    if normalizer is None:
        normalizer = default_normalizer(loss_type, mask)
    acc = acc_dtype(hidden.dtype)
    norm = torch.as_tensor(normalizer, dtype=acc, device=hidden.device).reshape(())
    backend, chunk = head_plan(hidden, weight, op)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (hidden, weight, bias)]
    loss, logp, ent, *_ = _policy_op(
        hidden, weight, target, old_logps, advantages, mask, bias, ref_logps, sampling_logps, norm,
        temp, cap, ignore_index, _encode_options(**options), backend,
        chunk, *need)
    metrics = policy_loss(logp, old_logps, advantages, mask, ref_logps=ref_logps, normalizer=norm,
                          entropy=ent, sampling_logps=sampling_logps, **options).metrics
    return PolicyLossOutput(loss, metrics)


# ---- preference (DPO) family ----

@torch.library.custom_op("ptcore::linear_dpo_loss", mutates_args=())
def _dpo_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
            bias: Optional[torch.Tensor], ref_chosen_logps: Optional[torch.Tensor],
            ref_rejected_logps: Optional[torch.Tensor], beta: float, loss_types: str,
            loss_weights: list[float], label_smoothing: float, gamma: float, orpo_lambda: float,
            temperature: float, softcap: float, ignore_index: int, backend: str, chunk: int,
            need_gx: bool, need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """hidden ``[2B, T, H]`` (pair p: chosen at 2p, rejected at 2p + 1, so a pair's rows are
    contiguous); loss_types comma-separated (the schema has no
    list of strings). Returns (loss, sequence log-probs [2B], grad_hidden, grad_weight, grad_bias)."""
    S, T = target.shape
    B = S // 2
    checks.targets_in_range("linear_dpo_loss", target, weight.shape[0], ignore_index)
    types = loss_types.split(",")
    # Completion lengths, for the length-normalized types only (others accept empty completions).
    lengths = (target != ignore_index).sum(-1) if set(types) & set(LENGTH_NORMALIZED) else None
    opts = dict(beta=beta, loss_type=types, loss_weights=list(loss_weights),
                label_smoothing=label_smoothing, gamma=gamma, orpo_lambda=orpo_lambda)

    def loss_fn(first, logp, entropy):
        p0, k = first // 2, logp.shape[0] // 2
        sel = lambda v: None if v is None else v[p0:p0 + k]
        seq = logp.sum(-1)
        out = dpo_loss(seq[0::2], seq[1::2], sel(ref_chosen_logps), sel(ref_rejected_logps),
                       chosen_lengths=None if lengths is None else lengths[2 * p0:2 * (p0 + k):2],
                       rejected_lengths=None if lengths is None else lengths[2 * p0 + 1:2 * (p0 + k):2],
                       **opts)
        return out.loss * (k / max(B, 1))  # these pairs' share of the mean over pairs (0 pairs: 0)

    loss, logp, _, gx, gw, gb = fused_sequence_loss(
        hidden, weight, bias, target, loss_fn, seqs_per_chunk=2 * max(1, chunk // (2 * T)),
        chunk=chunk, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        backend=backend, need=(need_gx, need_gw, need_gb), want_entropy=False)
    return loss, logp.sum(-1), gx, gw, gb


@_dpo_op.register_fake
def _(hidden, weight, target, *args):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(target.shape[0], dtype=acc),
            *empty_head_grads(hidden, weight, *args[-3:]))


_dpo_op.register_autograd(
    lambda ctx, g, *_: _StoredGradients.backward(ctx, g, 20, (0, 1, 3)),
    setup_context=lambda ctx, inputs, output: _StoredGradients.setup_context(ctx, inputs, output, _dpo_op))


def linear_dpo_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                    chosen_target: torch.Tensor, rejected_target: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None,
                    ref_rejected_logps: Optional[torch.Tensor] = None, *,
                    bias: Optional[torch.Tensor] = None, beta: float = 0.1, loss_type="sigmoid",
                    label_smoothing: float = 0.0, gamma: float = 0.5, orpo_lambda: float = 1.0,
                    loss_weights=None, temperature: float = 1.0, softcap: Optional[float] = None,
                    ignore_index: int = -100) -> PreferenceLossOutput:
    """DPO-family loss (:func:`ptcore.ops.dpo_loss`) from the last hidden states of the chosen and
    rejected sequences; their sequence log-probs are the sums of the token log-probs over the
    targets that are not ``ignore_index`` (the completions), and the logits never exist.

    Args:
        chosen_hidden, rejected_hidden: ``[B, T, H]`` (T may differ between the two);
        chosen_target, rejected_target: ``[B, T]`` with ``ignore_index`` outside the completions;
        ref_*_logps: ``[B]`` sequence log-probs of the reference (not needed for simpo / orpo).
        The other options are :func:`dpo_loss`'s (lengths are the completion token counts).

    Example:
        >>> hc, hr = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
        >>> W = torch.randn(40, 16); yc, yr = torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 5))
        >>> out = linear_dpo_loss(hc, hr, W, yc, yr, torch.zeros(2) - 20, torch.zeros(2) - 20)
        >>> out.loss.backward()
    """
    op = "linear_dpo_loss"
    checks.tensor(op, "chosen_hidden", chosen_hidden, ndim=3)
    _no_fp16(op, "chosen_hidden", chosen_hidden)
    checks.tensor(op, "rejected_hidden", rejected_hidden, ndim=3)
    if rejected_hidden.shape[0] != chosen_hidden.shape[0]:
        raise ValueError(f"{op}: 'rejected_hidden' has {rejected_hidden.shape[0]} sequences but "
                         f"'chosen_hidden' has {chosen_hidden.shape[0]}")
    cap = checks.lm_head(op, chosen_hidden, weight, chosen_target, bias, ignore_index, softcap,
                         names=("chosen_hidden", "chosen_target"))
    checks.lm_head(op, rejected_hidden, weight, rejected_target, bias, ignore_index, softcap,
                   names=("rejected_hidden", "rejected_target"))
    checks.same_device(op, "chosen_hidden", chosen_hidden, rejected_hidden=rejected_hidden,
                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    temp = checks.number(op, "temperature", temperature, low=0.0, low_open=True)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(v) for v in loss_weights]
    B = chosen_hidden.shape[0]
    # dpo_loss validates the options and the reference shapes on a stand-in batch.
    stand_in = chosen_hidden.new_zeros(B, dtype=acc_dtype(chosen_hidden.dtype))
    ones = torch.ones(B, dtype=torch.long, device=chosen_hidden.device)
    with checks.as_op(op, "dpo_loss"):
        dpo_loss(stand_in, stand_in, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                 label_smoothing=label_smoothing, chosen_lengths=ones, rejected_lengths=ones, gamma=gamma,
                 orpo_lambda=orpo_lambda, loss_weights=loss_weights)
    T = max(chosen_hidden.shape[1], rejected_hidden.shape[1])
    pad = lambda h, fill: torch.nn.functional.pad(h, (0, 0, 0, T - h.shape[1]) if h.dim() == 3 else (0, T - h.shape[1]), value=fill)
    interleave = lambda c, r: torch.stack([c, r], dim=1).reshape(2 * B, *c.shape[1:])
    hidden = interleave(pad(chosen_hidden, 0.0), pad(rejected_hidden, 0.0))
    target = interleave(pad(chosen_target, ignore_index), pad(rejected_target, ignore_index))
    backend, chunk = head_plan(hidden, weight, op)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (hidden, weight, bias)]
    loss, seq_logps, *_ = _dpo_op(hidden, weight, target, bias, ref_chosen_logps, ref_rejected_logps,
                                  float(beta), ",".join(types), weights, float(label_smoothing), float(gamma),
                                  float(orpo_lambda), temp, cap, ignore_index, backend, chunk, *need)
    lengths = (target != ignore_index).sum(-1) if set(types) & set(LENGTH_NORMALIZED) else None
    full = dpo_loss(seq_logps[0::2], seq_logps[1::2], ref_chosen_logps, ref_rejected_logps, beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing,
                    chosen_lengths=None if lengths is None else lengths[0::2],
                    rejected_lengths=None if lengths is None else lengths[1::2], gamma=gamma,
                    orpo_lambda=orpo_lambda, loss_weights=loss_weights)
    return PreferenceLossOutput(loss, full.chosen_rewards, full.rejected_rewards, full.metrics)
