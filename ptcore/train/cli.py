"""``ptcore sft|dpo|grpo``: the three loops from the command line.

    ptcore sft  --model tiny --task addition --output runs/sft
    ptcore dpo  --model runs/sft/final --data pairs.jsonl --output runs/dpo --loss-type sigmoid
    ptcore grpo --model runs/sft/final --task addition --output runs/grpo --group-size 8

``--model`` is ``tiny`` (the embedded model, the default), a directory ptcore saved, or a local
Hugging Face model directory (its tokenizer is used). ``--data`` is a jsonl file (formats in
:mod:`ptcore.train.data`); with the tiny model, ``--task addition|countdown`` generates the data
instead. Runs under ``torchrun`` too (``--strategy ddp|fsdp``). Every other flag is a field of
the objective's config (``SFTConfig``, ``DPOConfig``, ``GRPOConfig`` in ptcore.train.config),
spelled with dashes or underscores, with its help text; a bool field is ``--name`` (or
``--name false``), one that defaults to True also ``--no-name``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ptcore.train.config import DPOConfig, GRPOConfig, SFTConfig, option

CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}
DEFAULTS = {  # per objective: what a sensible first run uses (the Python API keeps the configs')
    "sft": dict(lr=1e-3, max_steps=200, batch_size=8, max_length=256, warmup_steps=10),
    "dpo": dict(lr=1e-4, max_steps=100, batch_size=8, max_length=256, warmup_steps=5),
    "grpo": dict(lr=2e-5, max_steps=50, batch_size=4, max_length=256, warmup_steps=0, max_new_tokens=32),
}


@dataclass
class RunArgs:
    """What the command line adds to the config: the model, the data, the device."""
    model: str = option("tiny", "'tiny' (embedded), a ptcore-saved directory, or a local Hugging Face "
                        "model directory")
    data: Optional[str] = option(None, "jsonl training data (see the README for the formats)")
    task: Optional[str] = option(None, "generate the data from this synthetic task when --data is not "
                                 "given", choices=("addition", "countdown"))
    num_examples: int = option(2000, "examples --task generates")
    dtype: Optional[str] = option(None, "model weights dtype (None: as loaded)",
                                  choices=("float32", "bfloat16"))
    device: Optional[str] = option(None, "cpu, cuda, ... (None: cuda when available)")


@dataclass
class DPORunArgs:
    """``ptcore dpo``'s own: the reference model to load."""
    ref_model: Optional[str] = option(None, "reference model (None: --model before training)")


@dataclass
class GRPORunArgs:
    """``ptcore grpo``'s own: a flag for what ``--rollout-clip-max`` cannot say (None)."""
    no_rollout_clip_max: bool = option(False, "no upper bound on the rollout importance weight "
                                       "(sets rollout_clip_max to None; mask modes)")


RUN_ARGS = {"sft": (RunArgs,), "dpo": (RunArgs, DPORunArgs), "grpo": (RunArgs, GRPORunArgs)}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, each flag's default after its help."""


def make_parser(kind: str):
    """The options of ``ptcore <kind>``: the objective's config (the shared loop's fields, then
    its own) and the run's, each field a flag with its help, parsed by transformers'
    ``HfArgumentParser``; the command line's first-run defaults; ``--output`` required."""
    from transformers import HfArgumentParser
    helps = {"sft": "supervised fine-tuning", "dpo": "preference optimization (DPO family)",
             "grpo": "group relative policy optimization"}
    p = HfArgumentParser([*RUN_ARGS[kind], CONFIGS[kind]], prog=f"ptcore {kind}",
                         description=f"{helps[kind]}. {__doc__}", formatter_class=_HelpFormatter)
    # argparse's defaults are the fields' (HfArgumentParser leaves a list-typed field's str default
    # out), then the command line's own
    p.set_defaults(**{f.name: f.default for cls in (*RUN_ARGS[kind], CONFIGS[kind])
                      for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING})
    p.set_defaults(**DEFAULTS[kind])
    for a in p._actions:
        if a.dest == "output_dir":
            a.required, a.default = True, argparse.SUPPRESS
    return p


def _config(kind: str, args: argparse.Namespace):
    """The objective's config from the parsed flags; its checks run here, inside main's error
    handling, so a bad value exits 2 naming the flag."""
    values = dict(vars(args))
    if getattr(args, "no_rollout_clip_max", False):
        values["rollout_clip_max"] = None
    cls = CONFIGS[kind]
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def _data(args, kind: str) -> str:
    if args.data:
        return args.data
    if not args.task:
        raise CLIError("give --data FILE.jsonl, or --task addition|countdown to generate synthetic data")
    from ptcore.train.tasks import write_jsonl
    path = Path(args.output_dir) / f"{args.task}-{kind}-n{args.num_examples}-seed{args.seed}.jsonl"
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


# Option names of the Python API without a flag of their own.
_FLAG_OF = {"rollout_clip": "--rollout-clip-min/--rollout-clip-max"}
_PREFIX = re.compile(r"^(TrainConfig|SFTConfig|DPOConfig|GRPOConfig|run_sft|run_dpo|run_grpo|dpo_loss|"
                     r"policy_loss|load_records): ")


def error_message(parser: argparse.ArgumentParser, e: BaseException) -> str:
    """One paragraph for an error: the API's argument names become the flags that set them
    ('lr' -> --lr, 'output_dir' -> --output: a field's last spelling, its alias or its dashed
    name), file:line locations are kept as they are."""
    flags = dict(_FLAG_OF)
    for a in parser._actions:  # the field's own flag, not its --no- complement
        if a.option_strings and a.dest not in flags and not a.option_strings[0].startswith("--no_"):
            flags[a.dest] = a.option_strings[-1]
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
    """What the config cannot check, before any data is written or model loaded."""
    _check_model("--model", args.model)
    _check_model("--ref-model", getattr(args, "ref_model", None))
    if not args.data and args.num_examples < 1:
        raise CLIError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.data:
        from ptcore.train import data as D
        records = D.load_records(args.data, kind)  # a bad file fails here, before any model loads
        if kind == "grpo":
            from ptcore.train.grpo import require_answers
            require_answers(records)  # the CLI's reward is the built-in answer reward


def _main(kind: str, args) -> int:
    config = _config(kind, args)  # every option of the objective checked here
    _check_options(kind, args)
    data = _data(args, kind)
    model, tok = _load(args.model, args)
    if kind == "sft":
        from ptcore.train.sft import run_sft
        result = run_sft(model, tok, data, config)
    elif kind == "dpo":
        from ptcore.train.dpo import run_dpo
        ref = _load(args.ref_model, args)[0] if args.ref_model else None
        result = run_dpo(model, ref, tok, data, config)
    else:
        from ptcore.train.grpo import run_grpo
        result = run_grpo(model, tok, data, config)
    last = result.metrics[-1] if result.metrics else {}
    if _rank() == 0:
        print(f"ptcore {kind}: {result.step} steps, final loss {last.get('loss', float('nan')):.4f}; "
              f"metrics in {Path(config.output_dir) / 'metrics.jsonl'}"
              + (f"; model in {result.final_dir}" if result.final_dir else ""), file=sys.stderr)
    return 0
