"""GRPO rollouts on ptcore.engine.Engine: the policy's own parameters (no copy, the version counter
of the weights it sampled with), the sampler's log-probs against the trainer's, reproducible seeds,
eos and stop strings, every page back in the pool, and bad input leaving no sequence in the cache.

Log-prob mismatches follow the tolerance rule's per-token form (tests/reference.py max_abs_bound):
the sampler's and the trainer's fp32 log-probs are each within d of the float64 ones (a float64
copy of the weights), d being twice the plain fp32 forward's worst error plus fp32's slack, so the
two differ by at most 2d (rollout/logp_diff_max)."""
import math

import pytest
import torch

from ptcore.train import run_grpo
from ptcore.train.config import GRPOConfig
from ptcore.train.data import load_records, prompt_examples
from ptcore.train.grpo import GRPOObjective
from tests.hf_float64 import float64_norms
from tests.reference import max_abs_bound
from tests.train_helpers import config, one_thread, tiny  # noqa: F401

DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (500, 61), (7, 7)]]


def first_char(prompts, completions, **_):
    return [(ord(c[0]) % 5) / 4 if c else 0.0 for c in completions]


def objective(tmp_path, model, tok, reward_fns=(first_char,), **kw):
    prompts = prompt_examples(load_records(DATA, "grpo"), tok, 32, report=False)
    opts = dict(seed=0, group_size=3, temperature=0.8, max_new_tokens=6)
    opts.update(kw)
    cfg = GRPOConfig(output_dir=str(tmp_path), batch_size=4, max_length=48, **opts)
    obj = GRPOObjective(prompts, tok, cfg, reward_fns=list(reward_fns))
    obj.prepare_model(model)
    obj.setup(model, obj.ctx, cfg)
    return obj, prompts


def truncated(z, top_k, top_p):
    """Logits outside the kept set at -inf, from the definition: the top_k largest (ties: lower id
    first), then of those the smallest prefix whose renormalized mass ahead of a token is < top_p."""
    zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
    rank = torch.arange(z.shape[-1])
    zs = zs.masked_fill(rank >= (top_k or z.shape[-1]), -math.inf)
    if top_p < 1:
        p = torch.softmax(zs, -1)
        zs = zs.masked_fill((rank > 0) & (p.cumsum(-1) - p >= top_p), -math.inf)
    return torch.full_like(z, -math.inf).scatter(-1, order, zs)


def logps(net, b, temperature, dtype, top_k=0, top_p=1.0):
    """The batch's target log-probs: ``net``'s logits in ``dtype``, tempered, truncated, log-softmax."""
    with torch.no_grad():
        z = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                use_cache=False).logits.to(dtype) / temperature
    if top_k or top_p < 1:
        z = truncated(z, top_k, top_p)
    return torch.log_softmax(z, -1).gather(-1, b["target"].clamp(min=0)[..., None])[..., 0]


def per_token_bound(weights, b, temperature, **truncation):
    """(d, the float64 log-probs of the completion tokens) for a model with ``weights``: d the rule's
    per-token bound, from the plain fp32 forward against a float64 copy (float64 norms too)."""
    net, _ = tiny()
    net.load_state_dict(weights)
    m = b["mask"].bool()
    naive = logps(net, b, temperature, torch.float32, **truncation)[m]
    with float64_norms():
        ref = logps(net.double(), b, temperature, torch.float64, **truncation)[m]
    assert naive.dtype == torch.float32 and ref.dtype == torch.float64 and torch.isfinite(ref).all()
    return max_abs_bound(naive, ref), ref


@pytest.fixture
def rollouts(monkeypatch):
    """Every rollout a run makes, with the weights it was made from: [(state_dict, batch)]."""
    seen, real = [], GRPOObjective.make_rollout

    def spy(self, model, prompts):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        batch = real(self, model, prompts)
        seen.append((weights, batch))
        return batch

    monkeypatch.setattr(GRPOObjective, "make_rollout", spy)
    return seen


