"""ptcore's inference engine: a compact forward of an HF Llama / Qwen2 / Qwen3 / Mistral model over a
paged KV cache with radix prefix reuse, batched prefill (extend) and decode, forks and rollback.

:class:`Engine` is assembled from one part per job: construction and input checks (here), the
sequence lifecycle (:mod:`ptcore.engine.sequences`), the batched forward
(:mod:`ptcore.engine.forward`) and sampling and the generate loop (:mod:`ptcore.engine.generate`);
its result types are in :mod:`ptcore.engine.results`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ptcore import ops
from ptcore.engine.forward import BatchedForward
from ptcore.engine.generate import Generation
from ptcore.engine.model import CompactModel, load_hf_model
from ptcore.engine.results import Completion, EngineStats, Recording
from ptcore.engine.sequences import EngineSeq, SequenceOps

__all__ = ["Completion", "Engine", "EngineSeq", "EngineStats", "Recording", "default_page_size"]


def default_page_size(device, dtype) -> int:
    """The engine's default KV page size: 256 when flash-attn would run the paged attention of
    tensors of this device and dtype (its block table needs a multiple of 256), else 16."""
    dispatch = ops.dispatch
    flash = getattr(dispatch, "FLASH_PAGE_MULTIPLE", 256)
    try:
        chosen = dispatch.resolve(torch.device(device), dtype, op="paged_attention_decode", page_size=flash,
                                  tree_mask=False)
    except dispatch.BackendUnavailable:  # a forced backend that cannot run: the ops will say so
        return 16
    return flash if chosen == "flash_attn" else 16


class Engine(SequenceOps, BatchedForward, Generation):
    """Inference over a paged KV cache with prefix reuse.

    Args:
        model: an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
            ``MistralForCausalLM`` (object), a local directory holding one, or a model name of
            :mod:`ptcore.models` (``"smollm2-135m-instruct"``, ``"tiny"``), loaded in ``dtype``
            (default float32) with its tokenizer.
        tokenizer: for text prompts, stop strings and ``Completion.text`` (loaded from the
            directory when ``model`` is a path and this is None).
        page_size: tokens per KV page. Default: 16, or 256 when flash-attn is the paged attention
            backend for the model's device and dtype (its paged KV cache takes only multiples
            of 256; CUDA, fp16/bf16, flash-attn installed, no other backend forced).
        max_cached_tokens: KV capacity in tokens (sequences plus the radix cache).
        dtype, device: cast / move the model first (default: as it is).
        prefix_caching: False turns reuse off (no radix matches, forks re-encode their prefix):
            the baseline of the benchmarks.
        fuse_weights: keep concatenated copies of the q/k/v and gate/up projections (one GEMM
            each: fewer small ops per decode step); default: for models under 200M parameters,
            otherwise the engine shares the HF module's weights without copying.

    Sliding-window attention (Mistral, some Qwen2 configs) is run as full attention, which is
    identical while sequences are no longer than the window; longer sequences raise ValueError.
    """

    def __init__(self, model, *, tokenizer=None, page_size: int | None = None, max_cached_tokens: int = 32768,
                 dtype: torch.dtype | None = None, device=None, prefix_caching: bool = True,
                 fuse_weights: bool | None = None):
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"Engine: 'page_size' must be an int >= 1 (or None: the backend's default), got {page_size!r}")
        if isinstance(max_cached_tokens, bool) or not isinstance(max_cached_tokens, int) or max_cached_tokens < (page_size or 1):
            raise ValueError(f"Engine: 'max_cached_tokens' must be an int >= page_size, got {max_cached_tokens!r}")
        if isinstance(model, str) and not Path(model).is_dir():  # a model name (ptcore.models)
            from ptcore import models
            if model in models.NAMES:
                model, named_tokenizer = models.load(model, dtype=dtype or torch.float32)
                tokenizer = named_tokenizer if tokenizer is None else tokenizer
        if tokenizer is None and isinstance(model, (str, Path)) and Path(model).is_dir():
            try:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            except Exception:  # a weights-only directory: token prompts still work
                tokenizer = None
        self.hf_model = load_hf_model(model, dtype, device)
        self.model = CompactModel(self.hf_model, fuse_weights)
        self.tokenizer = tokenizer
        if page_size is None:
            page_size = default_page_size(self.model.device, self.model.dtype)
            max_cached_tokens = max(max_cached_tokens, page_size)
        self.page_size = page_size
        self.prefix_caching = bool(prefix_caching)
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.vocab_size = self.model.vocab_size
        eos = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.hf_model.config, "eos_token_id", None)
        self.eos_token_ids = tuple(() if eos is None else ([eos] if isinstance(eos, int) else eos))
        from ptcore.cache import KVPool, PagedCache
        num_pages = -(-max_cached_tokens // page_size)
        try:
            self.pool = KVPool(self.model.num_layers, num_pages, page_size, self.model.num_kv_heads,
                               self.model.head_dim, dtype=self.dtype, device=self.device)
        except ValueError as e:
            raise ValueError(f"Engine: 'max_cached_tokens' = {max_cached_tokens} is too many for this "
                             f"device: {e}") from None
        self.cache = PagedCache(self.pool)  # the C++ radix tree: RuntimeError naming ptcore._C where it is missing
        self.stats = EngineStats()
        self.last_stats = EngineStats()
        self._recordings: list[Recording] = []

    # -- validation ------------------------------------------------------------------------------
    def _check_tokens(self, name: str, tokens, allow_empty=False) -> list[int]:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if not isinstance(tokens, (list, tuple)):
            raise ValueError(f"Engine: '{name}' must be a list of token ids, got {type(tokens).__name__}")
        if not tokens and not allow_empty:
            raise ValueError(f"Engine: '{name}' is empty (a prompt needs at least one token)")
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"Engine: '{name}' holds token id {t!r} outside [0, {self.vocab_size})")
        return list(tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with the engine's tokenizer (special tokens such as BOS added as
        the tokenizer does by default)."""
        if self.tokenizer is None:
            raise ValueError("Engine: text needs a tokenizer (pass tokenizer=... or token ids)")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, tokens) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(tokens))

