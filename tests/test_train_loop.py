"""The shared loop: schedule, accumulation normalized by the step's global token count, clipping,
exact resume after a kill, atomic checkpoints."""
import json
import math

import pytest
import torch

from ptcore.train import GRPOConfig, SFTConfig, checkpoint, run_grpo, run_sft
from ptcore.train.loop import Shuffler, lr_lambda
from tests.reference import assert_rule, rel_err, rule_bound
from tests.train_helpers import config, math_of, one_thread, same_params, sft_rows, tiny  # noqa: F401


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _same_up_to_rounding(a, c, ref, naive, what):
    """Two fp32 computations of one quantity: each within the tolerance rule of the float64
    oracle, and from each other by at most half the rule's bound."""
    a, c = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32)
    naive = torch.as_tensor(naive, dtype=torch.float32)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert_rule(a, ref, naive, what)
    assert_rule(c, ref, naive, what)
    assert rel_err(a, c) <= rule_bound(naive, ref) / 2, what


def test_warmup_cosine_schedule():
    f = lambda s: lr_lambda(s, warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 14))
    assert lr_lambda(0, warmup=0, total=10, min_ratio=0.0) == 1.0


def test_shuffler_is_a_function_of_seed_and_position():
    a, b = Shuffler(7, seed=3), Shuffler(7, seed=3)
    first = [a(p) for p in range(14)]
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:]) == list(range(7))
    assert first[7:] != first[:7]  # a fresh permutation per epoch
    assert [b(p) for p in reversed(range(14))] == first[::-1]  # any order of access


def test_accumulation_equals_one_big_batch(tmp_path):
    """Unpacked examples of different lengths: micro-batches hold different token counts, so a
    per-micro-batch mean would weight tokens differently; the global normalizer must not."""
    rows = sft_rows(16)
    rows[0]["completion"] *= 4  # token counts differ a lot between micro-batches
    runs = {}
    # the float64 run is the oracle, the fp32 one big batch the naive baseline of the tolerance rule
    for bs, acc, dtype in ((4, 1, torch.float64), (4, 1, None), (2, 2, None), (1, 4, None)):
        model, tok = tiny(dtype=dtype)
        res = run_sft(model, tok, rows, config(tmp_path, f"b{bs}-{dtype}", SFTConfig, batch_size=bs, grad_accum=acc,
                                               max_steps=3, packing=False))
        runs[(bs, acc, dtype)] = (model, res.metrics)
    (m64, r64), (m0, r0) = runs[(4, 1, torch.float64)], runs[(4, 1, None)]
    assert next(m64.parameters()).dtype == torch.float64 and next(m0.parameters()).dtype == torch.float32
    loss = lambda r: [x["loss"] for x in r]
    for key in ((2, 2, None), (1, 4, None)):
        m, r = runs[key]
        assert [a["tokens"] for a in r0] == [b["tokens"] for b in r] == [c["tokens"] for c in r64]
        _same_up_to_rounding(loss(r0), loss(r), loss(r64), loss(r0), f"losses {key}")
        _same_up_to_rounding(_flat(m0), _flat(m), _flat(m64), _flat(m0), f"parameters {key}")
    # the micro-batches did hold different token counts (so the test can fail)
    from ptcore.train import data as D
    model, tok = tiny()
    ex = D.sft_examples(D.load_records(rows, "sft"), tok, 48, report=False)
    assert len({sum(m[1:]) for _, m in ex}) > 1