def idle(engine):
    """No sequence running, every page free (nothing left in the radix cache either)."""
    engine.cache.check()
    return not engine.cache.running and engine.pool.num_free == engine.pool.num_pages


def test_engine_rollout_matches_the_trainer_and_frees_every_page(tmp_path):
    model, tok = tiny()
    obj, prompts = objective(tmp_path, model, tok, deterministic=True)
    eng = obj.engine
    # the engine's weights ARE the policy's parameters (views, no copy)
    assert eng.model.layers[0].qkv[0][0].data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert eng.model.lm_head.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert model.training  # the engine's eval() was undone
    before = eng.stats.copy()
    batch = obj.make_rollout(model, prompts)
    assert idle(eng)
    assert batch["input_ids"].shape[0] == 4 * 3
    # each prompt encoded once for its 3 completions; each completion's last token never fed back
    lengths = batch["attention_mask"].sum(-1) - torch.tensor([len(p["prompt"]) for p in prompts]).repeat_interleave(3)
    computed = (eng.stats - before).tokens_computed
    assert computed == sum(len(p["prompt"]) for p in prompts) + int((lengths - 1).sum())
    _, m1 = obj.loss(model, batch, obj.units(batch))
    d, _ = per_token_bound(model.state_dict(), batch, 0.8)
    assert m1["rollout/logp_diff_max"] <= 2 * d, (m1, d)  # deterministic trainer log-probs
    v1 = batch["stats"]["rollout/weights_checksum"]
    # an in-place update of the weights (what the optimizer does) is what the next rollout samples with
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    batch2 = obj.make_rollout(model, prompts)
    assert batch2["stats"]["rollout/weights_checksum"] != v1
    _, m2 = obj.loss(model, batch2, obj.units(batch2))
    d, _ = per_token_bound(model.state_dict(), batch2, 0.8)
    assert m2["rollout/logp_diff_max"] <= 2 * d, (m2, d)  # stale weights would differ by far more
    assert idle(eng)


def test_run_samples_with_the_weights_of_its_step(tmp_path, rollouts):
    """Each step's rollout claims a version (``rollout/policy_step``: the optimizer steps taken
    before it): its sampling log-probs are those of a fresh model loaded with the weights after
    exactly that many steps (within the rule's per-token bound of its float64 copy), and not those
    of the step before (outside that bound)."""
    seen = rollouts
    model, tok = tiny()
    res = run_grpo(model, tok, DATA, config(tmp_path, "v", GRPOConfig, max_steps=3, batch_size=2, lr=1e-2,
                                            group_size=4, max_new_tokens=6, deterministic=True, temperature=0.8,
                                            rollout_correction="token_mask", rollout_clip_min=0.5,
                                            rollout_clip_max=2.0),
                   reward_fns=[first_char])
    assert [m["rollout/policy_step"] for m in res.metrics] == [0, 1, 2]
    sums = [m["rollout/weights_checksum"] for m in res.metrics]
    assert len(set(sums)) == 3  # every step moved the weights the engine read

    assert len(seen) == len(res.metrics) == 3
    for s, ((weights, b), metrics) in enumerate(zip(seen, res.metrics)):
        m = b["mask"].bool()
        sampled = b["sampling_logps"][m].double()
        d, ref = per_token_bound(weights, b, 0.8)
        now = float((sampled - ref).abs().max())
        print(f"\nstep {s}: sampler vs float64 {now:.2e}, d {d:.2e}, logp_diff_max {metrics['rollout/logp_diff_max']:.2e}")
        assert now <= d, (s, now, d)
        assert metrics["rollout/logp_diff_max"] <= 2 * d and metrics["rollout/masked_fraction"] == 0.0
        if s:  # the step before's weights: the sampler's log-probs fail the bound they meet now
            _, ref_before = per_token_bound(seen[s - 1][0], b, 0.8)
            before = float((sampled - ref_before).abs().max())
            print(f"step {s}: sampler vs the step before's float64 {before:.2e}")
            assert before > d, (s, before, d)
    for m in res.metrics:
        for k in ("rollout/logp_diff_mean", "rollout/kl_k3", "rollout/is_ratio_mean"):
            assert k in m


