"""TRL 1.16 ``SFTTrainer.compute_loss`` through ptcore's fused cross-entropy.

TRL's loss is the sum of the label tokens' negative log-likelihoods over ``num_items_in_batch``
(their count when not given); DFT (``loss_type="dft"``) weights each token by its detached
probability. Here the NLL is :func:`ptcore.ops.linear_cross_entropy` (``reduction="sum"``) and DFT
:func:`ptcore.ops.linear_logprobs`, on the backbone's hidden states; the entropy and token-accuracy
metrics come from one no-grad pass (``head_stats``). The logging is TRL's, line for line.
"""
from __future__ import annotations

import warnings

import torch

from ptcore.integrations._head import (backbone_hidden, causal_lm, head_inputs, shifted_targets,
                                       unsupported)
from ptcore.integrations.head_stats import head_stats
from ptcore.ops import linear_cross_entropy, linear_logprobs

LOSS_TYPES = ("nll", "dft")
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch")


def check(trainer) -> None:
    """Raise for an SFT option the fused path cannot honour."""
    args = trainer.args
    if args.loss_type not in LOSS_TYPES:
        raise unsupported(trainer, f"loss_type={args.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if trainer.compute_loss_func is not None:
        raise unsupported(trainer, "compute_loss_func (it needs the full logits)")
    if trainer.label_smoother is not None:
        raise unsupported(trainer, f"label_smoothing_factor={args.label_smoothing_factor}")
    if getattr(trainer, "aux_loss_enabled", False):
        raise unsupported(trainer, "an MoE router auxiliary loss (output_router_logits)")
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and getattr(pc, "sp_enabled", False):
        raise unsupported(trainer, "sequence parallelism")


def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    mode = "train" if self.model.training else "eval"
    lm = causal_lm(self, model)
    inputs["use_cache"] = False
    model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    shift = inputs.get("shift_labels")
    target = shifted_targets(inputs["labels"]) if shift is None else shift
    head = head_inputs(lm, backbone_hidden(lm, **model_inputs))
    target = target.to(head.hidden.device)
    mask = target != -100
    num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
    denom = torch.as_tensor(num_tokens, device=head.hidden.device).clamp(min=1)
    opts = dict(bias=head.bias, softcap=head.softcap)
    if self.args.loss_type == "dft":  # DFT: https://huggingface.co/papers/2508.05629
        logp = linear_logprobs(head.hidden, head.weight, target, **opts)
        loss = (-logp * logp.detach().exp()).sum() / denom
    else:
        loss = linear_cross_entropy(head.hidden, head.weight, target, reduction="sum", **opts)
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()  # TRL's loss is fp32 (its log-probs are)
        loss = loss / denom
    if self.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (self.accelerator.num_processes // self.get_tp_size())

    stats = head_stats(head.hidden, head.weight, target, **opts)
    gather = self.accelerator.gather_for_metrics
    num_valid = gather(mask.sum()).sum()
    entropy_sum = gather(stats.entropy.sum()).sum()
    num_correct = gather(stats.is_top1.sum()).sum()
    self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
    self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            num_tokens_in_batch = gather(inputs["attention_mask"].sum()).sum().item()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            num_tokens_in_batch = gather(local).sum().item()
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    if return_outputs:  # as TRL: the logits for compute_metrics, by an extra forward
        warnings.warn("return_outputs=True recomputes the full logits with an extra forward pass",
                      FutureWarning, stacklevel=2)
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return loss, outputs
    return loss
