"""``RadixModel``: a brute-force Python model of :class:`ptcore.cache.RadixCache` (the C++ trie),
the oracle of the property tests (tests/test_radix_cache.py, tests/test_paged_cache.py) and the
baseline of ``bench/radix.py``. It lives with the tests, not in the package: the engine and the
paged cache always use the C++ tree (ptcore._C, which every install builds) and raise when it is
missing.

Same interface and same semantics, down to node ids, access ticks and eviction order, but no
index: nodes sit in a flat dict and every operation scans all of them (each node stores its whole
path from the root, so "is this node on the way to `tokens`" is a tuple comparison). Slow on
purpose: obviously right rather than fast.

Shared semantics (csrc/include/ptcore/radix_cache.h): a clock ticks at every match_prefix and
insert; the nodes whose tokens were matched get that tick; a split creates the upper node (new id,
the lower part keeps its id, locks and tick); insert splits only when it adds a leaf; evict takes
unlocked leaves by (tick, id) and returns the slots of the whole pages they own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ptcore.cache.radix import (MatchResult, check_count, check_node, check_page_size, check_slots,
                                int64_array)


@dataclass
class _Node:
    id: int
    parent: int  # -1 for the root
    path: tuple  # every token from the root to this node's end
    slots: list = field(default_factory=list)  # slots of this node's own run
    ref: int = 0  # locks on this node and below it
    tick: int = 0
    own: int = 0  # locks taken on this node itself (a split leaves them with the lower part)

    @property
    def depth(self) -> int:  # position of the first token of the run
        return len(self.path) - len(self.slots)


class RadixModel:
    """Brute-force reference of :class:`RadixCache` (same methods, same results)."""

    def __init__(self, page_size: int = 1):
        self.page_size = check_page_size(page_size)
        self.nodes = {0: _Node(0, -1, ())}
        self.clock = 0
        self.next_id = 1
        self._stats = dict.fromkeys(("match_calls", "query_tokens", "hit_tokens", "insert_calls",
                                     "inserted_tokens", "evicted_tokens", "evicted_nodes", "freed_slots"), 0)

    # -- brute-force helpers ----------------------------------------------------------------------
    def _children(self, node_id: int) -> list[_Node]:
        return [n for n in self.nodes.values() if n.parent == node_id]

    def _ancestors(self, node: _Node) -> list[_Node]:
        """node, its parent, ..., the root."""
        out = [node]
        while out[-1].parent != -1:
            out.append(self.nodes[out[-1].parent])
        return out

    def _walk(self, tokens: tuple):
        """(matched length, deepest node matched to its end, partly matched child or None, how
        many of its tokens matched)."""
        last = max((n for n in self.nodes.values() if tokens[:len(n.path)] == n.path),
                   key=lambda n: len(n.path))
        for c in self._children(last.id):
            k = 0
            while k < len(c.slots) and c.depth + k < len(tokens) and c.path[c.depth + k] == tokens[c.depth + k]:
                k += 1
            if k:  # k == len(c.slots) is impossible: c would have been `last`
                return len(last.path) + k, last, c, k
        return len(last.path), last, None, 0

    def _split(self, node: _Node, k: int) -> _Node:
        upper = _Node(self.next_id, node.parent, node.path[:node.depth + k], node.slots[:k], node.ref, node.tick)
        self.next_id += 1
        self.nodes[upper.id] = upper
        node.slots = node.slots[k:]
        node.parent = upper.id
        return upper

    def _pages_held(self) -> set:
        return {s // self.page_size for n in self.nodes.values() for s in n.slots}

    def _owned_pages(self, node: _Node) -> list[int]:
        P = self.page_size
        pages = list(dict.fromkeys(s // P for s in node.slots))
        parent = self.nodes[node.parent]
        if parent.id != 0 and pages and pages[0] == parent.slots[-1] // P:
            pages = pages[1:]
        return pages

    # -- interface --------------------------------------------------------------------------------
    def match_prefix(self, tokens) -> MatchResult:
        tokens = tuple(int64_array(tokens, "tokens"))
        self.clock += 1
        length, last, partial, k = self._walk(tokens)
        for n in self._ancestors(last):
            n.tick = self.clock
        if partial is not None:
            last = self._split(partial, k)
            last.tick = self.clock
        slots = [s for n in reversed(self._ancestors(last)) for s in n.slots]
        P = self.page_size
        for start in range(0, length, P):  # one physical page per logical page: the deepest one
            end = min(start + P, length)
            page = slots[end - 1] // P
            slots[start:end] = [page * P + d % P for d in range(start, end)]
        self._stats["match_calls"] += 1
        self._stats["query_tokens"] += len(tokens)
        self._stats["hit_tokens"] += length
        return MatchResult(length, slots, last.id)

    def insert(self, tokens, slots) -> int:
        t, s = int64_array(tokens, "tokens"), int64_array(slots, "slots")
        check_slots(t, s, self.page_size)
        tokens, slots = tuple(t), list(s)
        cached, last, partial, k = self._walk(tokens)
        P = self.page_size
        held, fresh = self._pages_held(), set()
        for d in range(cached, len(tokens)):
            if d != cached and d % P:
                continue
            page = slots[d] // P
            if page in held:
                raise ValueError(f"slots[{d}] = {slots[d]} lies in page {page}, which the cache already holds "
                                 f"(the first {cached} tokens are cached; new tokens need pages of their own)")
            if page in fresh:
                raise ValueError(f"slots[{d}] = {slots[d]}: page {page} is used for two different logical pages")
            fresh.add(page)
        self.clock += 1
        for n in self._ancestors(last):
            n.tick = self.clock
        if partial is not None:
            last = self._split(partial, k) if cached < len(tokens) else partial
            last.tick = self.clock
        if cached < len(tokens):
            self.nodes[self.next_id] = _Node(self.next_id, last.id, tokens, slots[cached:], 0, self.clock)
            self.next_id += 1
        self._stats["insert_calls"] += 1
        self._stats["inserted_tokens"] += len(tokens) - cached
        return cached

    def _find(self, node) -> _Node:
        node = check_node(node)
        if node not in self.nodes:
            raise ValueError(f"node {node} is not in the cache (never returned by match_prefix, or evicted)")
        return self.nodes[node]

    def lock(self, node) -> None:
        found = self._find(node)
        found.own += 1
        for n in self._ancestors(found):
            n.ref += 1

    def unlock(self, node) -> None:
        found = self._find(node)
        if found.own <= 0:
            below = " (only nodes below it are: unlock those handles)" if found.ref > 0 else ""
            raise ValueError(f"node {found.id} is not locked{below}")
        found.own -= 1
        for n in self._ancestors(found):
            n.ref -= 1

    def evict(self, num_slots) -> list[int]:
        num_slots = check_count(num_slots, "num_slots")
        P, freed = self.page_size, []
        while len(freed) < num_slots:
            leaves = [n for n in self.nodes.values() if n.id != 0 and n.ref == 0 and not self._children(n.id)]
            if not leaves:
                break
            victim = min(leaves, key=lambda n: (n.tick, n.id))
            for page in self._owned_pages(victim):
                freed += range(page * P, page * P + P)
            del self.nodes[victim.id]
            self._stats["evicted_tokens"] += len(victim.slots)
            self._stats["evicted_nodes"] += 1
        self._stats["freed_slots"] += len(freed)
        return freed

    def flush(self) -> list[int]:
        if self.nodes[0].ref:
            raise RuntimeError(f"cannot flush the radix cache: {self.nodes[0].ref} lock(s) are held by "
                               "running sequences (unlock them first)")
        freed = self.owned_slots()
        self._stats["evicted_tokens"] += self.cached_tokens
        self._stats["evicted_nodes"] += self.num_nodes
        self._stats["freed_slots"] += len(freed)
        self.nodes = {0: self.nodes[0]}
        return freed

    def owned_slots(self) -> list[int]:
        P = self.page_size
        return [p * P + o for p in sorted(self._pages_held()) for o in range(P)]

    def has_node(self, node) -> bool:
        return check_node(node) in self.nodes

    def node_ref(self, node) -> int:
        return self._find(node).ref

    def node_locks(self, node) -> int:
        return self._find(node).own

    def node_depth(self, node) -> int:
        return len(self._find(node).path)

    def prefixes(self) -> set:
        """Every cached prefix (a tuple of tokens): the model's whole content."""
        return {n.path[:d] for n in self.nodes.values() for d in range(n.depth + 1, len(n.path) + 1)}

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def cached_tokens(self) -> int:
        return sum(len(n.slots) for n in self.nodes.values())

    @property
    def held_slots(self) -> int:
        return len(self._pages_held()) * self.page_size

    @property
    def evictable_slots(self) -> int:
        return self.page_size * sum(len(self._owned_pages(n)) for n in self.nodes.values() if n.id and not n.ref)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes) - 1

    @property
    def locks(self) -> int:
        return self.nodes[0].ref

    def __repr__(self) -> str:
        return f"RadixModel(page_size={self.page_size}, cached_tokens={self.cached_tokens}, nodes={self.num_nodes})"
