"""The three loops against TRL on the real model (SmolLM2-135M-Instruct, from ``ptcore.models``):
one optimizer step of SFT, DPO and GRPO, ptcore (fp32) vs TRL's trainers (bf16 autocast and
gradient checkpointing off: TRL's fair CPU configuration), on the same chat examples per step.

    python -m bench --only loop_sft_real   # or loop_dpo_real, loop_grpo_real
    python -m bench.loop_real sft --repeats R --threads T [--quick] [--out DIR]

Every case runs in a fresh process (its peak RSS is its own): the bare GEMMs of the model's linear
layers for the step's tokens (forward + both backward GEMMs into preallocated outputs: the rate
that bounds training FLOPs, measured in the same run), one ptcore step, one TRL step. Columns:

* s/step (median of the timed steps, after one warm-up step);
* real tokens/s: non-padding tokens of the step (prompts + completions) over s/step;
* of GEMM: ``6 x FLOP-bearing parameters x tokens/s`` over the bare-GEMM rate; the FLOP-bearing
  parameters are the linear layers' weights with the tied LM head counted and the embedding
  lookup not (134.5M for SmolLM2); for GRPO the generation is inside the step but not in the
  numerator, on both sides alike;
* peak RSS of the process (model, optimizer state, activations: everything);
* ratios: TRL's s/step and peak RSS over ptcore's (on TRL's row: over the headline ptcore
  case's; on any other ptcore row: over that row's).

Work per step: SFT, 8 chat conversations (ptcore: ``batch_size=8`` examples packed into rows of
``max_length``; TRL: 8 examples padded to the longest, loss on the assistant turn as ptcore's);
DPO, 8 preference pairs of chat-format addition (right answer vs a near miss; ptcore caches the
reference log-probs once, TRL's default recomputes them every step); GRPO, 2 chat prompts x 8
completions of exactly 24 tokens (``min_new_tokens`` on every side), ptcore twice: rolling out on
its own engine (the default and the headline) and with HF ``generate`` (what TRL does), so the
engine's share of the speed-up shows.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from . import harness, scoreboard
from .registry import Standalone

NAME = "smollm2-135m-instruct"
KINDS = ("sft", "dpo", "grpo")
TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
ENGINE, HF = "ptcore (engine rollouts)", "ptcore (HF rollouts)"
CASES = {"sft": ("model GEMMs", "ptcore", "TRL"), "dpo": ("model GEMMs", "ptcore", "TRL"),
         "grpo": ("model GEMMs", ENGINE, HF, "TRL")}
HEADLINE = {"sft": "ptcore", "dpo": "ptcore", "grpo": ENGINE}  # the ptcore case held to the targets
SIZES = {"sft": dict(B=8), "dpo": dict(B=8), "grpo": dict(B=2, G=8, C=24)}
# the quick profile: a quarter of the examples (GRPO: one prompt x 4 completions of 12 tokens), one
# timed step; the ratios are per token, and each side does the same work per step
QUICK_SIZES = {"sft": dict(B=2), "dpo": dict(B=2), "grpo": dict(B=1, G=4, C=12)}
# scoreboard targets: speed (real tokens/s) over TRL's, peak memory over TRL's, "of GEMM"
TARGETS = {"sft": dict(speed=1.6, memory=0.6, of_gemm=0.8), "dpo": dict(speed=1.6), "grpo": dict(speed=3.0)}
LR = 1e-5
MAX_LENGTH = 256


def load():
    from ptcore import models
    return models.load(NAME, fetch_missing=False)


def flop_params(model) -> int:
    """Weights of the linear layers, the (tied) LM head included, the embedding lookup not."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# ---- the data (the same examples on both sides) ----

