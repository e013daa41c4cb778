"""TRL 1.16 ``GRPOTrainer`` losses and log-probs through ptcore's fused heads.

``_compute_loss``: the loss and its gradients from :func:`ptcore.ops.linear_policy_loss` on the
completion positions' hidden states, with TRL's options mapped (below) and TRL's normalizer of
each loss type passed as ``normalizer``; ``_get_per_token_logps_and_entropies`` (TRL's old and
reference log-probs): :func:`ptcore.ops.linear_logprobs`. The policy's current log-probs, needed
as the old ones when TRL has none (on-policy: ratio 1) and for TRL's per-sequence clip metrics,
come from one no-grad ``linear_logprobs`` pass; the entropy and KL metrics from the fused loss.

Mapping: grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo are ptcore's loss types of the same
names (cispo's cap ``epsilon_high`` is ptcore's absolute ``cispo_max``; ``sapo_temperature_*`` and
``vespo_k_*`` / ``vespo_lambda_*`` pass through); ``delta`` (TRL's cap of the unclipped ratio) is
ptcore's ``delta`` for the PPO-clip types (TRL ignores it elsewhere); the KL is k3, times the ratio
with ``use_bias_correction_kl``; ``top_entropy_quantile`` passes through; ``entropy_coef`` is
rescaled so that ptcore's bonus (scaled by this call's share of the normalizer) is TRL's (scaled
by ``1 / gradient_accumulation_steps`` for every loss type); ``off_policy_mask_threshold`` is
``off_policy_threshold`` on ``sampling_per_token_logps``.
"""
from __future__ import annotations

import torch

from ptcore.integrations._head import backbone_hidden, causal_lm, head_inputs, unsupported
from ptcore.ops import linear_logprobs, linear_policy_loss
from ptcore.ops.policy import default_normalizer

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
PPO_CLIP = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # where TRL applies delta and logs clip ratios
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check(trainer) -> None:
    args = trainer.args
    if trainer.loss_type not in LOSS_TYPES:
        raise unsupported(trainer, f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if trainer.use_adaptive_entropy:  # TRL's coefficient then moves every optimizer step
        raise unsupported(trainer, "use_adaptive_entropy=True (a coefficient TRL updates each step)")
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        raise unsupported(trainer, "vllm_importance_sampling_correction=True")
    if trainer.beta < 0:
        raise unsupported(trainer, f"beta={trainer.beta} (< 0)")
    if trainer.loss_type == "vespo" and trainer.importance_sampling_level != "token":
        raise unsupported(trainer, f"loss_type='vespo' with importance_sampling_level="
                          f"{trainer.importance_sampling_level!r} (vespo builds its own sequence weight)")
    if args.delta is not None and trainer.loss_type in PPO_CLIP and not args.delta > 1:
        raise unsupported(trainer, f"delta={args.delta} <= 1 (a cap that clips the on-policy ratio)")
    if getattr(trainer, "aux_loss_enabled", False):
        raise unsupported(trainer, "an MoE router auxiliary loss (output_router_logits)")


def _completion_head(self, lm, input_ids, attention_mask, C):
    """Hidden states of the positions that predict the last ``C`` tokens, and those targets
    (-100 where the attention mask is 0, as TRL's labels)."""
    hidden = backbone_hidden(lm, input_ids=input_ids, attention_mask=attention_mask)
    head = head_inputs(lm, hidden[:, -C - 1:-1], fp32=self.args.cast_lm_head_to_fp32)
    target = input_ids[:, -C:].masked_fill(attention_mask[:, -C:] == 0, -100).to(head.hidden.device)
    return head, target


def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                       compute_entropy=False, compute_aux_loss=False, **multimodal):
    for name, value in multimodal.items():
        if name not in _MULTIMODAL:
            raise TypeError(f"_get_per_token_logps_and_entropies() got an unexpected keyword argument {name!r}")
        if value is not None:
            raise unsupported(self, f"multimodal input {name!r}")
    if compute_aux_loss:
        raise unsupported(self, "an MoE router auxiliary loss (output_router_logits)")
    lm = causal_lm(self, model)
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for s in range(0, input_ids.size(0), batch_size):
        with self.accelerator.autocast():
            head, target = _completion_head(self, lm, input_ids[s:s + batch_size], attention_mask[s:s + batch_size],
                                            logits_to_keep)
            out = linear_logprobs(head.hidden, head.weight, target, bias=head.bias, softcap=head.softcap,
                                  temperature=self.temperature, return_entropy=compute_entropy)
        lp, ent = out if compute_entropy else (out, None)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


def _normalizer(self, mode, mask, B, num_items):
    """TRL's denominator of each loss type (gradient accumulation included)."""
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    if self.loss_type in ("grpo", "sapo", "luspo"):  # luspo: a sum per sequence, then TRL's mean
        return B * accum
    if self.loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * accum
    if self.loss_type == "dr_grpo":
        return B * self.max_completion_length * accum
    normalizer = num_items.clamp(min=1.0) / self.accelerator.num_processes  # dapo, cispo, vespo
    if mode == "train":
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
    return normalizer


