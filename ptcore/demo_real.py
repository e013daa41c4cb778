"""``ptcore demo --model smollm2-135m-instruct``: the three pillars on a real model, on the CPU.

SmolLM2-135M-Instruct already knows the chat format and writes sums in its own words
("345 + 678 = 1023"), but gets 3-digit addition mostly wrong. So:

1. held-out accuracy (greedy, on the engine) of the model as it comes;
2. GRPO on chat-format 3-digit addition (train split) with a partial-credit reward
   (:func:`ptcore.models.chat.addition_reward`), then held-out accuracy again; accuracy itself is
   exact: the completion's last number equals the sum;
3. test-time scaling on the engine: N = 1, 2, 4, 8, 16 samples per held-out problem, best-of-N with
   the verifier as oracle and majority vote over the answers, for the model before and after GRPO.

Writes ``report.md``, ``training.png``, ``test_time.png`` and ``metrics.json`` to ``--output``.
About 15 minutes on 2 cores (``--quick``: a few minutes, smaller everything).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NAME = "smollm2-135m-instruct"


@dataclass
class RealDemoSettings:
    n_eval: int = 48          # held-out problems for greedy accuracy (before / after GRPO)
    n_ttc: int = 16           # held-out problems for test-time scaling
    max_samples: int = 16     # largest N
    max_new_tokens: int = 20  # "206 + 883 = 1089" is 14 tokens (digits are single tokens), eos one more
    temperature: float = 0.7  # GRPO rollouts and test-time samples
    grpo_steps: int = 20
    grpo_prompts: int = 2     # prompts per step, each with grpo_group completions
    grpo_group: int = 8
    grpo_lr: float = 5e-5
    n_train: int = 512        # training prompts (train split)


FULL = RealDemoSettings()
QUICK = RealDemoSettings(n_eval=8, n_ttc=4, max_samples=4, grpo_steps=2, grpo_prompts=1,
                         grpo_group=4, n_train=16)


def _prompt_ids(tok, problems):
    from ptcore.models.chat import addition_messages
    return [list(tok.apply_chat_template(addition_messages(a, b), add_generation_prompt=True, tokenize=True,
                                         return_dict=False))
            for a, b, _ in problems]


def sample(model, tok, prompts, n, max_new_tokens, temperature, seed) -> list[list[str]]:
    """``n`` completions per prompt on the engine (temperature 0: greedy, n must be 1)."""
    from ptcore.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer=tok)  # a fresh engine: it keeps copies of the current weights
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=None if temperature == 0 else seed, stop_token_ids=(tok.eos_token_id,))
    torch.manual_seed(seed)
    outs = engine.generate(prompts, params, n=n)
    return [[tok.decode(c.tokens, skip_special_tokens=True) for c in row] for row in outs]


def accuracy(model, tok, problems, s, seed) -> tuple[float, list[str]]:
    from ptcore.models.chat import last_number
    texts = [row[0] for row in sample(model, tok, _prompt_ids(tok, problems), 1, s.max_new_tokens, 0, seed)]
    right = [last_number(t) == total for t, (_, _, total) in zip(texts, problems)]
    return sum(right) / max(1, len(problems)), texts


def test_time_curve(problems, samples, max_n) -> dict:
    """Best-of-N (right when any of the N is) and majority vote (most frequent last number, ties to
    the first seen) for N = 1, 2, 4, ..., max_n, averaged over the max_n / N disjoint groups."""
    from ptcore.models.chat import last_number
    ns = [2 ** k for k in range(int(math.log2(max_n)) + 1)]
    best, major = [], []
    for n in ns:
        b = m = 0.0
        groups = max_n // n
        for (_, _, total), texts in zip(problems, samples):
            answers = [last_number(t) for t in texts]
            for g in range(groups):
                group = answers[g * n:(g + 1) * n]
                b += any(a == total for a in group)
                votes = Counter(a for a in group if a is not None)
                if votes:
                    top = max(votes.values())
                    m += next(a for a in group if a is not None and votes[a] == top) == total
        best.append(b / (groups * len(problems)))
        major.append(m / (groups * len(problems)))
    return {"n": ns, "best_of_n": best, "majority": major}


def run_real_demo(output="ptcore-demo-real", settings: RealDemoSettings = FULL, seed=0, progress=True) -> dict:
    from ptcore import models
    from ptcore.models.chat import addition_problems, addition_prompts, addition_reward
    from ptcore.train import GRPOConfig, run_grpo

    s = settings
    t_start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    model, tok = models.load(NAME)
    timings["load_s"] = time.perf_counter() - t0
    heldout = addition_problems(s.n_eval + s.n_ttc, seed=seed, split="heldout")
    eval_problems, ttc_problems = heldout[:s.n_eval], heldout[s.n_eval:]
    base = copy.deepcopy(model)

    t0 = time.perf_counter()
    acc_before, texts_before = accuracy(model, tok, eval_problems, s, seed)
    timings["eval_before_s"] = time.perf_counter() - t0
    print(f"ptcore demo: {NAME} held-out accuracy (greedy, {len(eval_problems)} problems): {acc_before:.1%}",
          file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    cfg = GRPOConfig(output_dir=str(out / "grpo"), max_steps=s.grpo_steps, batch_size=s.grpo_prompts,
                     lr=s.grpo_lr, warmup_steps=0, max_length=256, seed=seed, progress=progress,
                     log_every=max(1, s.grpo_steps // 10), save_final=False, group_size=s.grpo_group,
                     temperature=s.temperature, max_new_tokens=s.max_new_tokens)
    grpo = run_grpo(model, tok, addition_prompts(tok, s.n_train, seed=seed), cfg, reward_fns=[addition_reward])
    model = grpo.model.eval()
    timings["grpo_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acc_after, texts_after = accuracy(model, tok, eval_problems, s, seed)
    timings["eval_after_s"] = time.perf_counter() - t0
    print(f"ptcore demo: after {s.grpo_steps} GRPO steps: held-out accuracy {acc_after:.1%}",
          file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    ttc = {}
    for name, m in (("base", base), ("grpo", model)):
        samples = sample(m, tok, _prompt_ids(tok, ttc_problems), s.max_samples, s.max_new_tokens,
                         s.temperature, seed)
        ttc[name] = test_time_curve(ttc_problems, samples, s.max_samples)
    timings["test_time_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    result = {"model": NAME, "task": "chat-format 3-digit addition", "seed": seed, "settings": asdict(s),
              "threads": torch.get_num_threads(),
              "heldout_problems": {"accuracy": len(eval_problems), "test_time": len(ttc_problems)},
              "accuracy": {"before": acc_before, "after_grpo": acc_after},
              "examples": [{"question": f"{a} + {b}", "sum": t, "before": x, "after": y}
                           for (a, b, t), x, y in list(zip(eval_problems, texts_before, texts_after))[:6]],
              "grpo_metrics": [{k: m.get(k) for k in ("step", "reward", "reward_std", "completion_length",
                                                      "truncated", "loss")} for m in grpo.metrics],
              "test_time": ttc, "timings_s": timings}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    write_report(out, result)
    return result


def write_report(out: Path, r: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = [m["step"] for m in r["grpo_metrics"]]
        ax1.plot(steps, [m["reward"] for m in r["grpo_metrics"]], marker=".", label="mean reward (rollouts)")
        ax1.set_xlabel("GRPO step")
        ax1.set_ylabel("reward")
        ax1.set_title("GRPO rollouts' mean reward")
        ax2.bar(["before", "after GRPO"], [r["accuracy"]["before"], r["accuracy"]["after_grpo"]])
        ax2.set_ylim(0, 1)
        ax2.set_title(f"held-out accuracy (greedy, {r['heldout_problems']['accuracy']} problems)")
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, style in (("base", "--"), ("grpo", "-")):
            tt = r["test_time"][name]
            ax.plot(tt["n"], tt["best_of_n"], style, marker="o", label=f"{name}: best-of-N (oracle)")
            ax.plot(tt["n"], tt["majority"], style, marker="s", label=f"{name}: majority vote")
        ax.set_xscale("log", base=2)
        ax.set_xticks(r["test_time"]["grpo"]["n"], [str(n) for n in r["test_time"]["grpo"]["n"]])
        ax.set_ylim(0, 1)
        ax.set_xlabel("samples per problem (N)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"test-time scaling ({r['heldout_problems']['test_time']} problems, "
                     f"T={r['settings']['temperature']})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "test_time.png", dpi=110)
        plt.close(fig)
        plots = "![training](training.png)\n\n![test-time scaling](test_time.png)\n"
    except ImportError:
        plots = "(matplotlib is not installed: no plots)\n"
    pct = lambda x: f"{100 * x:.1f}%"
    s, t = r["settings"], r["timings_s"]
    lines = [f"# ptcore demo: {r['model']}", "",
             f"Task: {r['task']} (held-out problems: a split no training prompt comes from); seed {r['seed']}, "
             f"{r['threads']} threads, {t['total_s']:.0f} s in all.", "",
             "| stage | held-out accuracy (greedy) |", "|---|---|",
             f"| as it comes | {pct(r['accuracy']['before'])} |",
             f"| after {s['grpo_steps']} GRPO steps ({s['grpo_prompts']} prompts x {s['grpo_group']} completions, "
             f"lr {s['grpo_lr']}) | {pct(r['accuracy']['after_grpo'])} |", "",
             "Test-time scaling on the engine (accuracy of N samples at T="
             f"{s['temperature']}):", "", "| N | " + " | ".join(str(n) for n in r["test_time"]["grpo"]["n"]) + " |",
             "|---|" + "---|" * len(r["test_time"]["grpo"]["n"])]
    for name in ("base", "grpo"):
        tt = r["test_time"][name]
        lines.append(f"| {name} best-of-N | " + " | ".join(pct(x) for x in tt["best_of_n"]) + " |")
        lines.append(f"| {name} majority | " + " | ".join(pct(x) for x in tt["majority"]) + " |")
    lines += ["", "Examples (greedy, before -> after):", ""]
    lines += [f"- {e['question']} = {e['sum']}: {e['before']!r} -> {e['after']!r}" for e in r["examples"]]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), "", plots]
    (out / "report.md").write_text("\n".join(lines))
