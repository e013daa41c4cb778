"""GRPO: completion masks, old log-probs equal to the sampler's (same tempered distribution, same
positions as generate), a training run with a toy reward, reward-function errors."""
import copy
import math

import pytest
import torch

from ptcore.train import run_grpo
from ptcore.train.config import GRPOConfig
from ptcore.train.data import load_records, prompt_examples
from ptcore.train.grpo import GRPOObjective, answer_reward, completion_mask
from tests.reference import SLACK, assert_rule, max_abs_bound, rel_err, rule_bound
from tests.train_helpers import config, one_thread, tiny  # noqa: F401

DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (500, 61), (7, 7)]]


def first_char(prompts, completions, **_):
    return [(ord(c[0]) % 5) / 4 if c else 0.0 for c in completions]


def test_completion_mask_stops_after_first_eos():
    comp = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 0, 0]])
    assert completion_mask(comp, 2, 0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_builtin_answer_reward():
    assert answer_reward(["1+2="] * 3, ["3", "4", " 3\nmore"], answer=["3", "3", "3"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        answer_reward(["p"], ["3"])


def test_old_logps_are_the_samplers(tmp_path):
    """Left-padded prompts of different lengths: the training forward must use the positions and
    the tempered distribution generate sampled from."""
    model, tok = tiny()
    prompts = prompt_examples(load_records(DATA, "grpo"), tok, 32, report=False)
    cfg = GRPOConfig(output_dir=str(tmp_path), batch_size=4, max_length=48, group_size=2, temperature=0.7,
                     max_new_tokens=6, rollout="hf")
    obj = GRPOObjective(prompts, tok, cfg, reward_fns=[first_char])
    obj.prepare_model(model)
    obj.setup(model, obj.ctx, cfg)
    scores = {}
    real = model.generate

    def generate(**kw):
        out = real(**kw)  # the rollout asks for output_scores itself (its sampling_logps)
        scores["s"] = torch.stack(out.scores, 1)  # [B, new, V], after the temperature
        return out

    model.generate = generate
    batch = obj.make_rollout(model, prompts)
    assert batch["old_logps"] is None  # filled by the first optimization pass, from its forward
    loss, metrics = obj.loss(model, batch, obj.units(batch))
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0
    mask, P = batch["mask"].bool(), batch["input_ids"].shape[1] - scores["s"].shape[1]
    sampled = batch["input_ids"][:, P:]
    sampler = torch.log_softmax(scores["s"].double(), -1).gather(-1, sampled[..., None])[..., 0]
    ours = batch["old_logps"][:, P - 1:-1]
    m = mask[:, P - 1:-1]
    assert m.sum() > 8 and (batch["attention_mask"][:, 0] == 0).any()  # some prompts are padded
    # Tolerance rule: the training forward's and generate's fp32 log-probs each against the same
    # tempered log-probs from a float64 copy of the model (the batch's left-padding positions), the
    # naive baseline being that forward in plain fp32; and within half the bound of each other.
    def tempered(net, acc):
        with torch.no_grad():
            z = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False).logits[:, P - 1:-1]
        return torch.log_softmax(z.to(acc) / 0.7, -1).gather(-1, sampled[..., None])[..., 0]

    ref64 = tempered(copy.deepcopy(model).double(), torch.float64)
    naive = tempered(model, torch.float32)
    assert ref64.dtype == torch.float64 and naive.dtype == torch.float32
    assert_rule(ours[m], ref64[m], naive[m], "training forward's old log-probs", dtype=torch.float32)
    assert_rule(sampler[m], ref64[m], naive[m], "generate's log-probs", dtype=torch.float32)
    assert rel_err(ours[m], sampler[m]) <= rule_bound(naive[m], ref64[m]) / 2
    assert (batch["old_logps"][~mask] == 0).all()
    # the rollout's sampling_logps are generate's own, at the same positions: against the float64
    # log-softmax of generate's fp32 scores under the rule (naive: the fp32 log-softmax of them)
    naive_s = torch.log_softmax(scores["s"].float(), -1).gather(-1, sampled[..., None])[..., 0]
    assert_rule(batch["sampling_logps"][:, P - 1:-1][m], sampler[m], naive_s[m], "sampling_logps",
                dtype=torch.float32)
    # the trainer's and the sampler's log-probs, each within the per-token bound of the float64 ones
    print(f"\nlogp_diff_max {metrics['rollout/logp_diff_max']:.2e}, bound {2 * max_abs_bound(naive[m], ref64[m]):.2e}")
    assert metrics["rollout/logp_diff_max"] <= 2 * max_abs_bound(naive[m], ref64[m])
    assert batch["advantages"].shape == (8,)


def test_grpo_trains_with_a_toy_reward(tmp_path, monkeypatch):
    model, tok = tiny()
    model0 = copy.deepcopy(model)  # the sampling policy of the one rollout, and the KL reference
    before = [p.detach().clone() for p in model.parameters()]
    rollouts, make_rollout = [], GRPOObjective.make_rollout

    def recorded(self, *a, **kw):
        rollouts.append(make_rollout(self, *a, **kw))
        return rollouts[-1]

    monkeypatch.setattr(GRPOObjective, "make_rollout", recorded)
    res = run_grpo(model, tok, DATA, config(tmp_path, "g", GRPOConfig, max_steps=2, batch_size=2, group_size=4,
                                            max_new_tokens=6, num_iterations=2, kl_coef=0.1, temperature=0.9),
                   reward_fns=[first_char])
    m1, m2 = res.metrics
    # Step 1 is on-policy and its policy is the reference: every log-prob difference behind
    # ratio_mean (current - old) and kl (reference - current) is the rounding of two fp32
    # computations of the same tempered log-prob, each within the per-token bound d of the float64
    # one, so |difference| <= 2d; hence |ratio_mean - 1| <= expm1(2d) (+ fp32's slack for the
    # mean) and |kl| <= k3(2d) = exp(2d) - 2d - 1 (+ 2 fp32 eps: k3 evaluated in fp32 at a tiny
    # difference cancels to within an ulp of 1, either sign). d: from the rollout's tokens, the
    # initial model in float64 against the plain fp32 forward.
    assert rollouts and all(r["mask"].sum() > 0 for r in rollouts)
    model64 = copy.deepcopy(model0).double()
    ref, naive = [], []
    for r in rollouts:
        m, tgt = r["mask"].bool(), r["target"].clamp(min=0)[..., None]
        for net, out in ((model64, ref), (model0, naive)):
            with torch.no_grad():
                z = net(input_ids=r["input_ids"], attention_mask=r["attention_mask"],
                        position_ids=r["position_ids"], use_cache=False).logits
            out.append(torch.log_softmax(z / 0.9, -1).gather(-1, tgt)[..., 0][m])
    ref, naive = torch.cat(ref), torch.cat(naive)
    assert ref.dtype == torch.float64 and naive.dtype == torch.float32
    d2 = 2 * max_abs_bound(naive, ref)
    slack = SLACK[torch.float32]
    print(f"\nstep 1: |ratio_mean - 1| = {abs(m1['ratio_mean'] - 1):.2e}, kl = {m1['kl']:.2e}; 2d = {d2:.2e}")
    assert abs(m1["ratio_mean"] - 1) <= math.expm1(d2) + slack, (m1["ratio_mean"], d2)
    eps = torch.finfo(torch.float32).eps
    assert abs(m1["kl"]) <= math.exp(d2) - d2 - 1 + 2 * eps, (m1["kl"], d2)
    assert m2["ratio_mean"] != m1["ratio_mean"]  # the second pass over the rollout is off-policy
    assert m1["reward"] == m2["reward"] and m1["reward_std"] > 0
    for key in ("entropy", "completion_length", "clip_ratio/region_mean", "rewards/first_char"):
        assert key in m1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reward_function_errors(tmp_path):
    model, tok = tiny()
    bad = lambda prompts, completions, **_: [1.0]
    with pytest.raises(ValueError, match="returned 1 values for 4 completions"):
        run_grpo(model, tok, DATA, config(tmp_path, "e", GRPOConfig, max_steps=1, batch_size=1, group_size=4,
                                          max_new_tokens=2), reward_fns=[bad])
    with pytest.raises(ValueError, match="group_size"):
        run_grpo(model, tok, DATA, config(tmp_path, "e", GRPOConfig, group_size=1))
