"""Lossless verification of a token tree of drafts: :func:`speculative_verify_tree`, recursive
rejection over siblings (math: docs/ttc.md §2; the chain rule it generalizes:
:mod:`ptcore.ops.speculative`)."""
from __future__ import annotations

from typing import Optional

import torch

from ptcore import _ext
from ptcore.ops import checks
from ptcore.ops.dispatch import resolve
from ptcore.ops.speculative_checks import (OP_TREE, check_common, check_probs, draw_randoms, tokens_in_range,
                                           unit_stride)


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
    exactly :func:`ptcore.ops.speculative.verify_torch`'s rule. If no child is accepted (or there are none), the stop token
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
        greedy, generator, validate: as in :func:`ptcore.ops.speculative.speculative_verify`.

    Returns:
        ``(num_accepted, emitted, accepted_nodes)``: ``num_accepted`` ``[B]`` the accepted path's
        length; ``emitted`` ``[B, N+1]`` the tokens to append (path tokens, then the correction or
        bonus token), padded with -1; ``accepted_nodes`` ``[B, N]`` the path's node indices (the
        KV entries to keep), padded with -1. On a chain (``parents[i] = i - 1``) the tokens equal
        :func:`ptcore.ops.speculative.speculative_verify`'s for the same generator state.
    """
    if not isinstance(greedy, bool):
        raise TypeError(f"{OP_TREE}: 'greedy' must be a bool, got {type(greedy).__name__}")
    N = tree_tokens.shape[1] if isinstance(tree_tokens, torch.Tensor) and tree_tokens.dim() == 2 else 0
    B, V = check_common(OP_TREE, tree_tokens, draft_probs, target_probs, N + 1)
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
        tokens_in_range(OP_TREE, "tree_tokens", tokens, torch.ones_like(tokens, dtype=torch.bool), V, True)
        check_probs(OP_TREE, "target_probs", target_probs, None, 0, True)
        if draft_probs is not None and not greedy:
            check_probs(OP_TREE, "draft_probs", draft_probs, None, 0, True)
    num_acc = torch.empty(B, dtype=torch.int64, device=device)
    emitted = torch.empty(B, N + 1, dtype=torch.int64, device=device)
    path = torch.empty(B, N, dtype=torch.int64, device=device)
    if B == 0:
        return num_acc, emitted, path
    u, e = draw_randoms(B, N, V, device, generator, greedy)
    backend = resolve(device, target_probs.dtype, op=OP_TREE)  # cpu or torch: no triton / cuda tree kernel
    VERIFY_TREE[backend](tokens, parents, None if greedy else unit_stride(draft_probs),
                         unit_stride(target_probs), u, e, greedy, num_acc, emitted, path)
    return num_acc, emitted, path
