"""Lossless verification of speculative drafts (math: docs/ttc.md §2).

:func:`speculative_verify` (here) checks a chain of K draft tokens per sequence against the
target's distributions in one call; :func:`speculative_verify_tree` (ptcore/ops/speculative_tree.py,
re-exported here) checks a token tree (several candidates per position, given as parent indices)
with recursive rejection over siblings. Their input checks and random draws:
ptcore/ops/speculative_checks.py.

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

from typing import Optional

import torch

from ptcore import _ext
from ptcore.ops import checks
from ptcore.ops.dispatch import resolve
from ptcore.ops.speculative_checks import (OP, OP_TREE, SUM_TOLERANCE, Lengths,  # noqa: F401  (re-exported)
                                           check_common, check_probs, draft_lengths, draw_randoms,
                                           tokens_in_range, unit_stride)
# The token-tree op lives in its own file; re-exported so both ops are importable from here.
from ptcore.ops.speculative_tree import (VERIFY_TREE, speculative_verify_tree, verify_tree_cpu,  # noqa: F401
                                         verify_tree_torch)


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
    B, V = check_common(OP, draft_tokens, draft_probs, target_probs, target_probs.shape[1] - 1)
    K = draft_tokens.shape[1]
    if draft_tokens.shape[0] != B or target_probs.shape[1] != K + 1:
        raise ValueError(f"{OP}: 'target_probs' must have shape (B, K+1, V) = ({draft_tokens.shape[0]}, "
                         f"{K + 1}, V) for 'draft_tokens' of shape {tuple(draft_tokens.shape)}, got "
                         f"{tuple(target_probs.shape)}")
    device = target_probs.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{OP}: 'generator' is on {generator.device} but 'target_probs' is on {device}")
    validate = device.type == "cpu" if validate is None else checks.flag(OP, "validate", validate)
    lens = draft_lengths(OP, draft_lens, B, K, device, validate)
    tokens = draft_tokens.to(torch.int64).contiguous()
    if validate:
        tokens_in_range(OP, "draft_tokens", tokens, torch.arange(K, device=device) < lens.unsqueeze(1), V, True)
        check_probs(OP, "target_probs", target_probs, lens, 1, True)
        if draft_probs is not None and not greedy:
            check_probs(OP, "draft_probs", draft_probs, lens, 0, True)
    num_acc = torch.empty(B, dtype=torch.int64, device=device)
    emitted = torch.empty(B, K + 1, dtype=torch.int64, device=device)
    if B == 0:
        return num_acc, emitted
    u, e = draw_randoms(B, K, V, device, generator, greedy)
    backend = resolve(device, target_probs.dtype, op=OP)
    VERIFY[backend](tokens, lens, None if greedy else unit_stride(draft_probs), unit_stride(target_probs),
                    u, e, greedy, num_acc, emitted)
    return num_acc, emitted

