"""ptcore.cache.RadixCache (C++) against the brute-force RadixModel (tests/radix_oracle.py) under random sequences of
start (match + lock + page allocation with copy-on-write) / finish (insert + unlock) / release /
evict / match / bad input, at page sizes 1 and 4, with the invariants of docs/ttc.md §1 checked
after every step: every page is free, held by the tree, or owned by exactly one running sequence;
locked paths are never evicted; match_prefix returns exactly the longest prefix inserted and not
evicted; after all sequences end and a flush, every page is free. Plus bad-input tests of the
wrapper and of the C++ class itself."""
from array import array

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptcore import _ext
from ptcore.cache import RadixCache
from tests.radix_oracle import RadixModel

VOCAB = 3  # a small vocabulary makes shared prefixes and splits frequent


def ceil_div(a, b):
    return -(-a // b)


class Harness:
    """Drives the C++ cache and the model with the same calls, as a small paged KV cache would
    (running sequences own pages; the tree owns what it took), and checks both agree."""

    def __init__(self, page_size, num_pages):
        self.P, self.num_pages = page_size, num_pages
        self.cache, self.model = RadixCache(page_size), RadixModel(page_size)
        self.free = set(range(num_pages))
        self.seqs = []  # dicts: tokens, slots, node, matched, own (logical index -> page)
        self.truth = set()  # every cached prefix, tracked independently of either tree
        self.inserted = []

    def both(self, name, *args):
        """Same call on both; same result, or the same exception type and message."""
        outs = []
        for impl in (self.cache, self.model):
            try:
                outs.append(("ok", getattr(impl, name)(*args)))
            except (ValueError, RuntimeError) as e:
                outs.append((type(e).__name__, str(e)))
        assert outs[0] == outs[1], f"{name}{args}: C++ {outs[0]} != model {outs[1]}"
        if outs[0][0] != "ok":
            raise ValueError(outs[0][1])
        return outs[0][1]

    def longest_cached(self, tokens):
        return max(k for k in range(len(tokens) + 1) if k == 0 or tuple(tokens[:k]) in self.truth)

    def tree_pages(self):
        return {s // self.P for s in self.cache.owned_slots()}

    def alloc(self, n):
        """n pages, evicting from the tree when short; None (nothing changed) if impossible."""
        if n > len(self.free):
            if n - len(self.free) > self.cache.evictable_slots // self.P:
                return None
            self.evict((n - len(self.free)) * self.P)
        return [self.free.pop() for _ in range(n)] if n <= len(self.free) else None

    # -- operations -------------------------------------------------------------------------------
    def start(self, tokens):
        P = self.P
        r = self.both("match_prefix", tokens)
        assert r.length == self.longest_cached(tokens)
        self.both("lock", r.node)
        borrowed = r.length // P
        own = self.alloc(ceil_div(len(tokens), P) - borrowed)
        if own is None:
            self.both("unlock", r.node)
            return
        # the partial shared page (if any) is a copy-on-write page: the first of `own`
        slots = r.slots[:borrowed * P] + [own[d // P - borrowed] * P + d % P for d in range(borrowed * P, len(tokens))]
        self.seqs.append(dict(tokens=list(tokens), slots=slots, node=r.node, matched=r.length,
                              own={borrowed + i: p for i, p in enumerate(own)}))

    def end(self, i, insert):
        P, seq = self.P, self.seqs.pop(i)
        n, taken = len(seq["tokens"]), set()
        if insert:
            held = self.tree_pages()
            cached = self.both("insert", seq["tokens"], seq["slots"])
            assert seq["matched"] <= cached <= n
            if cached < n:
                taken = set(range(cached // P, ceil_div(n, P)))
                assert {seq["own"][j] for j in taken}.isdisjoint(held)
            self.truth |= {tuple(seq["tokens"][:k]) for k in range(1, n + 1)}
            self.inserted.append(seq["tokens"])
        self.free |= {p for j, p in seq["own"].items() if j not in taken}
        self.both("unlock", seq["node"])

    def evict(self, k):
        before = self.tree_pages()
        freed = self.both("evict", k)
        pages = {s // self.P for s in freed}
        assert len(freed) == len(pages) * self.P and len(set(freed)) == len(freed), "whole pages, once each"
        assert len(freed) >= k or self.cache.evictable_slots == 0  # stops early only when nothing is left
        assert pages <= before and pages.isdisjoint(self.tree_pages()) and pages.isdisjoint(self.free)
        self.free |= pages
        after = self.model.prefixes()
        assert after <= self.truth
        removed = self.truth - after
        for p in removed:  # evicted prefixes take their extensions with them (leaves first)
            assert not any(q[:len(p)] == p for q in after if len(q) > len(p)), p
        self.truth = after
        for seq in self.seqs:  # locked paths survive
            assert self.cache.has_node(seq["node"])
            assert tuple(seq["tokens"][:seq["matched"]]) in self.truth | {()}

    def check(self):
        c, m = self.cache, self.model
        for attr in ("cached_tokens", "held_slots", "evictable_slots", "num_nodes", "locks", "stats"):
            assert getattr(c, attr) == getattr(m, attr), attr
        assert c.owned_slots() == m.owned_slots()
        assert c.cached_tokens == len(self.truth)
        assert c.locks == len(self.seqs)
        tree = self.tree_pages()
        owners = [self.free, tree] + [set(s["own"].values()) for s in self.seqs]
        assert sum(len(o) for o in owners) == self.num_pages, "a page is leaked or owned twice"
        assert set().union(*owners) == set(range(self.num_pages))
        for s in self.seqs:
            assert c.node_ref(s["node"]) > 0 and c.node_depth(s["node"]) == s["matched"]
            assert c.node_locks(s["node"]) == m.node_locks(s["node"]) > 0
            assert {s["slots"][d] // self.P for d in range(s["matched"] // self.P * self.P)} <= tree


def tokens_strategy(h):
    """A fresh random sequence, or a prefix of an inserted one plus a random tail."""
    def build(data):
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=9))
        if h.inserted and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(h.inserted))
            base = base[:data.draw(st.integers(0, len(base)))]
        else:
            base = []
        return (base + tail) or [0]
    return build


@pytest.mark.parametrize("page_size,num_pages", [(1, 48), (4, 16)])
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_against_model(page_size, num_pages, data):
    h = Harness(page_size, num_pages)
    make_tokens = tokens_strategy(h)
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["start", "start", "finish", "finish", "release", "evict", "match", "bad"]))
        if op == "start":
            h.start(make_tokens(data))
        elif op in ("finish", "release") and h.seqs:
            h.end(data.draw(st.integers(0, len(h.seqs) - 1)), insert=op == "finish")
        elif op == "evict":
            h.evict(data.draw(st.integers(0, 3 * page_size)))
        elif op == "match":
            tokens = make_tokens(data)
            assert h.both("match_prefix", tokens).length == h.longest_cached(tokens)
        elif op == "bad":
            bad_call(h, data)
        h.check()
    while h.seqs:
        h.end(0, insert=data.draw(st.booleans()))
        h.check()
    freed = h.both("flush")
    h.free |= {s // page_size for s in freed}
    h.truth = set()
    h.check()
    assert h.free == set(range(num_pages)) and h.cache.cached_tokens == 0 and h.cache.num_nodes == 0


def bad_call(h, data):
    """A call both must reject without changing anything (h.check() follows)."""
    P = h.P
    kind = data.draw(st.sampled_from(["owned page", "unlock", "misaligned", "unknown node", "negative"]))
    tree = sorted(h.tree_pages())
    if kind == "owned page" and tree:  # new tokens in a page the tree holds: a page owned twice
        fresh = [VOCAB + 1] * data.draw(st.integers(1, 2 * P))  # never cached (outside VOCAB)
        page = data.draw(st.sampled_from(tree))
        slots = [page * P + d % P for d in range(len(fresh))]
        with pytest.raises(ValueError, match="already holds"):
            h.both("insert", fresh, slots)
    elif kind == "unlock":
        node = h.both("match_prefix", [VOCAB + 2]).node  # the root: locked only by running seqs
        if h.cache.node_ref(node) == 0:
            with pytest.raises(ValueError, match="is not locked"):
                h.both("unlock", node)
    elif kind == "misaligned" and P > 1:
        with pytest.raises(ValueError, match="page-aligned"):
            h.both("insert", [VOCAB + 1] * 2, [1, 2])
    elif kind == "unknown node":
        with pytest.raises(ValueError, match="not in the cache"):
            h.both("lock", 10**9)
    elif kind == "negative":
        with pytest.raises(ValueError, match="negative"):
            h.both("match_prefix", [0, -3])


# -- deterministic cases --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [RadixCache, RadixModel])
def test_split_lock_evict_lru(impl):
    c = impl(1)
    assert c.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    assert c.insert([1, 2, 5], [20, 21, 22]) == 2  # slots 20, 21 stay the caller's
    m = c.match_prefix([1, 2, 3, 9])
    assert (m.length, m.slots) == (3, [10, 11, 12])  # split of [3, 4] after 3
    assert c.node_depth(m.node) == 3
    c.lock(m.node)
    assert c.evict(100) == [13, 22]  # unlocked leaves [4] then [5]; [1, 2, 3] is locked
    assert c.match_prefix([1, 2, 3, 4]).length == 3  # the unlocked leaf [4] went too
    c.unlock(m.node)
    assert sorted(c.evict(1)) == [12] and c.cached_tokens == 2
    assert sorted(c.flush()) == [10, 11] and c.cached_tokens == 0
    assert c.stats["evicted_tokens"] == 5


@pytest.mark.parametrize("impl", [RadixCache, RadixModel])
def test_lru_order(impl):
    c = impl(1)
    c.insert([1, 1], [0, 1])
    c.insert([2, 2], [2, 3])
    c.insert([3, 3], [4, 5])
    c.match_prefix([1, 1])  # now [2, 2] is the least recently used
    assert c.evict(1) == [2, 3]
    assert c.evict(2) == [4, 5]
    assert c.evict(5) == [0, 1]
    assert c.evict(5) == []


@pytest.mark.parametrize("impl", [RadixCache, RadixModel])
def test_pages_copy_on_write_branch(impl):
    """page_size 4: a branch at position 6 brings its own page for logical page 1 (a copy of
    positions 4, 5 + its own 6, 7); a match through the branch reports that page for the whole
    logical page; evicting the branch frees exactly its two pages."""
    c = impl(4)
    a = [1] * 10
    assert c.insert(a, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) == 0  # pages 0, 1, 2
    b = a[:6] + [2, 2, 2, 2, 2]
    slots = [0, 1, 2, 3] + [12, 13, 14, 15] + [20, 21, 22]  # pages 0 (dup), 3 (CoW), 5
    assert c.insert(b, slots) == 6
    m = c.match_prefix(b)
    assert m.length == 11 and m.slots == [0, 1, 2, 3, 12, 13, 14, 15, 20, 21, 22]
    m = c.match_prefix(a[:6] + [2])
    assert m.slots == [0, 1, 2, 3, 12, 13, 14]
    assert c.match_prefix(a[:5]).slots == [0, 1, 2, 3, 4]  # stops inside page 1 of the trunk
    assert c.owned_slots() == list(range(12)) + list(range(12, 16)) + list(range(20, 24))
    freed = c.evict(1)  # LRU leaf: the trunk's tail [1, 1, 1, 1] (positions 6..9: part of page 1, page 2)
    assert freed == [8, 9, 10, 11]  # page 1 stays with the upper part (positions 4, 5)
    assert c.match_prefix(a).length == 6


@pytest.mark.parametrize("impl", [RadixCache, RadixModel])
def test_unlock_only_through_the_locked_handle(impl):
    """A lock taken on a node is released through that node: releasing it through an ancestor
    (whose reference count includes it) is rejected, else the counts on the path would go
    negative and the still-locked node would become evictable."""
    c = impl(1)
    c.insert([1, 2, 3], [0, 1, 2])
    upper = c.match_prefix([1, 2]).node  # splits [1, 2, 3]
    lower = c.match_prefix([1, 2, 3]).node
    c.lock(lower)
    assert c.node_ref(upper) == 1 and c.node_locks(upper) == 0 and c.node_locks(lower) == 1
    with pytest.raises(ValueError, match="only nodes below it are"):
        c.unlock(upper)
    assert c.locks == 1 and c.evict(10) == [] and c.evictable_slots == 0  # nothing changed
    c.lock(upper)
    c.match_prefix([1])  # a split above both handles keeps their own locks
    c.unlock(upper)
    with pytest.raises(ValueError, match="is not locked"):
        c.unlock(upper)
    c.unlock(lower)
    assert c.locks == 0 and sorted(c.evict(10)) == [0, 1, 2]


@pytest.mark.parametrize("impl", [RadixCache, RadixModel])
def test_bad_input(impl):
    c = impl(4)
    with pytest.raises(ValueError, match=r"tokens\[1\] = -1 is negative"):
        c.match_prefix([3, -1])
    with pytest.raises(ValueError, match=r"tokens\[0\] = 1.5 is not an int"):
        c.match_prefix([1.5])
    with pytest.raises(ValueError, match="must hold integers"):
        c.match_prefix(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same length"):
        c.insert([1, 2], [0])
    with pytest.raises(ValueError, match=r"slots\[1\] = 6 is not page-aligned"):
        c.insert([1, 2], [0, 6])
    with pytest.raises(ValueError, match="different pages"):
        c.insert([1, 2], [0, 5])
    with pytest.raises(ValueError, match="two different logical pages"):
        c.insert([1] * 8, [0, 1, 2, 3, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="not in the cache"):
        c.lock(12345)
    with pytest.raises(ValueError, match="handle"):
        c.lock("a")
    with pytest.raises(ValueError, match="is not locked"):
        c.unlock(0)
    with pytest.raises(ValueError, match="num_slots"):
        c.evict(-1)
    with pytest.raises(ValueError, match="page_size"):
        impl(0)
    with pytest.raises(ValueError, match="page_size"):
        impl(2**40)  # evict would list 2**40 slots per page
    c.lock(c.match_prefix([]).node)
    with pytest.raises(RuntimeError, match="1 lock"):
        c.flush()
    assert c.cached_tokens == 0 and c.stats["insert_calls"] == 0  # nothing was half-done
    # tensors and numpy arrays are accepted
    assert c.insert(torch.tensor([5, 6]), np.array([0, 1])) == 0
    assert c.match_prefix(np.array([5, 6], dtype=np.int32)).length == 2


def test_cpp_checks_again():
    """The C++ class validates on its own (the wrapper's checks bypassed)."""
    raw = _ext.cpu_module().RadixCache(4)
    q = lambda *v: array("q", v)  # noqa: E731
    with pytest.raises(ValueError, match=r"tokens\[1\] = -2"):
        raw.match_prefix(q(1, -2))
    with pytest.raises(ValueError, match="same length"):
        raw.insert(q(1, 2), q(0))
    with pytest.raises(ValueError, match="page-aligned"):
        raw.insert(q(1, 2), q(0, 2))
    with pytest.raises(ValueError, match=r"slots\[0\] = -4 is negative"):
        raw.insert(q(1), q(-4))
    with pytest.raises(ValueError, match="int64"):
        raw.match_prefix(array("i", [1, 2]))
    raw.insert(q(1, 2), q(0, 1))
    with pytest.raises(ValueError, match="already holds"):
        raw.insert(q(3, 4), q(0, 1))
    with pytest.raises(ValueError, match="not in the cache"):
        raw.unlock(77)
    with pytest.raises(ValueError, match="is not locked"):
        raw.unlock(0)
    with pytest.raises(ValueError, match="num_slots"):
        raw.evict(-1)
    with pytest.raises(ValueError, match="page_size"):
        _ext.cpu_module().RadixCache(0)
    with pytest.raises(ValueError, match="page_size"):
        _ext.cpu_module().RadixCache(2**40)
    with pytest.raises(ValueError, match="1-D"):
        raw.match_prefix(np.zeros((2, 2), dtype=np.int64))
    assert raw.match_prefix(np.arange(4, dtype=np.int64)[::-1])[0] == 0  # strided buffers are copied
    raw.lock(0)
    raw.lock(raw.match_prefix(q(1, 2))[2])
    with pytest.raises(ValueError, match="only nodes below"):
        raw.unlock(raw.match_prefix(q(1))[2])  # splits [1, 2]; [1] holds no lock of its own
    raw.unlock(0)
    assert raw.cached_tokens == 2
