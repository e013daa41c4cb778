"""DPO optimizer step on the real model: ptcore vs TRL (see bench/loop_real.py)."""
import sys

from bench.loop_real import main_for


def main(argv: list[str]) -> int:
    return main_for("dpo", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
