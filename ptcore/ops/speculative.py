"""Lossless verification of speculative drafts (math: docs/ttc.md §2).

:func:`speculative_verify` checks a chain of K draft tokens per sequence against the target's
distributions in one call; :func:`speculative_verify_tree` checks a token tree (several candidates
per position, given as parent indices) with recursive rejection over siblings.

The rule, identical on every backend:

* position k (k < L, the sequence's draft length) with draft token x: accept iff
  ``u[b, k] * q_k(x) < p_k(x)`` in float64 (u uniform in [0, 1); ``q = 1`` for deterministic
  drafts), i.e. with probability ``min(1, p/q)``; stop at the first rejection;
* at the stop position j: the residual ``w = max(0, p_j - q_j)`` after a rejection (``q_j`` is the
  one-hot of x for deterministic drafts, so ``w`` is ``p_j`` with x zeroed), or ``w = p_j`` for the
  bonus when all L drafts were accepted. The token is drawn by the exponential race
  ``argmax_i w_i / E[b, i]`` (E ~ Exp(1), float64, lowest index on ties), which samples ``i`` with
  probability ``w_i / sum(w)`` without normalizing. If rounding left ``w`` all zero (p == q), the
  race runs on ``p_j``.
* greedy: accept while x equals ``argmax p_k`` (lowest index on ties), then emit the argmax at
  the stop position.

The uniforms and exponentials are drawn here, in Python, from ``generator`` (or the device's
default generator) as float64 tensors (u first, then E) and handed to the backend, so every backend
emits the same tokens for the same generator state, and nothing waits on the device: on CUDA the op
never synchronizes with the host (value checks are off there by default; see ``validate``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ptcore import _ext
from ptcore.ops import checks
from ptcore.ops.dispatch import resolve

OP = "speculative_verify"
OP_TREE = "speculative_verify_tree"
# Rows of probabilities may be off 1 by rounding (bf16 softmax: ~V * 2^-9 relative at worst per
# element, but errors mostly cancel); anything further is not a distribution (e.g. logits).
SUM_TOLERANCE = 1e-2

Lengths = Union[torch.Tensor, Sequence[int], None]


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_probs(op, name, probs, lens, extra, validate):
    """NaN / negative entries and row sums, on the rows the verification may read: row r of
    sequence b when ``r < lens[b] + extra`` (every row when ``lens`` is None). One C++ pass on CPU
    tensors (the torch fallback elsewhere or without the compiled module)."""
    if not validate or probs.numel() == 0:
        return
    B, R, V = probs.shape
    mod = _ext.cpu_module() if probs.device.type == "cpu" else None
    if mod is not None and probs.stride(-1) == 1:
        lens_c = None if lens is None else lens.contiguous()
        b, r, kind, total = mod.speculative_check_probs(
            str(probs.dtype).removeprefix("torch."), B, R, V, probs.data_ptr(), probs.stride(0), probs.stride(1),
            0 if lens_c is None else lens_c.data_ptr(), extra, SUM_TOLERANCE)
    else:
        rows = torch.arange(R, device=probs.device)
        used = torch.ones(B, R, dtype=torch.bool, device=probs.device) if lens is None else rows < lens.unsqueeze(1) + extra
        sel = probs[used]
        nan, neg = sel.isnan().any(-1), (sel < 0).any(-1)
        sums = sel.sum(-1, dtype=torch.float64)
        kinds = torch.where(nan, 1, torch.where(neg, 2, torch.where((sums - 1).abs() > SUM_TOLERANCE, 3, 0)))
        bad = kinds.nonzero()
        b = r = -1
        kind, total = 0, 0.0
        if bad.numel():
            i = int(bad[0, 0])
            b, r = used.nonzero()[i].tolist()
            kind, total = int(kinds[i]), float(sums[i])
    if kind in (1, 2):
        raise ValueError(f"{op}: '{name}' has {'NaN' if kind == 1 else 'negative'} entries in row [{b}, {r}]; "
                         "probabilities must be finite and >= 0")
    if kind == 3:
        raise ValueError(f"{op}: '{name}' row [{b}, {r}] sums to {total:.6g}, not 1; pass probabilities "
                         "(softmax of the logits after temperature / top-k / top-p), not logits")


def _lengths(op, draft_lens: Lengths, B: int, K: int, device, validate: bool) -> torch.Tensor:
    if draft_lens is None:
        return torch.full((B,), K, dtype=torch.int64, device=device)
    if not isinstance(draft_lens, torch.Tensor):
        try:
            draft_lens = list(draft_lens)
            for i, v in enumerate(draft_lens):  # torch.tensor would truncate 1.5 to 1
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"'draft_lens'[{i}] is {v!r}, not an int")
            draft_lens = torch.tensor(draft_lens, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{op}: 'draft_lens' must be an int64 tensor or a sequence of ints ({e})") from None
    if draft_lens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: 'draft_lens' must have an integer dtype (int64), got {draft_lens.dtype}")
    if draft_lens.shape != (B,):
        raise ValueError(f"{op}: 'draft_lens' must have shape ({B},), got {tuple(draft_lens.shape)}")
    if draft_lens.device.type == "cpu" and draft_lens.numel():
        lo, hi = int(draft_lens.min()), int(draft_lens.max())
        if lo < 0 or hi > K:
            raise ValueError(f"{op}: 'draft_lens' must lie in [0, K={K}], got values in [{lo}, {hi}]")
    elif validate and draft_lens.numel():
        if bool(((draft_lens < 0) | (draft_lens > K)).any()):
            raise ValueError(f"{op}: 'draft_lens' must lie in [0, K={K}]")
    return draft_lens.to(device=device, dtype=torch.int64).contiguous()


def _tokens_in_range(op, name, tokens, used, V, validate):
    if not validate or tokens.numel() == 0:
        return
    bad = used & ((tokens < 0) | (tokens >= V))
    if bool(bad.any()):
        b, k = bad.nonzero()[0].tolist()
        raise ValueError(f"{op}: '{name}' holds {int(tokens[b, k])} at [{b}, {k}], outside the "
                         f"vocabulary [0, {V})")


def _check_common(op, tokens, draft_probs, target_probs, rows):
    """Types, dtypes and devices shared by both ops; ``rows``: the expected draft-prob rows."""
    checks.tensor(op, "target_probs", target_probs, ndim=3, dtypes=checks.FLOAT_DTYPES)
    checks.tensor(op, "draft_tokens" if op == OP else "tree_tokens", tokens, ndim=2,
                  dtypes=(torch.int64, torch.int32))
    checks.same_device(op, "target_probs", target_probs, draft_probs=draft_probs,
                       **{"draft_tokens" if op == OP else "tree_tokens": tokens})
    B, V = target_probs.shape[0], target_probs.shape[2]
    if V == 0:
        raise ValueError(f"{op}: 'target_probs' has an empty vocabulary (V = 0)")
    if draft_probs is not None:
        checks.tensor(op, "draft_probs", draft_probs, ndim=3, dtypes=checks.FLOAT_DTYPES)
        if draft_probs.dtype != target_probs.dtype:
            raise TypeError(f"{op}: 'draft_probs' has dtype {draft_probs.dtype} but 'target_probs' has "
                            f"{target_probs.dtype}; cast one")
        if draft_probs.shape != (B, rows, V):
            raise ValueError(f"{op}: 'draft_probs' must have shape {(B, rows, V)} to match "
                             f"'target_probs' {tuple(target_probs.shape)}, got {tuple(draft_probs.shape)}")
    return B, V


def _unit_stride(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _draw(B, K, V, device, generator, greedy):
    """float64 uniforms u [B, K] and exponentials E [B, V], in this order, from ``generator``."""
    if greedy:
        return None, None
    u = torch.rand((B, K), dtype=torch.float64, device=device, generator=generator)
    e = torch.empty((B, V), dtype=torch.float64, device=device).exponential_(generator=generator)
    return u, e


# ---------------------------------------------------------------------------------------------
# Backends. Contract: tokens [B, K] int64, lens [B] int64, u [B, K] / e [B, V] float64 (None when
# greedy), all contiguous; probs with unit stride over V; outputs num_acc [B] and emitted [B, K+1]
# int64, contiguous, fully written.


def verify_torch(tokens, lens, draft_probs, target_probs, u, e, greedy, num_acc, emitted):
    """Reference implementation in plain PyTorch (float64 for the acceptance test and the race)."""
    B, K = tokens.shape
    V = target_probs.shape[-1]
    dev = tokens.device
    k_idx = torch.arange(K, device=dev)
    in_range = (tokens >= 0) & (tokens < V)
    safe = torch.where(in_range, tokens, 0)
    p_rows = target_probs[:, :K]
    if greedy:
        accept = p_rows.argmax(dim=-1) == tokens
    else:
        p_x = p_rows.gather(2, safe.unsqueeze(2)).squeeze(2).double()
        q_x = (draft_probs.gather(2, safe.unsqueeze(2)).squeeze(2).double() if draft_probs is not None
               else torch.ones_like(p_x))
        accept = u * q_x < p_x
    accept = accept & in_range & (k_idx < lens.unsqueeze(1))
    n = accept.long().cumprod(dim=1).sum(dim=1)  # accepted prefix length
    rows = torch.arange(B, device=dev)
    p = target_probs[rows, n]  # [B, V] the stop position's distribution
    if greedy:
        tok = p.argmax(dim=-1)
    else:
        p = p.double()
        rejected = n < lens
        n_c = n.clamp(max=max(K - 1, 0))
        if draft_probs is not None:
            q = draft_probs[rows, n_c].double() if K else torch.zeros_like(p)
        else:
            q = torch.zeros_like(p)
            if K:  # one-hot of the rejected draft (scatter, not boolean indexing: no host sync)
                x = tokens[rows, n_c]
                ok = (x >= 0) & (x < V)
                q.scatter_(1, x.clamp(0, V - 1).unsqueeze(1), ok.to(q.dtype).unsqueeze(1))
        q = torch.where(rejected.unsqueeze(1), q, 0.0)
        w = p - q
        w = torch.where(w > 0, w, 0.0)  # NaN -> 0 as in the kernels
        use_p = ~(w > 0).any(dim=1, keepdim=True)
        w = torch.where(use_p, torch.where(p > 0, p, 0.0), w)
        score = torch.where(w > 0, w / e, 0.0)
        tok = score.argmax(dim=1)
    out = torch.where(k_idx < n.unsqueeze(1), tokens, -1)
    emitted[:, :K].copy_(out)
    emitted[:, K] = -1
    emitted.scatter_(1, n.unsqueeze(1), tok.unsqueeze(1))
    num_acc.copy_(n)


def _native(module_fn):
    def run(tokens, lens, draft_probs, target_probs, u, e, greedy, num_acc, emitted):
        B, K = tokens.shape
        V = target_probs.shape[-1]
        dp = draft_probs
        cuda = target_probs.is_cuda
        stream = torch.cuda.current_stream(target_probs.device).cuda_stream if cuda else 0
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        args = (str(target_probs.dtype).removeprefix("torch."), B, K, V, tokens.data_ptr(), lens.data_ptr(),
                ptr(dp), 0 if dp is None else dp.stride(0), 0 if dp is None else dp.stride(1),
                target_probs.data_ptr(), target_probs.stride(0), target_probs.stride(1),
                ptr(u), ptr(e), greedy, num_acc.data_ptr(), emitted.data_ptr(), stream)
        if cuda:
            with torch.cuda.device(target_probs.device):
                module_fn().speculative_verify(*args)
        else:
            module_fn().speculative_verify(*args)
    return run


def verify_triton(tokens, lens, draft_probs, target_probs, u, e, greedy, num_acc, emitted):
    _ext.triton_kernels().speculative_verify(tokens, lens, draft_probs, target_probs, u, e, greedy,
                                             num_acc, emitted)


VERIFY = {"torch": verify_torch, "cpu": _native(_ext.cpu_module), "cuda": _native(_ext.cuda_module),
          "triton": verify_triton}


# ---------------------------------------------------------------------------------------------
# Public ops


def speculative_verify(draft_tokens: torch.Tensor, draft_probs: Optional[torch.Tensor],
                       target_probs: torch.Tensor, *, draft_lens: Lengths = None, greedy: bool = False,
                       generator: Optional[torch.Generator] = None, validate: Optional[bool] = None):
    """Verifies K draft tokens per sequence against the target model, losslessly.

    Args:
        draft_tokens: ``[B, K]`` int64, the drafted tokens (entries past ``draft_lens`` are ignored,
            e.g. -1 padding).
        draft_probs: ``[B, K, V]`` the draft distributions the tokens were sampled from (after the
            draft's temperature / top-k / top-p), or ``None`` for deterministic drafts (n-gram,
            prompt lookup, the draft model's argmax): ``q(x) = 1``.
        target_probs: ``[B, K+1, V]`` the target's distributions at each draft position, after the
            target's sampling transforms; row ``L`` (the draft length) gives the bonus token.
        draft_lens: ``[B]`` draft lengths in ``[0, K]`` for ragged batches (default: all K).
        greedy: accept while the draft equals the target's argmax, then emit the argmax
            (the probabilities' values only matter through their argmax; no randomness is drawn).
        generator: a ``torch.Generator`` on the probabilities' device (default: the device's).
        validate: check values (NaN / negative probabilities, rows not summing to 1, draft tokens
            outside ``[0, V)``, lengths outside ``[0, K]``). Default: on CPU tensors; off on CUDA,
            where it would synchronize with the host (the kernels then reject out-of-range drafts
            and still emit only ids in ``[0, V)``).

    Returns:
        ``(num_accepted, emitted)``: ``num_accepted`` ``[B]`` int64, the accepted drafts per
        sequence; ``emitted`` ``[B, K+1]`` int64, the ``num_accepted + 1`` tokens to append (the
        accepted drafts, then the correction or bonus token), padded with -1.
    """
    if not isinstance(greedy, bool):
        raise TypeError(f"{OP}: 'greedy' must be a bool, got {type(greedy).__name__}")
    B, V = _check_common(OP, draft_tokens, draft_probs, target_probs, target_probs.shape[1] - 1)
    K = draft_tokens.shape[1]
    if draft_tokens.shape[0] != B or target_probs.shape[1] != K + 1:
        raise ValueError(f"{OP}: 'target_probs' must have shape (B, K+1, V) = ({draft_tokens.shape[0]}, "
                         f"{K + 1}, V) for 'draft_tokens' of shape {tuple(draft_tokens.shape)}, got "
                         f"{tuple(target_probs.shape)}")
    device = target_probs.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{OP}: 'generator' is on {generator.device} but 'target_probs' is on {device}")
    validate = device.type == "cpu" if validate is None else checks.flag(OP, "validate", validate)
    lens = _lengths(OP, draft_lens, B, K, device, validate)
    tokens = draft_tokens.to(torch.int64).contiguous()
    if validate:
        _tokens_in_range(OP, "draft_tokens", tokens, torch.arange(K, device=device) < lens.unsqueeze(1), V, True)
        _check_probs(OP, "target_probs", target_probs, lens, 1, True)
        if draft_probs is not None and not greedy:
            _check_probs(OP, "draft_probs", draft_probs, lens, 0, True)
    num_acc = torch.empty(B, dtype=torch.int64, device=device)
    emitted = torch.empty(B, K + 1, dtype=torch.int64, device=device)
    if B == 0:
        return num_acc, emitted
    u, e = _draw(B, K, V, device, generator, greedy)
    backend = resolve(device, target_probs.dtype, op=OP)
    VERIFY[backend](tokens, lens, None if greedy else _unit_stride(draft_probs), _unit_stride(target_probs),
                    u, e, greedy, num_acc, emitted)
    return num_acc, emitted


# ---------------------------------------------------------------------------------------------
# Token trees: recursive rejection over siblings (docs/ttc.md §2). Backends: the torch reference
# and cpu. Contract: tokens [B, N] int64, parents [B, N] int64 (parents[b, i] in [-1, i)), u [B, N]
# and e [B, V] float64 (None when greedy); probs [B, N+1, V] with unit stride over V (row 0: the
# root's distribution, row i+1: the distribution after node i); outputs num_acc [B],
# emitted [B, N+1] and path [B, N] (accepted node indices) int64, fully written.


def verify_tree_torch(tokens, parents, draft_probs, target_probs, u, e, greedy, num_acc, emitted, path):
    """Reference: one sequence and one tree level at a time, in float64.

    At a node, its children (in index order) are tried in turn against the current residual ``w``
    (unnormalized, total ``S``; the node's own row counts as normalized, S = 1): accept child x iff
    ``w[x] > 0`` and ``u * q(x) * S < w[x]``; on rejection ``w <- max(0, w - S q)`` and ``S = sum w``
    (a sampled draft), or ``w[x] <- 0`` and ``S -= w[x]`` (a deterministic one). On a chain this is
    exactly :func:`verify_torch`'s rule. If no child is accepted (or there are none), the stop token
    is the race over ``w`` (over ``max(0, p)`` when ``w`` is all zero), or the row's argmax if greedy.
    """
    B, N = tokens.shape
    V = target_probs.shape[-1]
    emitted.fill_(-1)
    path.fill_(-1)
    tok_l, par_l = tokens.tolist(), parents.tolist()
    for b in range(B):
        children = [[] for _ in range(N + 1)]  # children[node + 1]
        for i, par in enumerate(par_l[b]):
            children[par + 1].append(i)
        node, depth = -1, 0
        while True:
            row = node + 1
            p = target_probs[b, row]
            w = p.double().clone()
            s = 1.0
            accepted = None
            for c in children[node + 1]:
                x = tok_l[b][c]
                if not 0 <= x < V:
                    continue
                if greedy:
                    if int(p.argmax()) == x:
                        accepted = c
                        break
                    continue
                qx = float(draft_probs[b, row, x]) if draft_probs is not None else 1.0
                wx = float(w[x])
                if wx > 0 and float(u[b, c]) * qx * s < wx:
                    accepted = c
                    break
                if draft_probs is not None:
                    w = w - s * draft_probs[b, row].double()
                    w = torch.where(w > 0, w, 0.0)
                    s = float(w.sum())
                else:
                    s = s - wx
                    w[x] = 0.0
            if accepted is None:
                break
            emitted[b, depth] = tok_l[b][accepted]
            path[b, depth] = accepted
            node, depth = accepted, depth + 1
        if greedy:
            tok = int(p.argmax())
        else:
            if not bool((w > 0).any()):
                w = p.double()
                w = torch.where(w > 0, w, 0.0)
            tok = int(torch.where(w > 0, w / e[b], 0.0).argmax())
        emitted[b, depth] = tok
        num_acc[b] = depth


def verify_tree_cpu(tokens, parents, draft_probs, target_probs, u, e, greedy, num_acc, emitted, path):
    B, N = tokens.shape
    dp = draft_probs
    _ext.cpu_module().speculative_verify_tree(
        str(target_probs.dtype).removeprefix("torch."), B, N, target_probs.shape[-1], tokens.data_ptr(),
        parents.data_ptr(), 0 if dp is None else dp.data_ptr(), 0 if dp is None else dp.stride(0),
        0 if dp is None else dp.stride(1), target_probs.data_ptr(), target_probs.stride(0),
        target_probs.stride(1), 0 if u is None else u.data_ptr(), 0 if e is None else e.data_ptr(),
        greedy, num_acc.data_ptr(), emitted.data_ptr(), path.data_ptr())


VERIFY_TREE = {"torch": verify_tree_torch, "cpu": verify_tree_cpu}


def speculative_verify_tree(tree_tokens: torch.Tensor, parents: torch.Tensor,
                            draft_probs: Optional[torch.Tensor], target_probs: torch.Tensor, *,
                            greedy: bool = False, generator: Optional[torch.Generator] = None,
                            validate: Optional[bool] = None):
    """Verifies a token tree of N draft nodes per sequence, losslessly (recursive rejection).

    Args:
        tree_tokens: ``[B, N]`` int64, the token of each tree node.
        parents: ``[N]`` or ``[B, N]`` int64, each node's parent node, -1 for the root's children;
            ``parents[i] < i`` (nodes in topological order). Siblings are tried in index order.
        draft_probs: ``[B, N+1, V]`` draft distributions, row 0 the one the root's children were
            drawn from and row ``i+1`` the one node i's children were drawn from (children drawn
            independently, with replacement), or ``None`` for deterministic candidates (e.g. the
            draft model's top-k; q = 1 for each, the rejected token is zeroed before the next).
        target_probs: ``[B, N+1, V]`` the target's distribution at the root (row 0) and after each
            node (row ``i+1``), computed in one pass with a tree attention mask.
        greedy, generator, validate: as in :func:`speculative_verify`.

    Returns:
        ``(num_accepted, emitted, accepted_nodes)``: ``num_accepted`` ``[B]`` the accepted path's
        length; ``emitted`` ``[B, N+1]`` the tokens to append (path tokens, then the correction or
        bonus token), padded with -1; ``accepted_nodes`` ``[B, N]`` the path's node indices (the
        KV entries to keep), padded with -1. On a chain (``parents[i] = i - 1``) the tokens equal
        :func:`speculative_verify`'s for the same generator state.
    """
    if not isinstance(greedy, bool):
        raise TypeError(f"{OP_TREE}: 'greedy' must be a bool, got {type(greedy).__name__}")
    N = tree_tokens.shape[1] if isinstance(tree_tokens, torch.Tensor) and tree_tokens.dim() == 2 else 0
    B, V = _check_common(OP_TREE, tree_tokens, draft_probs, target_probs, N + 1)
    if tree_tokens.shape[0] != B or target_probs.shape[1] != N + 1:
        raise ValueError(f"{OP_TREE}: 'target_probs' must have shape (B, N+1, V) = ({tree_tokens.shape[0]}, "
                         f"{N + 1}, V) for 'tree_tokens' of shape {tuple(tree_tokens.shape)}, got "
                         f"{tuple(target_probs.shape)}")
    checks.tensor(OP_TREE, "parents", parents, dtypes=(torch.int64, torch.int32))
    if parents.shape not in ((N,), (B, N)):
        raise ValueError(f"{OP_TREE}: 'parents' must have shape ({N},) or ({B}, {N}), got {tuple(parents.shape)}")
    device = target_probs.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{OP_TREE}: 'generator' is on {generator.device} but 'target_probs' is on {device}")
    validate = device.type == "cpu" if validate is None else checks.flag(OP_TREE, "validate", validate)
    parents = parents.to(device=device, dtype=torch.int64).expand(B, N).contiguous()
    tokens = tree_tokens.to(torch.int64).contiguous()
    # The tree's structure is always checked (small, and a bad parent would loop or read garbage).
    pc = parents.cpu()
    bad = (pc < -1) | (pc >= torch.arange(N))
    if bool(bad.any()):
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(f"{OP_TREE}: 'parents' must satisfy -1 <= parents[i] < i (topological order); "
                         f"got parents[{b}, {i}] = {int(pc[b, i])}")
    if validate:
        _tokens_in_range(OP_TREE, "tree_tokens", tokens, torch.ones_like(tokens, dtype=torch.bool), V, True)
        _check_probs(OP_TREE, "target_probs", target_probs, None, 0, True)
        if draft_probs is not None and not greedy:
            _check_probs(OP_TREE, "draft_probs", draft_probs, None, 0, True)
    num_acc = torch.empty(B, dtype=torch.int64, device=device)
    emitted = torch.empty(B, N + 1, dtype=torch.int64, device=device)
    path = torch.empty(B, N, dtype=torch.int64, device=device)
    if B == 0:
        return num_acc, emitted, path
    u, e = _draw(B, N, V, device, generator, greedy)
    backend = resolve(device, target_probs.dtype, op=OP_TREE)  # cpu or torch: no triton / cuda tree kernel
    VERIFY_TREE[backend](tokens, parents, None if greedy else _unit_stride(draft_probs),
                         _unit_stride(target_probs), u, e, greedy, num_acc, emitted, path)
    return num_acc, emitted, path
