"""MCTS, 64 simulations, 4 expansions, steps of 16 tokens, on a 512-token prompt: ptcore's engine (prefix reuse) beside its baseline, in the suite
runner's table. Workloads and definitions: bench/ttc.py (``python -m bench.ttc`` adds the tokens
computed / tree tokens columns). Not a FLOP benchmark in the usual sense: ``flops`` is the useful
model work, 2 x parameters x tree tokens, and ``of GEMM`` is the rate relative to the baseline
row, i.e. ptcore's speedup over it."""
from __future__ import annotations

import torch

from bench import ttc

WORKLOAD = "mcts"
NAME = "ttc_mcts"
TITLE = "MCTS, 64 simulations, 4 expansions, steps of 16 tokens"
SIZE_KEYS = tuple(ttc.DEFAULTS[WORKLOAD])
DEFAULT_SIZES = {"cpu": dict(ttc.DEFAULTS[WORKLOAD]), "cuda": dict(ttc.DEFAULTS[WORKLOAD])}
LARGE_SIZES = {**ttc.DEFAULTS[WORKLOAD], "P": 2048}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "float32"}
BASELINE = ttc.BASELINES[WORKLOAD]
REPEATS = {"cpu": 3, "cuda": 3}
NOTES = {"HF generate": "transformers generate(num_return_sequences=16): the prompt encoded 16 times",
         "re-encode": "the same search on Engine(prefix_caching=False): every node re-encodes its prefix"}


def flops(s: dict) -> int:
    return ttc.flops(WORKLOAD, s)


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    return [(c, None) for c in ttc.cases_for(WORKLOAD)]


def reference(device: str, dtype: torch.dtype) -> str:
    return "ptcore[engine]"


def estimate_bytes(case: str, s: dict, dtype: torch.dtype) -> int:
    return 2 << 30


def build(case: str, s: dict, dtype: torch.dtype, device: str):
    step, reset, _ = ttc.make_run(WORKLOAD, case, s, device, dtype)
    return step, reset
