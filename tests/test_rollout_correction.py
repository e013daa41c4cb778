"""Rollout correction (sampler log-probs in the loss) against TRL 1.16's own code on the same
tensors: the importance weight is TRL's block of ``GRPOTrainer._generate_and_score_completions``
(its source, executed as is on these tensors: the smallest TRL unit that computes it, since it
lives inline in that method), OPSM is TRL's static ``GRPOTrainer.get_off_policy_mask``, and the
whole loss is TRL's ``GRPOTrainer._compute_loss`` called on a minimal stand-in trainer.
Nothing of TRL's logic is re-written here."""
import collections
import inspect
import math
import textwrap
import types

import pytest
import torch

from ptcore.ops import linear_policy_loss, policy_loss
from ptcore.ops.policy import ROLLOUT_CORRECTIONS

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer

MODES = ROLLOUT_CORRECTIONS


def _trl_is_block():
    """The source of TRL's importance-sampling block (from ``if self.use_vllm and
    self.vllm_importance_sampling_correction:`` with ``mask = completion_mask`` to the end of that
    ``if``), dedented, compiled once."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, l in enumerate(lines)
                 if l.strip() == "if self.use_vllm and self.vllm_importance_sampling_correction:"
                 and "mask = completion_mask" in lines[i + 1])
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return compile(textwrap.dedent("\n".join(lines[start:end])), "trl_is_block", "exec")


TRL_IS = _trl_is_block()


def trl_is_ratio(old, samp, mask, mode, clip_min, clip_max):
    self = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode=mode,
                                 vllm_importance_sampling_clip_min=clip_min,
                                 vllm_importance_sampling_clip_max=clip_max)
    ns = dict(self=self, torch=torch, math=math, old_per_token_logps=old,
              sampling_per_token_logps=samp, completion_mask=mask, tool_mask=None)
    exec(TRL_IS, ns)
    return ns["vllm_importance_sampling_ratio"]


class _Acc:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(lp, old, samp, adv, mask, *, loss_type, mode, clip, threshold, beta=0.0, ref=None,
             level="token", eps_low=0.2, eps_high=0.28):
    """TRL's ``_compute_loss`` on a stand-in trainer whose model returns ``lp``."""
    B, T = lp.shape
    use_is = mode is not None
    inputs = {"prompt_ids": torch.zeros(B, 0, dtype=torch.long),
              "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if samp is not None:
        inputs["sampling_per_token_logps"] = samp
    if use_is:
        inputs["importance_sampling_ratio"] = trl_is_ratio(old, samp, mask, mode, *clip)
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=threshold,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=use_is, vllm_importance_sampling_correction=use_is,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T, accelerator=_Acc(), _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list)})
    return GRPOTrainer._compute_loss(self, None, inputs)


def make(B=6, T=7, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    samp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread  # ratios around the clip
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(torch.float64)
    mask[0] = 1
    mask[1, 2:] = 0
    return lp, old, samp, ref, adv, mask


CLIPS = [(None, 3.0), (0.5, 2.0), (None, None), (0.8, None)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_importance_weight_equals_trl(mode, clip):
    from ptcore.ops.policy import rollout_weight
    lp, old, samp, _, _, mask = make(B=12, spread=0.8 if mode.startswith("token") else 0.5)
    samp[2, 3] = math.nan  # a token the sampler could not score: ratio 1 in both
    if mode.endswith("truncate") and clip == (None, None):  # TRL's clamp fails; ptcore names it
        with pytest.raises(RuntimeError):
            trl_is_ratio(old, samp, mask, mode, *clip)
        with pytest.raises(ValueError, match="rollout_clip"):
            policy_loss(lp, old, torch.zeros(12), mask, sampling_logps=samp,
                        rollout_correction=mode, rollout_clip=clip)
        return
    want = trl_is_ratio(old, samp, mask, mode, *clip)
    m = mask.bool()
    z = torch.zeros((), dtype=old.dtype)
    got = rollout_weight(torch.where(m, old, z), torch.where(m, samp, z), mask, mode, *clip)
    assert got.shape == want.shape
    # outside the mask TRL's ratio is exp(0) = 1 (or clipped); the loss masks those tokens anyway
    if got.shape[-1] == 1:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(got[m], want[m], rtol=1e-12, atol=0)
    if mode.endswith("mask") and clip != (None, None):
        assert (want == 0).any() and (want != 0).any()  # the draw exercises both sides


def test_off_policy_mask_equals_trl():
    from ptcore.ops.policy import off_policy_keep
    lp, old, samp, _, adv, mask = make(spread=0.5)
    for thr in (-0.2, 0.0, 0.1, 0.3):
        want = GRPOTrainer.get_off_policy_mask(adv[:, None], lp, samp, mask, thr)
        got = off_policy_keep(adv[:, None], lp, samp, mask, thr)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (GRPOTrainer.get_off_policy_mask(adv[:, None], lp, samp, mask, 0.0) == 0).any()


CASES = [("grpo", "sequence_mask", (None, 3.0), None), ("dapo", "token_truncate", (None, 3.0), None),
         ("bnpo", "token_mask", (0.5, 2.0), None), ("dr_grpo", "sequence_truncate", (0.5, 2.0), None),
         ("grpo", None, (None, 3.0), 0.05), ("dapo", "token_mask", (None, 1.5), 0.0),
         ("cispo", "token_truncate", (None, 3.0), 0.1), ("grpo", "sequence_mask", (0.3, 3.0), 0.1)]


@pytest.mark.parametrize("loss_type,mode,clip,threshold", CASES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl(loss_type, mode, clip, threshold, beta):
    lp, old, samp, ref, adv, mask = make(spread=0.25 if mode and mode.startswith("seq") else 0.6)
    eps_high = 1.5 if loss_type == "cispo" else 0.28  # TRL's cispo caps at epsilon_high itself
    a = lp.clone().requires_grad_(True)
    want = trl_loss(a, old, samp, adv, mask, loss_type=loss_type, mode=mode, clip=clip,
                    threshold=threshold, beta=beta, ref=ref, eps_high=eps_high)
    (gw,) = torch.autograd.grad(want, a)
    b = lp.clone().requires_grad_(True)
    got = policy_loss(b, old, adv, mask, loss_type=loss_type, epsilon_high=eps_high,
                      cispo_max=eps_high if loss_type == "cispo" else None, beta=beta,
                      ref_logps=ref if beta else None, sampling_logps=samp,
                      rollout_correction=mode, rollout_clip=clip, off_policy_threshold=threshold)
    (gg,) = torch.autograd.grad(got.loss, b)
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gg * mask, gw * mask, rtol=1e-10, atol=1e-12)


def test_opsm_without_sampling_logps_uses_old_like_trl():
    lp, old, _, _, adv, mask = make()
    a = lp.clone().requires_grad_(True)
    want = trl_loss(a, old, None, adv, mask, loss_type="grpo", mode=None, clip=(None, 3.0), threshold=0.02)
    got = policy_loss(lp, old, adv, mask, loss_type="grpo", epsilon_high=0.28, off_policy_threshold=0.02)
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,threshold", [("sequence_mask", None), ("token_mask", 0.05),
                                            ("token_truncate", None)])
