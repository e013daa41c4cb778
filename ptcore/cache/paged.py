"""``PagedCache``: per-sequence KV bookkeeping over a :class:`KVPool` and a radix prefix cache, so
that the engine never handles pages itself.

Every page is, at any time, exactly one of: free (in the pool), held by the radix tree (possibly
borrowed read-only by running sequences, whose locks keep it there), or owned by exactly one running
sequence. A sequence's block table ``pages`` therefore has two parts: ``pages[:depth // page_size]``
are full pages borrowed from the tree along its locked path (``tokens[:depth]``), the rest are its
own. It never writes into a borrowed page: when a shared prefix ends inside a page, the sequence
gets a fresh page holding a copy of that page (copy-on-write, ``ptcore.ops.copy_pages``), so reuse
is not lost at page boundaries. :meth:`PagedCache.check` verifies all of this (the tests call it).

Calling order for a sequence: ``start`` (or ``fork``), then for each forward put the new token ids
into ``seq.tokens`` and ``reserve`` slots for them (the K/V are written there), ``truncate`` to roll
back, and ``finish`` (cache it for later sequences) or ``release``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ptcore import _ext
from ptcore.cache.pool import CacheFull, KVPool
from ptcore.cache.radix import RadixCache, check_count, int64_array

REINSTALL = "pip install -e . --no-build-isolation"


def default_radix(page_size: int) -> RadixCache:
    """The C++ RadixCache. It needs ptcore._C, which every install builds; without it the paged
    cache (and so the engine) cannot run: RuntimeError naming ptcore._C, why it did not load, and
    the reinstall command (never a silent fallback)."""
    mod = _ext.cpu_module()
    if mod is None or not hasattr(mod, "RadixCache"):
        why = ((_ext.why_not("cpu") or "ptcore._C did not load") if mod is None
               else "ptcore._C has no RadixCache (an older build)")
        hint = "" if REINSTALL in why else f"; reinstall ptcore with `{REINSTALL}`"
        raise RuntimeError(f"PagedCache (the engine's KV cache) needs the compiled module ptcore._C for its radix "
                           f"tree, and it is missing: {why}{hint}")
    return RadixCache(page_size)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class CacheSeq:
    """One running sequence as the cache keeps it (the engine wraps it in an ``EngineSeq``).
    ``tokens``: all its token ids (the caller appends new ones before ``reserve``); ``length``:
    positions that have KV slots (what ``seq_lens`` reports); ``cached_len``: tokens served from
    the cache when it started / was forked; ``pages``: its block table; ``node`` / ``depth``: the
    radix node it locks and that node's prefix length."""
    tokens: list
    length: int
    cached_len: int
    pages: list
    node: int
    depth: int
    id: int
    owner: object = field(repr=False, default=None)
    finished: bool = False

    def append(self, tokens) -> None:
        """Adds token ids (an int or a sequence of ints) to ``tokens``."""
        self.tokens.extend([tokens] if isinstance(tokens, int) else int64_array(tokens, "tokens").tolist())


