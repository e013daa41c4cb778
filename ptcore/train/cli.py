"""``ptcore sft|dpo|grpo``: the three loops from the command line.

    ptcore sft  --model tiny --task addition --output runs/sft
    ptcore dpo  --model runs/sft/final --data pairs.jsonl --output runs/dpo --loss-type sigmoid
    ptcore grpo --model runs/sft/final --task addition --output runs/grpo --group-size 8

``--model`` is ``tiny`` (the embedded model, the default), a directory ptcore saved, or a local
Hugging Face model directory (its tokenizer is used). ``--data`` is a jsonl file (formats in
:mod:`ptcore.train.data`); with the tiny model, ``--task addition|countdown`` generates the data
instead. Runs under ``torchrun`` too (``--strategy ddp|fsdp``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

from ptcore.train.config import TrainConfig

DEFAULTS = {  # per objective: what a sensible first run uses
    "sft": dict(lr=1e-3, max_steps=200, batch_size=8, max_length=256, warmup_steps=10),
    "dpo": dict(lr=1e-4, max_steps=100, batch_size=8, max_length=256, warmup_steps=5),
    "grpo": dict(lr=2e-5, max_steps=50, batch_size=4, max_length=256, warmup_steps=0),
}


def add_common(p: argparse.ArgumentParser, kind: str) -> None:
    d = DEFAULTS[kind]
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, default), a ptcore-saved "
                   "directory, or a local Hugging Face model directory")
    p.add_argument("--data", help="jsonl training data (see the README for the formats)")
    p.add_argument("--task", choices=("addition", "countdown"),
                   help="generate the data from this synthetic task when --data is not given")
    p.add_argument("--num-examples", type=int, default=2000, help="examples --task generates (default 2000)")
    p.add_argument("--output", required=True, help="output directory (metrics, checkpoints, final model)")
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="per micro-batch and rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--max-length", type=int, default=d["max_length"])
    p.add_argument("--overflow", choices=("truncate", "skip"), default="truncate",
                   help="what to do with longer examples (counted and printed either way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; print metrics lines")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="model weights dtype (default: as loaded)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    p.add_argument("--max-consecutive-skips", type=int, default=3,
                   help="stop after this many steps in a row with a non-finite loss or gradient "
                        "norm (each is skipped: no update) (default 3)")


def make_parser(kind: str) -> argparse.ArgumentParser:
    """The options of ``ptcore <kind>``: the shared ones, then the objective's own."""
    helps = {"sft": "supervised fine-tuning", "dpo": "preference optimization (DPO family)",
             "grpo": "group relative policy optimization"}
    p = argparse.ArgumentParser(prog=f"ptcore {kind}", description=f"{helps[kind]}. {__doc__}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, kind)
    if kind == "sft":
        p.add_argument("--no-packing", action="store_true", help="pad examples instead of packing them")
    elif kind == "dpo":
        from ptcore.ops.preference import LOSS_TYPES
        p.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES)
        p.add_argument("--beta", type=float, default=0.1)
        p.add_argument("--label-smoothing", type=float, default=0.0)
        p.add_argument("--gamma", type=float, default=0.5, help="simpo target margin")
        p.add_argument("--ref-model", help="reference model (default: --model before training)")
    else:
        from ptcore.ops.policy import LOSS_TYPES as PG_TYPES
        p.add_argument("--group-size", type=int, default=8)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--max-new-tokens", type=int, default=32)
        p.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per rollout")
        p.add_argument("--kl-coef", type=float, default=0.0)
        p.add_argument("--loss-type", default="dapo", choices=PG_TYPES)
        p.add_argument("--epsilon", type=float, default=0.2)
        p.add_argument("--epsilon-high", type=float, default=None)
        p.add_argument("--rollout", default="engine", choices=("engine", "hf"),
                       help="sample on ptcore.engine (default) or with HF generate")
        p.add_argument("--rollout-correction", default=None,
                       choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
                       help="importance weight of the sampler/trainer mismatch (TRL's vllm_importance_sampling_mode)")
        p.add_argument("--rollout-clip-min", type=float, default=None)
        p.add_argument("--rollout-clip-max", type=float, default=3.0)
        p.add_argument("--no-rollout-clip-max", action="store_true", help="no upper bound (mask modes)")
        p.add_argument("--off-policy-threshold", type=float, default=None, help="OPSM threshold")
        p.add_argument("--stop-string", action="append", default=[], help="repeatable (engine rollouts)")
        p.add_argument("--engine-max-tokens", type=int, default=None, help="the engine's KV cache")
        p.add_argument("--top-k", type=int, default=0, help="truncated sampling (0: off)")
        p.add_argument("--top-p", type=float, default=1.0, help="truncated sampling (1: off)")
        p.add_argument("--deterministic", action="store_true",
                       help="batch-invariant trainer log-probs (linear_logprobs deterministic=True)")
    return p


