"""Loss modules in the style of torch.nn losses."""
from __future__ import annotations

import torch

from ptcore.ops.cross_entropy import linear_cross_entropy


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