def sft_records(B):
    from ptcore.models.chat import addition_sft, conversations
    convs = conversations("train")[: B - B // 4] + addition_sft(B // 4)
    return [{"messages": c["messages"]} for c in convs[:B]]


def dpo_records(tok, B):
    from ptcore.models.chat import addition_question, addition_problems
    rng = random.Random(0)
    out = []
    for a, b, s in addition_problems(B, seed=1):
        prompt = tok.apply_chat_template([{"role": "user", "content": addition_question(a, b)}],
                                         add_generation_prompt=True, tokenize=False)
        out.append({"prompt": prompt, "chosen": str(s), "rejected": str(s + rng.choice([-10, -1, 1, 10]))})
    return out


def grpo_records(tok, B):
    from ptcore.models.chat import addition_prompts
    return addition_prompts(tok, 64, seed=2)


def tokens_per_step(kind, tok, s) -> int:
    """Real (non-padding) tokens of one step, by ptcore's tokenization (TRL's is the same ids)."""
    from ptcore.train.data import load_records, pair_examples, prompt_examples, sft_examples
    if kind == "sft":
        ex = sft_examples(load_records(sft_records(s["B"]), "sft"), tok, MAX_LENGTH, report=False)
        return sum(len(ids) for ids, _ in ex)
    if kind == "dpo":
        ex = pair_examples(load_records(dpo_records(tok, s["B"]), "dpo"), tok, MAX_LENGTH, report=False)
        return sum(2 * len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in ex)
    ex = prompt_examples(load_records(grpo_records(tok, s["B"]), "grpo"), tok, MAX_LENGTH, report=False)
    mean_prompt = statistics.mean(len(e["prompt"]) for e in ex)  # the prompts vary by a token or two
    return round(s["B"] * s["G"] * (mean_prompt + s["C"]))


# ---- the three cases ----

def gemm_step(kind, s):
    model, tok = load()
    N = tokens_per_step(kind, tok, s)
    bufs = []
    seen = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            w = m.weight.detach()
            out_f, in_f = w.shape
            bufs.append((torch.randn(N, in_f), w, torch.randn(N, out_f), torch.empty(N, out_f),
                         torch.empty(N, in_f), torch.empty_like(w)))

    def step():
        for x, w, g, y, gx, gw in bufs:
            torch.mm(x, w.t(), out=y)
            torch.mm(g, w, out=gx)
            torch.mm(g.t(), x, out=gw)
    return step


def ptcore_step(kind, s, rollout="engine"):
    from ptcore.models.chat import last_number_reward
    from ptcore.train.config import DPOConfig, GRPOConfig, SFTConfig
    from ptcore.train.data import load_records, pair_examples, prompt_examples, sft_examples
    from ptcore.train.distributed import DistContext
    from ptcore.train.loop import make_optimizer, train_step

    model, tok = load()
    common = dict(output_dir=tempfile.mkdtemp(prefix="ptcore-bench-"), max_steps=10**6, batch_size=s["B"],
                  max_length=MAX_LENGTH, lr=LR, progress=False, save_final=False)
    if kind == "sft":
        from ptcore.train.sft import SFTObjective
        ex = sft_examples(load_records(sft_records(s["B"]), "sft"), tok, MAX_LENGTH, report=False)
        cfg = SFTConfig(**common, packing=True)
        obj = SFTObjective(ex, tok, cfg)  # batch_size = 8 examples, packed
    elif kind == "dpo":
        from ptcore.train.dpo import DPOObjective
        cfg = DPOConfig(**common, beta=0.1)
        obj = DPOObjective(pair_examples(load_records(dpo_records(tok, s["B"]), "dpo"), tok, MAX_LENGTH,
                                         report=False), tok, cfg)
    else:
        from ptcore.train.grpo import GRPOObjective
        # min_new_tokens = max_new_tokens: every completion exactly C tokens, as TRL's
        cfg = GRPOConfig(**common, group_size=s["G"], max_new_tokens=s["C"], min_new_tokens=s["C"],
                         loss_type="dapo", rollout=rollout)
        obj = GRPOObjective(prompt_examples(load_records(grpo_records(tok, s["B"]), "grpo"), tok, MAX_LENGTH,
                                            report=False), tok, cfg, reward_fns=[last_number_reward])
    ctx = DistContext()
    obj.prepare_model(model)
    optimizer, scheduler = make_optimizer(model, cfg)
    obj.setup(model, ctx, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"step": 0}

    def step():
        train_step(model, obj, optimizer, scheduler, state["step"], ctx, cfg, params, 1.0, torch.device("cpu"))
        state["step"] += 1
    return step


def trl_step(kind, s):
    from datasets import Dataset

    from ptcore.models.chat import last_number_reward
    model, tok = load()
    # bf16 autocast; gradient checkpointing is off by default
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), learning_rate=LR, report_to=[],
                  logging_steps=10**9, save_strategy="no", use_cpu=True, bf16=True,
                  disable_tqdm=True, dataloader_num_workers=0, max_steps=10**6, max_grad_norm=1.0, seed=0)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sft_records(s["B"])]
        args = SFTConfig(per_device_train_batch_size=s["B"], max_length=MAX_LENGTH, packing=False,
                         completion_only_loss=True, shuffle_dataset=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    elif kind == "dpo":
        from trl import DPOConfig, DPOTrainer
        args = DPOConfig(per_device_train_batch_size=s["B"], max_length=MAX_LENGTH, beta=0.1, **common)
        ref = copy.deepcopy(model).eval()
        trainer = DPOTrainer(model=model, ref_model=ref, args=args,
                             train_dataset=Dataset.from_list(dpo_records(tok, s["B"])), processing_class=tok)
    else:
        from trl import GRPOConfig, GRPOTrainer
        args = GRPOConfig(per_device_train_batch_size=s["B"] * s["G"], num_generations=s["G"],
                          max_completion_length=s["C"], steps_per_generation=1, num_iterations=1, beta=0.0,
                          loss_type="dapo", temperature=1.0, top_k=0, top_p=1.0,
                          generation_kwargs={"min_new_tokens": s["C"]}, log_completions=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[last_number_reward], args=args,
                              train_dataset=Dataset.from_list(grpo_records(tok, s["B"])), processing_class=tok)
    from .trl_loops import trainer_step
    return trainer_step(trainer, args)


def worker(kind: str, case: str, repeats: int, s: dict) -> dict:
    torch.manual_seed(0)
    build = {"model GEMMs": gemm_step, "ptcore": ptcore_step, ENGINE: partial(ptcore_step, rollout="engine"),
             HF: partial(ptcore_step, rollout="hf"), "TRL": trl_step}[case]
    step = build(kind, s)
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    model, tok = load()
    return {"case": case, "times": times, "s_per_step": statistics.median(times),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_step": tokens_per_step(kind, tok, s), "flop_params": flop_params(model),
            "threads": torch.get_num_threads()}


def run(kind: str, repeats: int, threads: int | None, s: dict, timeout: float = 3600) -> dict:
    from ptcore import models
    rows = []
    if not models.is_cached(NAME):
        why = f"skipped: {NAME} is not cached; run `ptcore models fetch {NAME}`"
        print(f"loop_{kind}_real: {why}", file=sys.stderr)
        return {"benchmark": f"loop_{kind}_real", "model": NAME, "sizes": s, "repeats": repeats,
                "trainer": TRAINERS[kind], "rows": [{"case": c, "status": why} for c in CASES[kind]]}
    for case in CASES[kind]:
        if case == "TRL":
            try:
                import trl  # noqa: F401
            except ImportError:
                rows.append({"case": case, "status": "skipped: trl not installed"})
                continue
        cmd = [sys.executable, "-m", f"{__package__}.loop_real", "--worker", kind, case, str(repeats), json.dumps(s)]
        if threads:
            cmd += ["--threads", str(threads)]
        print(f"loop_{kind}_real: {case} ...", file=sys.stderr, flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=harness.subprocess_cwd())
            line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
            if line is None:
                tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
                rows.append({"case": case, "status": f"failed: {tail[0]}"})
            else:
                rows.append({"status": "ok", **json.loads(line[len("RESULT "):])})
        except subprocess.TimeoutExpired:
            rows.append({"case": case, "status": f"failed: timed out after {timeout:.0f} s"})
    ok = {r["case"]: r for r in rows if r.get("status") == "ok"}
    gemm = ok.get("model GEMMs")
    for r in ok.values():
        r["tokens_per_s"] = r["tokens_per_step"] / r["s_per_step"]
        r["gflops"] = 6 * r["flop_params"] * r["tokens_per_s"] / 1e9
        r["of_gemm"] = gemm["s_per_step"] / r["s_per_step"] if gemm else None
    if "TRL" in ok:
        for case in CASES[kind]:
            # the headline case's ratios go on TRL's row (the layout SFT and DPO keep), another
            # ptcore case's on that case's own row
            if case.startswith("ptcore") and case in ok:
                where = ok["TRL"] if case == HEADLINE[kind] else ok[case]
                where["time_ratio"] = ok["TRL"]["s_per_step"] / ok[case]["s_per_step"]
                where["rss_ratio"] = ok["TRL"]["peak_rss_bytes"] / ok[case]["peak_rss_bytes"]
    return {"benchmark": f"loop_{kind}_real", "model": NAME, "sizes": s, "repeats": repeats,
            "trainer": TRAINERS[kind], "rows": rows, "scoreboard": headlines(kind, ok)}


def headlines(kind: str, ok: dict) -> list[dict]:
    """Scoreboard rows: the headline ptcore case's real tokens/s and peak RSS beside TRL's, its "of
    GEMM"; for GRPO also the HF-rollout case's speed beside TRL's (no target: the baseline that
    shows what the engine adds)."""
    name, trainer, target = f"loop_{kind}_real", f"TRL {TRAINERS[kind]}", TARGETS[kind]
    mine, peer = ok.get(HEADLINE[kind]), ok.get("TRL")
    if mine is None:
        return [scoreboard.failed_row(name, f"{HEADLINE[kind]}: did not run")]
    get = lambda r, k: None if r is None else r[k]  # noqa: E731
    status = "ok" if peer is not None else "TRL: did not run"
    out = [scoreboard.row(name, f"speed vs {trainer}", mine["tokens_per_s"], trainer, get(peer, "tokens_per_s"),
                          unit=" tok/s", target=(">=", target["speed"]), status=status),
           scoreboard.row(name, f"memory vs {trainer}", mine["peak_rss_bytes"] / 1e6, trainer,
                          None if peer is None else peer["peak_rss_bytes"] / 1e6, unit=" MB",
                          target=("<=", target["memory"]) if "memory" in target else None, status=status,
                          higher_is_better=False)]
    if mine.get("of_gemm") is not None:
        out.append(scoreboard.row(name, "of GEMM", mine["of_gemm"], target=(">=", target.get("of_gemm", 0.8))))
    if kind == "grpo":
        hf = ok.get(HF)
        out.append(scoreboard.row(name, f"speed vs {trainer} (HF rollouts)", get(hf, "tokens_per_s"), trainer,
                                  get(peer, "tokens_per_s"), unit=" tok/s",
                                  status="ok" if hf is not None and peer is not None else
                                  f"{HF if hf is None else 'TRL'}: did not run"))
    return out


def table(res: dict) -> str:
    head = "| case | s/step | real tokens/s | GFLOP/s | of GEMM | peak RSS | TRL/ptcore time | TRL/ptcore RSS |"
    lines = [f"{res['benchmark']}: {res['model']}, sizes {res['sizes']}, median of {res['repeats']} steps",
             head, "|" + "---|" * 8]
    for r in res["rows"]:
        name = f"TRL {res['trainer']}" if r["case"] == "TRL" else r["case"]
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')} |" + " |" * 7)
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} | "
                     f"{f('of_gemm', '{:.2f}')} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{f('time_ratio', '{:.2f}x')} | {f('rss_ratio', '{:.2f}x')} |")
    return "\n".join(lines)


def main_for(kind: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m bench --only loop_{kind}_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads in each case (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the quick profile: QUICK_SIZES, one timed step")
    p.add_argument("--out", type=Path, help="results folder")
    a = p.parse_args(argv)
    res = run(kind, 1 if a.quick else a.repeats, a.threads, (QUICK_SIZES if a.quick else SIZES)[kind])
    print(table(res))
    out = a.out or harness.results_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loop_{kind}_real.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / f'loop_{kind}_real.json'}")
    bad = [r for r in res["rows"] if r["case"] != "TRL" and r.get("status", "").startswith("failed")]
    return 1 if bad else 0


SFT, DPO, GRPO = (Standalone(f"loop_{k}_real", f"{k.upper()} optimizer step on {NAME} vs TRL", partial(main_for, k))
                  for k in KINDS)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, case, repeats, sizes = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
        if "--threads" in sys.argv:
            torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        print("RESULT " + json.dumps(worker(kind, case, repeats, sizes)), flush=True)
    else:
        p = argparse.ArgumentParser(prog="python -m bench.loop_real")
        p.add_argument("kind", choices=KINDS)
        a, rest = p.parse_known_args()
        sys.exit(main_for(a.kind, rest))
