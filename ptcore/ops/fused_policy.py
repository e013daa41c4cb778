"""``linear_policy_loss``: the GRPO / PPO family (:func:`ptcore.ops.policy_loss`) from hidden states,
through the shared fused machinery (fused_losses.py): the logits never exist, the gradients are known
in the forward and the work stays at 6NHV."""
import ast
from typing import Optional

import torch

from ptcore.ops import checks
from ptcore.ops.fused_losses import _no_fp16, _StoredGradients, fused_sequence_loss
from ptcore.ops.lm_head_chunks import acc_dtype, empty_head_grads, head_plan
from ptcore.ops.policy import PolicyLossOutput, default_normalizer, policy_loss


@torch.library.custom_op("ptcore::linear_policy_loss", mutates_args=())
def _policy_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
               old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               bias: Optional[torch.Tensor], ref_logps: Optional[torch.Tensor],
               sampling_logps: Optional[torch.Tensor], normalizer: torch.Tensor, temperature: float,
               softcap: float, ignore_index: int, options: str, backend: str, chunk: int,
               need_gx: bool, need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp [B, T], entropy [B, T], grad_hidden, grad_weight, grad_bias). ``options``: the
    scalar options of :func:`policy_loss` in one string (``_encode_options``), one schema argument
    instead of one per option, None staying None."""
    B, T = target.shape
    m = mask if mask.dtype == torch.bool else mask != 0
    t = torch.where(m, target, torch.full_like(target, ignore_index))  # outside the mask: ignored
    checks.targets_in_range("linear_policy_loss", t, weight.shape[0], ignore_index)
    opts = _decode_options(options)

    def loss_fn(first, logp, entropy):
        sel = lambda v: None if v is None else v[first:first + logp.shape[0]]
        return policy_loss(logp, sel(old_logps), sel(advantages), sel(m), ref_logps=sel(ref_logps),
                           sampling_logps=sel(sampling_logps), normalizer=normalizer,
                           entropy=entropy, **opts).loss

    loss_type, level = opts["loss_type"], opts["importance_sampling_level"]
    # A sequence-level ratio ties a sequence's tokens together, and so do OPSM's mean of the
    # current log-probs, VESPO's sequence weight and GMPO's geometric mean; the entropy quantile
    # and the entropy bonus's mean need the whole batch (two passes once it exceeds the budget).
    batch = opts["top_entropy_quantile"] < 1 or opts["entropy_coef"] != 0
    whole = (loss_type in ("gspo", "vespo", "gmpo") or (level == "sequence" and loss_type != "pg")
             or opts["off_policy_threshold"] is not None)
    seqs = B if batch else (max(1, chunk // T) if whole else None)
    loss, logp, ent, gx, gw, gb = fused_sequence_loss(
        hidden, weight, bias, t, loss_fn, seqs_per_chunk=seqs,
        chunk=chunk, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
        backend=backend, need=(need_gx, need_gw, need_gb), want_entropy=True)
    return loss, logp, ent, gx, gw, gb


@_policy_op.register_fake
def _(hidden, weight, target, old_logps, advantages, mask, bias, ref_logps, sampling_logps, normalizer, *args):
    acc = acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(target.shape, dtype=acc),
            hidden.new_empty(target.shape, dtype=acc), *empty_head_grads(hidden, weight, *args[-3:]))


_policy_op.register_autograd(
    lambda ctx, g, *_: _StoredGradients.backward(ctx, g, 19, (0, 1, 6)),
    setup_context=lambda ctx, inputs, output: _StoredGradients.setup_context(ctx, inputs, output, _policy_op))


def _encode_options(**opts) -> str:
    """The validated scalar options (finite numbers, None, bools, strings) as ``k=repr(v);...``:
    an f-string, which torch.compile traces as a constant (json.dumps it cannot). Numbers become
    floats, so a 0-d tensor or an int reaches the op as the same number."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (str, bool)) else float(v)

    return ";".join(f"{k}={plain(v)!r}" for k, v in sorted(opts.items()))