def _rollout_kwargs(args) -> dict:
    return dict(rollout=args.rollout, rollout_correction=args.rollout_correction,
                rollout_clip=(args.rollout_clip_min, None if args.no_rollout_clip_max else args.rollout_clip_max),
                off_policy_threshold=args.off_policy_threshold, stop_strings=tuple(args.stop_string),
                engine_max_tokens=args.engine_max_tokens, deterministic=args.deterministic,
                top_k=args.top_k, top_p=args.top_p)


def _config(args) -> TrainConfig:
    return TrainConfig(output_dir=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, min_lr_ratio=args.min_lr_ratio,
                       max_grad_norm=args.max_grad_norm or None, max_length=args.max_length,
                       overflow=args.overflow, seed=args.seed, log_every=args.log_every,
                       save_every=args.save_every, resume=args.resume, progress=not args.no_progress,
                       strategy=args.strategy, max_consecutive_skips=args.max_consecutive_skips)


def _data(args, kind: str) -> str:
    if args.data:
        return args.data
    if not args.task:
        raise CLIError("give --data FILE.jsonl, or --task addition|countdown to generate synthetic data")
    from ptcore.train.tasks import write_jsonl
    path = Path(args.output) / f"{args.task}-{kind}-n{args.num_examples}-seed{args.seed}.jsonl"
    if _rank() == 0:
        write_jsonl(args.task, kind, path, n=args.num_examples, seed=args.seed)  # atomic (os.replace)
        print(f"ptcore {kind}: wrote {args.num_examples} {args.task} examples to {path}", file=sys.stderr)
    else:  # under torchrun, rank 0 writes the file; the others wait for it to appear
        deadline = time.monotonic() + 600
        while not path.is_file():
            if time.monotonic() > deadline:
                raise CLIError(f"rank {_rank()} waited 10 minutes for {path}")
            time.sleep(0.2)
    return str(path)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _load(name, args):
    from ptcore.train.tiny import load_model_and_tokenizer
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load_model_and_tokenizer(name, dtype=dtype, seed=args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok


class CLIError(ValueError):
    """A usage error of ``ptcore sft|dpo|grpo`` (printed, exit status 2)."""


# Option names of the Python API whose flag is spelled differently.
_FLAG_OF = {"output_dir": "--output", "epsilon_low": "--epsilon", "ref_model": "--ref-model",
            "rollout_clip": "--rollout-clip-min/--rollout-clip-max", "stop_strings": "--stop-string"}
_PREFIX = re.compile(r"^(TrainConfig|run_sft|run_dpo|run_grpo|dpo_loss|policy_loss|load_records): ")


def error_message(parser: argparse.ArgumentParser, e: BaseException) -> str:
    """One paragraph for an error: the API's argument names become the flags that set them
    ('lr' -> --lr), file:line locations are kept as they are."""
    flags = dict(_FLAG_OF)
    flags.update({a.dest: a.option_strings[-1] for a in parser._actions
                  if a.option_strings and a.dest not in flags})
    from ptcore.train.data import DataError
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, DataError):  # names a file and line (or a record); its quotes are keys
        return msg
    msg = _PREFIX.sub("", msg)
    return re.sub(r"'([a-z_]+)'", lambda m: flags.get(m.group(1), m.group(0)), msg)


