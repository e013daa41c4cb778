"""ptcore's Triton kernels, installed as ``ptcore.kernels``. They take torch tensors and know
nothing of ptcore's Python layers; ptcore.ops decides when they run."""
from .cross_entropy import cross_entropy_rows

__all__ = ["cross_entropy_rows"]
