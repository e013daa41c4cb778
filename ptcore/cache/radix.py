"""``RadixCache``: the prefix (radix) KV cache, a compressed trie from token ids to KV slots.

The trie lives in C++ (``ptcore._C.RadixCache``, csrc/cpu/radix_cache.cpp); this wrapper checks
its arguments (types, signs, lengths, node handles) and names them in its errors; the C++ side
checks them again, and alone checks slot alignment and page ownership (one pass over the slots
and its page map; the same ValueError messages as :func:`check_slots`). Semantics and invariants:
``match_prefix`` returns the longest cached prefix and splits the node it ends inside (slot
indices only, never KV data); ``insert`` adds a sequence and returns how many leading tokens were
already cached; ``lock`` / ``unlock`` count running sequences from a node up to the root;
``evict`` removes unlocked leaves, least recently used first, a parent becoming a candidate once
its children are gone. With ``page_size > 1`` the token at position ``i`` sits in a slot with
``slot % page_size == i % page_size`` (slot = page * page_size + offset), the tree owns whole pages,
and a branch that starts inside a page brings its own copy-on-write page (see
csrc/include/ptcore/radix_cache.h), so no page is ever owned twice and ``evict`` / ``flush``
return whole pages.
"""
from __future__ import annotations

import functools
from array import array
from typing import NamedTuple

import numpy as np
import torch

from ptcore import _ext


class MatchResult(NamedTuple):
    """``length`` cached tokens, their ``slots`` (one physical page per logical page), and the
    ``node`` handle to ``lock`` so that this prefix stays cached."""
    length: int
    slots: list[int]
    node: int


