"""The benchmark registry. Every benchmark is declared once, in its module, as a :class:`Benchmark`
(a table from the shared runner, bench/run.py) or a :class:`Standalone` (a benchmark with its own
table); :data:`REGISTRY` says where each is declared, and :func:`load` imports it on demand (a
benchmark's module may import heavy peers). A new benchmark is one declaration plus one line here.

Both profiles of the suite come from the same declarations: the quick profile (the default of
``ptcore bench``) runs each benchmark at ``quick_sizes`` and only the cases its scoreboard rows
need; ``--full`` runs every case at ``default_sizes``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

PROFILES = ("quick", "full")


@dataclass(frozen=True)
class Headline:
    """One scoreboard row of a benchmark: ptcore's figure beside a peer's, and the target.

    ``figure`` is a per-case result: ``"rate"`` (work per second: higher is better),
    ``"extra_peak_mb"`` (lower is better) or ``"frac_of_gemm"`` (the fraction of the baseline's
    rate). ``ratio`` is ptcore's figure over the peer's, so for ``"rate"`` it is ptcore's speedup.
    ``target`` is ``(">=" or "<=", value)`` on the ratio, or on ptcore's figure when ``peer`` is
    None. ``ptcore=None`` means the benchmark's reference case (ptcore's default backend)."""
    label: str
    figure: str
    peer: Optional[str]
    target: Optional[tuple[str, float]] = None
    ptcore: Optional[str] = None


@dataclass(frozen=True)
class Benchmark:
    """A benchmark of the shared runner: its cases run one by one, each in a fresh process.

    Fields:
      name, title           registry name (the results' file stem) and the table's title
      size_keys             the size parameters, in ``--sizes`` order, e.g. ("N", "H", "V")
      default_sizes         {"cpu": {...}, "cuda": {...}}: the full profile's sizes
      quick_sizes           the same for the quick profile: small enough that the benchmark takes
                            seconds, large enough that its headline ratios mean what the full ones do
      default_dtype         {"cpu": "float32", "cuda": "bfloat16"}
      baseline              the case whose rate is the 1.0 of "of GEMM" (the unavoidable work)
      flops(sizes)          work of one step (FLOPs, or ``unit``s): the numerator of every rate
      cases(device, dtype)  [(case, None or why it cannot run here)], in table order
      reference(device, dtype)            the case the ratios are taken against (ptcore's default)
      estimate_bytes(case, sizes, dtype)  a generous memory estimate, inputs included
      build(case, sizes, dtype, device) -> (step, reset)
                            in the worker: makes the inputs; step() is one timed iteration (it may
                            return the loss, kept as a cross-check), reset() clears state, untimed;
                            ``step.held_bytes``: buffers it keeps across steps (bench/harness.py)
      headlines             its scoreboard rows (:class:`Headline`)
      large_sizes           the size ``--large`` adds (None: none)
      notes                 {case: note} shown in the table's note column
      shared                {case: key}: cases whose work depends only on sizes and dtype (the bare
                            GEMMs); the runner measures each key once per suite run and reuses it
      repeats, quick_repeats  {"cpu": R, "cuda": R}: timed runs per case in each profile
      unit                  the unit ``flops`` counts when it is not FLOPs ("token", "op"): the
                            table then shows units/s and the rate relative to ``baseline``
    """
    name: str
    title: str
    size_keys: tuple[str, ...]
    default_sizes: dict
    quick_sizes: dict
    default_dtype: dict
    baseline: str
    flops: Callable
    cases: Callable
    reference: Callable
    estimate_bytes: Callable
    build: Callable
    headlines: tuple[Headline, ...] = ()
    large_sizes: Optional[dict] = None
    notes: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    repeats: dict = field(default_factory=lambda: {"cpu": 3, "cuda": 10})
    quick_repeats: dict = field(default_factory=lambda: {"cpu": 2, "cuda": 10})
    unit: str = "FLOP"

    def sizes(self, profile: str, device: str) -> dict:
        return dict((self.quick_sizes if profile == "quick" else self.default_sizes)[device])

    def case_names(self, profile: str, device: str, dtype) -> set:
        """The cases a profile runs: all of them in the full one; in the quick one the baseline,
        the reference and the cases the headlines compare."""
        ref = self.reference(device, dtype)
        if profile == "full":
            return {c for c, _ in self.cases(device, dtype)}
        return {self.baseline, ref, *(h.ptcore or ref for h in self.headlines),
                *(h.peer for h in self.headlines if h.peer)}


@dataclass(frozen=True)
class Standalone:
    """A benchmark with its own table (columns the shared runner does not have).

    ``main(argv) -> exit status`` takes ``--quick`` (the quick profile) and ``--out DIR``; it writes
    ``DIR/<name>.json`` whose ``"scoreboard"`` list holds its scoreboard rows
    (:func:`bench.scoreboard.row`)."""
    name: str
    title: str
    main: Callable
    needs_checkout: bool = False  # builds from the sources (csrc/): skipped from an installed wheel


# name -> "module:attribute", relative to this package (bench, or ptcore.bench when installed)
REGISTRY = {
    "linear_cross_entropy": "linear_ce:BENCHMARK",
    "linear_logprobs": "logprobs:BENCHMARK",
    "linear_policy_loss": "grpo:BENCHMARK",
    "linear_dpo_loss": "dpo:BENCHMARK",
    "cpu_dispatch": "cpu_dispatch:BENCHMARK",  # linear CE, the portable dispatched build vs -march=native
    "loop_sft": "trl_loops:SFT",  # the three loops vs TRL's trainers on a tiny model
    "loop_dpo": "trl_loops:DPO",
    "loop_grpo": "trl_loops:GRPO",
    "loop_sft_real": "loop_real:SFT",  # the same on SmolLM2-135M (its own table)
    "loop_dpo_real": "loop_real:DPO",
    "loop_grpo_real": "loop_real:GRPO",
    "trl_integration": "trl_integration:BENCHMARK",  # TRL's trainers alone vs patched with ptcore.integrations.trl
    "radix_cache": "radix:BENCHMARK",
    "ttc_best_of_n": "ttc:BEST_OF_N",  # test-time search on the engine
    "ttc_beam_search": "ttc:BEAM_SEARCH",
    "ttc_mcts": "ttc:MCTS",
    "paged_attention_decode": "paged_attention:DECODE",
    "paged_attention_extend": "paged_attention:EXTEND",
    "speculative_verify": "speculative:BENCHMARK",
    "speculative_decoding": "speculative_decoding:BENCHMARK",  # speedup and tokens per forward vs theory
    "backbone_ops": "backbone_ops:BENCHMARK",  # fused RMSNorm+residual, RoPE, SwiGLU vs eager HF code
}


def load(name: str):
    """The :class:`Benchmark` or :class:`Standalone` registered as ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    module, attr = REGISTRY[name].split(":")
    bench = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    if bench.name != name:
        raise RuntimeError(f"bench registry: {REGISTRY[name]} declares {bench.name!r}, registered as {name!r}")
    return bench