class PagedCache:
    """Sequences over ``pool`` sharing prefixes through ``radix`` (a :class:`RadixCache` with the
    pool's page size; one is made if None).

    Example::

        pool = KVPool(num_layers=2, num_pages=64, page_size=4, num_kv_heads=2, head_dim=8)
        cache = PagedCache(pool)
        seq, cached = cache.start([1, 2, 3, 4, 5])     # cached == 0 the first time
        slots = cache.reserve([seq], 5 - cached)       # write K/V of tokens[cached:] there
        cache.finish(seq)                              # the tree keeps them
        seq2, cached = cache.start([1, 2, 3, 4, 5, 6]) # cached == 5: compute only token 6
    """

    def __init__(self, pool: KVPool, radix: RadixCache | None = None):
        if not isinstance(pool, KVPool):
            raise ValueError(f"PagedCache: pool must be a KVPool, got {type(pool).__name__}")
        radix = default_radix(pool.page_size) if radix is None else radix
        if radix.page_size != pool.page_size:
            raise ValueError(f"PagedCache: the radix cache's page_size ({radix.page_size}) differs from the "
                             f"pool's ({pool.page_size})")
        if radix.cached_tokens or radix.locks:
            raise ValueError("PagedCache: the radix cache must be empty (its slots would not belong to this pool)")
        self.pool, self.radix = pool, radix
        self.page_size = pool.page_size
        self._running: dict[int, CacheSeq] = {}
        self._ids = itertools.count()
        self.reset_stats()

    # -- allocation -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = {"computed_tokens": 0, "cached_tokens": 0, "copied_pages": 0, "evicted_slots": 0}

    @property
    def stats(self) -> dict:
        """computed_tokens (slots reserved: tokens the caller computes), cached_tokens (served from
        the cache by start / fork), copied_pages (copy-on-write), evicted_slots (from the tree)."""
        return dict(self._stats)

    def _alloc(self, n: int) -> list[int]:
        """``n`` fresh pages, evicting from the radix tree when the pool runs short."""
        short = n - self.pool.num_free
        if short > 0:
            P = self.page_size
            evictable = self.radix.evictable_slots // P
            if short > evictable:
                own = sum(len(s.pages) - s.depth // P for s in self._running.values())
                raise CacheFull(
                    f"KV cache full: {n} pages of {P} tokens needed, {self.pool.num_free} free, {evictable} "
                    f"evictable from the prefix cache ({self.radix.held_slots // P} held by it, the rest locked by "
                    f"{len(self._running)} running sequences, which own {own} more); pool of {self.pool.num_pages} "
                    f"pages. Finish or release sequences, or make the pool larger")
            freed = self.radix.evict(short * P)
            self._stats["evicted_slots"] += len(freed)
            self.pool.free(sorted({s // P for s in freed}))
        return self.pool.alloc(n)

    def _copy_pages(self, src: list[int]) -> list[int]:
        """Fresh pages holding copies of ``src`` (copy-on-write)."""
        dst = self._alloc(len(src))
        self.pool.copy(src, dst)
        self._stats["copied_pages"] += len(src)
        return dst

    def _running_seq(self, seq, op: str) -> CacheSeq:
        if not isinstance(seq, CacheSeq) or seq.owner is not self:
            raise ValueError(f"{op}: not a running sequence of this cache (got {type(seq).__name__})")
        if seq.finished:
            raise ValueError(f"{op}: sequence {seq.id} is already finished")
        return seq

    def _slots(self, seq: CacheSeq, start: int, end: int) -> list[int]:
        P = self.page_size
        return [seq.pages[d // P] * P + d % P for d in range(start, end)]

    def _new_seq(self, tokens, length, cached, pages, node, depth) -> CacheSeq:
        seq = CacheSeq(tokens, length, cached, pages, node, depth, next(self._ids), owner=self)
        self._running[seq.id] = seq
        self._stats["cached_tokens"] += cached
        return seq

    # -- sequences --------------------------------------------------------------------------------
    def start(self, tokens) -> tuple[CacheSeq, int]:
        """A sequence for ``tokens`` reusing their longest cached prefix: returns it and
        ``cached_len`` (< len(tokens): the last token is always computed, its logits are needed).
        The caller computes ``tokens[cached_len:]`` (reserve that many slots)."""
        tokens = int64_array(tokens, "tokens").tolist()  # plain ints, whatever came in
        if not tokens:
            raise ValueError("start: tokens is empty")
        P = self.page_size
        m = self.radix.match_prefix(tokens[:-1])
        self.radix.lock(m.node)
        pages = [m.slots[j * P] // P for j in range(m.length // P)]
        if m.length % P:  # the shared prefix ends inside a page: copy it, write into the copy
            try:
                pages += self._copy_pages([m.slots[-1] // P])
            except BaseException:
                self.radix.unlock(m.node)
                raise
        return self._new_seq(tokens, m.length, m.length, pages, m.node, m.length), m.length

    def fork(self, seq: CacheSeq, length: int | None = None) -> CacheSeq:
        """A new sequence sharing ``seq``'s first ``length`` tokens (default all of its KV) without
        recomputing them: full pages shared through the radix tree, a partial last page copied."""
        seq = self._running_seq(seq, "fork")
        m = seq.length if length is None else check_count(length, "length")
        if m > seq.length:
            raise ValueError(f"fork: length {m} exceeds the sequence's KV length {seq.length}")
        if len(seq.tokens) < m:
            raise ValueError(f"fork: the sequence has {len(seq.tokens)} tokens but {m} KV positions; "
                             "append the token ids before reserving their slots")
        P = self.page_size
        full = m // P * P
        if full > seq.depth:
            self._share(seq, full)  # the tree takes seq's full pages, so both can borrow them
        d = min(m, seq.depth)
        if d == seq.depth:
            node = seq.node
        else:
            r = self.radix.match_prefix(seq.tokens[:m])
            assert r.length == m, "a locked prefix must stay cached"
            node = r.node
        self.radix.lock(node)
        try:
            copies = self._copy_pages(seq.pages[d // P:_ceil_div(m, P)])
        except BaseException:
            self.radix.unlock(node)
            raise
        return self._new_seq(seq.tokens[:m], m, m, seq.pages[:d // P] + copies, node, d)

    def _share(self, seq: CacheSeq, full: int) -> None:
        """Inserts ``seq.tokens[:full]`` (page-aligned) into the tree and re-points seq to borrow
        those pages: seq's own pages the tree did not take (it held the same tokens) are freed."""
        P = self.page_size
        cached = self.radix.insert(seq.tokens[:full], self._slots(seq, 0, full))
        r = self.radix.match_prefix(seq.tokens[:full])
        assert r.length == full, "tokens just inserted must be cached"
        self.radix.lock(r.node)
        self.radix.unlock(seq.node)
        shared = [r.slots[j * P] // P for j in range(full // P)]
        taken = range(cached // P, full // P)
        dup = [seq.pages[j] for j in range(seq.depth // P, full // P) if j not in taken]
        seq.pages[:full // P] = shared
        seq.node, seq.depth = r.node, full
        self.pool.free(dup)

    def reserve(self, seqs, num_new) -> torch.Tensor:
        """Slots (int64 [sum num_new], on the pool's device) for the next ``num_new`` positions of
        each sequence (an int for all, or one per sequence), in order; advances ``seq.length``.
        Allocates pages (evicting from the prefix cache first); CacheFull changes nothing."""
        seqs = [self._running_seq(s, "reserve") for s in seqs]
        if len({s.id for s in seqs}) != len(seqs):
            raise ValueError("reserve: a sequence appears twice")
        counts = [num_new] * len(seqs) if isinstance(num_new, int) else list(num_new)
        if len(counts) != len(seqs):
            raise ValueError(f"reserve: {len(seqs)} sequences but {len(counts)} counts in num_new")
        counts = [check_count(c, "num_new") for c in counts]
        P = self.page_size
        extra = [_ceil_div(s.length + k, P) - len(s.pages) for s, k in zip(seqs, counts)]
        fresh = iter(self._alloc(sum(extra)))
        slots = []
        for s, k, e in zip(seqs, counts, extra):
            s.pages += [next(fresh) for _ in range(e)]
            slots += self._slots(s, s.length, s.length + k)
            s.length += k
        self._stats["computed_tokens"] += sum(counts)
        return torch.tensor(slots, dtype=torch.int64, device=self.pool.device)

    def truncate(self, seq: CacheSeq, length: int) -> None:
        """Rolls ``seq`` back to its first ``length`` positions (and tokens), freeing its pages
        past them. Rolling back into the shared prefix re-locks the shorter prefix and copies the
        page that will be written next if the tree holds it."""
        seq = self._running_seq(seq, "truncate")
        length = check_count(length, "length")
        if length > seq.length:
            raise ValueError(f"truncate: length {length} exceeds the sequence's KV length {seq.length}")
        P = self.page_size
        own_from = seq.depth // P  # pages before this index are borrowed from the tree
        keep = _ceil_div(length, P)
        pages = seq.pages[:keep]
        if length < seq.depth:
            r = self.radix.match_prefix(seq.tokens[:length])
            assert r.length == length, "a locked prefix must stay cached"
            self.radix.lock(r.node)
            if length % P and length // P < own_from:  # the next write goes into a borrowed page
                try:
                    pages[-1:] = self._copy_pages(pages[-1:])
                except BaseException:
                    self.radix.unlock(r.node)
                    raise
            self.radix.unlock(seq.node)
            seq.node, seq.depth = r.node, length
        self.pool.free([seq.pages[j] for j in range(max(own_from, keep), len(seq.pages))])
        seq.pages, seq.length = pages, length
        del seq.tokens[length:]
        seq.cached_len = min(seq.cached_len, length)

    def finish(self, seq: CacheSeq, insert: bool = True) -> int:
        """Ends ``seq``: with ``insert``, its tokens go into the radix tree (which keeps the pages
        it did not already have) so later sequences reuse them; its lock is released and every
        page the tree did not take is freed. Returns how many of its tokens were already cached."""
        seq = self._running_seq(seq, "finish")
        n, P = seq.length, self.page_size
        cached, taken = 0, range(0)
        if insert and n:
            if len(seq.tokens) < n:
                raise ValueError(f"finish: the sequence has {len(seq.tokens)} tokens but {n} KV positions; "
                                 "append the token ids before reserving their slots")
            cached = self.radix.insert(seq.tokens[:n], self._slots(seq, 0, n))
            if cached < n:
                taken = range(cached // P, _ceil_div(n, P))
        self.pool.free([seq.pages[j] for j in range(seq.depth // P, len(seq.pages)) if j not in taken])
        self.radix.unlock(seq.node)
        seq.finished = True
        del self._running[seq.id]
        return cached

    def release(self, seq: CacheSeq) -> None:
        """Ends ``seq`` without caching it: frees its pages, releases its lock."""
        self.finish(seq, insert=False)

    # -- batch views ------------------------------------------------------------------------------
    def block_table(self, seqs) -> torch.Tensor:
        """int32 [B, max pages] of the sequences' pages, padded with 0 (never read past
        ceil(seq_len / page_size))."""
        seqs = [self._running_seq(s, "block_table") for s in seqs]
        width = max([len(s.pages) for s in seqs] + [1])
        rows = [s.pages + [0] * (width - len(s.pages)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.pool.device).reshape(len(seqs), width)

    def seq_lens(self, seqs) -> torch.Tensor:
        """int32 [B]: each sequence's ``length``."""
        seqs = [self._running_seq(s, "seq_lens") for s in seqs]
        return torch.tensor([s.length for s in seqs], dtype=torch.int32, device=self.pool.device)

    @property
    def running(self) -> list[CacheSeq]:
        return list(self._running.values())

    @property
    def available_pages(self) -> int:
        """Pages an allocation could get now: free ones plus those evictable from the tree."""
        return self.pool.num_free + self.radix.evictable_slots // self.page_size

    def __repr__(self) -> str:
        return (f"PagedCache(page_size={self.page_size}, running={len(self._running)}, free_pages="
                f"{self.pool.num_free}/{self.pool.num_pages}, cached_tokens={self.radix.cached_tokens})")

    def flush(self) -> None:
        """Empties the radix tree into the pool (no sequence may be running)."""
        if self._running:
            raise RuntimeError(f"PagedCache.flush: {len(self._running)} sequences are still running")
        self.pool.free(sorted({s // self.page_size for s in self.radix.flush()}))

    def check(self) -> None:
        """Raises AssertionError unless every page is free, held by the tree, or owned by exactly
        one running sequence; borrowed pages are the tree's and locked; no lock is leaked."""
        P = self.page_size
        free = self.pool.free_pages()
        tree = sorted({s // P for s in self.radix.owned_slots()})
        owners: dict[int, str] = {p: "free" for p in free}
        for p in tree:
            assert p not in owners, f"page {p} is both {owners[p]} and held by the radix tree"
            owners[p] = "tree"
        tree_set = set(tree)
        for s in self._running.values():
            assert len(s.pages) == _ceil_div(s.length, P), f"seq {s.id}: {len(s.pages)} pages for {s.length} tokens"
            assert s.depth <= s.length and self.radix.node_depth(s.node) == s.depth, f"seq {s.id}: bad lock depth"
            assert self.radix.node_ref(s.node) > 0, f"seq {s.id}: its node {s.node} is not locked"
            for p in s.pages[:s.depth // P]:
                assert p in tree_set, f"seq {s.id}: borrowed page {p} is not held by the tree"
            for p in s.pages[s.depth // P:]:
                assert p not in owners, f"page {p} of seq {s.id} is also {owners[p]}"
                owners[p] = f"owned by seq {s.id}"
        assert len(owners) == self.pool.num_pages, \
            f"{self.pool.num_pages - len(owners)} pages leaked: {sorted(set(range(self.pool.num_pages)) - set(owners))}"
        assert self.radix.locks == len(self._running), \
            f"{self.radix.locks} radix locks for {len(self._running)} running sequences"
