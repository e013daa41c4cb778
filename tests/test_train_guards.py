"""Issue 18, the loop's guards: options checked before any work, non-finite steps skipped, counted
and bounded, a non-finite model never saved, a failed run leaves no temporary files; the CLI
reports errors in one paragraph naming the flag (or file:line) with exit status 2."""
import json
import math

import pytest
import torch

from ptcore.__main__ import main
from ptcore.train import DPOConfig, GRPOConfig, TrainConfig, TrainingError, checkpoint, run_dpo, run_grpo, run_sft
from ptcore.train import data as D
from ptcore.train.tasks import write_jsonl
from tests.train_helpers import config, one_thread, sft_rows, tiny  # noqa: F401


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def stray_files(root):
    return [p for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("kw, name", [
    (dict(lr=float("inf")), "'lr'"), (dict(lr=1e30), "'lr'"), (dict(lr=float("nan")), "'lr'"),
    (dict(lr=0.0), "'lr'"), (dict(weight_decay=float("nan")), "'weight_decay'"),
    (dict(weight_decay=1e30), "'weight_decay'"), (dict(max_grad_norm=float("nan")), "'max_grad_norm'"),
    (dict(max_grad_norm=float("inf")), "'max_grad_norm'"), (dict(min_lr_ratio=float("nan")), "'min_lr_ratio'"),
    (dict(seed=2**64), "'seed'"), (dict(max_consecutive_skips=0), "'max_consecutive_skips'"),
    (dict(lr=True), "'lr'"),
])
def test_config_rejects_non_finite_and_absurd_numbers(tmp_path, kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        TrainConfig(output_dir=str(tmp_path / "x"), **kw)


def test_config_rejects_a_file_as_output(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="'output_dir'.*not a directory"):
        TrainConfig(output_dir=str(f))


def test_dpo_options_fail_before_the_reference_pass(tmp_path):
    model, tok = tiny()
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
    for kw, name in ((dict(beta=-1.0), "'beta'"), (dict(loss_type="nope"), "'loss_type'"),
                     (dict(label_smoothing=0.7, loss_type="robust"), "'label_smoothing'"),
                     (dict(beta=float("nan")), "'beta'")):
        with pytest.raises(ValueError, match=f"run_dpo: {name}"):
            run_dpo(model, None, tok, rows, config(tmp_path, "dpo", DPOConfig, **kw))
    assert not (tmp_path / "dpo").exists()  # no ref_logps.pt, no empty metrics.jsonl


def test_grpo_options_named_as_run_grpo_names_them(tmp_path):
    model, tok = tiny()
    rows = [{"prompt": "1+1=", "answer": "2"}] * 4
    for kw, name in ((dict(kl_coef=-1.0), "'kl_coef'"), (dict(group_size=1), "'group_size'"),
                     (dict(temperature=float("nan")), "'temperature'"),
                     (dict(temperature=0.005), "'temperature'"),  # below the log-prob ops' bound
                     (dict(epsilon_low=2.0), "'epsilon_low'"), (dict(group_size=2.5), "'group_size'")):
        with pytest.raises(ValueError, match=f"run_grpo: {name}"):
            run_grpo(model, tok, rows, config(tmp_path, "grpo", GRPOConfig, **kw))
    with pytest.raises(D.DataError, match=r"data\[1\]: missing key 'answer'"):
        run_grpo(model, tok, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}],
                 config(tmp_path, "grpo", GRPOConfig, group_size=2))
    assert not (tmp_path / "grpo").exists()


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    from ptcore.train.sft import SFTObjective
    real = SFTObjective.loss
    calls = []

    def loss(self, model, mb, global_units):
        out, m = real(self, model, mb, global_units)
        calls.append(1)
        return (out * float("nan") if len(calls) == 2 else out), m  # step 2 only

    monkeypatch.setattr(SFTObjective, "loss", loss)
    model, tok = tiny()
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen[len(calls)] = True
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    res = run_sft(model, tok, sft_rows(8), config(tmp_path, save_final=True, save_every=1))
    assert [m["skipped"] for m in res.metrics] == [0, 1, 0]
    assert res.metrics[-1]["skipped_steps"] == 1 and sorted(seen) == [1, 3]  # no update at step 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "run" / "final" / "config.json").is_file() and not stray_files(tmp_path)


