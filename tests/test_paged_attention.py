"""Paged attention (decode, extend, write_kv, copy_pages) on every backend here against a float64
oracle written position by position from the block table (tolerances: docs/kernels.md
section 4), plus the argument checks of the Python and C++ layers."""
import math

import pytest
import torch

import ptcore
from ptcore.ops import (BackendUnavailable, copy_pages, paged_attention_decode, paged_attention_extend,
                        write_kv)
from ptcore.ops import dispatch, paged_backends
from tests.conftest import cpu_backends
from tests.reference import assert_rule, rel_err, rule_bound

BACKENDS = cpu_backends()
NOT_TRITON = [b for b in BACKENDS if getattr(b, "values", (b,))[0] != "triton"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The oracle runs thousands of tiny ops: torch's thread pool only adds spin time to them (40x
    CPU time measured on the shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def oracle(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, *, scale=None, softcap=None,
           tree_mask=None, dtype=torch.float64):
    """Token by token: the visible positions listed explicitly, K/V read slot by slot. ``dtype``:
    float64 for the oracle, bf16/fp16 for the naive low-precision baseline."""
    S, Hkv, D = k_cache.shape[1:]
    Hq = q.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(q.shape, dtype=dtype)
    cu = cu_seqlens_q.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        n = cu[b + 1] - cu[b]
        prefix = L - n
        slots = [(int(block_table[b, p // S]), p % S) for p in range(L)]
        K = torch.stack([k_cache[pg, o] for pg, o in slots]).to(dtype) if L else None  # [L, Hkv, D]
        V = torch.stack([v_cache[pg, o] for pg, o in slots]).to(dtype) if L else None
        for j in range(n):
            t = cu[b] + j
            seen = [p for p in range(L) if p < prefix or
                    (bool(tree_mask[t, p - prefix]) if tree_mask is not None else p - prefix <= j)]
            if not seen:
                continue
            kv_head = torch.arange(Hq) // (Hq // Hkv)  # query head h reads KV head h // G
            Ks, Vs = K[seen][:, kv_head], V[seen][:, kv_head]  # [len(seen), Hq, D]
            s = torch.einsum("hd,lhd->hl", q[t].to(dtype), Ks) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[t] = torch.einsum("hl,lhd->hd", torch.softmax(s, 1), Vs)
    return out


def make_case(page_size, Hkv, G, D, lens, q_lens, dtype=torch.float32, tree=False, spare_pages=7):
    """Shuffled, non-contiguous pages; unused block-table entries are -1 and every slot no sequence
    owns is NaN, so reading a wrong page or a position past seq_lens poisons the output."""
    B = len(lens)
    need = [(L + page_size - 1) // page_size for L in lens]
    P = sum(need) + spare_pages
    k = torch.full((P, page_size, Hkv, D), float("nan"))
    v = torch.full((P, page_size, Hkv, D), float("nan"))
    perm = torch.randperm(P).tolist()
    table = torch.full((B, max(need + [1]) + 2), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        for i in range(need[b]):
            page = perm.pop()
            table[b, i] = page
            used = min(page_size, L - i * page_size)
            k[page, :used] = torch.randn(used, Hkv, D)
            v[page, :used] = torch.randn(used, Hkv, D)
    q = torch.randn(sum(q_lens), Hkv * G, D)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    mask = None
    if tree:
        mask = torch.rand(sum(q_lens), max(q_lens + [1]) + 1) < 0.5
        for b, n in enumerate(q_lens):  # a tree: every token sees itself
            mask[cu[b] + torch.arange(n), torch.arange(n)] = True
    return dict(q=q.to(dtype), k_cache=k.to(dtype), v_cache=v.to(dtype), block_table=table,
                seq_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=cu, tree_mask=mask)


def extend(backend, c, **opts):
    with ptcore.use_backend(backend):
        return paged_attention_extend(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"],
                                      c["cu_seqlens_q"], tree_mask=c["tree_mask"], **opts)


def decode(backend, c, **opts):
    with ptcore.use_backend(backend):
        return paged_attention_decode(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"], **opts)


def reference(c, dtype=torch.float64, **opts):
    return oracle(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"], c["cu_seqlens_q"],
                  tree_mask=c["tree_mask"], dtype=dtype, **opts)


def check(out, c, what="", **opts):
    """``out`` (fp32) against the float64 oracle under the tolerance rule (tests/reference.py), the
    naive baseline being the same oracle run in the inputs' dtype; returns (ref, naive)."""
    ref, naive = reference(c, **opts), reference(c, dtype=c["q"].dtype, **opts)
    assert_rule(out, ref, naive, what)
    return ref, naive


def _name(b):
    return getattr(b, "values", (b,))[0]


# lengths: 1, page boundaries (S, 2S), one past a boundary, and longer
def decode_lens(S, big):
    return [1, S, 2 * S, S + 1, 37] + ([300] if big else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_matches_float64(backend, page_size):
    big = _name(backend) != "triton"
    for G, D in [(1, 64), (2, 80), (4, 16 if not big else 64)]:
        c = make_case(page_size, 2, G, D, decode_lens(page_size, big), [1] * (6 if big else 5))
        out = decode(backend, c)
        assert out.shape == c["q"].shape and out.dtype == torch.float32
        check(out, c, f"G={G} D={D}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_matches_float64(backend, page_size):
    """Ragged new-token counts, one sequence with nothing new (0), one with an empty prefix."""
    S = page_size
    lens, q_lens = [5, 2 * S, 40, 3, 17], [2, 2 * S, 19, 0, 17]
    for G, D in [(1, 64), (2, 80), (4, 32)]:
        c = make_case(S, 2, G, D, lens, q_lens)
        out = extend(backend, c)
        check(out, c, f"G={G} D={D}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_scale_and_tree_mask(backend):
    c = make_case(4, 1, 2, 24, [9, 6, 12], [4, 6, 5], tree=True)
    c["tree_mask"][0, :] = False  # an empty-prefix row that sees nothing would be zeros; this one has a prefix
    opts = dict(softcap=2.5, scale=0.3)
    check(extend(backend, c, **opts), c, "extend", **opts)
    d = make_case(4, 2, 2, 24, [9, 1, 12], [1, 1, 1])
    check(decode(backend, d, **opts), d, "decode", **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_that_sees_nothing_is_zero(backend):
    c = make_case(4, 1, 1, 16, [3], [3], tree=True)  # empty prefix
    c["tree_mask"][1, :] = False
    out = extend(backend, c)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    check(out, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_equals_extend_of_one_token(backend):
    c = make_case(16, 2, 2, 64, [1, 16, 33], [1, 1, 1])
    # Two fp32 computations of the same thing: each within the rule of the float64 oracle, and from
    # each other by at most half the rule's bound (the run-to-run convention of tests/reference.py).
    dec, ext = decode(backend, c), extend(backend, c)
    ref, naive = check(dec, c, "decode")
    assert_rule(ext, ref, naive, "extend")
    assert rel_err(dec, ext) <= rule_bound(naive, ref) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q as a slice of a packed qkv projection, a column slice of a wider block table, one layer of a
    pool: read through their strides, as the engine passes them."""
    c = make_case(4, 2, 2, 16, [9, 6, 12], [3, 6, 1])
    T, Hq, D = c["q"].shape
    qkv = torch.randn(T, Hq + 4, D)
    qkv[:, :Hq] = c["q"]
    wide = torch.full((3, c["block_table"].shape[1] + 3), -1, dtype=torch.int32)
    wide[:, 1:1 + c["block_table"].shape[1]] = c["block_table"]
    pool = torch.stack([c["k_cache"], c["v_cache"]])
    strided = {**c, "q": qkv[:, :Hq], "block_table": wide[:, 1:], "k_cache": pool[0], "v_cache": pool[1]}
    assert not strided["q"].is_contiguous() and not strided["block_table"].is_contiguous()
    check(extend(backend, strided), c)


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_float64_inputs(backend):
    c = make_case(16, 2, 2, 80, [7, 33], [3, 33], dtype=torch.float64)
    out = extend(backend, c)
    assert out.dtype == torch.float64 and rel_err(out, reference(c)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_criterion(backend, dtype):
    """Error vs float64 <= the naive PyTorch computation in the same dtype + 1e-2 (relative)."""
    if _name(backend) == "triton" and dtype == torch.bfloat16:
        pytest.skip("triton: bf16 tl.dot is broken in the CPU interpreter (docs/kernels.md section 5)")
    c = make_case(16, 2, 4, 80, [40, 17, 1], [9, 17, 1], dtype=dtype)
    out = extend(backend, c)
    assert out.dtype == dtype
    ref = reference(c)
    assert rel_err(out, ref) <= rel_err(reference(c, dtype=dtype), ref) + 1e-2
    d = make_case(16, 2, 2, 64, [40, 17, 1], [1, 1, 1], dtype=dtype)
    out = decode(backend, d)
    ref = reference(d)
    assert rel_err(out, ref) <= rel_err(reference(d, dtype=dtype), ref) + 1e-2


def test_cpu_split_decode_long_context_and_batch_invariance():
    """Contexts past the C++ kernel's split length (256 keys) merge their partials exactly, and a
    sequence's output does not depend on the batch it shares."""
    if dispatch_why("cpu"):
        pytest.skip(f"backend cpu: {dispatch_why('cpu')}")
    c = make_case(16, 2, 4, 64, [1000, 257, 256, 3], [1, 1, 1, 1])
    out = decode("cpu", c)
    check(out, c)
    alone = decode("cpu", {**c, "q": c["q"][:1], "block_table": c["block_table"][:1], "seq_lens": c["seq_lens"][:1]})
    assert torch.equal(alone, out[:1])
    assert torch.equal(decode("cpu", c), out)  # repeatable


@pytest.mark.parametrize("dtype,page_size,G", [(torch.float32, 16, 2), (torch.float64, 4, 4),
                                               (torch.bfloat16, 16, 1), (torch.float32, 1, 4)])
def test_cpu_decode_forks_sharing_prefix_pages(dtype, page_size, G):
    """Forks whose block tables map the prompt to the same pages (best-of-n, search trees): the C++
    kernel computes each shared 256-key chunk once for the whole group. Every row still matches
    the oracle: forks sharing two chunks or only the first, a group larger than one work item
    (16 // G + 4 members), one sequence with its own copy of the prompt, one exactly at the split
    length, softcap on."""
    if dispatch_why("cpu"):
        pytest.skip(f"backend cpu: {dispatch_why('cpu')}")
    S, members = page_size, 32 // G + 4
    lens = [700] + [513 + 7 * i for i in range(members)] + [300, 257, 256, 600]
    c = make_case(S, 2, G, 16, lens, [1] * len(lens), dtype=dtype)
    table = c["block_table"]
    for b in range(1, members + 1):
        table[b, :512 // S] = table[0, :512 // S]  # two whole chunks of the root's pages
    table[members + 1, :256 // S] = table[0, :256 // S]  # one chunk, then its own pages
    table[members + 2, :256 // S] = table[0, :256 // S]
    table[members + 3, :256 // S] = table[0, :256 // S]  # 256 keys: not split, computed alone
    opts = dict(softcap=3.0)
    out = decode("cpu", c, **opts)
    ref = reference(c, **opts)
    if dtype == torch.bfloat16:
        assert rel_err(out, ref) <= rel_err(reference(c, dtype=dtype, **opts), ref) + 1e-2
    elif dtype == torch.float64:
        assert rel_err(out, ref) < 1e-12
    else:
        assert_rule(out, ref, reference(c, dtype=dtype, **opts), "fp32 shared-prefix decode")
    last = len(lens) - 1  # shares nothing: the same bits as when alone
    alone = {**c, "q": c["q"][last:], "block_table": table[last:], "seq_lens": c["seq_lens"][last:]}
    assert torch.equal(decode("cpu", alone, **opts), out[last:])
    assert torch.equal(decode("cpu", c, **opts), out)  # repeatable


def dispatch_why(backend):
    from ptcore.ops import dispatch
    return dispatch.cannot_run(backend, torch.device("cpu"), torch.float32)


def _pick(q, page_size, tree_mask):
    return dispatch.resolve(q.device, q.dtype, op="paged_attention_decode", page_size=page_size,
                            tree_mask=tree_mask is not None)


def test_default_backend_on_cpu_and_forcing():
    c = make_case(16, 2, 2, 16, [5], [1])
    expected = "cpu" if paged_backends._cpu_kernel() is not None else "torch"
    assert _pick(c["q"], 16, None) == expected
    with ptcore.use_backend("torch"):
        assert _pick(c["q"], 16, None) == "torch"
    with ptcore.use_backend("cuda"), pytest.raises(BackendUnavailable, match="flash-attn"):
        decode("cuda", c)


def test_flash_attn_backend():
    why = dispatch.cannot_run("flash_attn", torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                              torch.float16, op="paged_attention_decode", page_size=256, tree_mask=False)
    if why is not None:
        pytest.skip(f"flash-attn backend: {why}")
    c = make_case(256, 2, 2, 64, [300, 5], [1, 1], dtype=torch.float16)
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    c["k_cache"], c["v_cache"] = c["k_cache"].nan_to_num(), c["v_cache"].nan_to_num()
    out = decode("flash_attn", c).cpu()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    ref = reference(cpu)
    assert rel_err(out, ref) <= rel_err(reference(cpu, dtype=torch.float16), ref) + 1e-2


# ---- write_kv and copy_pages ----

def test_write_kv_round_trip():
    P, S, Hkv, D = 6, 4, 2, 8
    for make in (lambda: torch.zeros(P, S, Hkv, D), lambda: torch.zeros(S, P, Hkv, D).transpose(0, 1)):
        kc, vc = make(), make()  # contiguous, and a strided layout (the general path)
        slots = torch.randperm(P * S)[:10]
        k, v = torch.randn(10, Hkv, D), torch.randn(10, Hkv, D)
        write_kv(kc, vc, slots, k, v)
        torch.testing.assert_close(kc[slots // S, slots % S], k, rtol=0, atol=0)
        torch.testing.assert_close(vc[slots // S, slots % S], v, rtol=0, atol=0)
        others = torch.ones(P * S, dtype=torch.bool)
        others[slots] = False
        rest = others.nonzero()[:, 0]
        assert kc[rest // S, rest % S].abs().sum() == 0 and vc[rest // S, rest % S].abs().sum() == 0


def test_write_then_attend():
    """The engine's order: write the new token's K/V, then decode over it."""
    S, Hkv, D = 4, 1, 16
    kc, vc = torch.zeros(5, S, Hkv, D), torch.zeros(5, S, Hkv, D)
    table = torch.tensor([[3, 0]], dtype=torch.int32)
    pos = torch.arange(6)
    slots = table[0, pos // S].long() * S + pos % S
    k, v = torch.randn(6, Hkv, D), torch.randn(6, Hkv, D)
    write_kv(kc, vc, slots, k, v)
    q = torch.randn(1, 2, D)
    out = paged_attention_decode(q, kc, vc, table, torch.tensor([6], dtype=torch.int32))
    def sdpa(dtype):  # float64: the oracle; float32: the naive baseline of the rule
        q_, k_, v_ = (a.to(dtype) for a in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(
            q_[:, :, None], k_.transpose(0, 1)[None].expand(1, 2, 6, D), v_.transpose(0, 1)[None].expand(1, 2, 6, D))[:, :, 0]
    assert_rule(out, sdpa(torch.float64), sdpa(torch.float32), "decode after write_kv")


@pytest.mark.parametrize("case", ["disjoint", "rotation", "chain", "self", "swap"])
def test_copy_pages_any_overlap(case):
    L, P, S, Hkv, D = 3, 8, 4, 2, 5
    k, v = torch.randn(L, P, S, Hkv, D), torch.randn(L, P, S, Hkv, D)
    src, dst = {"disjoint": ([0, 1], [5, 6]), "rotation": ([1, 2, 3], [2, 3, 1]), "chain": ([0, 1, 2], [1, 2, 3]),
                "self": ([4], [4]), "swap": ([6, 2], [2, 6])}[case]
    ek, ev = k.clone(), v.clone()
    ek[:, dst], ev[:, dst] = k[:, src].clone(), v[:, src].clone()  # what a snapshot copy gives
    copy_pages(k, v, torch.tensor(src), torch.tensor(dst, dtype=torch.int32))
    assert torch.equal(k, ek) and torch.equal(v, ev)


def test_copy_pages_bad_input():
    k, v = torch.randn(2, 4, 2, 1, 3), torch.randn(2, 4, 2, 1, 3)
    with pytest.raises(ValueError, match="'dst'"):
        copy_pages(k, v, torch.tensor([0, 1]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="'src'"):
        copy_pages(k, v, torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="'dst'"):
        copy_pages(k, v, torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="'src'"):
        copy_pages(k, v, torch.tensor([0, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="'v_pool'"):
        copy_pages(k, v[:, :3], torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(TypeError, match="'src'"):
        copy_pages(k, v, torch.tensor([0.0]), torch.tensor([1]))


def test_write_kv_bad_input():
    kc, vc = torch.zeros(2, 4, 1, 3), torch.zeros(2, 4, 1, 3)
    k = torch.randn(2, 1, 3)
    with pytest.raises(ValueError, match="'slots'"):
        write_kv(kc, vc, torch.tensor([0, 8]), k, k)
    with pytest.raises(ValueError, match="'slots'"):
        write_kv(kc, vc, torch.tensor([-1, 0]), k, k)
    with pytest.raises(ValueError, match="'v'"):
        write_kv(kc, vc, torch.tensor([0, 1]), k, k[:1])
    with pytest.raises(TypeError, match="'k'"):
        write_kv(kc, vc, torch.tensor([0, 1]), k.double(), k)
    with pytest.raises(TypeError, match="'slots'"):
        write_kv(kc, vc, torch.tensor([0, 1], dtype=torch.int32), k, k)
    with pytest.raises(ValueError, match="'slots'"):
        write_kv(kc, vc, torch.tensor([0, 1], device="meta"), k, k)


# ---- bad input to the attention ops ----

def _bad_cases():
    """(name, change to a valid extend case, error type, argument the message must name)."""
    def edit(**kw):
        return lambda c: c.update(kw)

    def with_(key, fn):
        return lambda c: c.update({key: fn(c[key])})

    def page_out_of_range(c):
        c["block_table"] = c["block_table"].clone()
        c["block_table"][1, 0] = c["k_cache"].shape[0]

    def negative_page(c):
        c["block_table"] = c["block_table"].clone()
        c["block_table"][0, 0] = -1

    return [
        ("seq_lens beyond capacity", with_("seq_lens", lambda s: s + torch.tensor([0, 1000], dtype=torch.int32)), ValueError, "seq_lens"),
        ("seq_lens below q_len", with_("seq_lens", lambda s: s - torch.tensor([0, 8], dtype=torch.int32)), ValueError, "seq_lens"),
        ("page id out of range", page_out_of_range, ValueError, "block_table"),
        ("negative page id", negative_page, ValueError, "block_table"),
        ("cu_seqlens_q not ending at T", with_("cu_seqlens_q", lambda cu: cu - torch.tensor([0, 0, 1], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
        ("cu_seqlens_q decreasing", edit(cu_seqlens_q=torch.tensor([0, 9, 5], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
        ("cu_seqlens_q wrong length", with_("cu_seqlens_q", lambda cu: cu[:2]), ValueError, "cu_seqlens_q"),
        ("Hq % Hkv != 0", with_("q", lambda q: q[:, :3]), ValueError, "heads"),
        ("head dim mismatch", with_("q", lambda q: q[..., :7]), ValueError, "head_dim"),
        ("q 2-D", with_("q", lambda q: q[:, 0]), ValueError, "'q'"),
        ("k/v shapes differ", with_("v_cache", lambda v: v[:-1]), ValueError, "v_cache"),
        ("block_table rows", with_("block_table", lambda t: t[:1]), ValueError, "block_table"),
        ("q dtype vs cache", with_("q", lambda q: q.double()), TypeError, "k_cache"),
        ("v dtype", with_("v_cache", lambda v: v.double()), TypeError, "v_cache"),
        ("int64 block_table", with_("block_table", lambda t: t.long()), TypeError, "block_table"),
        ("int64 seq_lens", with_("seq_lens", lambda t: t.long()), TypeError, "seq_lens"),
        ("float tree_mask", edit(tree_mask=torch.ones(9, 9)), TypeError, "tree_mask"),
        ("tree_mask rows", edit(tree_mask=torch.ones(8, 9, dtype=torch.bool)), ValueError, "tree_mask"),
        ("tree_mask columns", edit(tree_mask=torch.ones(9, 2, dtype=torch.bool)), ValueError, "tree_mask"),
        ("device", with_("seq_lens", lambda s: s.to("meta")), ValueError, "seq_lens"),
        ("softcap <= 0", None, ValueError, "softcap"),
        ("scale not finite", None, ValueError, "scale"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,err,arg", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_extend_bad_input(backend, name, change, err, arg):
    c = make_case(4, 2, 2, 8, [10, 12], [4, 5])
    opts = {}
    if change is None:
        opts = {"softcap": 0.0} if arg == "softcap" else {"scale": float("inf")}
    else:
        change(c)
    with pytest.raises(err, match=arg):
        extend(backend, c, **opts)


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_decode_bad_input(backend):
    c = make_case(4, 2, 2, 8, [10, 12], [1, 1])
    with pytest.raises(ValueError, match="seq_lens"):
        decode(backend, {**c, "seq_lens": torch.tensor([0, 12], dtype=torch.int32)})  # no new token
    with pytest.raises(ValueError, match="seq_lens"):
        decode(backend, {**c, "seq_lens": torch.tensor([10, 100], dtype=torch.int32)})
    with pytest.raises(ValueError, match="'q' has 1 sequences"):
        decode(backend, {**c, "q": c["q"][:1]})
    with pytest.raises(ValueError, match="heads"):
        decode(backend, {**c, "q": c["q"][:, :3]})


def test_cpp_layer_checks_again():
    """ptcore._C.paged_attention raises ValueError naming the argument without the Python checks."""
    if paged_backends._cpu_kernel() is None:
        pytest.skip("backend cpu: ptcore._C has no paged_attention")
    c = make_case(4, 2, 2, 8, [10, 12], [4, 5])
    q, k, v, bt, sl, cu = (c[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q"))
    out = torch.empty_like(q)

    def call(dtype="float32", q_heads=4, kv_heads=2, seq_lens=sl, table=bt, cu=cu, tokens=9, mask_cols=0, mask=0):
        paged_backends._cpu_kernel()(
            dtype, q.data_ptr(), tokens, q_heads, 8, q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(),
            k.shape[0], 4, kv_heads, *k.stride()[:3], *v.stride()[:3], table.data_ptr(), 2, table.shape[1],
            table.stride(0), seq_lens.data_ptr(), 0 if cu is None else cu.data_ptr(), mask, mask_cols, 0.5, 0.0,
            out.data_ptr(), q.numel(), k.numel(), v.numel(), table.numel(), seq_lens.numel(),
            0 if cu is None else cu.numel(), 27 if mask else 0, out.numel())

    call()  # valid
    bad_table = bt.clone()
    bad_table[1, 1] = 999
    tm = torch.ones(9, 2, dtype=torch.bool)
    for kwargs, arg in [(dict(dtype="int8"), "dtype"), (dict(q_heads=3), "heads"), (dict(kv_heads=0), "heads"),
                        (dict(seq_lens=torch.tensor([10, 999], dtype=torch.int32)), "seq_lens"),
                        (dict(seq_lens=torch.tensor([3, 12], dtype=torch.int32)), "seq_lens"),
                        (dict(table=bad_table), "block_table"), (dict(tokens=8), "cu_seqlens_q"),
                        (dict(cu=torch.tensor([0, 5, 4], dtype=torch.int32)), "cu_seqlens_q"),
                        (dict(cu=None), "sequences"), (dict(mask=tm.data_ptr(), mask_cols=2), "tree_mask")]:
        with pytest.raises(ValueError, match=arg):
            call(**kwargs)


def _raw_call(c, out, **over):
    """ptcore._C.paged_attention on case ``c`` with any argument overridden (keyword names of the
    binding): the sizes, strides and numels the Python side would pass."""
    q, k, v, bt, sl, cu, tm = (c[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q",
                                              "tree_mask"))
    args = dict(dtype="float32", q=q.data_ptr(), tokens=q.shape[0], q_heads=q.shape[1], head_dim=q.shape[2],
                q_stride_t=q.stride(0), q_stride_h=q.stride(1), k=k.data_ptr(), v=v.data_ptr(), pages=k.shape[0],
                page_size=k.shape[1], kv_heads=k.shape[2], k_stride_page=k.stride(0), k_stride_slot=k.stride(1),
                k_stride_head=k.stride(2), v_stride_page=v.stride(0), v_stride_slot=v.stride(1),
                v_stride_head=v.stride(2), block_table=bt.data_ptr(), batch=bt.shape[0], max_pages=bt.shape[1],
                bt_stride=bt.stride(0), seq_lens=sl.data_ptr(), cu_seqlens_q=cu.data_ptr(),
                tree_mask=0 if tm is None else tm.data_ptr(), mask_cols=0 if tm is None else tm.shape[1],
                scale=0.5, softcap=0.0, out=out.data_ptr(), q_numel=q.numel(), k_numel=k.numel(),
                v_numel=v.numel(), block_table_numel=bt.numel(), seq_lens_numel=sl.numel(),
                cu_seqlens_q_numel=cu.numel(), tree_mask_numel=0 if tm is None else tm.numel(),
                out_numel=out.numel())
    args.update(over)
    paged_backends._cpu_kernel()(**args)


def test_cpp_checks_every_extent():
    """Wrong but pointer-free sizes / strides (a huge or negative stride, more pages than the cache
    holds with a block-table id that points there, a lying head_dim, short buffers) raise
    ValueError naming the argument instead of reading out of bounds (they segfaulted / aborted)."""
    if paged_backends._cpu_kernel() is None:
        pytest.skip("backend cpu: ptcore._C has no paged_attention")
    c = make_case(4, 2, 2, 8, [10, 12], [4, 5], tree=True)
    out = torch.empty_like(c["q"])
    _raw_call(c, out)  # valid
    P = c["k_cache"].shape[0]
    far = c["block_table"].clone()
    far[1, 0] = 10 ** 6  # a page id "inside" a cache claimed to have 10**6 + 1 pages
    cases = [
        (dict(k_stride_page=1 << 40), "k_cache"), (dict(k_stride_page=-64), "stride"),
        (dict(v_stride_slot=1 << 50), "v_cache"), (dict(k_stride_head=-1), "stride"),
        (dict(pages=10 ** 6 + 1, block_table=far.data_ptr()), "k_cache"),
        (dict(pages=P + 1), "k_cache"),
        (dict(bt_stride=1 << 40), "block_table"), (dict(bt_stride=-3), "stride"),
        (dict(block_table_numel=5), "block_table"), (dict(seq_lens_numel=1), "seq_lens"),
        (dict(cu_seqlens_q_numel=2), "cu_seqlens_q"),
        (dict(q_stride_t=1 << 45), "'q'"), (dict(q_stride_h=-8), "stride"), (dict(q_numel=10), "'q'"),
        (dict(out_numel=71), "'out'"), (dict(tree_mask_numel=3), "tree_mask"),
        (dict(mask_cols=1 << 40), "tree_mask"), (dict(mask_cols=-1), "tree_mask"),
        (dict(head_dim=1 << 40), "head_dim"),  # aborted in the scratch allocation (exit 134)
        (dict(head_dim=1 << 14), "'q'"),
        (dict(q_heads=1 << 40, kv_heads=1 << 39), "'q'"),
        (dict(q_numel=-1), "numel"),
    ]
    for over, arg in cases:
        with pytest.raises(ValueError, match=arg):
            _raw_call(c, out, **over)
    _raw_call(c, out)  # still fine after the errors


def test_cpp_empty_block_table_columns():
    """A block table with 0 columns (nothing to read) is not reported as a null pointer."""
    if paged_backends._cpu_kernel() is None:
        pytest.skip("backend cpu: ptcore._C has no paged_attention")
    c = make_case(4, 2, 2, 8, [10, 12], [4, 5])
    out = torch.empty(0, 4, 8)
    c = {**c, "q": torch.empty(0, 4, 8), "block_table": torch.empty(2, 0, dtype=torch.int32),
         "seq_lens": torch.zeros(2, dtype=torch.int32), "cu_seqlens_q": torch.zeros(3, dtype=torch.int32)}
    _raw_call(c, out, block_table=0)  # no sequence reads a page: fine
    with pytest.raises(ValueError, match="capacity"):
        _raw_call({**c, "seq_lens": torch.tensor([0, 3], dtype=torch.int32)}, out, block_table=0)


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_extend_no_sequences_cu_checked_on_every_backend(backend):
    """cu_seqlens_q = [3] with no sequences is rejected by every backend alike (torch skipped it)."""
    c = make_case(4, 2, 2, 8, [10], [2])
    c = {**c, "q": torch.empty(0, 4, 8), "block_table": c["block_table"][:0], "seq_lens": c["seq_lens"][:0],
         "cu_seqlens_q": torch.tensor([3], dtype=torch.int32)}
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        extend(backend, c)
    assert extend(backend, {**c, "cu_seqlens_q": torch.zeros(1, dtype=torch.int32)}).shape == (0, 4, 8)


# ---- the Triton kernels themselves: flash-decoding splits and extend tiles (interpreter: tiny sizes) ----

def _triton_kernels():
    why = dispatch_why("triton")
    if why:
        pytest.skip(f"backend triton: {why}")
    from ptcore import _ext
    _ext.triton_kernels()
    from ptcore.kernels import paged_attention as kernels
    return kernels


def _kernel_decode(K, c, splits, **opts):
    D = c["q"].shape[-1]
    return K.paged_attention_decode(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"],
                                    scale=opts.get("scale", 1 / math.sqrt(D)), softcap=opts.get("softcap"),
                                    num_splits=splits)


@pytest.mark.parametrize("page_size", [1, 5, 16, 64])
def test_triton_decode_splits_match_float64(page_size):
    """Several key splits per (sequence, KV head) merged by log-sum-exp: lengths 1 (every split but
    the first empty), on and off page and split boundaries (splits are multiples of 16 keys here;
    page size 64: several splits inside one page),
    GQA 1/2/4 (the group padded to 16 tl.dot rows), head dims 64 and 80 (80 padded to 128), shuffled
    pages, NaN in every slot no sequence owns."""
    K = _triton_kernels()
    S = page_size
    lens = [1, 16, 17, 33, 2 * S + 1, 47]
    for G, D, splits in [(1, 64, 2), (2, 80, 3), (4, 64, 5), (4, 80, 64)]:
        c = make_case(S, 2, G, D, lens, [1] * len(lens))
        capacity = c["block_table"].shape[1] * S
        used, chunk = K.decode_splits(len(lens), 2, capacity, c["q"].device, splits)
        # equal chunks of whole 16-key blocks: at most `splits` of them, none wholly past the table
        assert 1 < used <= splits and chunk % 16 == 0 and (used - 1) * chunk < capacity <= used * chunk
        out = _kernel_decode(K, c, splits)
        assert out.shape == c["q"].shape and torch.isfinite(out).all()
        check(out, c, f"G={G} D={D} splits={splits}")


def test_triton_decode_wide_table_softcap_and_one_split():
    """A block table much wider than any sequence: most splits lie past the end (lse -inf, weight
    0); softcap and scale go through the splits; one split writes the output directly; the split
    count changes only the last bits."""
    K = _triton_kernels()
    c = make_case(4, 2, 4, 24, [1, 9, 30], [1, 1, 1])
    wide = torch.full((3, 40), -1, dtype=torch.int32)
    wide[:, :c["block_table"].shape[1]] = c["block_table"]
    c["block_table"] = wide  # 160 positions: 10 splits of 16, the sequences reach 2 at most
    opts = dict(softcap=2.0, scale=0.4)
    ref, naive = reference(c, **opts), reference(c, dtype=c["q"].dtype, **opts)
    outs = [_kernel_decode(K, c, s, **opts) for s in (1, 10)]
    for s, out in zip((1, 10), outs):
        assert_rule(out, ref, naive, f"splits={s}")
    assert rel_err(outs[0], outs[1]) <= rule_bound(naive, ref) / 2  # the split count: rounding only


def test_triton_decode_default_splits_through_the_op():
    """The op's default split count (CPU: aims at 8 programs) on one sequence: 4 splits here."""
    K = _triton_kernels()
    c = make_case(16, 2, 2, 64, [70], [1])
    assert K.decode_splits(1, 2, c["block_table"].shape[1] * 16, c["q"].device)[0] == 4
    check(decode("triton", c), c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_decode_splits_low_precision(dtype):
    """fp16 caches through the split path (tl.dot on fp16 tiles, fp32 partials) against the naive
    fp16 computation + 1e-2; fp32 under the rule (2 x the naive fp32 error + 1e-6)."""
    K = _triton_kernels()
    c = make_case(16, 2, 4, 80, [1, 40, 17, 64], [1] * 4, dtype=dtype)
    out = _kernel_decode(K, c, 4)
    assert out.dtype == dtype
    ref = reference(c)
    bound = rel_err(reference(c, dtype=dtype), ref) + 1e-2 if dtype == torch.float16 else rule_bound(reference(c, dtype=dtype), ref)
    assert rel_err(out, ref) <= bound


def test_triton_extend_max_q_bound():
    """max_q exact or any upper bound gives the same bits as computing it (the extra row blocks
    exit at once); a tree mask too."""
    K = _triton_kernels()
    for tree in (False, True):
        c = make_case(4, 2, 2, 80, [5, 21, 40, 3], [2, 21, 19, 0], tree=tree)
        args = [c[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu_seqlens_q")]
        outs = [K.paged_attention_extend(*args, scale=0.3, softcap=None, tree_mask=c["tree_mask"], max_q=m)
                for m in (None, 21, 40, 1000)]
        for out in outs[1:]:
            assert torch.equal(out, outs[0])
        check(outs[0], c, f"tree={tree}", scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_max_q_checked(backend):
    """The op's max_q: the longest q_len or more is fine on every backend; less, or not an int >= 0,
    is a ValueError naming it (CPU tensors)."""
    c = make_case(4, 2, 2, 8, [10, 12], [4, 5])
    ref, naive = reference(c), reference(c, dtype=c["q"].dtype)
    for m in (5, 9):
        assert_rule(extend(backend, c, max_q=m), ref, naive, f"max_q={m}")
    for m in (4, 0, -1, True, 5.0):
        with pytest.raises(ValueError, match="max_q"):
            extend(backend, c, max_q=m)


def test_triton_through_the_engine(monkeypatch):
    """The engine's calls (extend with max_q for prompts and drafts, flash-decoding for decode
    steps) on the triton backend: fp32 logits against the float64 Hugging Face forward, and the
    greedy tokens of the cpu backend's run."""
    _triton_kernels()
    from ptcore.engine import Engine, SamplingParams
    from tests.test_engine import tiny_model
    calls = {"decode": 0, "extend": 0}
    for kind, table in (("decode", paged_backends.DECODE), ("extend", paged_backends.EXTEND)):
        def counted(*a, _f=table["triton"], _k=kind, **kw):
            calls[_k] += 1
            if _k == "extend":
                assert kw["max_q"] is not None  # the engine passes it
            return _f(*a, **kw)
        monkeypatch.setitem(table, "triton", counted)
    model = tiny_model()
    ids = torch.randint(0, 131, (1, 30))
    with torch.no_grad():
        ref = model(ids).logits[0]
        m32 = model.float()
        naive = m32(ids).logits[0]  # the naive baseline: the plain fp32 Hugging Face forward
    assert ref.dtype == torch.float64 and naive.dtype == torch.float32
    with ptcore.use_backend("triton"):
        engine = Engine(m32, page_size=4, max_cached_tokens=512)
        seq = engine.start(ids[0, :19].tolist())
        rows = engine.forward([seq], [ids[0, 19:].tolist()], all_logits=True)[0]
        assert rows.dtype == seq.logits.dtype == torch.float32
        assert_rule(rows, ref[19:], naive[19:], "triton engine logits")
        assert_rule(seq.logits, ref[-1], naive[-1], "triton engine last logits")
        engine.release(seq)
        prompts = [ids[0, :n].tolist() for n in (3, 9)]
        got = [c[0].tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))]
    want = [c[0].tokens for c in Engine(m32, page_size=4, max_cached_tokens=512).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=0))]
    assert got == want
    assert calls["decode"] > 0 and calls["extend"] > 0
