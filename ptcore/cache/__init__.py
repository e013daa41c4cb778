"""Prefix-reusing paged KV cache: :class:`RadixCache` (C++ radix tree from token ids to KV slots),
:class:`KVPool` (paged K/V tensors of every layer and their allocator), and :class:`PagedCache`
(per-sequence block tables over both: start / fork / reserve / truncate / finish), so the engine
never handles pages itself. :class:`RadixModel` is the brute-force Python model of RadixCache used
by the tests and the benchmark."""
from ptcore.cache.paged import PagedCache, Seq
from ptcore.cache.pool import CacheFull, KVPool
from ptcore.cache.radix import MatchResult, RadixCache
from ptcore.cache.radix_model import RadixModel

__all__ = ["CacheFull", "KVPool", "MatchResult", "PagedCache", "RadixCache", "RadixModel", "Seq"]