def test_consecutive_skips_stop_the_run_and_nothing_non_finite_is_saved(tmp_path, monkeypatch):
    from ptcore.train.sft import SFTObjective
    real = SFTObjective.loss
    monkeypatch.setattr(SFTObjective, "loss", lambda self, *a: (real(self, *a)[0] * math.nan, {}))
    model, tok = tiny()
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="3 consecutive steps .*non-finite.*step-00000002"):
        run_sft(model, tok, sft_rows(8), config(tmp_path, max_steps=6, save_final=True, save_every=1))
    m = lines(out / "metrics.jsonl")
    assert [x["skipped"] for x in m] == [1, 1, 1] and m[-1]["skipped_steps"] == 3
    # the checkpoints of the skipped steps hold the (finite, unchanged) model; no final/
    sd = torch.load(checkpoint.latest(out) / "model.pt")
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert not (out / "final").exists() and not stray_files(tmp_path)


def test_a_non_finite_model_is_never_written(tmp_path, monkeypatch):
    """Finite loss and gradients, but the update makes a weight inf: the checkpoint of that step
    and final/ are refused; the last good checkpoint stays."""
    model, tok = tiny()
    real_step = torch.optim.AdamW.step
    n = []

    def step(self, *a, **k):
        r = real_step(self, *a, **k)
        n.append(1)
        if len(n) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return r

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite weights; not saving the checkpoint of step 2"):
        run_sft(model, tok, sft_rows(8), config(tmp_path, max_steps=3, save_every=1, save_final=True))
    assert checkpoint.latest(out).name == "step-00000001" and not (out / "final").exists()
    assert not stray_files(tmp_path)


TINY = ["--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--no-progress", "--num-examples", "8"]


@pytest.mark.parametrize("argv, message", [
    (["sft", "--lr", "inf"], "--lr must be a finite number"),
    (["sft", "--lr", "1e30"], "--lr must be <="),
    (["sft", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["sft", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["grpo", "--kl-coef", "-1"], "--kl-coef must be >= 0"),
    (["dpo", "--beta", "nan"], "--beta must be a finite number"),
    (["dpo", "--loss-type", "robust", "--label-smoothing", "0.6"], "--label-smoothing must be in"),
    (["sft", "--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["sft", "--max-consecutive-skips", "0"], "--max-consecutive-skips must be an int >= 1"),
    (["sft", "--model", "/no/such/model"], "--model '/no/such/model' is neither a model name"),
    (["dpo", "--ref-model", "nope"], "--ref-model 'nope' is neither"),
    (["sft", "--num-examples", "-1"], "--num-examples must be >= 1"),
])
def test_cli_bad_flags_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([argv[0], "--task", "addition", "--output", str(out), *TINY, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written: no data file, no metrics, no ref_logps.pt


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n', ":2: not UTF-8"),
    (bytes(range(1, 256)) * 3, ":1: not"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", ":1: the JSON is nested too deeply"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "\xc3\xa9"}\n',
     ":2: cannot tokenize this record: text: character"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ":2: missing key 'completion'"),
    (b"", "the data file is empty"),
])
def test_cli_data_errors_name_file_and_line(tmp_path, capsys, content, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    assert main(["sft", "--data", str(data), "--output", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{data}{message}" in err or (message in err and str(data) in err), err
    assert "Traceback" not in err and not out.exists()


def test_cli_grpo_without_answer_and_output_file(tmp_path, capsys):
    data = tmp_path / "g.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    assert main(["grpo", "--data", str(data), "--output", str(tmp_path / "o"), *TINY]) == 2
    assert f"{data}:2: missing key 'answer'" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["sft", "--task", "addition", "--output", str(f), *TINY]) == 2
    assert "--output" in capsys.readouterr().err and f.read_text() == "x"


def test_cli_diverged_run_exits_2_and_saves_nothing(tmp_path, capsys, monkeypatch):
    from ptcore.train.sft import SFTObjective
    real = SFTObjective.loss
    monkeypatch.setattr(SFTObjective, "loss",
                        lambda self, *a: (real(self, *a)[0] * math.inf, {}))
    out = tmp_path / "o"
    assert main(["sft", "--task", "addition", "--output", str(out), *TINY[2:], "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "3 consecutive steps" in err and "Traceback" not in err
    assert not (out / "final").exists() and not stray_files(tmp_path)


def test_write_jsonl_leaves_no_temporary_file_on_failure(tmp_path):
    with pytest.raises(ValueError):
        write_jsonl("addition", "sft", tmp_path / "x.jsonl", n=-1)
    assert list(tmp_path.iterdir()) == []


def test_an_infinite_reward_names_the_reward_function(tmp_path):
    model, tok = tiny()
    rows = [{"prompt": "1+1=", "answer": "2"}] * 4

    def broken(prompts, completions, **_):
        return [float("inf")] * len(completions)

    with pytest.raises(ValueError, match="reward function 'broken' returned inf for completion 0"):
        run_grpo(model, tok, rows, config(tmp_path, "g", GRPOConfig, max_steps=1, group_size=2, max_new_tokens=2),
                 reward_fns=[broken])