def test_seeded_rollouts_are_reproducible(tmp_path):
    outs = []
    for _ in range(2):
        model, tok = tiny()
        obj, prompts = objective(tmp_path, model, tok, seed=5)
        b = obj.make_rollout(model, prompts)
        outs.append((b["input_ids"], b["sampling_logps"]))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    model, tok = tiny()
    obj, prompts = objective(tmp_path, model, tok, seed=6)
    assert not torch.equal(obj.make_rollout(model, prompts)["input_ids"], outs[0][0])


def test_eos_and_stop_strings(tmp_path):
    model, tok = tiny()
    obj, prompts = objective(tmp_path, model, tok, max_new_tokens=8, temperature=1.5)
    b = obj.make_rollout(model, prompts)
    P = max(len(p["prompt"]) for p in prompts)
    # stop strings the same seeded rollout is known to produce: its 3rd characters
    stops = sorted({tok.decode(c[2:3].tolist()) for c, m in zip(b["input_ids"][:, P:], b["attention_mask"][:, P:])
                    if m[2] and tok.decode(c[2:3].tolist()).strip()})[:2]
    assert stops
    obj, prompts = objective(tmp_path, model, tok, stop_strings=stops, max_new_tokens=8, temperature=1.5)
    b = obj.make_rollout(model, prompts)
    comp, cmask = b["input_ids"][:, P:], b["attention_mask"][:, P:]
    stopped = 0
    for c, m in zip(comp, cmask):
        toks = c[m.bool()].tolist()
        text = tok.decode(toks)
        hit = [i for i, t in enumerate(toks) if t == tok.eos_token_id
               or any(x in tok.decode(toks[:i + 1]) for x in stops)]
        if hit:  # the completion ends at the first eos or stop string, which it keeps
            assert hit[0] == len(toks) - 1, text
            stopped += 1
        else:
            assert len(toks) == 8
    assert stopped > 0
    assert idle(obj.engine)


def test_hf_and_engine_rollouts_both_feed_sampling_logps(tmp_path, rollouts):
    model, tok = tiny()
    res = run_grpo(model, tok, DATA, config(tmp_path, "h", GRPOConfig, max_steps=1, batch_size=2, group_size=2,
                                            max_new_tokens=4, rollout="hf"), reward_fns=[first_char])
    (weights, b), = rollouts
    d, _ = per_token_bound(weights, b, 1.0)
    assert res.metrics[0]["rollout/logp_diff_max"] <= 2 * d, (res.metrics[0], d)


def _raises(obj, prompts, model, exc, match):
    with pytest.raises(exc, match=match):
        obj.make_rollout(model, prompts)
    assert idle(obj.engine)


