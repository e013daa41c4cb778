"""``linear_dpo_loss``: the DPO family (:func:`ptcore.ops.dpo_loss`) from the hidden states of chosen
and rejected sequences, through the shared fused machinery (fused_losses.py): whole pairs in a chunk,
the logits never exist, the gradients are known in the forward and the work stays at 6NHV."""
from typing import Optional

import torch

from ptcore.ops import checks
from ptcore.ops.fused_losses import _no_fp16, _StoredGradients, fused_sequence_loss
from ptcore.ops.lm_head_chunks import acc_dtype, empty_head_grads, head_plan
from ptcore.ops.preference import LENGTH_NORMALIZED, PreferenceLossOutput, dpo_loss


@torch.library.custom_op("ptcore::linear_dpo_loss", mutates_args=())
def _dpo_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
            bias: Optional[torch.Tensor], ref_chosen_logps: Optional[torch.Tensor],
            ref_rejected_logps: Optional[torch.Tensor], beta: float, loss_types: str,
            loss_weights: list[float], label_smoothing: float, gamma: float, orpo_lambda: float,
            temperature: float, softcap: float, ignore_index: int, backend: str, chunk: int,
            need_gx: bool, need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """hidden ``[2B, T, H]`` (pair p: chosen at 2p, rejected at 2p + 1, so a pair's rows are
    contiguous); loss_types comma-separated (the schema has no
    list of strings). Returns (loss, sequence log-probs [2B], grad_hidden, grad_weight, grad_bias)."""
    S, T = target.shape
    B = S // 2
    checks.targets_in_range("linear_dpo_loss", target, weight.shape[0], ignore_index)
    types = loss_types.split(",")
    # Completion lengths, for the length-normalized types only (others accept empty completions).
    lengths = (target != ignore_index).sum(-1) if set(types) & set(LENGTH_NORMALIZED) else None
    opts = dict(beta=beta, loss_type=types, loss_weights=list(loss_weights),
                label_smoothing=label_smoothing, gamma=gamma, orpo_lambda=orpo_lambda)

    def loss_fn(first, logp, entropy):
        p0, k = first // 2, logp.shape[0] // 2
        sel = lambda v: None if v is None else v[p0:p0 + k]
        seq = logp.sum(-1)
        out = dpo_loss(seq[0::2], seq[1::2], sel(ref_chosen_logps), sel(ref_rejected_logps),
                       chosen_lengths=None if lengths is None else lengths[2 * p0:2 * (p0 + k):2],
                       rejected_lengths=None if lengths is None else lengths[2 * p0 + 1:2 * (p0 + k):2],
                       **opts)
        return out.loss * (k / max(B, 1))  # these pairs' share of the mean over pairs (0 pairs: 0)

    loss, logp, _, gx, gw, gb = fused_sequence_loss(
        hidden, weight, bias, target, loss_fn, seqs_per_chunk=2 * max(1, chunk // (2 * T)),
        chunk=chunk, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        backend=backend, need=(need_gx, need_gw, need_gb), want_entropy=False)
    return loss, logp.sum(-1), gx, gw, gb


@_dpo_op.register_fake
def _(hidden, weight, target, *args):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(target.shape[0], dtype=acc),
            *empty_head_grads(hidden, weight, *args[-3:]))


_dpo_op.register_autograd(
    lambda ctx, g, *_: _StoredGradients.backward(ctx, g, 20, (0, 1, 3)),
    setup_context=lambda ctx, inputs, output: _StoredGradients.setup_context(ctx, inputs, output, _dpo_op))


