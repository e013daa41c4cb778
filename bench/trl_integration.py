"""TRL alone against TRL + ptcore (``ptcore.integrations.trl.patch_trainer``) on SmolLM2-135M:
one optimizer step of TRL's SFTTrainer, DPOTrainer and GRPOTrainer, step time and peak memory.

    python -m bench --only trl_integration          # quick profile; --full for the full sizes
    python -m bench.trl_integration [--quick] [--repeats R] [--threads T] [--kinds sft dpo grpo]

The two sides are the same trainer on the same model (fp32, no autocast), data and batch sizes
(bench/loop_real.py's chat examples), stepped the same way (bench/trl_loops.trainer_step: next
batch, training_step, clipping, optimizer and scheduler); the only difference is the patch. Every
case runs in a fresh process, so its peak memory is its own: peak RSS on the CPU (model, optimizer
state, activations: everything), ``torch.cuda.max_memory_allocated`` on a GPU. GRPO's step includes
HF ``generate`` on both sides (unchanged by the patch). Target: TRL + ptcore at least 1.3x as fast
and at most 0.7x the memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import harness, scoreboard
from .registry import Standalone

NAME = "trl_integration"
MODEL = "smollm2-135m-instruct"
KINDS = ("sft", "dpo", "grpo")
CASES = ("TRL", "TRL + ptcore")
TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
SIZES = {"sft": dict(B=8), "dpo": dict(B=8), "grpo": dict(B=2, G=8, C=24)}
QUICK_SIZES = {"sft": dict(B=2), "dpo": dict(B=2), "grpo": dict(B=1, G=2, C=4)}
TARGET = {"speed": 1.3, "memory": 0.7}


def trainer_for(kind: str, s: dict, device: str):
    """(trainer, args) of TRL's trainer for ``kind`` on SmolLM2, fp32."""
    import copy

    from datasets import Dataset

    from ptcore.models.chat import last_number_reward

    from .loop_real import LR, MAX_LENGTH, dpo_records, grpo_records, load, sft_records
    model, tok = load()
    model = model.to(device)
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-integration-"), learning_rate=LR, report_to=[],
                  logging_steps=10**9, save_strategy="no", use_cpu=device == "cpu", bf16=False,
                  disable_tqdm=True, dataloader_num_workers=0, max_steps=10**6, max_grad_norm=1.0, seed=0)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sft_records(s["B"])]
        args = SFTConfig(per_device_train_batch_size=s["B"], max_length=MAX_LENGTH, packing=False,
                         completion_only_loss=True, shuffle_dataset=False, **common)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok), args
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        args = DPOConfig(per_device_train_batch_size=s["B"], max_length=MAX_LENGTH, beta=0.1, **common)
        return DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                          train_dataset=Dataset.from_list(dpo_records(tok, s["B"])), processing_class=tok), args
    from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(per_device_train_batch_size=s["B"] * s["G"], num_generations=s["G"], max_completion_length=s["C"],
                      steps_per_generation=1, num_iterations=1, beta=0.0, loss_type="dapo", temperature=1.0,
                      top_k=0, top_p=1.0, generation_kwargs={"min_new_tokens": s["C"]}, log_completions=False,
                      **common)
    return GRPOTrainer(model=model, reward_funcs=[last_number_reward], args=args,
                       train_dataset=Dataset.from_list(grpo_records(tok, s["B"])), processing_class=tok), args


def worker(kind: str, case: str, repeats: int, s: dict) -> dict:
    from .trl_loops import trainer_step
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    trainer, args = trainer_for(kind, s, device)
    if case == "TRL + ptcore":
        from ptcore.integrations.trl import patch_trainer
        patch_trainer(trainer)
    step = trainer_step(trainer, args)
    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"case": case, "times": times, "s_per_step": statistics.median(times), "peak_bytes": peak,
            "memory": "CUDA max allocated" if device == "cuda" else "peak RSS", "threads": torch.get_num_threads()}