def test_bad_input_is_a_clear_error_leaving_no_sequence(tmp_path):
    model, tok = tiny()

    def boom(prompts, completions, **_):
        raise KeyError("nope")

    obj, prompts = objective(tmp_path, model, tok, reward_fns=[boom])
    _raises(obj, prompts, model, RuntimeError, "reward function 'boom' raised KeyError")
    obj, prompts = objective(tmp_path, model, tok, reward_fns=[lambda prompts, completions, **_: [1.0]])
    _raises(obj, prompts, model, ValueError, "returned 1 values for 12 completions")

    def nan(prompts, completions, **_):
        return [math.nan] + [0.0] * (len(completions) - 1)

    obj, prompts = objective(tmp_path, model, tok, reward_fns=[nan])
    _raises(obj, prompts, model, ValueError, "'nan' returned NaN for completion 0")
    # an engine error inside sampling (here: a poisoned generator list) releases every sequence
    obj, prompts = objective(tmp_path, model, tok)
    real = obj.engine.generate_from
    obj.engine.generate_from = lambda seqs, *a, **k: (_ for _ in ()).throw(RuntimeError("mid-rollout"))
    _raises(obj, prompts, model, RuntimeError, "mid-rollout")
    obj.engine.generate_from = real
    with pytest.raises(ValueError, match="does not fit the engine's cache"):
        objective(tmp_path, model, tok, engine_max_tokens=32, max_new_tokens=30)
    with pytest.raises(ValueError, match="too small for one group"):
        objective(tmp_path, model, tok, engine_max_tokens=40, group_size=8)
    with pytest.raises(ValueError, match="group_size"):
        objective(tmp_path, model, tok, group_size=1)
    for kw, name in ((dict(rollout="vllm"), "rollout"), (dict(rollout_correction="seq"), "rollout_correction"),
                     (dict(rollout_clip_min=3.0, rollout_clip_max=1.0), "rollout_clip"),
                     (dict(off_policy_threshold=math.inf), "off_policy_threshold"),
                     (dict(stop_strings="1"), "stop_strings"), (dict(engine_max_tokens=0), "engine_max_tokens")):
        with pytest.raises(ValueError, match=name):
            objective(tmp_path, model, tok, **kw)


def test_cli_rollout_flags(tmp_path, capsys):
    import json
    from ptcore.__main__ import main
    tiny_args = ["--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--no-progress",
                 "--num-examples", "8", "--group-size", "2", "--max-new-tokens", "4"]
    out = tmp_path / "g"
    assert main(["grpo", "--task", "addition", "--output", str(out), "--rollout-correction", "sequence_mask",
                 "--rollout-clip-min", "0.5", "--off-policy-threshold", "0.1", "--stop-string", "\n",
                 "--deterministic", *tiny_args]) == 0
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    for k in ("rollout/logp_diff_mean", "rollout/logp_diff_max", "rollout/kl_k3", "rollout/masked_fraction",
              "rollout/off_policy_masked_fraction"):
        assert k in m
    assert main(["grpo", "--task", "addition", "--output", str(tmp_path / "b"), "--rollout-clip-min", "4",
                 *tiny_args]) == 2
    assert "--rollout-clip-min/--rollout-clip-max must have min <= max" in capsys.readouterr().err


def test_truncated_sampling_matches_truncation_aware_trainer(tmp_path, rollouts):
    """top_k / top_p on the engine: the trainer's log-probs of the truncated distribution equal the
    sampler's to rounding, where the full-vocabulary log-probs are off by log S."""
    from ptcore.ops import linear_logprobs
    model, tok = tiny()
    obj, prompts = objective(tmp_path, model, tok, top_k=6, top_p=0.9, deterministic=True, temperature=1.0)
    b = obj.make_rollout(model, prompts)
    _, metrics = obj.loss(model, b, obj.units(b))
    d, _ = per_token_bound(model.state_dict(), b, 1.0, top_k=6, top_p=0.9)
    assert metrics["rollout/logp_diff_max"] <= 2 * d, (metrics, d)
    m = b["mask"].bool()
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    output_hidden_states=True)
        full = linear_logprobs(out.hidden_states[-1], model.get_output_embeddings().weight, b["target"])
    assert (b["sampling_logps"] - full)[m].abs().mean() > 1e-2  # the bias log S the truncation removes
    res = run_grpo(model, tok, DATA, config(tmp_path, "t", GRPOConfig, max_steps=1, batch_size=2, group_size=2,
                                            max_new_tokens=4, top_k=5, top_p=0.8), reward_fns=[first_char])
    assert len(rollouts) == 2  # the one above, then the run's one
    weights, b = rollouts[1]
    d, _ = per_token_bound(weights, b, 1.0, top_k=5, top_p=0.8)
    assert res.metrics[0]["rollout/logp_diff_max"] <= 2 * d, (res.metrics[0], d)
    with pytest.raises(ValueError, match="top_p"):
        objective(tmp_path, model, tok, top_p=0.0)