def linear_dpo_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                    chosen_target: torch.Tensor, rejected_target: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None,
                    ref_rejected_logps: Optional[torch.Tensor] = None, *,
                    bias: Optional[torch.Tensor] = None, beta: float = 0.1, loss_type="sigmoid",
                    label_smoothing: float = 0.0, gamma: float = 0.5, orpo_lambda: float = 1.0,
                    loss_weights=None, temperature: float = 1.0, softcap: Optional[float] = None,
                    ignore_index: int = -100) -> PreferenceLossOutput:
    """DPO-family loss (:func:`ptcore.ops.dpo_loss`) from the last hidden states of the chosen and
    rejected sequences; their sequence log-probs are the sums of the token log-probs over the
    targets that are not ``ignore_index`` (the completions), and the logits never exist.

    Args:
        chosen_hidden, rejected_hidden: ``[B, T, H]`` (T may differ between the two);
        chosen_target, rejected_target: ``[B, T]`` with ``ignore_index`` outside the completions;
        ref_*_logps: ``[B]`` sequence log-probs of the reference (not needed for simpo / orpo).
        The other options are :func:`dpo_loss`'s (lengths are the completion token counts).

    Example:
        >>> hc, hr = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
        >>> W = torch.randn(40, 16); yc, yr = torch.randint(0, 40, (2, 5)), torch.randint(0, 40, (2, 5))
        >>> out = linear_dpo_loss(hc, hr, W, yc, yr, torch.zeros(2) - 20, torch.zeros(2) - 20)
        >>> out.loss.backward()
    """
    op = "linear_dpo_loss"
    checks.tensor(op, "chosen_hidden", chosen_hidden, ndim=3)
    _no_fp16(op, "chosen_hidden", chosen_hidden)
    checks.tensor(op, "rejected_hidden", rejected_hidden, ndim=3)
    if rejected_hidden.shape[0] != chosen_hidden.shape[0]:
        raise ValueError(f"{op}: 'rejected_hidden' has {rejected_hidden.shape[0]} sequences but "
                         f"'chosen_hidden' has {chosen_hidden.shape[0]}")
    cap = checks.lm_head(op, chosen_hidden, weight, chosen_target, bias, ignore_index, softcap,
                         names=("chosen_hidden", "chosen_target"))
    checks.lm_head(op, rejected_hidden, weight, rejected_target, bias, ignore_index, softcap,
                   names=("rejected_hidden", "rejected_target"))
    checks.same_device(op, "chosen_hidden", chosen_hidden, rejected_hidden=rejected_hidden,
                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    temp = checks.number(op, "temperature", temperature, low=0.0, low_open=True)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(v) for v in loss_weights]
    B = chosen_hidden.shape[0]
    # dpo_loss validates the options and the reference shapes on a stand-in batch.
    stand_in = chosen_hidden.new_zeros(B, dtype=acc_dtype(chosen_hidden.dtype))
    ones = torch.ones(B, dtype=torch.long, device=chosen_hidden.device)
    with checks.as_op(op, "dpo_loss"):
        dpo_loss(stand_in, stand_in, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                 label_smoothing=label_smoothing, chosen_lengths=ones, rejected_lengths=ones, gamma=gamma,
                 orpo_lambda=orpo_lambda, loss_weights=loss_weights)
    T = max(chosen_hidden.shape[1], rejected_hidden.shape[1])
    pad = lambda h, fill: torch.nn.functional.pad(h, (0, 0, 0, T - h.shape[1]) if h.dim() == 3 else (0, T - h.shape[1]), value=fill)
    interleave = lambda c, r: torch.stack([c, r], dim=1).reshape(2 * B, *c.shape[1:])
    hidden = interleave(pad(chosen_hidden, 0.0), pad(rejected_hidden, 0.0))
    target = interleave(pad(chosen_target, ignore_index), pad(rejected_target, ignore_index))
    backend, chunk = head_plan(hidden, weight, op)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (hidden, weight, bias)]
    loss, seq_logps, *_ = _dpo_op(hidden, weight, target, bias, ref_chosen_logps, ref_rejected_logps,
                                  float(beta), ",".join(types), weights, float(label_smoothing), float(gamma),
                                  float(orpo_lambda), temp, cap, ignore_index, backend, chunk, *need)
    lengths = (target != ignore_index).sum(-1) if set(types) & set(LENGTH_NORMALIZED) else None
    full = dpo_loss(seq_logps[0::2], seq_logps[1::2], ref_chosen_logps, ref_rejected_logps, beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing,
                    chosen_lengths=None if lengths is None else lengths[0::2],
                    rejected_lengths=None if lengths is None else lengths[1::2], gamma=gamma,
                    orpo_lambda=orpo_lambda, loss_weights=loss_weights)
    return PreferenceLossOutput(loss, full.chosen_rewards, full.rejected_rewards, full.metrics)
