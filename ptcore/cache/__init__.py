"""Prefix-reusing paged KV cache: :class:`RadixCache` (C++ radix tree from token ids to KV slots),
:class:`KVPool` (paged K/V tensors of every layer and their allocator), and :class:`PagedCache`
(per-sequence block tables over both: start / fork / reserve / truncate / finish), so the engine
never handles pages itself. The radix tree is ptcore._C's (every install builds it); its brute-force
Python model, the tests' oracle, is tests/radix_oracle.py."""
from ptcore.cache.paged import CacheSeq, PagedCache
from ptcore.cache.pool import CacheFull, KVPool
from ptcore.cache.radix import MatchResult, RadixCache

__all__ = ["CacheFull", "CacheSeq", "KVPool", "MatchResult", "PagedCache", "RadixCache"]
