"""verl's fused log-prob / entropy entry point, computed by ptcore (any device, no Triton needed).

verl's actors call ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight,
labels, temperature, reduction, dist_process_group)`` on the final hidden states and the LM-head
weight, with ``labels`` the input ids rolled left by one, and read back ``(log_probs, entropy)``:
per token, the log-prob of the label and the entropy of ``softmax(hidden @ weight.T /
temperature)``, both float32, both differentiable. :func:`linear_cross_entropy` here takes the same
arguments in the same order with the same defaults and returns the same pair, computed by
:func:`ptcore.ops.linear_logprobs` (docs/integrations.md has the recipe).

What verl's kernel does that this does not: a vocabulary split over a tensor-parallel group
(``dist_process_group`` with more than one rank) and the reductions other than ``"none"`` (verl's
own call sites all pass ``"none"``); both raise, naming the argument.
"""
from __future__ import annotations

import torch

from ptcore.ops import linear_logprobs

OP = "ptcore.integrations.verl.linear_cross_entropy"


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of ``labels`` under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: ``(..., H)`` hidden states (verl: ``(1, total_nnz, H)`` without padding, or
            ``(B, T, H)``); weight: ``(V, H)`` in hidden's dtype; labels: ``(...)`` int64 ids.
        temperature: a float (verl asserts it is one), >= 1e-2.
        reduction: ``"none"`` (per token), as every verl call site passes.
        dist_process_group: None or a group of one rank (no vocabulary parallelism here).

    Returns float32 (float64 for float64 inputs) tensors of ``labels``' shape; gradients reach
    ``hidden`` and ``weight`` from either output. A label of -100 gives 0 for both (verl never
    passes one: its rolled ids are all valid).

    Example (verl's ``forward_with_triton_backend``, with ptcore's function instead):
        >>> hidden = model.model(input_ids=input_ids).last_hidden_state
        >>> rolled = torch.roll(input_ids, shifts=-1, dims=-1)
        >>> log_probs, entropy = linear_cross_entropy(hidden, model.lm_head.weight, rolled, 0.7, "none")
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: 'temperature' must be a float, got {type(temperature).__name__}")
    if reduction != "none":
        raise ValueError(f"{OP}: 'reduction' must be 'none' (per-token log-probs and entropy, what "
                         f"verl's actors use), got {reduction!r}")
    if dist_process_group is not None:
        world = torch.distributed.get_world_size(dist_process_group)
        if world != 1:
            raise NotImplementedError(f"{OP}: 'dist_process_group' with {world} ranks (a vocabulary "
                                      "split over tensor-parallel ranks) is not supported")
    for name, t in (("hidden", hidden), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if labels.shape != hidden.shape[:-1]:  # named here: ptcore's op calls them 'target'
        raise ValueError(f"{OP}: 'labels' must have shape {tuple(hidden.shape[:-1])} ('hidden' without its "
                         f"last dim), got {tuple(labels.shape)}")
    return linear_logprobs(hidden, weight, labels, temperature=float(temperature), return_entropy=True)