def run(kinds, repeats: int, threads: int | None, sizes: dict, timeout: float = 3600) -> dict:
    from ptcore import models
    res = {"benchmark": NAME, "model": MODEL, "repeats": repeats, "sizes": {k: sizes[k] for k in kinds}, "rows": []}
    why = None
    if not models.is_cached(MODEL):
        why = f"skipped: {MODEL} is not cached; run `ptcore models fetch {MODEL}`"
    try:
        import trl  # noqa: F401
    except ImportError:
        why = "skipped: trl not installed"
    for kind in kinds:
        for case in CASES:
            row = {"kind": kind, "case": case}
            if why is not None:
                res["rows"].append({**row, "status": why})
                continue
            cmd = [sys.executable, "-m", f"{__package__}.trl_integration", "--worker", kind, case, str(repeats),
                   json.dumps(sizes[kind])] + (["--threads", str(threads)] if threads else [])
            print(f"{NAME}: {kind} / {case} ...", file=sys.stderr, flush=True)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=harness.subprocess_cwd())
                line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
                if line is None:
                    tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
                    row["status"] = f"failed: {tail[0]}"
                else:
                    row.update(status="ok", **json.loads(line[len("RESULT "):]))
            except subprocess.TimeoutExpired:
                row["status"] = f"failed: timed out after {timeout:.0f} s"
            res["rows"].append(row)
    res["scoreboard"] = headlines(res)
    return res


def _pairs(res):
    for kind in res["sizes"]:
        by = {r["case"]: r for r in res["rows"] if r["kind"] == kind and r.get("status") == "ok"}
        yield kind, by.get("TRL"), by.get("TRL + ptcore")


def headlines(res) -> list[dict]:
    out = []
    for kind, trl, mine in _pairs(res):
        name, peer = f"{NAME}_{kind}", f"TRL {TRAINERS[kind]}"
        if mine is None or trl is None:
            out.append(scoreboard.failed_row(name, "a case did not run"))
            continue
        out.append(scoreboard.row(name, f"speed vs {peer}", 1 / mine["s_per_step"], peer, 1 / trl["s_per_step"],
                                  unit=" steps/s", target=(">=", TARGET["speed"])))
        out.append(scoreboard.row(name, f"memory vs {peer}", mine["peak_bytes"] / 1e6, peer, trl["peak_bytes"] / 1e6,
                                  unit=" MB", target=("<=", TARGET["memory"]), higher_is_better=False))
    return out


def table(res: dict) -> str:
    lines = [f"{NAME}: TRL alone vs TRL + ptcore.integrations.trl on {res['model']} (fp32), median of "
             f"{res['repeats']} steps, sizes {res['sizes']}",
             "| trainer | TRL s/step | TRL + ptcore s/step | speedup | TRL peak | TRL + ptcore peak | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for kind, trl, mine in _pairs(res):
        if trl is None or mine is None:
            status = next((r["status"] for r in res["rows"] if r["kind"] == kind and r.get("status") != "ok"), "")
            lines.append(f"| {TRAINERS[kind]} | {status} |" + " |" * 5)
            continue
        gib = lambda r: f"{r['peak_bytes'] / 2**30:.2f} GiB"  # noqa: E731
        lines.append(f"| {TRAINERS[kind]} | {trl['s_per_step']:.2f} | {mine['s_per_step']:.2f} | "
                     f"{trl['s_per_step'] / mine['s_per_step']:.2f}x | {gib(trl)} | {gib(mine)} | "
                     f"{mine['peak_bytes'] / trl['peak_bytes']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m bench --only {NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick profile: QUICK_SIZES, one timed step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads in each case (default: torch's)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--out", type=Path, help="results folder")
    a = p.parse_args(argv)
    res = run(a.kinds, 1 if a.quick else a.repeats, a.threads, QUICK_SIZES if a.quick else SIZES)
    print(table(res))
    out = a.out or harness.results_dir("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / f'{NAME}.json'}")
    return 1 if any(r.get("status", "").startswith("failed") for r in res["rows"]) else 0


BENCHMARK = Standalone(NAME, f"SFT / DPO / GRPO steps of TRL's trainers on {MODEL}, with and without ptcore", main)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, case, repeats, sizes = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
        if "--threads" in sys.argv:
            torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        print("RESULT " + json.dumps(worker(kind, case, repeats, sizes)), flush=True)
    else:
        sys.exit(main(sys.argv[1:]))
