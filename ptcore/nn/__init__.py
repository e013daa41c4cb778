"""torch.nn-style modules over ptcore's fused ops."""
from ptcore.nn.loss import LinearCrossEntropyLoss

__all__ = ["LinearCrossEntropyLoss"]
