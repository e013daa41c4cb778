"""Per-token log-probs and entropy from hidden states (the RL head), forward + backward of
``sum(logp) + 0.01 sum(entropy)`` (grads for input and weight), side by side: the bare GEMMs (the
limit), ptcore's ``linear_logprobs``, eager PyTorch and PyTorch's chunked op (log-probs only). The
interface is bench/registry.py's; sizes, inputs, the baseline and the step are bench/lm_head.py's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptcore
from . import lm_head
from .lm_head import BASELINE
from .registry import Benchmark
from .lm_head import bare_gemms, fwd_bwd, head_cases, head_inputs

NAME = "linear_logprobs"
ENTROPY_WEIGHT = 0.01
NOTES = {"torch chunked": "no entropy: -F.linear_cross_entropy(reduction='none'), bwd of sum(logp)"}


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    out = head_cases(device, dtype)
    out.append(("eager", None))
    out.append(("torch chunked", None if hasattr(torch.nn, "LinearCrossEntropyOptions") else
                f"torch {torch.__version__} has no chunked F.linear_cross_entropy (PyTorch >= 2.13)"))
    return out


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    """eager keeps ~5 copies of the [N, V] logits (logits, log-softmax, softmax, their product,
    and the gradients' temporaries)."""
    return lm_head.estimate_bytes(case, s, dtype, {"eager": 5})


def _eager(x, w, t):
    """The unfused head: full logits, log-softmax, the target's entry, the entropy."""
    z = F.linear(x, w).float()  # no copy in fp32
    logs = F.log_softmax(z, dim=-1)
    logp = logs.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    entropy = -(F.softmax(z, dim=-1) * logs).sum(-1)
    return logp, entropy


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    x, w, t = head_inputs(s, dtype, device)
    if case == BASELINE:
        return bare_gemms(x, w)
    if case == "torch chunked":
        opts = torch.nn.LinearCrossEntropyOptions()  # defaults: "auto" chunking and accumulation

        def objective():  # -nll = logp; it has no entropy
            logp_sum = -F.linear_cross_entropy(x, w, t, reduction="none", options=opts).sum()
            return logp_sum, logp_sum
    else:
        if case.startswith("ptcore["):
            head = lambda: ptcore.ops.linear_logprobs(x, w, t, return_entropy=True)  # noqa: E731
        elif case == "eager":
            head = lambda: _eager(x, w, t)  # noqa: E731
        else:
            raise KeyError(f"{NAME}: unknown case {case!r}")

        def objective():
            logp, entropy = head()
            logp_sum = logp.sum()
            return logp_sum + ENTROPY_WEIGHT * entropy.sum(), logp_sum  # value: sum(logp), for all
    return fwd_bwd(objective, [x, w], case)


BENCHMARK = Benchmark(
    name=NAME, title="log-probs + entropy, fwd+bwd of sum(logp) + 0.01 sum(entropy)", cases=cases, estimate_bytes=estimate_bytes, build=build,
    notes=NOTES,
    # 8NHV (the backward recomputes the logits): 0.9 of the 0.75 that allows
    headlines=lm_head.headlines("eager", "eager", of_gemm=0.9 * 0.75, memory=1 / 6),
    **lm_head.common(repeats=lm_head.FEW_REPEATS))