def test_fused_equals_unfused(mode, threshold):
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 4, 6, 8, 17
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    lp0 = torch.log_softmax(h @ W.T, -1).gather(-1, y[..., None])[..., 0]
    old = lp0 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    samp = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -0.5, 0.3], dtype=torch.float64)
    opts = dict(sampling_logps=samp, rollout_correction=mode, rollout_clip=(0.9, 1.1),
                off_policy_threshold=threshold, loss_type="grpo")
    hf = h.clone().requires_grad_(True)
    fused = linear_policy_loss(hf, W, y, old, adv, mask, **opts)
    fused.loss.backward()
    hu = h.clone().requires_grad_(True)
    lp = torch.log_softmax(hu @ W.T, -1).gather(-1, y[..., None])[..., 0]
    ref = policy_loss(lp, old, adv, mask, **opts)
    ref.loss.backward()
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hf.grad, hu.grad, rtol=1e-8, atol=1e-10)
    if mode.endswith("mask"):  # the draw exercises the correction
        assert 0 < float(ref.metrics["rollout/masked_fraction"]) < 1
    # and the fused loss against TRL's _compute_loss on the same log-probs
    want = trl_loss(lp.detach(), old, samp, adv, mask.double(), loss_type="grpo", mode=mode,
                    clip=(0.9, 1.1), threshold=threshold, eps_high=0.2)
    torch.testing.assert_close(fused.loss, want, rtol=1e-9, atol=1e-12)
    for k, v in ref.metrics.items():
        if k.startswith("rollout/"):
            torch.testing.assert_close(fused.metrics[k], v, rtol=1e-9, atol=1e-12)


def test_mismatch_metrics():
    lp, old, samp, _, adv, mask = make()
    out = policy_loss(lp, old, adv, mask, sampling_logps=samp, rollout_correction="token_mask",
                      rollout_clip=(0.5, 2.0))
    m = mask.bool()
    d = (samp - old).abs()[m]
    assert math.isclose(float(out.metrics["rollout/logp_diff_mean"]), float(d.mean()), rel_tol=1e-12)
    assert math.isclose(float(out.metrics["rollout/logp_diff_max"]), float(d.max()), rel_tol=1e-12)
    r = (old - samp)[m]
    assert math.isclose(float(out.metrics["rollout/kl_k3"]), float((r.exp() - r - 1).mean()), rel_tol=1e-12)
    w = (old - samp).exp()[m]
    masked = ((w < 0.5) | (w > 2.0)).double().mean()
    assert math.isclose(float(out.metrics["rollout/masked_fraction"]), float(masked), rel_tol=1e-12)


@pytest.mark.parametrize("fn", ["policy_loss", "linear_policy_loss"])
def test_bad_input_named(fn):
    lp, old, samp, _, adv, mask = make()
    if fn == "policy_loss":
        call = lambda **k: policy_loss(lp, old, adv, mask, **k)
    else:
        B, T = lp.shape
        h, W, y = torch.randn(B, T, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), \
            torch.randint(0, 9, (B, T))
        call = lambda **k: linear_policy_loss(h, W, y, old, adv, mask, **k)
    with pytest.raises(ValueError, match="sampling_logps"):
        call(sampling_logps=samp[:, :-1], rollout_correction="token_mask")
    with pytest.raises(ValueError, match="sampling_logps"):
        call(rollout_correction="token_mask")  # required with a correction
    with pytest.raises(ValueError, match="rollout_correction"):
        call(sampling_logps=samp, rollout_correction="token_clip")
    with pytest.raises(ValueError, match="rollout_clip"):
        call(sampling_logps=samp, rollout_correction="token_mask", rollout_clip=(2.0, 1.0))
    with pytest.raises(ValueError, match="rollout_clip"):
        call(sampling_logps=samp, rollout_correction="token_mask", rollout_clip=3.0)
    with pytest.raises(ValueError, match="rollout_clip"):
        call(sampling_logps=samp, rollout_correction="token_mask", rollout_clip=(None, math.inf))
    with pytest.raises(ValueError, match="off_policy_threshold"):
        call(off_policy_threshold=math.nan)
