"""torch.nn-style modules over ptcore's fused ops."""
from ptcore.nn.loss import LinearCrossEntropyLoss, LinearDPOLoss, LinearPolicyLoss

__all__ = ["LinearCrossEntropyLoss", "LinearDPOLoss", "LinearPolicyLoss"]