def test_clipping(tmp_path, monkeypatch):
    """The logged norm is the one before clipping; the clipped gradients have norm max_norm (up to
    clip_grad_norm_'s own 1e-6 in the denominator). Both against float64 norms of the very
    gradients the loop clips, under the tolerance rule, the naive baseline being the plain fp32
    norm (and, for the clipped norm, the plain fp32 scaling by 0.01 / (fp32 norm + 1e-6))."""
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def norms(grads):  # (float64 oracle, naive fp32) norms of fp32 gradients
        n64 = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
        n32 = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        assert n32.dtype == torch.float32
        return n64, n32

    def spy(params, max_norm, *a, **k):
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        pre64, pre32 = norms(grads)
        before = [g.clone() for g in grads]
        out = real_clip(params, max_norm, *a, **k)
        post64, _ = norms(grads)
        if math.isinf(max_norm):
            naive_post = pre32.double()
            ref_post = pre64
        else:
            c32 = torch.tensor(max_norm, dtype=torch.float32) / (pre32 + 1e-6)
            naive_post = norms([g * c32 for g in before])[0]
            ref_post = max_norm * pre64 / (pre64 + 1e-6)
        seen.append((out.detach().clone(), pre64, pre32, post64, ref_post, naive_post))
        return out

    stepped = []
    real_step = torch.optim.AdamW.step

    def step_spy(self, *a, **k):  # the optimizer steps with the gradients clip_grad_norm_ clipped
        stepped.append(norms([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])[0])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    for name, clip in (("clip", 0.01), ("noclip", None)):
        seen.clear()
        stepped.clear()
        model, tok = tiny()
        res = run_sft(model, tok, sft_rows(8), config(tmp_path, name, max_grad_norm=clip, max_steps=2))
        # (float64 norms of the same fp32 gradients, summed in the optimizer's parameter order)
        assert len(seen) == 2 and [float(x) for x in stepped] == pytest.approx([float(x[3]) for x in seen], rel=1e-12)
        if clip:
            assert all(m["grad_norm"] > 0.02 for m in res.metrics)  # the norm before clipping is logged
        for m, (out, pre64, pre32, post64, ref_post, naive_post) in zip(res.metrics, seen):
            assert m["grad_norm"] == float(out)
            assert_rule(out, pre64, pre32, f"{name}: logged norm")
            assert_rule(post64, ref_post, naive_post, f"{name}: norm after clipping", dtype=torch.float32)
            if clip:
                assert abs(float(ref_post) - clip) <= clip * 1e-6 / 0.02  # max_norm, up to the 1e-6


class Killed(Exception):
    pass


def _kill_at(monkeypatch, cls, step):
    real = cls.micro_batches

    def micro_batches(self, s, model):
        if s == step:
            raise Killed()
        return real(self, s, model)

    monkeypatch.setattr(cls, "micro_batches", micro_batches)
    return real


def _resume_matches(tmp_path, monkeypatch, run, cls, kill_step, **cfg):
    model, tok = tiny()
    full = run(model, tok, config(tmp_path, "full", **cfg))
    model2, tok = tiny()
    real = _kill_at(monkeypatch, cls, kill_step)
    with pytest.raises(Killed):
        run(model2, tok, config(tmp_path, "killed", **cfg))
    monkeypatch.setattr(cls, "micro_batches", real)
    model3, tok = tiny(seed=5)  # a different init: everything must come from the checkpoint
    torch.manual_seed(999)       # and a disturbed RNG
    resumed = run(model3, tok, config(tmp_path, "killed", resume=True, **cfg))
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert math_of(lines) == math_of(full.metrics)  # the same curve, bitwise
    same_params(model, model3)
    return full


def test_sft_resume_after_kill_is_exact(tmp_path, monkeypatch):
    from ptcore.train.sft import SFTObjective
    run = lambda m, t, c: run_sft(m, t, sft_rows(12), c)
    _resume_matches(tmp_path, monkeypatch, run, SFTObjective, kill_step=4, max_steps=6, save_every=2,
                    warmup_steps=2)


def test_grpo_resume_mid_rollout_is_exact(tmp_path, monkeypatch):
    """Checkpoint at step 3 falls inside a rollout used for two steps: the rollout buffer and the
    sampling RNG come back from the checkpoint."""
    from ptcore.train.grpo import GRPOObjective
    ones = lambda prompts, completions, **_: [(ord(c[0]) % 7) / 7 if c else 0.0 for c in completions]
    data = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
    run = lambda m, t, c: run_grpo(m, t, data, GRPOConfig(**c.to_dict(), group_size=3, max_new_tokens=5,
                                                          num_iterations=2), reward_fns=[ones])
    full = _resume_matches(tmp_path, monkeypatch, run, GRPOObjective, kill_step=4, max_steps=6,
                           save_every=3, batch_size=1)
    assert all(m["grad_norm"] > 0 and m["reward_std"] > 0 for m in full.metrics)  # real updates


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model, tok = tiny()
    run_sft(model, tok, sft_rows(8), config(tmp_path, "a", max_steps=2, save_every=2))
    good = checkpoint.latest(tmp_path / "a")
    assert good.name == "step-00000002"
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and "step-00000004" in str(f):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    model, tok = tiny()
    with pytest.raises(OSError, match="disk full"):
        run_sft(model, tok, sft_rows(8), config(tmp_path, "a", max_steps=4, save_every=2, resume=True))
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest(tmp_path / "a") == good  # the half-written step 4 is not a checkpoint
    # a failed save removes its temporary directory (a killed one is removed by the next save)
    assert not (tmp_path / "a" / "checkpoints" / ".tmp-step-00000004").exists()
    model, tok = tiny()
    res = run_sft(model, tok, sft_rows(8), config(tmp_path, "a", max_steps=4, save_every=2, resume=True))
    assert [m["step"] for m in res.metrics] == [1, 2, 3, 4]
    assert checkpoint.latest(tmp_path / "a").name == "step-00000004"
