"""``ptcore demo --quick`` end to end: the report, plots and metrics exist and agree. (Whether
accuracy rises is the full demo's job: at quick size it is noise.)"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptcore.demo import test_time_curve as curve_of
from ptcore.demo_report import _pct
from ptcore.train.tasks import AdditionTask, Problem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "ptcore", "demo", "--quick", "--no-progress", "--threads", "1",
                           "--output", str(out), "--seed", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout
    return out


def test_demo_quick_writes_report(demo_dir):
    for name in ("report.md", "training.png", "test_time.png", "metrics.json"):
        assert (demo_dir / name).is_file(), name
    for png in ("training.png", "test_time.png"):
        assert (demo_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((demo_dir / "metrics.json").read_text())
    report = (demo_dir / "report.md").read_text()
    # accuracies are fractions of held-out problems, and the report prints exactly those
    n_eval = m["heldout_problems"]["accuracy_curve"]
    k = m["settings"]["eval_samples"]
    for stage in ("init", "sft", "grpo"):
        acc, sampled = m["accuracy"][stage], m["sampled_accuracy"][stage]
        assert 0.0 <= acc <= 1.0 and abs(acc * n_eval - round(acc * n_eval)) < 1e-9
        assert 0.0 <= sampled <= 1.0 and abs(sampled * n_eval * k - round(sampled * n_eval * k)) < 1e-9
        assert _pct(acc) in report and _pct(sampled) in report
    assert m["seed"] == 1 and m["sampler"] in ("engine", "hf")
    # training compute is 6 x parameters x tokens, accumulated over the SFT steps
    sft = m["sft_metrics"]
    assert len(sft) == m["sft_steps"] == m["sft_validation"][-1]["step"] <= m["settings"]["sft_max_steps"]
    assert m["flops"]["sft"] == pytest.approx(6 * m["parameters"] * sum(x["tokens"] for x in sft), rel=1e-6)
    assert f"{m['flops']['sft']:.3g}" in report
    phases = [c["phase"] for c in m["curve"]]
    assert phases[0] == "init" and "sft" in phases and "grpo" in phases
    flops = [c["flops"] for c in m["curve"]]
    assert flops == sorted(flops) and flops[-1] > m["flops"]["sft"]
    # test-time table: one row per N with the numbers of metrics.json
    for name in ("sft", "grpo"):
        tt = m["test_time"][name]
        assert tt["n"] == [1, 2, 4, 8]
        assert all(a <= b + 1e-12 for a, b in zip(tt["best_of_n"], tt["best_of_n"][1:]))  # oracle: monotone
        assert all(0 <= x <= 1 for x in tt["best_of_n"] + tt["majority"])
    sft_tt, grpo_tt = m["test_time"]["sft"], m["test_time"]["grpo"]
    for i, n in enumerate(grpo_tt["n"]):
        row = (f"| {n} | {_pct(sft_tt['best_of_n'][i])} | {_pct(sft_tt['majority'][i])} | "
               f"{_pct(grpo_tt['best_of_n'][i])} | {_pct(grpo_tt['majority'][i])} |")
        assert row in report
    assert re.search(r"total \d+ s", report)


def test_demo_heldout_problems_are_not_trained_on(demo_dir):
    read = lambda name: [json.loads(x) for x in (demo_dir / "data" / name).read_text().splitlines()]  # noqa: E731
    held = {r["prompt"] for r in read("heldout.jsonl")}
    m = json.loads((demo_dir / "metrics.json").read_text())
    assert len(held) == sum(m["heldout_problems"].values())
    assert not held & {r["prompt"] for r in read("sft.jsonl")}
    assert not held & {r["prompt"] for r in read("grpo.jsonl")}


def test_test_time_curve_definitions():
    task = AdditionTask(2)
    p = Problem("10+5=", "15", "15")
    # samples 0-3: wrong, right, malformed, wrong-but-frequent
    samples = [["14", "15", "x", "14"]]
    c = curve_of(task, [p], samples, 4)
    assert c["n"] == [1, 2, 4]
    assert c["best_of_n"] == [0.25, 0.5, 1.0]  # groups {14},{15},{x},{14}; {14,15},{x,14}; all
    # majority: N=1 -> 1/4 right; N=2: {14,15} tie -> first (14) wrong, {x,14} -> 14 wrong; N=4: 14 wins
    assert c["majority"] == [0.25, 0.0, 0.0]
    c = curve_of(task, [p], [["15", "14", "15", "x"]], 4)
    assert c["majority"] == [0.5, 1.0, 1.0]  # N=2: {15,14} tie -> 15 (first seen), {15,x} -> 15
