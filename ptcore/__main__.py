"""The ``ptcore`` command: ``ptcore info`` prints versions and backends; ``ptcore bench`` runs the
benchmark suite (bench/) on embedded default sizes."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability")
    sub.add_parser("bench", help="run the benchmark suite (see bench/README.md); extra args go to it",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from ptcore.info import main as info_main
        return info_main()
    if args.command == "bench":
        try:
            from bench.run import main as bench_main
        except ImportError:
            print("ptcore bench: the benchmark suite lives in the repository's bench/ folder; run it "
                  "from a checkout (`python -m bench`)", file=sys.stderr)
            return 2
        return bench_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