def int64_array(values, name: str):
    """``values`` (a sequence of ints, a 1-D integer tensor or array) as a 1-D int64 buffer of
    non-negative values; ValueError naming ``name`` and the offending index otherwise."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a {values.dtype} tensor")
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        out = values.detach().to("cpu", torch.int64).contiguous().numpy()
    elif isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got a {values.dtype} array")
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
        out = np.ascontiguousarray(values, dtype=np.int64)
    else:
        if isinstance(values, (str, bytes)):
            raise ValueError(f"{name} must be a sequence of ints, got {type(values).__name__}")
        try:  # one C pass converts and validates: unsigned 64-bit rejects non-ints and negatives
            out = array("Q", values)
        except (TypeError, OverflowError):
            out = None
        if out is None:
            try:
                items = list(values)
            except TypeError:
                raise ValueError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
            for i, v in enumerate(items):
                if not isinstance(v, (int, np.integer)) or int(v) >= 2**63:
                    raise ValueError(f"{name}[{i}] = {v!r} is not an int (int64)")
                if v < 0:
                    raise ValueError(f"{name}[{i}] = {v} is negative")
            raise ValueError(f"{name}: cannot read as int64")  # unreachable
        u = np.frombuffer(out, dtype=np.uint64)  # one vectorized pass: >= 2**63 is no int64 (ptcore._C
        if u.size and int(u.max()) >= 2**63:     # would read it as a negative and print that)
            i = int(np.argmax(u >= 2**63))
            raise ValueError(f"{name}[{i}] = {int(u[i])} is not an int (int64)")
        return out  # a 'Q' buffer: ptcore._C reads it as int64
    if out.size and out.min() < 0:
        i = int(np.argmax(out < 0))
        raise ValueError(f"{name}[{i}] = {int(out[i])} is negative")
    return out


@functools.lru_cache(maxsize=64)
def _page_layout(n: int, page_size: int):
    """(position % page_size, index of the first position of its logical page), for n positions."""
    d = np.arange(n, dtype=np.int64)
    pos = d % page_size
    return pos, d - pos


def check_slots(tokens, slots, page_size: int) -> None:
    """Same length; for ``page_size > 1`` every slot page-aligned with its position, and the
    positions of one logical page in one physical page (a few vectorized passes)."""
    n, m = len(tokens), len(slots)
    if n != m:
        raise ValueError(f"tokens and slots must have the same length, got {n} and {m}")
    if n == 0:
        return
    s = np.frombuffer(slots, dtype=np.int64) if isinstance(slots, array) else np.asarray(slots)
    top = int(s.max())
    if top > max_slot(page_size):
        i = int(np.argmax(s))
        raise ValueError(f"slots[{i}] = {top} lies in a page whose last slot is past 2**63 - 1 "
                         f"(page_size {page_size}: slots must be <= {max_slot(page_size)})")
    if page_size == 1:
        return
    pos, first = _page_layout(n, page_size)
    if not np.array_equal(s % page_size, pos):
        i = int(np.flatnonzero(s % page_size != pos)[0])
        raise ValueError(f"slots[{i}] = {int(s[i])} is not page-aligned: slot % page_size = "
                         f"{int(s[i]) % page_size} but position % page_size = {i % page_size} "
                         f"(page_size {page_size})")
    pages = s // page_size
    if not np.array_equal(pages, pages[first]):
        i = int(np.flatnonzero(pages != pages[first])[0])
        raise ValueError(f"slots[{i - 1}] and slots[{i}] ({int(s[i - 1])}, {int(s[i])}) lie in different "
                         f"pages but positions {i - 1} and {i} share a logical page (page_size {page_size})")


def max_slot(page_size: int) -> int:
    """The largest slot id whose whole page (every slot of it) is an int64: the slot space is
    bounded so that evict / owned_slots never overflow (RadixCache::insert checks the same)."""
    return ((2**63 - 1 - (page_size - 1)) // page_size) * page_size + page_size - 1


def check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


MAX_PAGE_SIZE = 1 << 20  # RadixCache::kMaxPageSize: evict / owned_slots list every slot of a page


def check_page_size(page_size) -> int:
    if (isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer))
            or not 1 <= page_size <= MAX_PAGE_SIZE):
        raise ValueError(f"page_size must be an int in [1, {MAX_PAGE_SIZE}], got {page_size!r}")
    return int(page_size)


def check_node(node) -> int:
    if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or node < 0:
        raise ValueError(f"node must be a handle from match_prefix (an int >= 0), got {node!r}")
    return int(node)


class RadixCache:
    """Prefix cache over token ids (C++ trie). ``page_size`` tokens per KV page (>= 1).

    Example::

        cache = RadixCache(page_size=1)
        cache.insert([1, 2, 3], [7, 8, 9])        # -> 0 (nothing was cached)
        m = cache.match_prefix([1, 2, 5])          # MatchResult(length=2, slots=[7, 8], node=...)
        cache.lock(m.node)                         # a running sequence uses the prefix
        cache.evict(10)                            # frees unlocked leaves only -> [9]
        cache.unlock(m.node)
    """

    def __init__(self, page_size: int = 1):
        page_size = check_page_size(page_size)
        mod = _ext.cpu_module()
        if mod is None or not hasattr(mod, "RadixCache"):
            why = _ext.why_not("cpu") or "ptcore._C has no RadixCache (rebuild: pip install -e . --no-build-isolation)"
            raise RuntimeError(f"ptcore.cache.RadixCache needs the compiled module ptcore._C: {why}")
        self._c = mod.RadixCache(page_size)
        self.page_size = page_size

    def match_prefix(self, tokens) -> MatchResult:
        """The longest cached prefix of ``tokens``: its length, slots and node handle."""
        length, slots, node = self._c.match_prefix(int64_array(tokens, "tokens"))
        return MatchResult(length, slots, node)

    def insert(self, tokens, slots) -> int:
        """Caches ``tokens`` whose K/V sit in ``slots``; returns how many leading tokens were
        already cached (their ``slots`` stay the caller's to free). The cache takes the pages of
        ``slots[returned:]``, which must not already belong to it."""
        t = int64_array(tokens, "tokens")
        s = int64_array(slots, "slots")
        if len(t) != len(s):
            raise ValueError(f"tokens and slots must have the same length, got {len(t)} and {len(s)}")
        arr = np.frombuffer(s, dtype=np.int64) if isinstance(s, array) else np.asarray(s)
        if len(arr) and int(arr.max()) > max_slot(self.page_size):  # one vectorized pass
            i = int(np.argmax(arr))
            raise ValueError(f"slots[{i}] = {int(arr[i])} lies in a page whose last slot is past "
                             f"2**63 - 1 (page_size {self.page_size}: slots must be <= "
                             f"{max_slot(self.page_size)})")
        # Page alignment, page consistency and page ownership: one C++ pass (ValueError, same
        # messages as check_slots), three times cheaper than the same checks in numpy.
        return self._c.insert(t, s)

    def _known(self, node) -> int:
        node = check_node(node)
        if not self._c.has_node(node):
            raise ValueError(f"node {node} is not in the cache (never returned by match_prefix, or evicted)")
        return node

    def lock(self, node: int) -> None:
        """Protects the path from ``node`` to the root from eviction (counted)."""
        self._c.lock(self._known(node))

    def unlock(self, node: int) -> None:
        """Releases one ``lock`` taken on ``node`` itself (a lock on a node below it is released
        through that node's handle, never through an ancestor's)."""
        node = self._known(node)
        if self._c.node_locks(node) <= 0:
            below = " (only nodes below it are: unlock those handles)" if self._c.node_ref(node) > 0 else ""
            raise ValueError(f"node {node} is not locked{below}")
        self._c.unlock(node)

    def evict(self, num_slots: int) -> list[int]:
        """Frees at least ``num_slots`` slots (whole pages) from unlocked leaves, least recently
        used first; returns them (fewer if nothing more can be evicted)."""
        return self._c.evict(check_count(num_slots, "num_slots"))

    def flush(self) -> list[int]:
        """Empties the cache (no lock may be held); returns every slot it held."""
        return self._c.flush()

    def owned_slots(self) -> list[int]:
        """Every slot of every page the cache holds, sorted."""
        return self._c.owned_slots()

    def has_node(self, node: int) -> bool:
        return self._c.has_node(check_node(node))

    def node_ref(self, node: int) -> int:
        """How many locks hold ``node`` (its own and its descendants')."""
        return self._c.node_ref(self._known(node))

    def node_locks(self, node: int) -> int:
        """How many locks were taken on ``node`` itself (what ``unlock(node)`` may release)."""
        return self._c.node_locks(self._known(node))

    def node_depth(self, node: int) -> int:
        """Prefix length that ``node`` ends at."""
        return self._c.node_depth(self._known(node))

    @property
    def stats(self) -> dict:
        """Counters: match_calls, query_tokens, hit_tokens, insert_calls, inserted_tokens,
        evicted_tokens, evicted_nodes, freed_slots."""
        return self._c.stats

    @property
    def cached_tokens(self) -> int:
        """Tokens in the tree (distinct cached prefixes)."""
        return self._c.cached_tokens

    @property
    def held_slots(self) -> int:
        """Slots of the pages the tree holds (>= cached_tokens when pages are partly used)."""
        return self._c.held_slots

    @property
    def evictable_slots(self) -> int:
        """Slots ``evict`` could free now (the pages of unlocked nodes)."""
        return self._c.evictable_slots

    @property
    def num_nodes(self) -> int:
        return self._c.num_nodes

    @property
    def locks(self) -> int:
        """Outstanding locks."""
        return self._c.locks

    def __repr__(self) -> str:
        return (f"RadixCache(page_size={self.page_size}, cached_tokens={self.cached_tokens}, "
                f"nodes={self.num_nodes}, held_slots={self.held_slots}, locks={self.locks})")
