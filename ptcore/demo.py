"""``ptcore demo``: the three ways post-training scales, end to end on the CPU, with real numbers.

1. SFT of the embedded tiny Llama from scratch on a synthetic verifiable task (default: 3-digit
   addition with zero-padded operands), stopped once it solves most validation problems but
   still makes mistakes (validation problems: train split, never trained on);
2. GRPO on the task's reward, which raises held-out accuracy further;
3. test-time scaling: N = 1, 2, 4, ..., 32 samples per held-out problem, best-of-N with the task's
   verifier as the oracle (right when any of the N is right) and majority vote over the N answers.

Accuracy is always measured on held-out problems, a split no training example comes from
(:mod:`ptcore.train.tasks`). Writes ``report.md``, ``training.png``, ``test_time.png`` and every
number in ``metrics.json`` to ``--output``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ptcore.train.tasks import TASKS, AdditionTask, get_task, write_jsonl
from ptcore.train.tiny import load_model_and_tokenizer


@dataclass
class DemoSettings:
    """Everything the demo's numbers depend on (tuned so that, on 2 CPU cores in a few minutes,
    SFT leaves room that GRPO and test-time samples then fill)."""
    model: dict = field(default_factory=dict)   # tiny_config overrides
    n_train: int = 20000          # training problems (SFT and GRPO draw from the same train split)
    n_val: int = 200              # train-split problems outside the training data: SFT's stop rule
    n_eval: int = 300             # held-out problems for the accuracy curves
    eval_samples: int = 4         # sampled accuracy: mean over this many samples per problem
    n_ttc: int = 200              # held-out problems for test-time scaling
    max_samples: int = 32         # largest N
    temperature: float = 1.0      # sampling temperature for GRPO, sampled accuracy and test time
    # SFT runs at a constant learning rate (after warmup) in chunks, and stops at the end of the
    # first chunk where greedy accuracy on the validation problems reaches sft_target: when a
    # tiny model "gets" addition varies by hundreds of steps, so a fixed step count would leave
    # GRPO either nothing to learn from or nothing to improve.
    sft_target: float = 0.7
    sft_chunk: int = 50
    sft_max_steps: int = 1500
    sft_batch: int = 72           # examples per step (14 tokens each: 8 packed rows of 128 tokens)
    sft_max_length: int = 128
    sft_lr: float = 3e-3
    sft_warmup: int = 50
    sft_eval_every: int = 100     # held-out curve points (checkpoints)
    grpo_steps: int = 200
    grpo_prompts: int = 32        # prompts per step, each with grpo_group completions
    grpo_group: int = 8
    grpo_lr: float = 2e-4
    grpo_warmup: int = 20         # a fresh Adam's first steps are full-size sign steps: ramp up
    grpo_eval_every: int = 50


# The demo's task configurations: zero-padded operands put every digit at a fixed position, which
# the tiny model learns within the demo's few minutes (unpadded 3-digit addition takes it longer).
DEMO_TASKS = {"addition": AdditionTask(digits=3, pad=True), "countdown": TASKS["countdown"]}

FULL = DemoSettings()
QUICK = DemoSettings(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                     n_train=500, n_val=20, n_eval=40, eval_samples=2, n_ttc=16, max_samples=8,
                     sft_chunk=3, sft_max_steps=6, sft_batch=18, sft_warmup=2, sft_eval_every=3,
                     grpo_steps=2, grpo_prompts=4, grpo_group=4, grpo_warmup=0, grpo_eval_every=1)


# -- evaluation -------------------------------------------------------------------------------------
def _prompt_batch(tokenizer, prompts):
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task, problems, max_new_tokens, chunk=100) -> float:
    """Share of ``problems`` whose greedy completion the task's reward accepts."""
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(problems), chunk):
        batch = problems[i:i + chunk]
        ids, mask = _prompt_batch(tokenizer, [p.prompt for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        correct += sum(task.reward(t, p.answer) for t, p in zip(texts, batch))
    model.train(was_training)
    return correct / max(1, len(problems))


class Sampler:
    """N samples per prompt at a temperature: on ptcore's engine (paged KV cache; the prompt is
    encoded once and its samples fork from it) when it runs here, else Hugging Face generate."""

    def __init__(self, prefer_engine: bool = True):
        self.backend = "hf"
        self.why = "ptcore.engine not requested"
        if prefer_engine:
            try:
                from ptcore.engine import Engine, SamplingParams  # noqa: F401
                self.backend, self.why = "engine", None
            except Exception as e:  # noqa: BLE001 - any import problem falls back, with the reason
                self.why = f"ptcore.engine unavailable: {e}"

    def __call__(self, model, tokenizer, prompts, n, max_new_tokens, temperature, seed) -> list[list[str]]:
        if self.backend == "engine":
            try:
                return self._engine(model, tokenizer, prompts, n, max_new_tokens, temperature, seed)
            except Exception as e:  # noqa: BLE001 - the report says which backend produced the numbers
                self.backend, self.why = "hf", f"ptcore.engine failed: {type(e).__name__}: {e}"
                print(f"ptcore demo: {self.why}; sampling with Hugging Face generate instead", file=sys.stderr)
        return self._hf(model, tokenizer, prompts, n, max_new_tokens, temperature, seed)

    @staticmethod
    def _engine(model, tokenizer, prompts, n, max_new_tokens, temperature, seed):
        from ptcore.engine import Engine, SamplingParams
        ids = [tokenizer.encode(p) for p in prompts]
        longest = max(map(len, ids)) + max_new_tokens
        engine = Engine(model, page_size=16, max_cached_tokens=max(4096, 16 * (len(prompts) * n + 1) * (-(-longest // 16))))
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                stop_token_ids=(tokenizer.eos_token_id,))
        torch.manual_seed(seed)
        outs = engine.generate(ids, params, n=n)
        return [[tokenizer.decode(c.tokens, skip_special_tokens=True) for c in row] for row in outs]

    @staticmethod
    @torch.no_grad()
    def _hf(model, tokenizer, prompts, n, max_new_tokens, temperature, seed, chunk=50):
        model.eval()
        torch.manual_seed(seed)
        out = []
        for i in range(0, len(prompts), chunk):
            batch = prompts[i:i + chunk]
            ids, mask = _prompt_batch(tokenizer, batch)
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                  temperature=temperature, top_k=None, top_p=None,
                                  num_return_sequences=n, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
            out += [texts[j * n:(j + 1) * n] for j in range(len(batch))]
        return out


def test_time_curve(task, problems, samples, max_n) -> dict:
    """Accuracy of best-of-N (oracle verifier: right when any sample is) and of majority vote
    (most frequent extracted answer, ties to the first seen, no answer = no vote) for
    N = 1, 2, 4, ..., max_n. The ``max_n`` samples of each problem are cut into ``max_n / N``
    disjoint groups of N and the accuracy averaged over them (less noise than one group)."""
    ns = [2 ** k for k in range(int(math.log2(max_n)) + 1)]
    best, major = {}, {}
    for n in ns:
        b = m = 0.0
        groups = max_n // n
        for p, texts in zip(problems, samples):
            rewards = [task.reward(t, p.answer) for t in texts]
            answers = [task.extract_answer(t) for t in texts]
            for g in range(groups):
                sl = slice(g * n, (g + 1) * n)
                b += max(rewards[sl])
                votes = Counter(a for a in answers[sl] if a is not None)
                if votes:
                    top = max(votes.values())
                    pick = next(i for i in range(sl.start, sl.stop) if answers[i] is not None and votes[answers[i]] == top)
                    m += rewards[pick]
        best[n] = b / (groups * len(problems))
        major[n] = m / (groups * len(problems))
    return {"n": ns, "best_of_n": [best[n] for n in ns], "majority": [major[n] for n in ns]}


def sampled_accuracy(sampler, model, tokenizer, task, problems, samples, max_new_tokens, temperature,
                     seed) -> float:
    """Mean reward of ``samples`` samples per problem at ``temperature`` (pass@1 when sampling)."""
    outs = sampler(model, tokenizer, [p.prompt for p in problems], samples, max_new_tokens, temperature, seed)
    return sum(task.reward(t, p.answer) for p, row in zip(problems, outs) for t in row) / max(1, samples * len(problems))


def evaluate(model, tokenizer, task, problems, settings, sampler, max_new_tokens, seed) -> dict:
    return {"greedy": greedy_accuracy(model, tokenizer, task, problems, max_new_tokens),
            "sampled": sampled_accuracy(sampler, model, tokenizer, task, problems, settings.eval_samples,
                                        max_new_tokens, settings.temperature, seed)}


def checkpoint_curve(run_dir, eval_model, tokenizer, task, problems, settings, sampler, max_new_tokens,
                     phase, flops_offset, metrics, seed, every) -> list[dict]:
    """Held-out accuracy (greedy and sampled) of the run's checkpoints at multiples of ``every``
    and the last one; then the checkpoints are deleted (only the demo's window into a run)."""
    by_step = {m["step"]: m for m in metrics}
    root = Path(run_dir) / "checkpoints"
    found = sorted(root.glob("step-*"))
    points = []
    for ckpt in found:
        step = int(ckpt.name.split("-")[1])
        if step % every and ckpt != found[-1]:
            continue
        eval_model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
        acc = evaluate(eval_model, tokenizer, task, problems, settings, sampler, max_new_tokens, seed)
        points.append({"phase": phase, "step": step, "flops": flops_offset + by_step[step]["flops"],
                       "heldout_accuracy": acc["greedy"], "heldout_sampled_accuracy": acc["sampled"]})
        print(f"ptcore demo: {phase} step {step}: held-out accuracy greedy {acc['greedy']:.3f}, "
              f"sampled {acc['sampled']:.3f}", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return points


# -- the run ----------------------------------------------------------------------------------------
def run_demo(output="ptcore-demo", task_name="addition", settings: DemoSettings = FULL, seed=0,
             progress=True) -> dict:
    from ptcore.train import GRPOConfig, SFTConfig, run_grpo, run_sft

    t_start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    task = DEMO_TASKS[task_name] if task_name in DEMO_TASKS else get_task(task_name)
    s = settings
    model, tok = load_model_and_tokenizer("tiny", seed=seed, **s.model)
    eval_model = copy.deepcopy(model)  # checkpoints are loaded into this one
    n_params = sum(p.numel() for p in model.parameters())

    sft_path = write_jsonl(task, "sft", out / "data" / "sft.jsonl", n=s.n_train, seed=seed)
    grpo_path = write_jsonl(task, "grpo", out / "data" / "grpo.jsonl", n=s.n_train, seed=seed)
    heldout = task.problems(s.n_eval + s.n_ttc, seed=seed, split="heldout")
    eval_problems, ttc_problems = heldout[:s.n_eval], heldout[s.n_eval:]
    val_problems = task.problems(s.n_train + s.n_val, seed=seed)[s.n_train:]  # train split, unseen
    with open(out / "data" / "heldout.jsonl", "w") as f:  # what the accuracies are measured on
        f.writelines(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in heldout)
    max_new = max(len(p.solution) for p in val_problems + heldout) + 2  # answer, eos, one spare

    timings = {}
    sampler = Sampler()
    init = evaluate(model, tok, task, eval_problems, s, sampler, max_new, seed)
    curve = [{"phase": "init", "step": 0, "flops": 0.0, "heldout_accuracy": init["greedy"],
              "heldout_sampled_accuracy": init["sampled"]}]

    # 1. SFT from scratch, in chunks at a constant learning rate, until validation accuracy
    #    reaches the target (each chunk resumes the previous one's checkpoint exactly)
    t0 = time.perf_counter()
    step, val_curve = 0, []
    while step < s.sft_max_steps:
        step = min(step + s.sft_chunk, s.sft_max_steps)
        sft_cfg = SFTConfig(output_dir=str(out / "sft"), max_steps=step, batch_size=s.sft_batch,
                            lr=s.sft_lr, warmup_steps=s.sft_warmup, min_lr_ratio=1.0,
                            max_length=s.sft_max_length, seed=seed, save_every=s.sft_chunk,
                            keep_checkpoints=10 ** 6, resume=True, progress=progress,
                            log_every=s.sft_chunk, save_final=False)
        sft = run_sft(model, tok, str(sft_path), sft_cfg)
        model = sft.model
        val = greedy_accuracy(model, tok, task, val_problems, max_new)
        val_curve.append({"step": step, "validation_accuracy": val})
        print(f"ptcore demo: SFT step {step}: validation accuracy {val:.3f} (target {s.sft_target})",
              file=sys.stderr, flush=True)
        if val >= s.sft_target:
            break
    timings["sft_train_s"] = time.perf_counter() - t0
    sft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    curve += checkpoint_curve(out / "sft", eval_model, tok, task, eval_problems, s, sampler, max_new, "sft",
                              0.0, sft.metrics, seed, s.sft_eval_every)
    timings["sft_eval_s"] = time.perf_counter() - t0
    sft_flops = sft.metrics[-1]["flops"]

    # 2. GRPO on the verifiable reward
    t0 = time.perf_counter()
    grpo_cfg = GRPOConfig(output_dir=str(out / "grpo"), max_steps=s.grpo_steps, batch_size=s.grpo_prompts,
                          lr=s.grpo_lr, warmup_steps=s.grpo_warmup, max_length=s.sft_max_length, seed=seed,
                          save_every=s.grpo_eval_every, keep_checkpoints=10 ** 6, progress=progress,
                          log_every=max(1, s.grpo_steps // 10), save_final=False, group_size=s.grpo_group,
                          temperature=s.temperature, max_new_tokens=max_new)

    def task_reward(prompts, completions, answer, **_):
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    grpo = run_grpo(model, tok, str(grpo_path), grpo_cfg, reward_fns=[task_reward])
    timings["grpo_train_s"] = time.perf_counter() - t0
    model = grpo.model
    t0 = time.perf_counter()
    curve += checkpoint_curve(out / "grpo", eval_model, tok, task, eval_problems, s, sampler, max_new, "grpo",
                              sft_flops, grpo.metrics, seed, s.grpo_eval_every)
    timings["grpo_eval_s"] = time.perf_counter() - t0

    # 3. test-time scaling, for the SFT model and the SFT + GRPO model
    t0 = time.perf_counter()
    prompts = [p.prompt for p in ttc_problems]
    ttc = {}
    eval_model.load_state_dict(sft_state)
    for name, m in (("sft", eval_model), ("grpo", model)):
        samples = sampler(m, tok, prompts, s.max_samples, max_new, s.temperature, seed)
        ttc[name] = test_time_curve(task, ttc_problems, samples, s.max_samples)
    timings["test_time_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    result = {
        "task": task_name, "task_config": repr(task), "seed": seed, "settings": asdict(s),
        "parameters": n_params, "sampler": sampler.backend, "sampler_note": sampler.why,
        "heldout_problems": {"accuracy_curve": len(eval_problems), "test_time": len(ttc_problems)},
        "curve": curve,
        "sft_metrics": [{k: m[k] for k in ("step", "loss", "flops", "tokens")} for m in sft.metrics],
        "grpo_metrics": [{"step": m["step"], "flops": sft_flops + m["flops"], "reward": m.get("reward")}
                         for m in grpo.metrics],
        "sft_validation": val_curve, "sft_steps": sft.metrics[-1]["step"],
        "accuracy": {k: [c for c in curve if c["phase"] == k][-1]["heldout_accuracy"] for k in ("init", "sft", "grpo")},
        "sampled_accuracy": {k: [c for c in curve if c["phase"] == k][-1]["heldout_sampled_accuracy"]
                             for k in ("init", "sft", "grpo")},
        "flops": {"sft": sft_flops, "grpo": grpo.metrics[-1]["flops"]},
        "test_time": ttc, "timings_s": timings,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    from ptcore.demo_report import write_report
    write_report(out, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptcore demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="ptcore-demo", help="output directory (default ./ptcore-demo)")
    parser.add_argument("--task", default="addition", choices=sorted(DEMO_TASKS), help="synthetic task")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (seconds; for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # One thread by default: the tiny model's matrices are too small for intra-op threads to pay
    # off, and on a busy machine OpenMP threads spin waiting for peers that are not scheduled.
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 for the tiny model, torch's default for a real one)")
    parser.add_argument("--model", default="tiny", help="'tiny' (trained from scratch, default) or "
                        "'smollm2-135m-instruct' (GRPO and test-time scaling of a real model: ptcore/demo_real.py)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.model != "tiny":
        from ptcore import demo_real, models
        if args.model not in models.REAL_MODELS:
            parser.error(f"--model: unknown model {args.model!r}; known names: {', '.join(models.NAMES)}")
        if args.threads:
            torch.set_num_threads(args.threads)
        res = demo_real.run_real_demo(args.output, demo_real.QUICK if args.quick else demo_real.FULL,
                                      seed=args.seed, progress=not args.no_progress)
        acc, tt = res["accuracy"], res["test_time"]["grpo"]
        print(f"ptcore demo: {args.model} held-out accuracy {acc['before']:.1%} -> GRPO {acc['after_grpo']:.1%}; "
              f"best-of-{tt['n'][-1]} {tt['best_of_n'][-1]:.1%}, majority-of-{tt['n'][-1]} {tt['majority'][-1]:.1%}; "
              f"{res['timings_s']['total_s']:.0f} s; report: {Path(args.output) / 'report.md'}")
        return 0
    torch.set_num_threads(args.threads or 1)
    settings = QUICK if args.quick else FULL
    res = run_demo(args.output, args.task, settings, seed=args.seed, progress=not args.no_progress)
    acc = res["accuracy"]
    tt = res["test_time"]["grpo"]
    print(f"ptcore demo: held-out accuracy {acc['init']:.1%} -> SFT {acc['sft']:.1%} -> GRPO {acc['grpo']:.1%}; "
          f"best-of-{tt['n'][-1]} {tt['best_of_n'][-1]:.1%}, majority-of-{tt['n'][-1]} {tt['majority'][-1]:.1%}; "
          f"{res['timings_s']['total_s']:.0f} s; report: {Path(args.output) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
