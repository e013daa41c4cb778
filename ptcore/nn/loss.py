"""Loss modules in the style of torch.nn losses."""
from __future__ import annotations

import torch

from ptcore.ops.cross_entropy import linear_cross_entropy
from ptcore.ops.fused_dpo import linear_dpo_loss
from ptcore.ops.fused_policy import linear_policy_loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`ptcore.ops.linear_cross_entropy`; the LM-head weight (and bias) are
    passed at call time, so the module owns no parameters and can wrap any model's head.

    Example:
        >>> loss_fn = LinearCrossEntropyLoss(ignore_index=-100)
        >>> loss = loss_fn(hidden, lm_head.weight, labels)
    """

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, reduction: str = "mean"):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.reduction = reduction

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(input, weight, target, bias=bias, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                    softcap=self.softcap, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, reduction={self.reduction!r}")


class LinearPolicyLoss(torch.nn.Module):
    """Module form of :func:`ptcore.ops.linear_policy_loss` (GRPO / PPO family from hidden
    states); the options are fixed at construction, the tensors passed at call time.

    Example:
        >>> loss_fn = LinearPolicyLoss(loss_type="dapo", epsilon_high=0.28)
        >>> out = loss_fn(hidden, lm_head.weight, targets, old_logps, advantages, mask)
        >>> out.loss.backward(); out.metrics["entropy"]
    """

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, target, old_logps, advantages, mask, *, bias=None,
                ref_logps=None, normalizer=None):
        return linear_policy_loss(hidden, weight, target, old_logps, advantages, mask, bias=bias,
                                  ref_logps=ref_logps, normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearDPOLoss(torch.nn.Module):
    """Module form of :func:`ptcore.ops.linear_dpo_loss` (DPO family from hidden states).

    Example:
        >>> loss_fn = LinearDPOLoss(beta=0.1, loss_type="sigmoid")
        >>> out = loss_fn(chosen_h, rejected_h, lm_head.weight, chosen_y, rejected_y, ref_c, ref_r)
    """

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, chosen_hidden, rejected_hidden, weight, chosen_target, rejected_target,
                ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None):
        return linear_dpo_loss(chosen_hidden, rejected_hidden, weight, chosen_target, rejected_target,
                               ref_chosen_logps, ref_rejected_logps, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
