"""What the three objectives share: patching the model, the data stream, moving batches."""
from __future__ import annotations

import torch

from ptcore.train.config import TrainConfig
from ptcore.train.distributed import DistContext
from ptcore.train.loop import Shuffler, example_positions


def patch(model):
    """ptcore.patch: the training losses run fused from the last hidden states (no logits)."""
    import ptcore
    return ptcore.patch(model)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the hidden states: ``target[:, t] = labels[:, t + 1]``,
    and -100 at the last position (what Hugging Face's label shift computes)."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def head_of(out):
    """The object the head_loss function returned (patched forward keeps it as ``head_output``)."""
    return getattr(out, "head_output", None)


class BaseObjective:
    """Holds the items (examples, packed rows, pairs or prompts), the seeded order, the device."""
    name = "objective"
    shuffle = True

    def __init__(self, items: list, config: TrainConfig):
        self.items = items
        self.config = config
        self.order = Shuffler(len(items), config.seed, self.shuffle)
        self.ctx = DistContext()
        self.device = torch.device("cpu")

    def prepare_model(self, model) -> None:
        patch(model)

    def setup(self, model, ctx: DistContext, config: TrainConfig) -> None:
        self.ctx = ctx
        self.device = next(model.parameters()).device

    def batches(self, step: int) -> list[list]:
        """This rank's micro-batches of items at ``step`` (see loop.example_positions)."""
        return [[self.items[self.order(p)] for p in positions]
                for positions in example_positions(step, self.config, self.ctx)]

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
