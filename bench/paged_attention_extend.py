"""Paged attention, extend (prefill): Q new tokens for each of B sequences, attending to their
L - Q cached positions and causally to each other, through 8 layers. Same inputs, rows and columns
as bench/paged_attention.py (the decode benchmark), whose code this reuses."""
from bench.paged_attention import (BASELINE, DEFAULT_DTYPE, HKV, HQ, LAYERS, NOTES, REPEATS, SIZE_KEYS, D,  # noqa: F401
                                   build, cases, estimate_bytes, flops, reference)

NAME = "paged_attention_extend"
TITLE = f"Paged attention extend ({LAYERS} layers, Hq={HQ}, Hkv={HKV}, D={D})"
DEFAULT_SIZES = {"cpu": {"B": 4, "L": 512, "Q": 256, "S": 16}, "cuda": {"B": 16, "L": 4096, "Q": 2048, "S": 256}}
LARGE_SIZES = {"B": 1, "L": 1024, "Q": 1024, "S": 16}
