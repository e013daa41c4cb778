"""How many rows of logits a fused op materializes at once (the chunk loop that uses it:
:mod:`ptcore.ops.lm_head_chunks`).

The budget is in bytes of one logits chunk, independent of the number of tokens N: that is what
bounds the fused ops' extra memory. 96 MiB (768 rows at V=32768 fp32) is enough rows for the
chunk's GEMMs to run at the BLAS's full rate (smaller chunks begin to cost time, larger ones only
cost memory), and a fraction of the whole batch's logits (512 MB at N=4096, V=32768 fp32).
Override per process with PTCORE_CHUNK_MB, per block with :func:`chunk_budget`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os

DEFAULT_CHUNK_BYTES = 96 << 20
MAX_CHUNK_MB = 1 << 30  # 1 PiB: beyond any memory; above it the byte count leaves int64
_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("ptcore_chunk_bytes", default=None)


@contextlib.contextmanager
def chunk_budget(nbytes: int):
    """Use at most ``nbytes`` for one logits chunk inside this block (at least one row)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"chunk_budget: 'nbytes' must be a positive int, got {nbytes!r}")
    token = _budget.set(nbytes)
    try:
        yield
    finally:
        _budget.reset(token)


def budget_bytes() -> int:
    nbytes = _budget.get()
    if nbytes is None:
        env = os.environ.get("PTCORE_CHUNK_MB")
        try:
            mib = float(env) if env else None
        except ValueError:
            mib = math.nan
        if mib is not None and not (math.isfinite(mib) and 0 < mib <= MAX_CHUNK_MB):
            raise ValueError(f"PTCORE_CHUNK_MB must be a number of MiB in (0, {MAX_CHUNK_MB}], "
                             f"got {env!r}")
        nbytes = int(mib * (1 << 20)) if mib is not None else DEFAULT_CHUNK_BYTES
    return max(1, nbytes)


def chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk for ``n_rows`` rows of ``vocab`` logits of ``itemsize`` bytes."""
    rows = budget_bytes() // max(1, vocab * itemsize)
    return int(max(1, min(max(n_rows, 1), rows)))
