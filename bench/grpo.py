"""GRPO policy loss from hidden states (k3 KL to a reference, beta 0.04), forward + backward (grads
for hidden and weight), side by side: the bare GEMMs (the limit), ptcore's ``linear_policy_loss``,
the eager composition (full logits, log-softmax, ptcore's unfused ``policy_loss``) and Liger's
``LigerFusedLinearGRPOLoss``. B sequences of T tokens, all completion tokens (mask all ones), so
the work is exactly 6NHV. The interface is bench/registry.py's; sizes, the baseline and the step
are bench/lm_head.py's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptcore
from . import lm_head
from .lm_head import BASELINE
from .registry import Benchmark, Headline
from .lm_head import bare_gemms, fwd_bwd, head_inputs

NAME = "linear_policy_loss"
LOSS = dict(loss_type="grpo", beta=0.04, kl_estimator="k3", epsilon_low=0.2, epsilon_high=0.2)
NOTES = {"Liger": "8NHV: recomputes the logits in its backward"}


# Shared with the other RL-loss benchmark: ptcore, eager and Liger, and eager's memory estimate.
cases, estimate_bytes = lm_head.rl_loss_cases, lm_head.rl_loss_estimate_bytes


def _inputs(s: dict, dtype: torch.dtype, device: str):
    """hidden [B, T, H], weight, target [B, T]; old and reference log-probs [B, T] near what the
    policy gives (logits ~ N(0, 1)), advantages [B] ~ N(0, 1), mask all ones."""
    B, T = lm_head.sequences(s)
    x, w, t = head_inputs(s, dtype, device, lead=(B, T))
    typical = lm_head.typical_logp(s["V"])
    old = typical + 0.1 * torch.randn(B, T, device=device)
    ref = typical + 0.1 * torch.randn(B, T, device=device)
    adv = torch.randn(B, device=device)
    mask = torch.ones(B, T, device=device)
    return x, w, t, old, ref, adv, mask


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    x, w, t, old, ref, adv, mask = _inputs(s, dtype, device)
    if case == BASELINE:
        return bare_gemms(x, w)
    if case.startswith("ptcore["):
        loss = lambda: ptcore.ops.linear_policy_loss(x, w, t, old, adv, mask, ref_logps=ref, **LOSS).loss  # noqa: E731
    elif case == "eager":
        def loss():
            logs = F.log_softmax(F.linear(x, w).float(), dim=-1)
            logp = logs.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            return ptcore.ops.policy_loss(logp, old, adv, mask, ref_logps=ref, **LOSS).loss
    elif case == "Liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        # Its defaults otherwise: one sequence per chunk, the loss math torch.compile'd (the
        # warm-up compiles), logits recomputed by vocab chunks in its backward.
        liger = LigerFusedLinearGRPOLoss(beta=LOSS["beta"], loss_type=LOSS["loss_type"], use_ref_model=True,
                                         epsilon_low=LOSS["epsilon_low"], epsilon_high=LOSS["epsilon_high"])
        loss = lambda: liger(x, w, t, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]  # noqa: E731
    else:
        raise KeyError(f"{NAME}: unknown case {case!r}")

    def objective():
        value = loss()
        return value, value
    return fwd_bwd(objective, [x, w], case)


BENCHMARK = Benchmark(
    name=NAME, title=f"GRPO loss (k3 KL, beta 0.04), fwd+bwd, sequences of {lm_head.SEQ_LEN} tokens", cases=cases, estimate_bytes=estimate_bytes, build=build,
    notes=NOTES,
    headlines=(*lm_head.headlines("Liger", "eager", of_gemm=0.95, memory=1 / 6),
               Headline("memory vs Liger", "extra_peak_mb", "Liger", ("<=", 1.0))),
    **lm_head.common(repeats=lm_head.FEW_REPEATS))
