"""The ``ptcore`` command: ``ptcore info`` prints versions and backends; ``ptcore bench`` runs the
benchmark suite (bench/, installed as ptcore.bench): its quick profile, or ``--full``; ``ptcore sft|dpo|grpo`` train (see
ptcore/train/cli.py); ``ptcore demo`` runs the post-training scaling demo; ``ptcore models`` lists and fetches the named
models (ptcore/models)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability")
    sub.add_parser("bench", help="run the benchmark suite (see bench/README.md); extra args go to it",
                   add_help=False)
    for kind, what in (("sft", "supervised fine-tuning"), ("dpo", "preference optimization (DPO family)"),
                       ("grpo", "group relative policy optimization")):
        sub.add_parser(kind, help=f"{what}; `ptcore {kind} --help` for the options", add_help=False)
    sub.add_parser("demo", help="SFT, GRPO and test-time scaling end to end on the tiny model", add_help=False)
    sub.add_parser("models", help="model names, what is cached, `ptcore models fetch NAME`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from ptcore.info import main as info_main
        return info_main()
    if args.command == "bench":
        try:
            from ptcore.bench.run import main as bench_main
        except ImportError as e:  # a missing tool of the suite (matplotlib, psutil): name it
            print(f"ptcore bench: {e}; install the suite's tools with `pip install ptcore[bench]`",
                  file=sys.stderr)
            return 2
        return bench_main(rest)
    if args.command in ("sft", "dpo", "grpo"):
        from ptcore.train.cli import main as train_main
        return train_main(args.command, rest)
    if args.command == "models":
        from ptcore.models.cli import main as models_main
        return models_main(rest)
    if args.command == "demo":
        from ptcore.demo import main as demo_main
        return demo_main(rest) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
