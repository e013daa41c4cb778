"""ptcore's inference engine: a compact forward of an HF Llama / Qwen2 / Qwen3 / Mistral model over a
paged KV cache with radix prefix reuse, batched prefill (extend) and decode, forks and rollback.

Every token a search tree needs is computed once: a new sequence reuses the longest prefix any
finished sequence left in the radix cache, a fork shares its parent's KV pages (and its logits),
and :meth:`Engine.finish` hands a sequence's KV to the radix cache for later sequences.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptcore import ops
from ptcore.engine.model import CompactModel, load_hf_model
from ptcore.engine.sampling import SamplingParams, make_generator, sample, suppress_stops
from ptcore.engine.tree import TokenTrie


@dataclass
class Completion:
    """One generated continuation: its tokens, the log-prob of each under the distribution it was
    sampled from (after temperature / top-k / top-p), why it ended ("stop": a stop or EOS token or
    a stop string; "length": max_new_tokens), and its text when the engine has a tokenizer."""
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None


@dataclass
class EngineStats:
    """Token accounting: ``tokens_computed`` positions run through the model, ``tokens_cached``
    positions a new sequence or a fork got from the cache instead (radix matches and fork
    prefixes), ``forward_calls`` batched model calls, ``tokens_generated`` sampled tokens."""
    tokens_computed: int = 0
    tokens_cached: int = 0
    forward_calls: int = 0
    tokens_generated: int = 0

    def __sub__(self, other: "EngineStats") -> "EngineStats":
        return EngineStats(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))

    def copy(self) -> "EngineStats":
        return EngineStats(**self.__dict__)


@dataclass
class Recording:
    """What happened between entering and leaving :meth:`Engine.record`: the stats delta and the
    trie of every token context the model encoded (the KV of each finished sequence)."""
    stats: EngineStats = field(default_factory=EngineStats)
    trie: TokenTrie = field(default_factory=TokenTrie)

    @property
    def tree_tokens(self) -> int:
        """Distinct token positions (distinct prefixes) whose keys/values the work needed."""
        return self.trie.size

    @property
    def reuse_ratio(self) -> float:
        """tokens computed / tree tokens: 1.0 when no position was encoded twice."""
        return self.stats.tokens_computed / max(1, self.tree_tokens)


class Seq:
    """A sequence of the engine, over a ``ptcore.cache`` sequence (``handle``). ``tokens``: all its
    tokens; the first ``num_computed`` have their keys/values in the cache, the rest are pending
    (e.g. the last sampled token) and get encoded by the next :meth:`Engine.forward`.
    ``logits``: next-token logits after the computed tokens (None when unknown)."""

    __slots__ = ("handle", "logits", "alive")

    def __init__(self, handle, logits=None):
        self.handle = handle
        self.logits = logits
        self.alive = True

    @property
    def tokens(self) -> list[int]:
        return self.handle.tokens

    @property
    def num_computed(self) -> int:
        return self.handle.length

    def __len__(self):
        return len(self.handle.tokens)

    def __repr__(self):
        return f"Seq(len={len(self)}, computed={self.num_computed}, alive={self.alive})"


def default_page_size(device, dtype) -> int:
    """The engine's default KV page size: 256 when flash-attn would run the paged attention of
    tensors of this device and dtype (its block table needs a multiple of 256), else 16."""
    from ptcore.ops import dispatch
    flash = getattr(dispatch, "FLASH_PAGE_MULTIPLE", 256)
    try:
        chosen = dispatch.resolve(torch.device(device), dtype, op="paged_attention_decode", page_size=flash,
                                  tree_mask=False)
    except dispatch.BackendUnavailable:  # a forced backend that cannot run: the ops will say so
        return 16
    return flash if chosen == "flash_attn" else 16


class Engine:
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

    def _check_alive(self, name, seq):
        if not isinstance(seq, Seq) or not seq.alive or getattr(seq.handle, "owner", self.cache) is not self.cache:
            raise ValueError(f"Engine: '{name}' must be a live Seq of this engine, got {seq!r}")

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

    # -- sequences -------------------------------------------------------------------------------
    def start(self, tokens, *, compute: bool = True) -> Seq:
        """A new sequence over ``tokens`` (ids, or text with a tokenizer). Reuses the longest
        prefix in the radix cache (all but the last token at most: its logits are needed) and,
        with ``compute``, encodes the rest now; otherwise the next :meth:`forward` does."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        tokens = self._check_tokens("tokens", tokens)
        handle, cached = self.cache.start(tokens)  # matches len(tokens) - 1 at most
        self.stats.tokens_cached += cached
        seq = Seq(handle)
        if compute:
            try:
                self.forward([seq], [[]])
            except BaseException:
                self.release(seq)  # e.g. CacheFull: the caller never got the sequence
                raise
        return seq

    def fork(self, seq: Seq, length: int | None = None) -> Seq:
        """A new sequence sharing ``seq``'s first ``length`` tokens (default: all). The shared KV
        is not recomputed; forking at the end of the computed tokens also shares the logits.
        Forking strictly inside the computed tokens recomputes the fork point's last token (its
        logits are not kept). With ``prefix_caching=False`` the fork re-encodes everything."""
        self._check_alive("seq", seq)
        n = len(seq.tokens) if length is None else length
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(seq.tokens):
            raise ValueError(f"Engine.fork: 'length' must be in [1, {len(seq.tokens)}], got {length!r}")
        if not self.prefix_caching:
            # the baseline: encode the whole prefix again (nothing is ever inserted in the radix
            # cache, so this matches nothing)
            handle, _ = self.cache.start(seq.tokens[:n])
            return Seq(handle)
        kv = min(n, seq.num_computed)
        logits = seq.logits if kv == seq.num_computed else None
        if logits is None and kv == n:
            kv -= 1  # the fork point's logits are unknown: recompute its last token
        handle = self.cache.fork(seq.handle, kv)
        handle.tokens.extend(seq.tokens[kv:n])  # pending tokens
        self.stats.tokens_cached += kv
        return Seq(handle, logits)

    def truncate(self, seq: Seq, length: int) -> None:
        """Roll ``seq`` back to its first ``length`` tokens (speculative decoding), freeing the
        KV past it. Its logits become unknown unless nothing was removed."""
        self._check_alive("seq", seq)
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= len(seq.tokens):
            raise ValueError(f"Engine.truncate: 'length' must be in [1, {len(seq.tokens)}], got {length!r}")
        if length == len(seq.tokens):
            return
        if length < seq.num_computed:
            self.cache.truncate(seq.handle, length)  # truncates seq.tokens too
            seq.logits = None
        del seq.tokens[length:]

    def finish(self, seq: Seq, insert: bool = True) -> None:
        """Done with ``seq``: its computed tokens go to the radix cache (``insert`` and prefix
        caching on) for later sequences to reuse; its pages are otherwise freed."""
        self._check_alive("seq", seq)
        for rec in self._recordings:
            rec.trie.add(seq.tokens[:seq.num_computed])
        seq.alive = False
        seq.logits = None
        self.cache.finish(seq.handle, insert=insert and self.prefix_caching)

    def release(self, seq: Seq) -> None:
        """Done with ``seq`` without keeping its tokens in the radix cache."""
        self.finish(seq, insert=False)

    def flush(self) -> None:
        """Empties the radix cache (every sequence must be finished or released)."""
        self.cache.flush()

    @contextlib.contextmanager
    def record(self):
        """``with engine.record() as rec:`` collects the stats delta and the trie of the token
        contexts of every sequence finished inside the block (see :class:`Recording`)."""
        rec = Recording()
        before = self.stats.copy()
        self._recordings.append(rec)
        try:
            yield rec
        finally:
            self._recordings.remove(rec)
            rec.stats = self.stats - before

    # -- the forward -----------------------------------------------------------------------------
    def forward(self, seqs: list[Seq], new_tokens: list[list[int]], all_logits: bool = False,
                tree_mask: torch.Tensor | None = None):
        """Appends ``new_tokens[i]`` to ``seqs[i]`` and encodes them (after any pending tokens) in
        one batched pass. Returns the logits after the last token of each sequence ``[B, V]``, or
        with ``all_logits`` a list of ``[len(new_tokens[i]), V]`` tensors, row j being the logits
        after new token j (speculative verification scores K drafts in one pass this way).

        ``tree_mask`` bool ``[sum new, max new]``: row j says which new tokens of its own sequence
        token j may attend to (itself and its ancestors); positions follow the tree depth. The
        sequence's tokens are then stored in tree order: truncate back and re-feed the accepted
        path before generating on. Not allowed with pending tokens.

        If it raises (CacheFull, a kernel error, KeyboardInterrupt...), every sequence is left with
        the tokens it had before the call (``new_tokens`` are not appended; pending tokens stay
        pending), no KV position it did not compute, and ``logits`` None where they may be stale:
        the call can be retried, or the sequences finished / released."""
        if len(seqs) != len(new_tokens):
            raise ValueError(f"Engine.forward: {len(seqs)} 'seqs' but {len(new_tokens)} 'new_tokens' lists")
        if not seqs:
            raise ValueError("Engine.forward: 'seqs' is empty")
        checked = []
        for i, (seq, new) in enumerate(zip(seqs, new_tokens)):  # validate everything before changing anything
            self._check_alive(f"seqs[{i}]", seq)
            checked.append(self._check_tokens(f"new_tokens[{i}]", new, allow_empty=True))
            if tree_mask is not None and seq.num_computed != len(seq.tokens):
                raise ValueError(f"Engine.forward: seqs[{i}] has pending tokens; 'tree_mask' needs none")
            window = self.model.window
            if window is not None and len(seq.tokens) + len(checked[-1]) > window:
                raise ValueError(f"Engine.forward: seqs[{i}] would be longer than the model's sliding window "
                                 f"({window}); the engine runs full attention, exact only within the window")
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("Engine.forward: a sequence appears twice in 'seqs'")
        if tree_mask is not None:
            total, width = sum(map(len, checked)), max(map(len, checked))
            if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool \
                    or tuple(tree_mask.shape) != (total, width):
                raise ValueError(f"Engine.forward: 'tree_mask' must be a bool tensor of shape ({total}, {width}), "
                                 f"got {getattr(tree_mask, 'dtype', type(tree_mask).__name__)} "
                                 f"{tuple(getattr(tree_mask, 'shape', ()))}")
        if tree_mask is not None:
            self._check_tree_mask(tree_mask, [len(c) for c in checked])
        feeds, starts = [], []
        before = [(len(seq.tokens), seq.tokens[-1]) for seq in seqs]  # to roll the token lists back
        try:
            for seq, new in zip(seqs, checked):
                if seq.num_computed == len(seq.tokens) and not new and seq.logits is None:
                    # logits of a computed position are not kept: recompute the last token
                    last = seq.tokens[-1]
                    self.cache.truncate(seq.handle, seq.num_computed - 1)
                    seq.tokens.append(last)
                seq.tokens.extend(new)
                starts.append(seq.num_computed)
                feeds.append(seq.tokens[seq.num_computed:])
            lens = [len(f) for f in feeds]
            live = [i for i, n in enumerate(lens) if n]
            out_rows = [None] * len(seqs)
            if live:
                self._run([seqs[i] for i in live], [feeds[i] for i in live], [starts[i] for i in live],
                          [len(checked[i]) for i in live], all_logits, tree_mask, out_rows, live)
        except BaseException:
            # _run already took back the positions it reserved; drop this call's new tokens (a
            # retry must not append them twice), keep the pending ones
            for seq, (n, last) in zip(seqs, before):
                if seq.alive and not seq.handle.finished:
                    del seq.tokens[n:]
                    if len(seq.tokens) < n:  # interrupted between the truncate and the re-append
                        seq.tokens.append(last)
            raise
        if all_logits:
            return [out_rows[i] if out_rows[i] is not None else seqs[i].logits[None] for i in range(len(seqs))]
        return torch.stack([seqs[i].logits for i in range(len(seqs))])

    @staticmethod
    def _check_tree_mask(tree_mask: torch.Tensor, counts: list[int]) -> None:
        """Positions come from row sums: every row must see itself and nothing past its own
        sequence's new tokens, or the positions would be silently wrong."""
        total = sum(counts)
        if not total:
            return
        dev = tree_mask.device
        n = torch.tensor(counts, device=dev)
        own = torch.repeat_interleave(n, n)  # each row's sequence's new-token count
        j = torch.cat([torch.arange(c, device=dev) for c in counts])  # each row's index in its sequence
        outside = tree_mask & (torch.arange(tree_mask.shape[1], device=dev)[None, :] >= own[:, None])
        if bool(outside.any()):
            r, c = (int(x) for x in outside.nonzero()[0])
            raise ValueError(f"Engine.forward: 'tree_mask'[{r}, {c}] is True but row {r}'s sequence has only "
                             f"{int(own[r])} new tokens")
        diag = tree_mask[torch.arange(total, device=dev), j]
        if not bool(diag.all()):
            r = int((~diag).nonzero()[0, 0])
            raise ValueError(f"Engine.forward: 'tree_mask' row {r} does not see itself (column {int(j[r])})")

    def _run(self, seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index):
        lens = [len(f) for f in feeds]
        slots = self.cache.reserve([s.handle for s in seqs], lens)  # CacheFull changes nothing
        try:
            self._run_reserved(seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index, slots)
        except BaseException:
            # The reserved positions may hold no (or partial) K/V: give them back, so the sequences
            # never claim unwritten K/V (finish would put it in the radix cache for later requests,
            # and forward would take the old logits for the new ones). Their tokens stay pending
            # and the logits unknown.
            for seq, start in zip(seqs, starts):
                seq.logits = None
                h = seq.handle
                if h.finished or h.length <= start:
                    continue
                pending = h.tokens[start:]
                self.cache.truncate(h, start)  # start >= the locked prefix: only frees own pages
                h.tokens.extend(pending)
            raise

    def _run_reserved(self, seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index, slots):
        dev = self.device
        lens = [len(f) for f in feeds]
        T = sum(lens)
        if not isinstance(slots, torch.Tensor):
            slots = torch.as_tensor(slots, dtype=torch.int64)
        slots = slots.to(dev)
        ids = torch.tensor([t for f in feeds for t in f], dtype=torch.int64, device=dev)
        if tree_mask is not None:
            depth = tree_mask.to(dev).sum(-1).long() - 1
            positions = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in zip(starts, lens)]).to(dev) + depth
        else:
            positions = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)], dtype=torch.int64, device=dev)
        handles = [s.handle for s in seqs]
        block_table = self.cache.block_table(handles).to(dev)
        seq_lens = self.cache.seq_lens(handles).to(dev)
        decode = tree_mask is None and all(n == 1 for n in lens)
        cu = None if decode else torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
        max_q = max(lens)  # known here: the kernels need no host sync for it
        kp, vp = self.pool.k, self.pool.v
        scale = self.model.scale

        def attention(layer, q, k, v):
            ops.write_kv(kp[layer], vp[layer], slots, k, v)
            if decode:
                return ops.paged_attention_decode(q, kp[layer], vp[layer], block_table, seq_lens, scale=scale)
            return ops.paged_attention_extend(q, kp[layer], vp[layer], block_table, seq_lens, cu,
                                              scale=scale, tree_mask=tree_mask, max_q=max_q)

        if decode:
            select = None  # one row per sequence: every row
        elif all_logits:
            # rows of the new tokens (the last num_new of each feed; at least the last row)
            ends = torch.tensor(lens).cumsum(0)
            select = torch.cat([torch.arange(int(e) - max(1, m), int(e)) for e, m in zip(ends, num_new)]).to(dev)
        else:
            select = (torch.tensor(lens).cumsum(0) - 1).to(dev)
        logits = self.model.forward(ids, positions, attention, select)
        logits = logits.float() if logits.dtype != torch.float64 else logits
        self.stats.tokens_computed += T
        self.stats.forward_calls += 1
        r = 0
        for j, (seq, m) in enumerate(zip(seqs, num_new)):
            if all_logits:
                rows = logits[r:r + max(1, m)]
                r += max(1, m)
                out_rows[index[j]] = rows
                seq.logits = rows[-1]
            else:
                seq.logits = logits[j]

    def sample(self, logits: torch.Tensor, params, generators):
        """Samples one token per row of ``logits [B, V]`` (see ptcore.engine.sampling.sample);
        ``params``: one SamplingParams for all rows or one per row."""
        B = logits.shape[0]
        plist = [params] * B if isinstance(params, SamplingParams) else list(params)
        return sample(logits, plist, list(generators))

    # -- generation ------------------------------------------------------------------------------
    def _stop_check(self, params: SamplingParams, out: list[int]) -> str | None:
        if out[-1] in params.stop_token_ids or out[-1] in self.eos_token_ids:
            return "stop"  # never before min_new_tokens: their logits were -inf
        if params.stop_strings and len(out) >= params.min_new_tokens:
            # a string of n characters spans at most n tokens (+ a margin for multi-byte pieces):
            # decoding the tail keeps the check O(1) per token
            tail = self.decode(out[-(max(map(len, params.stop_strings)) + 8):])
            if any(s in tail for s in params.stop_strings):
                return "stop"
        if len(out) >= params.max_new_tokens:
            return "length"
        return None

    def generate_from(self, seqs: list[Seq], params, generators, progress: bool = False) -> list[Completion]:
        """Samples on from the end of each sequence until it stops (batched decode). The sampled
        tokens are appended to the sequences (the last one pending: not encoded yet)."""
        B = len(seqs)
        plist = [params] * B if isinstance(params, SamplingParams) else list(params)
        generators = list(generators)
        if len(plist) != B or len(generators) != B or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError(f"Engine.generate_from: {B} 'seqs' need one SamplingParams (or one per seq) and "
                             f"{B} 'generators', got {len(plist)} and {len(generators)}")
        if any(p.stop_strings for p in plist) and self.tokenizer is None:
            raise ValueError("Engine: 'stop_strings' need a tokenizer")
        need = [s for s in seqs if s.logits is None or s.num_computed != len(s.tokens)]
        if need:
            self.forward(need, [[] for _ in need])
        outs = [[] for _ in range(B)]
        logps = [[] for _ in range(B)]
        reasons = [None] * B
        active = list(range(B))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max(p.max_new_tokens for p in plist), desc="decode", unit="tok", leave=False)
        while active:
            logits = torch.stack([seqs[i].logits for i in active])
            # min_new_tokens: EOS and the stop tokens cannot be sampled yet (Hugging Face's rule)
            banned = [plist[i].stop_token_ids + self.eos_token_ids if len(outs[i]) < plist[i].min_new_tokens else ()
                      for i in active]
            if any(banned):
                logits = suppress_stops(logits, banned)
            tok, lp = sample(logits, [plist[i] for i in active], [generators[i] for i in active])
            tok, lp = tok.tolist(), lp.tolist()
            self.stats.tokens_generated += len(active)
            nxt = []
            for j, i in enumerate(active):
                outs[i].append(tok[j])
                logps[i].append(lp[j])
                seqs[i].tokens.append(tok[j])
                seqs[i].logits = None
                reasons[i] = self._stop_check(plist[i], outs[i])
                if reasons[i] is None:
                    nxt.append(i)
            if nxt:
                self.forward([seqs[i] for i in nxt], [[] for _ in nxt])
            active = nxt
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return [Completion(outs[i], logps[i], reasons[i], self.decode(outs[i])) for i in range(B)]

    def generators(self, params: SamplingParams, n: int) -> list[torch.Generator]:
        """``n`` generators for one request: sample 0 uses ``params.seed`` itself, sample j a seed
        derived from (seed, j), so a request's samples never depend on what else runs with it."""
        if params.seed is None:
            return [make_generator(None, self.device) for _ in range(n)]
        return [make_generator(params.seed if j == 0 else hash((params.seed, j)) & (2**62 - 1), self.device)
                for j in range(n)]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *, n: int = 1,
                 progress: bool = False) -> list[list[Completion]]:
        """Samples ``n`` completions for each prompt (text with a tokenizer, or token ids; one
        prompt or a list). The prompts are encoded in one batched pass, their ``n`` samples fork
        from them, all decode together; afterwards everything stays in the radix cache.
        ``engine.last_stats`` tells tokens computed vs served from cache."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("Engine.generate: 'prompts' must be a non-empty list of prompts")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Engine.generate: 'n' must be an int >= 1, got {n!r}")
        params = SamplingParams() if params is None else params
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts) or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError("Engine.generate: 'params' must be a SamplingParams or one per prompt")
        tokens = [self.encode(p) if isinstance(p, str) else self._check_tokens(f"prompts[{i}]", p)
                  for i, p in enumerate(prompts)]
        before = self.stats.copy()
        roots, seqs, sp, gens = [], [], [], []
        ok = False
        try:
            for t in tokens:
                roots.append(self.start(t, compute=False))
            self.forward(roots, [[] for _ in roots])
            for root, p in zip(roots, plist):
                seqs.append(root)
                for _ in range(n - 1):
                    seqs.append(self.fork(root))  # registered as soon as it exists
                sp += [p] * n
                gens += self.generators(p, n)
            done = self.generate_from(seqs, sp, gens, progress=progress)
            ok = True
        finally:
            # every live sequence ends: cached on success, released (nothing cached) on error
            for s in roots + seqs:
                if s.alive:
                    self.finish(s) if ok else self.release(s)
        self.last_stats = self.stats - before
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]
