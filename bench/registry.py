"""The benchmark registry: name -> module. A new benchmark (a log-prob head, an RL loss) is one
module in bench/ with the interface below, plus one line in BENCHMARKS.

A benchmark module defines:
  NAME, TITLE            registry name (also the results' file stem) and the table's title
  SIZE_KEYS              the size parameters, in ``--sizes`` order, e.g. ("N", "H", "V")
  DEFAULT_SIZES          {"cpu": {...}, "cuda": {...}};  LARGE_SIZES: the size ``--large`` adds
  DEFAULT_DTYPE          {"cpu": "float32", "cuda": "bfloat16"}
  BASELINE               the case whose FLOP rate is the 1.0 of "of GEMM" (the unavoidable work)
  flops(sizes)           FLOPs of one step: the numerator of GFLOP/s for every case
  cases(device, dtype)   [(case, None or why it is skipped here)], in table order
  reference(device, dtype)            the case the ratios are taken against (ptcore's default)
  estimate_bytes(case, sizes, dtype)  a generous memory estimate, inputs included
  build(case, sizes, dtype, device) -> (step, reset)
                         in the worker: makes the inputs; step() is one timed iteration (it may
                         return the loss, kept as a cross-check), reset() clears state, untimed;
                         ``step.held_bytes``: buffers it keeps across steps (bench/harness.py)
and optionally:
  NOTES                  {case: note} shown in the table's note column (what a row does differently)
  SHARED                 {case: key}: cases whose work depends only on sizes and dtype (the bare
                         GEMMs); the runner measures each key once per suite run and reuses it
  REPEATS                {"cpu": R, "cuda": R}: this benchmark's default timed runs per case
  UNIT                   the unit of work flops() counts when it is not FLOPs ("token", "op"): the
                         table then shows units/s and the rate relative to BASELINE

The LM-head benchmarks (linear_ce, logprobs, grpo, dpo) take their sizes, baseline, inputs and
fwd+bwd step from bench/lm_head.py.
"""
import importlib
from types import ModuleType

BENCHMARKS = {
    "linear_cross_entropy": "bench.linear_ce",
    "linear_logprobs": "bench.logprobs",
    "linear_policy_loss": "bench.grpo",
    "linear_dpo_loss": "bench.dpo",
    "loop_sft": "bench.loop_sft",  # the three loops vs TRL's trainers (bench/trl_loops.py)
    "loop_dpo": "bench.loop_dpo",
    "loop_grpo": "bench.loop_grpo",
    "radix_cache": "bench.radix",
    "ttc_best_of_n": "bench.ttc_best_of_n",  # test-time search on the engine (bench/ttc.py)
    "ttc_beam_search": "bench.ttc_beam",
    "ttc_mcts": "bench.ttc_mcts",
    "paged_attention_decode": "bench.paged_attention",
    "paged_attention_extend": "bench.paged_attention_extend",
    "speculative_verify": "bench.speculative",
}

# Benchmarks with their own table (columns the shared runner does not have): `python -m bench`
# runs each module's main([]) after the registered ones; `--only NAME` runs one.
STANDALONE = {
    "speculative_decoding": "bench.speculative_decoding",  # speedup and tokens per target forward vs theory
    "cpu_dispatch": "bench.cpu_dispatch",  # linear CE with the portable dispatched build vs -march=native
    "loop_sft_real": "bench.loop_sft_real",  # the loops vs TRL on SmolLM2-135M (bench/loop_real.py)
    "loop_dpo_real": "bench.loop_dpo_real",
    "loop_grpo_real": "bench.loop_grpo_real",
}


def load(name: str) -> ModuleType:
    modules = {**BENCHMARKS, **STANDALONE}
    if name not in modules:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(modules)}")
    return importlib.import_module(modules[name])
