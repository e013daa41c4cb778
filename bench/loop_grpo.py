"""GRPO optimizer step: ptcore vs TRL (see bench/trl_loops.py)."""
from bench.trl_loops import interface

globals().update(interface("grpo"))
