"""TRL 1.16 ``DPOTrainer`` losses through :func:`ptcore.ops.linear_dpo_loss`.

TRL stacks each batch as ``[chosen; rejected]`` (2B rows sharing one length) and scores the
completion tokens (``completion_mask``). Here the policy's loss and gradients come from the fused
DPO op on the backbone's hidden states, the reference's sequence log-probs from
:func:`ptcore.ops.linear_logprobs` (or the precomputed columns), and the logged metrics (entropy,
mean logits, token accuracy, rewards, margins, accuracies, log-probs) from the op's rewards and one
no-grad pass (``head_stats``). TRL's per-type loss formulas are ptcore's ``dpo_loss`` types of the
same name (docs/losses.md §1) with TRL's conventions: sigmoid has no label smoothing, ipo divides by
the completion token counts.
"""
from __future__ import annotations

import warnings

import torch

from ptcore.integrations._head import (backbone_hidden, causal_lm, head_inputs, shifted_targets,
                                       unsupported)
from ptcore.integrations.head_stats import head_stats
from ptcore.ops import linear_dpo_loss, linear_logprobs

# TRL loss types that are ptcore dpo_loss types with the same per-pair formula.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "apo_zero", "apo_down")
SMOOTHED = ("robust", "exo_pair")  # the TRL types that read label_smoothing
_NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def check(trainer) -> None:
    for t in trainer.loss_types:
        if t not in LOSS_TYPES:
            raise unsupported(trainer, f"loss_type {t!r} (supported: {', '.join(LOSS_TYPES)})")
    if trainer.f_divergence_type != "reverse_kl" and not (
            trainer.f_divergence_type == "alpha_divergence" and abs(trainer.f_alpha_divergence_coef - 1.0) < 1e-6):
        raise unsupported(trainer, f"f_divergence_type={trainer.f_divergence_type!r}")
    if trainer.ld_alpha is not None:
        raise unsupported(trainer, f"ld_alpha={trainer.ld_alpha}")
    if trainer.use_weighting:
        raise unsupported(trainer, "use_weighting=True (WPO weights)")
    if trainer.label_smoothing and "sigmoid" in trainer.loss_types:
        # TRL's sigmoid ignores label_smoothing; ptcore's applies it (cDPO)
        raise unsupported(trainer, f"label_smoothing={trainer.label_smoothing} with loss_type 'sigmoid'")
    if getattr(trainer, "aux_loss_enabled", False):
        raise unsupported(trainer, "an MoE router auxiliary loss (output_router_logits)")


def _model_kwargs(inputs) -> dict:
    kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    kwargs.pop("use_cache", None)
    return kwargs


def _targets(inputs) -> torch.Tensor:
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    return shifted_targets(labels)


@torch.no_grad()
def _sequence_logps(trainer, model, inputs, target) -> torch.Tensor:
    """Summed completion log-probs ``[2B]`` of ``model`` (the reference), fused."""
    lm = causal_lm(trainer, model)
    with trainer.accelerator.autocast():
        head = head_inputs(lm, backbone_hidden(lm, **_model_kwargs(inputs)))
        logp = linear_logprobs(head.hidden, head.weight, target.to(head.hidden.device), bias=head.bias,
                               softcap=head.softcap)
    return logp.sum(-1)


def compute_ref_log_probs(self, model, inputs):
    """TRL's reference log-probs of one padded batch (``precompute_ref_log_probs``)."""
    return _sequence_logps(self, model, inputs, _targets(inputs)).chunk(2, dim=0)


def _compute_loss(self, model, inputs, return_outputs):
    mode = "train" if self.model.training else "eval"
    lm = causal_lm(self, model)
    completion_mask = inputs["completion_mask"]
    target = _targets(inputs)
    types = list(self.loss_types)
    if "ipo" in types and bool(completion_mask[:, 0].any()):
        # TRL's ipo divides by completion_mask.sum() (position 0 included); ptcore by the scored tokens
        raise unsupported(self, "loss_type 'ipo' on a completion that starts at position 0 (no prompt)")
    head = head_inputs(lm, backbone_hidden(lm, **_model_kwargs(inputs)))
    target = target.to(head.hidden.device)
    if self.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = _sequence_logps(self, self.ref_model, inputs, target).chunk(2, dim=0)
    B = target.shape[0] // 2
    out = linear_dpo_loss(head.hidden[:B], head.hidden[B:], head.weight, target[:B], target[B:],
                          ref_chosen, ref_rejected, bias=head.bias, beta=self.beta, loss_type=types,
                          loss_weights=list(self.loss_weights), softcap=head.softcap,
                          label_smoothing=self.label_smoothing if set(types) & set(SMOOTHED) else 0.0)
    _log_metrics(self, mode, inputs, head, target, out)
    if return_outputs:  # as TRL: the logits for compute_metrics, by an extra forward
        warnings.warn("return_outputs=True recomputes the full logits with an extra forward pass",
                      FutureWarning, stacklevel=2)
        with torch.no_grad():
            outputs = model(**_model_kwargs(inputs), use_cache=False)
        return out.loss, outputs
    return out.loss


def _log_metrics(self, mode, inputs, head, target, out) -> None:
    """TRL's metrics of ``_compute_loss``, in TRL's order and with its reductions."""
    acc = self.accelerator
    stats = head_stats(head.hidden, head.weight, target, bias=head.bias, softcap=head.softcap)
    mask = target != -100  # TRL's shifted completion mask
    entropy_sum = acc.gather_for_metrics((stats.entropy * mask).sum()).sum()
    total_tokens = acc.gather_for_metrics(mask.sum()).sum()
    self._metrics[mode]["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
    if mode == "train":
        num_tokens_in_batch = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    chosen_logits, rejected_logits = stats.mean_logits.chunk(2, dim=0)
    for name, logits, m in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
        total = acc.gather_for_metrics(logits[m].sum()).sum().item()
        count = acc.gather_for_metrics(m.sum()).sum().item()
        self._metrics[mode][f"logits/{name}"].append(total / count if count > 0 else 0.0)
    chosen_top1, _ = stats.is_top1.chunk(2, dim=0)
    correct = acc.gather_for_metrics((chosen_top1 & chosen_mask).sum()).sum()
    total = acc.gather_for_metrics(chosen_mask.sum()).sum()
    self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)

    chosen_rewards, rejected_rewards = acc.gather(out.chosen_rewards), acc.gather(out.rejected_rewards)
    self._metrics[mode]["rewards/chosen"].append(chosen_rewards.mean().item())
    self._metrics[mode]["rewards/rejected"].append(rejected_rewards.mean().item())
    self._metrics[mode]["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
    self._metrics[mode]["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
    chosen_logps, rejected_logps = stats.logp.sum(-1).chunk(2, dim=0)
    self._metrics[mode]["logps/chosen"].append(acc.gather(chosen_logps).mean().item())
    self._metrics[mode]["logps/rejected"].append(acc.gather(rejected_logps).mean().item())
