"""ptcore's ops: PyTorch-style functional ops, each dispatched to a backend (see dispatch.py)."""
from ptcore.ops.chunking import chunk_budget
from ptcore.ops.cross_entropy import linear_cross_entropy
from ptcore.ops.dispatch import BACKENDS, BackendUnavailable, use_backend

__all__ = ["BACKENDS", "BackendUnavailable", "chunk_budget", "linear_cross_entropy", "use_backend"]
