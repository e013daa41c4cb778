"""ptcore.cache.PagedCache over a KVPool: prefix reuse, copy-on-write, fork, truncate, finish /
release, eviction under pressure and CacheFull, with the K/V contents checked: every position of
every running sequence must read back (through its block table) the value written for its own
prefix, and no page may leak (PagedCache.check after every step, all pages free at the end)."""
import functools
import random

import pytest
import torch

import ptcore
from ptcore.cache import CacheFull, KVPool, PagedCache, RadixCache
from tests.radix_oracle import RadixModel


def kv_value(prefix) -> float:
    """What a model would store at the last position of `prefix`: a function of the whole prefix
    (exact in float64)."""
    return float(hash(tuple(prefix)) % 1_000_003)


class Sim:
    """A stand-in for the engine: writes each position's K/V and reads sequences back."""

    def __init__(self, page_size, num_pages, radix=None, device="cpu"):
        self.P = page_size
        self.pool = KVPool(2, num_pages, page_size, 2, 3, dtype=torch.float64, device=device)
        self.cache = PagedCache(self.pool, radix)

    def compute(self, seqs, new_tokens):
        """Appends the tokens, reserves their slots, writes their K/V."""
        for s, t in zip(seqs, new_tokens):
            s.tokens.extend(t)
        slots = self.cache.reserve(seqs, [len(t) for t in new_tokens])
        vals = [kv_value(s.tokens[:i + 1]) for s, t in zip(seqs, new_tokens) for i in range(s.length - len(t), s.length)]
        vals = torch.tensor(vals, dtype=torch.float64, device=self.pool.device).view(-1, 1, 1)
        for layer in range(self.pool.num_layers):
            self.pool.k[layer, slots // self.P, slots % self.P] = vals + layer
            self.pool.v[layer, slots // self.P, slots % self.P] = -vals - layer
        return slots

    def start(self, tokens):
        seq, cached = self.cache.start(tokens)
        assert 0 <= cached < len(tokens) and seq.length == cached
        self.verify(seq)
        del seq.tokens[cached:]  # compute() appends them again
        self.compute([seq], [tokens[cached:]])
        self.verify(seq)
        return seq, cached

    def verify(self, seq):
        """The K/V read through the block table equal those of the sequence's own prefixes."""
        n = seq.length
        table = self.cache.block_table([seq])[0].long().cpu()
        assert self.cache.seq_lens([seq]).tolist() == [n]
        pos = torch.arange(n)
        k = self.pool.k.cpu()[:, table[pos // self.P], pos % self.P]  # [L, n, H, D]
        v = self.pool.v.cpu()[:, table[pos // self.P], pos % self.P]
        want = torch.tensor([kv_value(seq.tokens[:i + 1]) for i in range(n)], dtype=torch.float64)
        for layer in range(self.pool.num_layers):
            assert torch.equal(k[layer], (want + layer).view(n, 1, 1).expand(n, 2, 3)), f"seq {seq.id} K, layer {layer}"
            assert torch.equal(v[layer], (-want - layer).view(n, 1, 1).expand(n, 2, 3)), f"seq {seq.id} V, layer {layer}"


PAGE_SIZES = [1, 4, 16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.mark.parametrize("P", PAGE_SIZES)
def test_prefix_reuse_and_copy_on_write(P):
    sim = Sim(P, 64)
    t = list(range(100, 140))
    a, cached = sim.start(t)
    assert cached == 0
    assert sim.cache.finish(a) == 0
    sim.cache.check()
    b, cached = sim.start(t[:23] + [7, 8, 9])  # shares 23 tokens: inside a page unless P == 1
    assert cached == 23
    c, cached = sim.start(t + [5])  # the whole of a, though b's branch split its nodes
    assert cached == 40
    assert sim.cache.stats["copied_pages"] == sum(1 for m in (23, 40) if m % P)  # a match inside a page
    sim.cache.check()
    for s in (b, c):
        sim.compute([s], [[11, 12, 13]])
        sim.verify(s)
    sim.cache.finish(b)
    sim.cache.finish(c)
    d, cached = sim.start(t[:23] + [7, 8, 9, 11, 12, 13])  # through b's branch (its CoW page)
    assert cached == 28
    sim.cache.release(d)
    sim.cache.check()
    sim.cache.flush()
    assert sim.pool.num_free == 64
    stats = sim.cache.stats
    assert stats["cached_tokens"] == 23 + 40 + 28 and stats["computed_tokens"] == 40 + 3 + 1 + 6 + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", PAGE_SIZES)
def test_fork(P, device):
    sim = Sim(P, 64, device=device)
    parent, _ = sim.start(list(range(1, 20)))  # 19 tokens with K/V
    kids = [sim.cache.fork(parent, m) for m in (7, 8, 16, 19, 0)] + [sim.cache.fork(parent)]
    sim.cache.check()
    for kid, m in zip(kids, (7, 8, 16, 19, 0, 19)):
        assert kid.length == kid.cached_len == m and kid.tokens == parent.tokens[:m]
        sim.verify(kid)
    # everybody writes on: nobody's pages are shared with a writer
    for i, s in enumerate([parent] + kids):
        sim.compute([s], [[50 + i, 60 + i, 70 + i]])
        sim.cache.check()
    for s in [parent] + kids:
        sim.verify(s)
    grandkid = sim.cache.fork(kids[0], 9)
    sim.verify(grandkid)
    for s in [parent, grandkid] + kids:
        sim.cache.finish(s)
        sim.cache.check()
    sim.cache.flush()
    assert sim.pool.num_free == 64


@pytest.mark.parametrize("P", PAGE_SIZES)
def test_truncate(P):
    sim = Sim(P, 64)
    t = list(range(200, 230))
    a, _ = sim.start(t)
    sim.cache.finish(a)
    s, cached = sim.start(t + [1, 2, 3, 4, 5])
    assert cached == 30
    sim.cache.truncate(s, 33)  # own pages only
    assert s.tokens == (t + [1, 2, 3]) and s.length == 33
    sim.verify(s)
    sim.cache.truncate(s, 13)  # into the shared prefix, inside a page: the page is copied
    sim.cache.check()
    sim.verify(s)
    sim.compute([s], [[9, 9, 9, 9, 9, 9]])  # overwrites positions 13..18 of its copy only
    sim.verify(s)
    b, cached = sim.start(t + [7])  # the tree's K/V are untouched
    assert cached == 30
    sim.cache.truncate(s, 0)
    sim.cache.truncate(b, b.length)
    sim.compute([s, b], [[3], [4, 4]])
    for x in (s, b):
        sim.verify(x)
        sim.cache.finish(x)
    sim.cache.check()
    sim.cache.flush()
    assert sim.pool.num_free == 64


@functools.cache
def random_run(P, radix_impl):
    """Random start / compute / fork / truncate / finish / release under memory pressure (some
    CacheFull): after every step the pages are accounted for and every sequence reads its own K/V.
    Returns the trace of block tables and stats (one entry per step)."""
    rng = random.Random(P)
    sim = Sim(P, 12 if P == 4 else 40, radix_impl(P))
    corpus, running, fulls, trace = [[1, 2, 3, 4, 5, 6, 7]], [], 0, []
    for step in range(250):
        op = rng.choice(["start", "start", "compute", "compute", "fork", "truncate", "finish", "release"])
        try:
            if op == "start" or not running:
                base = rng.choice(corpus)
                tokens = base[:rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(1, 6))]
                seq, cached = sim.cache.start(tokens)
                running.append(seq)
                del seq.tokens[cached:]
                sim.compute([seq], [tokens[cached:]])
            elif op == "compute":
                batch = rng.sample(running, rng.randint(1, len(running)))
                sim.compute(batch, [[rng.randint(0, 3) for _ in range(rng.randint(0, 5))] for _ in batch])
            elif op == "fork":
                s = rng.choice(running)
                running.append(sim.cache.fork(s, rng.randint(0, s.length)))
            elif op == "truncate":
                s = rng.choice(running)
                sim.cache.truncate(s, rng.randint(0, s.length))
            else:
                s = running.pop(rng.randrange(len(running)))
                if op == "finish":
                    corpus.append(list(s.tokens))
                    sim.cache.finish(s)
                else:
                    sim.cache.release(s)
        except CacheFull as e:
            fulls += 1
            assert "KV cache full" in str(e)
            for s in [x for x in running if x.length < len(x.tokens)]:  # a failed compute appended tokens
                del s.tokens[s.length:]
            if len(running) > 3:
                sim.cache.release(running.pop(0))
        sim.cache.check()
        for s in running:
            sim.verify(s)
        trace.append(([(s.id, s.length, tuple(s.pages)) for s in running], sim.cache.stats))
    assert fulls > 0 and sim.cache.stats["evicted_slots"] > 0
    assert (sim.cache.stats["copied_pages"] > 0) == (P > 1)  # copy-on-write only splits pages
    for s in running:
        sim.cache.finish(s)
    sim.cache.check()
    sim.cache.flush()
    assert sim.pool.num_free == sim.pool.num_pages and sim.cache.radix.cached_tokens == 0
    return trace


@pytest.mark.parametrize("P", [1, 4])
@pytest.mark.parametrize("radix_impl", [RadixCache, RadixModel])
def test_random_operations_no_leak(P, radix_impl):
    assert len(random_run(P, radix_impl)) == 250


@pytest.mark.parametrize("P", [1, 4])
def test_same_pages_with_the_model(P):
    """The C++ tree and the brute-force model lead to the same block tables at every step."""
    assert random_run(P, RadixCache) == random_run(P, RadixModel)


def test_cache_full_and_eviction():
    sim = Sim(4, 6)
    a, _ = sim.start(list(range(8)))  # 2 pages
    b, _ = sim.start(list(range(10, 18)))  # 2 pages
    c, _ = sim.start(list(range(20, 28)))  # 2 pages: the pool is full
    d, _ = sim.cache.start(list(range(30, 34)))
    assert sim.cache.available_pages == 0
    with pytest.raises(CacheFull, match=r"1 pages of 4 tokens needed, 0 free, 0 evictable .* 4 running sequences"):
        sim.cache.reserve([d], 4)
    sim.cache.check()
    sim.cache.release(d)
    with pytest.raises(CacheFull):
        sim.compute([a], [[1] * 5])  # nothing changed: a still has 8 positions
    assert a.length == 8
    del a.tokens[8:]
    for s in (a, b, c):
        sim.cache.finish(s)  # the tree holds all 6 pages now
    sim.cache.check()
    assert sim.cache.available_pages == 6 and sim.pool.num_free == 0
    e, _ = sim.start(list(range(8)) + [99])  # a's prefix is the most recent now; one page needed:
    assert sim.cache.stats["evicted_slots"] == 8  # evicts b's leaf (least recently used), 2 pages
    sim.cache.release(e)
    d, _ = sim.start(list(range(40, 48)))  # the 2 pages are free again: no eviction
    assert sim.cache.stats["evicted_slots"] == 8
    sim.cache.release(d)
    assert sim.cache.radix.match_prefix(list(range(8))).length == 8
    assert sim.cache.radix.match_prefix(list(range(10, 18))).length == 0
    assert sim.cache.radix.match_prefix(list(range(20, 28))).length == 8
    sim.cache.check()


def test_copy_on_write_calls_the_op(monkeypatch):
    calls = []
    real = ptcore.ops.copy_pages

    def spy(k, v, src, dst):
        calls.append((src.tolist(), dst.tolist()))
        return real(k, v, src, dst)
    monkeypatch.setattr(ptcore.ops, "copy_pages", spy)
    sim = Sim(4, 8)
    a, _ = sim.start(list(range(10)))
    sim.cache.finish(a)
    b, cached = sim.start(list(range(6)) + [1, 1])
    assert cached == 6 and calls == [([1], [b.pages[1]])]
    sim.cache.release(b)


def test_views():
    sim = Sim(4, 16)
    a, _ = sim.start(list(range(9)))
    b, _ = sim.start([5])
    bt = sim.cache.block_table([a, b])
    assert bt.dtype == torch.int32 and bt.shape == (2, 3)
    assert bt[0].tolist() == a.pages and bt[1].tolist() == b.pages + [0, 0]
    lens = sim.cache.seq_lens([a, b])
    assert lens.dtype == torch.int32 and lens.tolist() == [9, 1]
    assert sim.cache.block_table([]).shape == (0, 1)


def test_bad_input():
    sim = Sim(4, 8)
    cache = sim.cache
    a, _ = sim.start([1, 2, 3])
    with pytest.raises(ValueError, match="tokens is empty"):
        cache.start([])
    with pytest.raises(ValueError, match=r"tokens\[1\] = -5 is negative"):
        cache.start([1, -5])
    with pytest.raises(ValueError, match="num_new must be >= 0"):
        cache.reserve([a], -1)
    with pytest.raises(ValueError, match="2 counts"):
        cache.reserve([a], [1, 1])
    with pytest.raises(ValueError, match="appears twice"):
        cache.reserve([a, a], 1)
    with pytest.raises(ValueError, match="exceeds"):
        cache.truncate(a, 4)
    with pytest.raises(ValueError, match="exceeds"):
        cache.fork(a, 4)
    cache.reserve([a], 2)  # tokens not appended: finish cannot know them
    with pytest.raises(ValueError, match="append the token ids"):
        cache.finish(a)
    cache.release(a)
    t, _ = cache.start(torch.tensor([4, 5, 6]))  # tensors and arrays become plain ints
    assert t.tokens == [4, 5, 6] and all(type(x) is int for x in t.tokens)
    cache.release(t)
    with pytest.raises(ValueError, match="already finished"):
        cache.finish(a)
    other = Sim(4, 8)
    b, _ = other.start([1])
    with pytest.raises(ValueError, match="not a running sequence of this cache"):
        cache.reserve([b], 1)
    with pytest.raises(RuntimeError, match="still running"):
        other.cache.flush()
    with pytest.raises(ValueError, match="page_size"):
        PagedCache(sim.pool, RadixCache(2))
    with pytest.raises(ValueError, match="num_pages"):
        KVPool(1, 0, 4, 1, 8)
    with pytest.raises(ValueError, match="page_size"):
        KVPool(1, 4, 0, 1, 8)
    with pytest.raises(ValueError, match="dtype"):
        KVPool(1, 4, 4, 1, 8, dtype=torch.int32)
    pool = KVPool(1, 4, 4, 1, 8)
    pages = pool.alloc(2)
    pool.free(pages)
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages[:1])
    with pytest.raises(ValueError, match="not in"):
        pool.free([9])
    with pytest.raises(CacheFull, match="5 pages requested, 4 of 4 free"):
        pool.alloc(5)
    sim.cache.check()


def test_pool_free_rejects_non_integer_page_ids():
    """free(1.7) freed page 1 and free(True) page 1: non-integer ids are a TypeError."""
    import numpy as np
    pool = KVPool(1, 4, 2, 1, 4)
    pages = pool.alloc(3)
    for bad in (1.7, True, "1"):
        with pytest.raises(TypeError, match="pages"):
            pool.free([bad])
    assert pool.num_free == 1
    pool.free([np.int64(pages[1]), torch.tensor(pages[2])])
    pool.free([pages[0]])
    assert pool.num_free == 4
