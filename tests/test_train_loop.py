"""The shared loop: schedule, accumulation normalized by the step's global token count, clipping,
exact resume after a kill, atomic checkpoints."""
import json
import math

import pytest
import torch

from ptcore.train import checkpoint, run_grpo, run_sft
from ptcore.train.loop import Shuffler, lr_lambda
from tests.train_helpers import config, math_of, one_thread, same_params, sft_rows, tiny  # noqa: F401


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
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        model, tok = tiny()
        res = run_sft(model, tok, rows, config(tmp_path, f"b{bs}", batch_size=bs, grad_accum=acc, max_steps=3),
                      packing=False)
        runs[(bs, acc)] = (model, res.metrics)
    (m0, r0) = runs[(4, 1)]
    for key in ((2, 2), (1, 4)):
        m, r = runs[key]
        for a, b in zip(r0, r):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        same_params(m0, m, exact=False, atol=1e-5)
    # the micro-batches did hold different token counts (so the test can fail)
    from ptcore.train import data as D
    model, tok = tiny()
    ex = D.sft_examples(D.load_records(rows, "sft"), tok, 48, report=False)
    assert len({sum(m[1:]) for _, m in ex}) > 1


def test_clipping(tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for g in self.param_groups
                                  for p in g["params"] if p.grad is not None)))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model, tok = tiny()
    res = run_sft(model, tok, sft_rows(8), config(tmp_path, "clip", max_grad_norm=0.01, max_steps=2))
    assert all(m["grad_norm"] > 0.02 for m in res.metrics)  # the norm before clipping is logged
    assert seen == pytest.approx([0.01, 0.01], rel=1e-4)
    seen.clear()
    model, tok = tiny()
    res = run_sft(model, tok, sft_rows(8), config(tmp_path, "noclip", max_grad_norm=None, max_steps=2))
    assert seen == pytest.approx([m["grad_norm"] for m in res.metrics], rel=1e-4)


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
    run = lambda m, t, c: run_grpo(m, t, data, c, reward_fns=[ones], group_size=3, max_new_tokens=5,
                                   num_iterations=2)
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