def _compute_loss(self, model, inputs):
    mode = "train" if self.model.training else "eval"
    lm = causal_lm(self, model)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    B, C = completion_ids.shape
    with self.accelerator.autocast():
        head, target = _completion_head(self, lm, input_ids, attention_mask, C)
        opts = dict(bias=head.bias, softcap=head.softcap, temperature=self.temperature)
        with torch.no_grad():
            now = linear_logprobs(head.hidden.detach(), head.weight.detach(), target, **opts)
        old = inputs.get("old_per_token_logps")
        old = now if old is None else old
        normalizer = _normalizer(self, mode, mask, B, inputs.get("num_items_in_batch"))
        kw = dict(ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, beta=self.beta,
                  kl_estimator="k3", epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                  importance_sampling_level=self.importance_sampling_level, loss_type=self.loss_type,
                  normalizer=normalizer, bias_correction_kl=bool(self.args.use_bias_correction_kl and self.beta != 0.0),
                  top_entropy_quantile=self.top_entropy_quantile,
                  entropy_coef=_entropy_coef(self, mode, mask, normalizer))
        kw.update(_family_options(self))
        if self.off_policy_mask_threshold is not None:
            kw.update(off_policy_threshold=self.off_policy_mask_threshold,
                      sampling_logps=inputs.get("sampling_per_token_logps"))
        out = linear_policy_loss(head.hidden, head.weight, target, old, advantages, mask, **kw, **opts)
    _log_metrics(self, mode, mask, advantages, now, old, out.metrics)
    if self._entropy_bonus_enabled:
        _log_entropy_bonus(self, mode, out)
    return out.loss


def _family_options(self) -> dict:
    """The options of the loss type itself (TRL's argument names, ptcore's meaning)."""
    args = self.args
    if self.loss_type == "cispo":
        return {"cispo_max": self.epsilon_high}
    if self.loss_type == "sapo":
        return {"sapo_temperature_pos": args.sapo_temperature_pos, "sapo_temperature_neg": args.sapo_temperature_neg}
    if self.loss_type == "vespo":
        return {"vespo_k_pos": args.vespo_k_pos, "vespo_lambda_pos": args.vespo_lambda_pos,
                "vespo_k_neg": args.vespo_k_neg, "vespo_lambda_neg": args.vespo_lambda_neg}
    return {} if args.delta is None else {"delta": args.delta}  # the PPO-clip types


def _entropy_coef(self, mode, mask, normalizer) -> float:
    """ptcore subtracts ``coef * H * share`` with ``share`` = this call's default normalizer over
    ``normalizer``; TRL subtracts ``entropy_coef * H / accum`` (accum = gradient accumulation
    steps in train, 1 in eval). The coefficient that makes them equal: ``entropy_coef / (accum *
    share)``: ``entropy_coef`` itself for grpo, bnpo, sapo, luspo; a host read where the
    normalizer is a tensor (bnpo, dapo, cispo, vespo)."""
    if not self._entropy_bonus_enabled:
        return 0.0
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    share = float(default_normalizer(self.loss_type, mask)) / float(normalizer)
    return self.entropy_coef / (accum * share) if share > 0 else self.entropy_coef  # share 0: no tokens, no bonus


def _log_entropy_bonus(self, mode, out) -> None:
    """TRL's ``policy_loss`` (the loss before the bonus; before the accumulation scaling for the
    loss types TRL divides by it afterwards) and ``entropy_coef`` metrics."""
    policy = out.loss.detach() + out.metrics["entropy_bonus"]
    if self.loss_type not in ("dapo", "cispo", "vespo") and mode == "train":
        policy = policy * self.current_gradient_accumulation_steps
    self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
    if mode == "train" and self.accelerator.sync_gradients:
        self._metrics[mode]["entropy_coef"].append(self.entropy_coef)


def _log_metrics(self, mode, mask, advantages, now, old, fused) -> None:
    """TRL's metrics: kl and entropy from the fused loss, the clip ratios from TRL's formulas on
    the current (no-grad) log-probs, as TRL computes them."""
    from trl.trainer.utils import nanmax, nanmin

    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = now - old
    if self.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)

    def seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_mean(x, total=None, count=None):  # x, or its (total, count)
        if total is None and x.shape[1] == 1:
            total, count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        elif total is None:
            total, count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([total, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    m = self._metrics[mode]
    if self.beta != 0.0:
        m["kl"].append(fused["kl"].item())
    m["entropy"].append(fused["entropy"].item())
    if self.loss_type == "cispo":
        m["cispo_clip_ratio"].append(global_mean(((coef_1 > self.epsilon_high) & (adv > 0)).float()))
        return
    if self.loss_type == "vespo":  # TRL's mean over sequences (per-token advantages: over tokens)
        phi = fused["vespo/phi_seq_mean"]
        count = (torch.tensor(float(adv.shape[0])) if adv.shape[1] == 1 else mask.sum()).to(phi)
        m["vespo/phi_seq_mean"].append(global_mean(None, phi * count, count))
        return
    if self.loss_type not in PPO_CLIP:  # sapo: no clip metrics
        return
    if self.args.delta is not None:
        coef_1 = torch.clamp(coef_1, max=self.args.delta)
    low = (coef_1 < 1 - self.epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + self.epsilon_high) & (adv > 0)
    m["clip_ratio/low_mean"].append(global_mean(low.float()))  # float32, as TRL's
    m["clip_ratio/high_mean"].append(global_mean(high.float()))
    m["clip_ratio/region_mean"].append(global_mean((low | high).float()))
    m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low.float()))).item())
    m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high.float()))).item())