def _decode_options(text: str) -> dict:
    opts = {}
    for item in text.split(";"):
        k, v = item.split("=", 1)
        opts[k] = ast.literal_eval(v)
    opts["rollout_clip"] = tuple(opts["rollout_clip"])
    return opts


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                       old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
                       temperature: float = 1.0, softcap: Optional[float] = None,
                       ignore_index: int = -100, beta: float = 0.0, kl_estimator: str = "k3",
                       epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                       dual_clip: Optional[float] = None, importance_sampling_level: str = "token",
                       loss_type: str = "dapo", normalizer=None,
                       cispo_max: Optional[float] = None,
                       sampling_logps: Optional[torch.Tensor] = None,
                       rollout_correction: Optional[str] = None, rollout_clip=(None, 3.0),
                       off_policy_threshold: Optional[float] = None, delta: Optional[float] = None,
                       sapo_temperature_pos: Optional[float] = None,
                       sapo_temperature_neg: Optional[float] = None,
                       vespo_k_pos: Optional[float] = None, vespo_lambda_pos: Optional[float] = None,
                       vespo_k_neg: Optional[float] = None, vespo_lambda_neg: Optional[float] = None,
                       top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
                       bias_correction_kl: bool = False) -> PolicyLossOutput:
    """GRPO / PPO-family loss (:func:`ptcore.ops.policy_loss`) computed from the last hidden states:
    ``logps`` are ``log softmax(softcap(hidden @ weight.T + bias) / temperature)[target]`` over the
    completion tokens (``mask``), fused so that the logits never exist.

    Args:
        hidden: ``[B, T, H]``; weight ``[V, H]``; target ``[B, T]`` next-token ids (ignored where
            ``mask`` is 0); old_logps, mask, ref_logps: ``[B, T]``; advantages ``[B]`` or ``[B, T]``.
        The other options are :func:`policy_loss`'s (``sampling_logps`` ``[B, T]``,
        ``rollout_correction``, ``rollout_clip``, ``off_policy_threshold`` included: the rollout
        correction; and the newer families: sapo, luspo, vespo, gmpo, ``delta``,
        ``top_entropy_quantile``, ``entropy_coef``, ``bias_correction_kl``); the entropy the two
        entropy options use is the per-token entropy of the same tempered distribution, computed
        in the same pass (its gradient included). ``normalizer`` defaults to this batch's.
        ``top_entropy_quantile < 1`` or ``entropy_coef != 0`` make the loss depend on the whole
        batch at once: two passes over the logits (8NHV) once the batch exceeds the chunk budget.

    Returns ``PolicyLossOutput(loss, metrics)``; metrics add ``entropy`` (at no extra pass).

    Example:
        >>> h = torch.randn(2, 6, 16, requires_grad=True); W = torch.randn(50, 16)
        >>> y = torch.randint(0, 50, (2, 6)); mask = torch.zeros(2, 6); mask[:, 3:] = 1
        >>> out = linear_policy_loss(h, W, y, torch.zeros(2, 6) - 4, torch.tensor([1.0, -1.0]), mask)
        >>> out.loss.backward()
    """
    op = "linear_policy_loss"
    checks.tensor(op, "hidden", hidden, ndim=3)
    _no_fp16(op, "hidden", hidden)
    cap = checks.lm_head(op, hidden, weight, target, bias, ignore_index, softcap, names=("hidden", "target"))
    temp = checks.number(op, "temperature", temperature, low=0.0, low_open=True)
    for name, value in (("mask", mask), ("old_logps", old_logps), ("ref_logps", ref_logps),
                        ("sampling_logps", sampling_logps)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != target.shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{op}: '{name}' must have the shape of 'target' {tuple(target.shape)}, got {got}")
    checks.tensor(op, "old_logps", old_logps, ndim=2, dtypes=checks.FLOAT_DTYPES)  # before the
    # stand-in below, which would call it 'logps'
    checks.tensor(op, "advantages", advantages)
    checks.real(op, "advantages", advantages)
    checks.real(op, "mask", mask, allow_bool=True)
    checks.same_device(op, "hidden", hidden, mask=mask, old_logps=old_logps, ref_logps=ref_logps,
                       advantages=advantages, sampling_logps=sampling_logps)
    options = dict(beta=beta, kl_estimator=kl_estimator, epsilon_low=epsilon_low,
                   epsilon_high=epsilon_high, dual_clip=dual_clip,
                   importance_sampling_level=importance_sampling_level, loss_type=loss_type,
                   cispo_max=cispo_max, rollout_correction=rollout_correction,
                   rollout_clip=rollout_clip, off_policy_threshold=off_policy_threshold, delta=delta,
                   sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                   vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                   vespo_lambda_neg=vespo_lambda_neg, top_entropy_quantile=top_entropy_quantile,
                   entropy_coef=entropy_coef, bias_correction_kl=bias_correction_kl)
    # policy_loss validates the options and the advantages on a stand-in batch (the entropy is
    # the op's own, so a stand-in for it too).
    with checks.as_op(op, "policy_loss"):
        stand_in = old_logps.detach()
        policy_loss(stand_in, old_logps, advantages, mask, ref_logps=ref_logps, normalizer=normalizer,
                    sampling_logps=sampling_logps, entropy=torch.zeros_like(stand_in), **options)
    if normalizer is None:
        normalizer = default_normalizer(loss_type, mask)
    acc = acc_dtype(hidden.dtype)
    norm = torch.as_tensor(normalizer, dtype=acc, device=hidden.device).reshape(())
    backend, chunk = head_plan(hidden, weight, op)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (hidden, weight, bias)]
    loss, logp, ent, *_ = _policy_op(
        hidden, weight, target, old_logps, advantages, mask, bias, ref_logps, sampling_logps, norm,
        temp, cap, ignore_index, _encode_options(**options), backend,
        chunk, *need)
    metrics = policy_loss(logp, old_logps, advantages, mask, ref_logps=ref_logps, normalizer=norm,
                          entropy=ent, sampling_logps=sampling_logps, **options).metrics
    return PolicyLossOutput(loss, metrics)


