"""ptcore's Triton kernels, installed as ``ptcore.kernels``. They take torch tensors and know
nothing of ptcore's Python layers; ptcore.ops decides when they run."""
from .cross_entropy import cross_entropy_rows
from .logprobs import logprob_rows_grad, logprob_rows_stats
from .paged_attention import paged_attention_decode, paged_attention_extend
from .speculative import speculative_verify

__all__ = ["speculative_verify", "cross_entropy_rows", "logprob_rows_grad", "logprob_rows_stats"]
__all__ += ["paged_attention_decode", "paged_attention_extend"]