def main(kind: str, argv: list[str]) -> int:
    """Runs ``ptcore <kind>``; a bad option, a data error, an unusable output directory or a
    diverged run prints one paragraph naming the flag (or file:line) and returns 2, with no
    traceback (``PTCORE_TRACEBACK=1`` shows it)."""
    parser = make_parser(kind)
    args = parser.parse_args(list(argv))
    from ptcore.train.config import TrainingError
    try:
        return _main(kind, args)
    except (ValueError, TypeError, OSError, TrainingError) as e:
        if os.environ.get("PTCORE_TRACEBACK") == "1":
            raise
        print(f"ptcore {kind}: error: {error_message(parser, e)}", file=sys.stderr, flush=True)
        return 2


def _check_model(flag: str, name) -> None:
    """A model that cannot load is reported before any data is written (not after)."""
    if name is None or name == "tiny" or Path(name).is_dir():
        return
    try:
        from ptcore import models
        known = tuple(models.NAMES)
    except ImportError:
        known = ("tiny",)
    if name not in known:
        raise CLIError(f"{flag} {name!r} is neither a model name ({', '.join(known)}) nor a model directory")


def _check_options(kind: str, args) -> None:
    """The objective's options, checked before any data is written or model loaded."""
    _check_model("--model", args.model)
    _check_model("--ref-model", getattr(args, "ref_model", None))
    if not args.data and args.num_examples < 1:
        raise CLIError(f"--num-examples must be >= 1, got {args.num_examples}")
    if kind == "dpo":
        from ptcore.train.dpo import check_options
        check_options(loss_type=args.loss_type, beta=args.beta, label_smoothing=args.label_smoothing,
                      gamma=args.gamma)
    elif kind == "grpo":
        from ptcore.train.grpo import check_options
        check_options(group_size=args.group_size, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, num_iterations=args.num_iterations,
                      kl_coef=args.kl_coef, loss_type=args.loss_type, epsilon_low=args.epsilon,
                      epsilon_high=args.epsilon_high, **_rollout_kwargs(args))
    if args.data:
        from ptcore.train import data as D
        records = D.load_records(args.data, kind)  # a bad file fails here, before any model loads
        if kind == "grpo":
            from ptcore.train.grpo import require_answers
            require_answers(records)  # the CLI's reward is the built-in answer reward


def _main(kind: str, args) -> int:
    config = _config(args)
    _check_options(kind, args)
    data = _data(args, kind)
    model, tok = _load(args.model, args)
    if kind == "sft":
        from ptcore.train.sft import run_sft
        result = run_sft(model, tok, data, config, packing=not args.no_packing)
    elif kind == "dpo":
        from ptcore.train.dpo import run_dpo
        ref = _load(args.ref_model, args)[0] if args.ref_model else None
        result = run_dpo(model, ref, tok, data, config, loss_type=args.loss_type, beta=args.beta,
                         label_smoothing=args.label_smoothing, gamma=args.gamma)
    else:
        from ptcore.train.grpo import run_grpo
        result = run_grpo(model, tok, data, config, group_size=args.group_size,
                          temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          num_iterations=args.num_iterations, kl_coef=args.kl_coef,
                          loss_type=args.loss_type, epsilon_low=args.epsilon,
                          epsilon_high=args.epsilon_high, **_rollout_kwargs(args))
    last = result.metrics[-1] if result.metrics else {}
    if _rank() == 0:
        print(f"ptcore {kind}: {result.step} steps, final loss {last.get('loss', float('nan')):.4f}; "
              f"metrics in {Path(args.output) / 'metrics.jsonl'}"
              + (f"; model in {result.final_dir}" if result.final_dir else ""), file=sys.stderr)
    return 0
