"""A sequence of the engine (:class:`EngineSeq`) and its lifecycle: :class:`SequenceOps`, the part of
:class:`ptcore.engine.Engine` that starts, forks, truncates, finishes and releases sequences, and
records what they encoded.

Every token a search tree needs is computed once: a new sequence reuses the longest prefix any
finished sequence left in the radix cache, a fork shares its parent's KV pages (and its logits),
and :meth:`SequenceOps.finish` hands a sequence's KV to the radix cache for later sequences.
"""
from __future__ import annotations

import contextlib

from ptcore.engine.results import Recording


class EngineSeq:
    """A sequence of the engine, over the cache's record of it (``handle``, a
    ``ptcore.cache.CacheSeq``). ``tokens``: all its tokens; the first ``num_computed`` have their
    keys/values in the cache, the rest are pending (e.g. the last sampled token) and get encoded by
    the next :meth:`Engine.forward`. ``logits``: next-token logits after the computed tokens (None
    when unknown)."""

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
        return f"EngineSeq(len={len(self)}, computed={self.num_computed}, alive={self.alive})"


class SequenceOps:
    """Engine methods over sequences. They use the engine's ``cache`` (a ``ptcore.cache.PagedCache``),
    ``stats``, ``prefix_caching``, ``_recordings``, ``_check_tokens``, ``encode`` and ``forward``."""

    def _check_alive(self, name, seq):
        if not isinstance(seq, EngineSeq) or not seq.alive or getattr(seq.handle, "owner", self.cache) is not self.cache:
            raise ValueError(f"Engine: '{name}' must be a live EngineSeq of this engine, got {seq!r}")

    def start(self, tokens, *, compute: bool = True) -> EngineSeq:
        """A new sequence over ``tokens`` (ids, or text with a tokenizer). Reuses the longest
        prefix in the radix cache (all but the last token at most: its logits are needed) and,
        with ``compute``, encodes the rest now; otherwise the next :meth:`forward` does."""
        if isinstance(tokens, str):
            tokens = self.encode(tokens)
        tokens = self._check_tokens("tokens", tokens)
        handle, cached = self.cache.start(tokens)  # matches len(tokens) - 1 at most
        self.stats.tokens_cached += cached
        seq = EngineSeq(handle)
        if compute:
            try:
                self.forward([seq], [[]])
            except BaseException:
                self.release(seq)  # e.g. CacheFull: the caller never got the sequence
                raise
        return seq

    def fork(self, seq: EngineSeq, length: int | None = None) -> EngineSeq:
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
            return EngineSeq(handle)
        kv = min(n, seq.num_computed)
        logits = seq.logits if kv == seq.num_computed else None
        if logits is None and kv == n:
            kv -= 1  # the fork point's logits are unknown: recompute its last token
        handle = self.cache.fork(seq.handle, kv)
        handle.tokens.extend(seq.tokens[kv:n])  # pending tokens
        self.stats.tokens_cached += kv
        return EngineSeq(handle, logits)

    def truncate(self, seq: EngineSeq, length: int) -> None:
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

    def finish(self, seq: EngineSeq, insert: bool = True) -> None:
        """Done with ``seq``: its computed tokens go to the radix cache (``insert`` and prefix
        caching on) for later sequences to reuse; its pages are otherwise freed."""
        self._check_alive("seq", seq)
        for rec in self._recordings:
            rec.trie.add(seq.tokens[:seq.num_computed])
        seq.alive = False
        seq.logits = None
        self.cache.finish(seq.handle, insert=insert and self.prefix_caching)

    def release(self, seq: EngineSeq) -> None:
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
