"""The LM head's per-token statistics that TRL logs, by chunks of rows, without gradients.

TRL's trainers log the entropy, the mean token accuracy (is the label the argmax?) and the mean
logit of the next-token distributions. ptcore's fused losses return the loss and its gradients but
not the argmax nor the mean logit, so these come from one extra no-grad pass: per chunk of valid
rows, the chunk's logits (``chunk_rows`` rows: the same memory bound as the fused ops), their
statistics, then the next chunk. The ``[N, V]`` logits never exist.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ptcore.ops.lm_head_chunks import acc_dtype
from ptcore.ops.logits_budget import chunk_rows


class HeadStats(NamedTuple):
    """Per position (the shape of ``target``; 0 / False where the target is ignored)."""
    logp: torch.Tensor        # log-prob of the target
    entropy: torch.Tensor     # entropy of the distribution
    mean_logits: torch.Tensor  # mean over the vocabulary of the (scaled) logits
    is_top1: torch.Tensor     # bool: the target is the first argmax (TRL's tie rule)


@torch.no_grad()
def head_stats(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, bias=None,
               softcap: float | None = None, temperature: float = 1.0,
               ignore_index: int = -100) -> HeadStats:
    """Statistics of ``softmax(softcap(hidden @ weight.T + bias) / temperature)`` at each
    position, computed in the accumulation dtype (fp32, fp64 for fp64 inputs)."""
    H = hidden.shape[-1]
    x = hidden.detach().reshape(-1, H)
    t = target.reshape(-1)
    acc = acc_dtype(x.dtype)
    n = t.numel()
    logp, ent, mean = (torch.zeros(n, dtype=acc, device=x.device) for _ in range(3))
    top1 = torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = (t != ignore_index).nonzero().squeeze(1)
    step = chunk_rows(rows.numel(), weight.shape[0], torch.finfo(acc).bits // 8)
    for s in range(0, rows.numel(), step):
        idx = rows[s:s + step]
        z = torch.nn.functional.linear(x.index_select(0, idx), weight, bias).to(acc)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        ti = t.index_select(0, idx)
        zt = z.gather(1, ti[:, None])[:, 0]
        logp[idx] = zt - lse
        ent[idx] = lse - (p * z).sum(-1)
        mean[idx] = z.mean(-1)
        top1[idx] = z.argmax(-1) == ti  # argmax returns the first maximum, as TRL counts ties
    shape = target.shape
    return HeadStats(logp.reshape(shape), ent.reshape(shape), mean.reshape(shape), top1.reshape(shape))
