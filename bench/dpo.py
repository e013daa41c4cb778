"""Sigmoid DPO loss from hidden states, forward + backward (grads for hidden and weight), side by
side: the bare GEMMs (the limit), ptcore's ``linear_dpo_loss``, the eager composition (full logits
of chosen and rejected, token log-probs, their sums, ptcore's unfused ``dpo_loss``) and Liger's
``LigerFusedLinearDPOLoss``. B pairs of a chosen and a rejected sequence of T tokens each (N = 2BT
tokens), every token a completion token, so the work is exactly 6NHV. The interface is
bench/registry.py's; sizes, the baseline and the step are bench/lm_head.py's.

The reference log-probs are precomputed (``ref_chosen_logps``, ``ref_rejected_logps``, [B]).
Liger's DPO cannot take them (only a reference model, ``ref_input`` + ``ref_weight``, at 2NHV more
forward work), so it runs with ``use_ref_model=False``: a reference of 0. The sigmoid loss only
depends on ``(pc - rc) - (pr - rr)``, and the benchmark's references are equal for the chosen and
the rejected sequence of a pair, so every case computes the same loss with the same work."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptcore
from . import lm_head
from .lm_head import BASELINE
from .registry import Benchmark, Headline
from .lm_head import bare_gemms, fwd_bwd, head_inputs

NAME = "linear_dpo_loss"
BETA = 0.1
NOTES = {"Liger": "use_ref_model=False (no precomputed-reference input), same loss here"}


# Shared with the other RL-loss benchmark: ptcore, eager and Liger, and eager's memory estimate.
cases, estimate_bytes = lm_head.rl_loss_cases, lm_head.rl_loss_estimate_bytes


def _inputs(s: dict, dtype: torch.dtype, device: str):
    """hidden [2B, T, H] (the B chosen sequences, then the B rejected: one leaf, as Liger takes
    it; ptcore gets its two halves), weight, target [2B, T], the reference sequence log-probs [B]
    (the same for both sequences of a pair, near what the policy gives)."""
    B, T = lm_head.sequences(s, per_group=2)
    x, w, t = head_inputs(s, dtype, device, lead=(2 * B, T))
    ref = T * lm_head.typical_logp(s["V"]) + torch.randn(B, device=device)
    return x, w, t, ref, B


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    x, w, t, ref, B = _inputs(s, dtype, device)
    if case == BASELINE:
        return bare_gemms(x, w)
    if case.startswith("ptcore["):
        def loss():
            return ptcore.ops.linear_dpo_loss(x[:B], x[B:], w, t[:B], t[B:], ref, ref, beta=BETA,
                                              loss_type="sigmoid").loss
    elif case == "eager":
        def loss():
            logs = F.log_softmax(F.linear(x, w).float(), dim=-1)
            seq = logs.gather(-1, t.unsqueeze(-1)).squeeze(-1).sum(-1)
            return ptcore.ops.dpo_loss(seq[:B], seq[B:], ref, ref, beta=BETA, loss_type="sigmoid").loss
    elif case == "Liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        # Its defaults otherwise: one pair per chunk, the chunk's fwd+bwd (torch.func) compiled
        # by torch.compile (the warm-up compiles), summed (not averaged) log-probs, no NLL term.
        liger = LigerFusedLinearDPOLoss(beta=BETA, loss_type="sigmoid", use_ref_model=False,
                                        compute_nll_loss=False, average_log_prob=False)
        loss = lambda: liger(w, x, t)[0]  # noqa: E731
    else:
        raise KeyError(f"{NAME}: unknown case {case!r}")

    def objective():
        value = loss()
        return value, value
    return fwd_bwd(objective, [x, w], case)


BENCHMARK = Benchmark(
    name=NAME, title=f"sigmoid DPO loss (beta 0.1), fwd+bwd, pairs of {lm_head.SEQ_LEN}-token sequences", cases=cases, estimate_bytes=estimate_bytes, build=build,
    notes=NOTES,
    headlines=(*lm_head.headlines("Liger", "eager", of_gemm=0.95, memory=1 / 6),
               Headline("memory vs Liger", "extra_peak_mb", "Liger", ("<=", 1.0))),
    **lm_head.common(repeats=lm_head.FEW_REPEATS))
