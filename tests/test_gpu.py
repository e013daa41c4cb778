"""Every op on CUDA tensors, on each GPU backend, against the float64 oracle (bench/gpu_check.sh runs
this file first on a lent GPU; without CUDA every test skips, saying so).

The tolerance rule (docs/kernels.md section 4): the error against float64 may be at most twice the
error of the naive computation in the same dtype in plain PyTorch on the same device, plus a slack
of 1e-6 (relative) for fp32 and 1e-2 for bf16/fp16. Copies (write_kv, copy_pages) and the
speculative verification (integer decisions on float64 draws) must be exact.

``PTCORE_GPU_TESTS_ON=cpu`` runs the same tests here as a dry run of their logic: tiny sizes, CPU
tensors, the cpu backend and Triton's interpreter in place of the GPU backends (no bf16 for Triton
there: its interpreter cannot run bf16 tl.dot).
"""
import math
import os

import pytest
import torch

import ptcore
from ptcore.ops import (copy_pages, dispatch, linear_cross_entropy, linear_dpo_loss, linear_logprobs,
                        linear_policy_loss, paged_attention_decode, paged_attention_extend, policy_loss,
                        speculative_verify, speculative_verify_tree, write_kv)
from tests.reference import linear_cross_entropy_ref, rel_err

DEVICE = os.environ.get("PTCORE_GPU_TESTS_ON", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="no CUDA device here: the gpu tests run in bench/gpu_check.sh "
                                       "(PTCORE_GPU_TESTS_ON=cpu dry-runs their logic on the CPU)")
GPU_BACKENDS = ["triton", "cuda"] if ON_GPU else ["triton", "cpu"]
PAGED_BACKENDS = ["triton", "flash_attn", "torch"] if ON_GPU else ["triton", "cpu", "torch"]
LOW = [torch.bfloat16, torch.float16]


def big(gpu, cpu):
    """A size for the GPU run, and the tiny one of the CPU dry run."""
    return gpu if ON_GPU else cpu


def slack(dtype):
    return 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2


def within_rule(out, ref, naive, dtype, what=""):
    err, base = rel_err(out, ref), rel_err(naive, ref)
    assert err <= 2 * base + slack(dtype), \
        f"{what}: error vs float64 {err:.3g} > 2 x naive {dtype} torch error {base:.3g} + {slack(dtype)}"


def need(backend, dtype=torch.float32, **op):
    """A GPU backend that cannot run on a CUDA machine is a failure (a broken build), not a skip;
    the optional flash-attn package is a skip, printed."""
    if not ON_GPU and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("dry run: bf16 tl.dot is broken in Triton's CPU interpreter")
    why = dispatch.cannot_run(backend, torch.device(DEVICE), dtype, **op)
    if why is None:
        return
    if backend == "flash_attn" or not ON_GPU:
        pytest.skip(f"backend {backend}: {why}")
    pytest.fail(f"gpu backend {backend} cannot run on a CUDA machine: {why}")


def no_host_sync():
    """A context in which a host synchronization raises (CUDA only; nothing on the CPU)."""
    class _Ctx:
        def __enter__(self):
            if ON_GPU:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            if ON_GPU:
                torch.cuda.set_sync_debug_mode(0)
    return _Ctx()


# =============================================================================================
# Paged attention: decode, extend, write_kv, copy_pages


def paged_case(page_size, Hkv, G, D, lens, q_lens, dtype, *, tree=False, nan=True, wide=0, seed=0):
    """Shuffled pages; block-table entries past a sequence are -1; every slot no sequence owns is
    NaN (``nan``), so reading a wrong page or a position past seq_lens poisons the output."""
    g = torch.Generator().manual_seed(seed)
    need_pages = [-(-L // page_size) for L in lens]
    P = sum(need_pages) + 5
    k = torch.full((P, page_size, Hkv, D), float("nan") if nan else 0.0)
    v = torch.full((P, page_size, Hkv, D), float("nan") if nan else 0.0)
    perm = torch.randperm(P, generator=g).tolist()
    table = torch.full((len(lens), max(need_pages + [1]) + 1 + wide), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        for i in range(need_pages[b]):
            page = perm.pop()
            table[b, i] = page
            used = min(page_size, L - i * page_size)
            k[page, :used] = torch.randn(used, Hkv, D, generator=g)
            v[page, :used] = torch.randn(used, Hkv, D, generator=g)
    q = torch.randn(sum(q_lens), Hkv * G, D, generator=g)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    mask = None
    if tree:
        mask = torch.rand(sum(q_lens), max(q_lens + [1]), generator=g) < 0.5
        for b, n in enumerate(q_lens):
            mask[int(cu[b]) + torch.arange(n), torch.arange(n)] = True  # every node sees itself
    dev = torch.device(DEVICE)
    return dict(q=q.to(dev, dtype), k_cache=k.to(dev, dtype), v_cache=v.to(dev, dtype), block_table=table.to(dev),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), cu_seqlens_q=cu.to(dev),
                tree_mask=None if mask is None else mask.to(dev))


def paged_oracle(c, *, dtype, scale=None, softcap=None, decode=False):
    """Written here from the contract (docs/paged_attention.md): sequence by sequence, positions
    read through the block table, query head h on KV head h // G, attention computed in ``dtype``
    (float64: the oracle; the inputs' dtype: the naive baseline)."""
    q, kc, vc, bt = c["q"], c["k_cache"], c["v_cache"], c["block_table"]
    S, Hkv, D = kc.shape[1:]
    Hq = q.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    lens = c["seq_lens"].tolist()
    cu = list(range(len(lens) + 1)) if decode else c["cu_seqlens_q"].tolist()
    tm = None if decode else c["tree_mask"]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b, L in enumerate(lens):
        t0, t1 = cu[b], cu[b + 1]
        n = t1 - t0
        if n == 0:
            continue
        pos = torch.arange(L, device=q.device)
        pages = bt[b].long()[pos // S]
        K = kc[pages, pos % S].to(dtype).repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        V = vc[pages, pos % S].to(dtype).repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("thd,lhd->htl", q[t0:t1].to(dtype), K) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        rel = pos[None, :] - (L - n)  # < 0: the prefix
        j = torch.arange(n, device=q.device)[:, None]
        new = (rel <= j) if tm is None else (tm[t0:t1][:, rel[0].clamp(0, tm.shape[1] - 1)] & (rel >= 0))
        vis = (rel < 0) | new  # [n, L]
        s = s.masked_fill(~vis[None], float("-inf"))
        p = torch.softmax(s.float() if dtype in LOW else s, -1).to(dtype).nan_to_num(0.0)  # sees nothing: 0
        out[t0:t1] = torch.einsum("htl,lhd->thd", p, V)
    return out


def _decode(backend, c, **opts):
    with ptcore.use_backend(backend):
        return paged_attention_decode(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"], **opts)


def _extend(backend, c, **opts):
    with ptcore.use_backend(backend):
        return paged_attention_extend(c["q"], c["k_cache"], c["v_cache"], c["block_table"], c["seq_lens"],
                                      c["cu_seqlens_q"], tree_mask=c["tree_mask"], **opts)


def _paged_dtypes(backend):
    return [torch.float16, torch.bfloat16] if backend == "flash_attn" else [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_paged_decode(backend, dtype):
    """Lengths 1, on and around page and split boundaries and long (many flash-decoding splits);
    GQA 1/2/4; head dims 64, 80 (padded), 128; softcap and scale; a block table far wider than the
    sequences; pages shuffled, NaN in unowned slots (flash-attn reads whole pages: zeros there)."""
    if dtype not in _paged_dtypes(backend):
        pytest.skip(f"{backend} takes fp16/bf16 only")
    S = 256 if backend == "flash_attn" else 16
    need(backend, dtype, op="paged_attention_decode", page_size=S, tree_mask=False)
    lens = big([1, 15, 16, 17, 255, 256, 257, 1000, 2049, 4100], [1, 15, 16, 17, 40])
    for G, D, opts, wide in [(1, 64, {}, 0), (2, 80, dict(softcap=30.0, scale=0.1), big(64, 6)), (4, 128, {}, 0)]:
        if not ON_GPU and D == 128:
            D = 32
        c = paged_case(S, 2, G, D, lens, [1] * len(lens), dtype, nan=backend != "flash_attn", wide=wide)
        out = _decode(backend, c, **opts)
        assert out.shape == c["q"].shape and out.dtype == dtype
        ref = paged_oracle(c, dtype=torch.float64, decode=True, **opts)
        within_rule(out, ref, paged_oracle(c, dtype=dtype, decode=True, **opts), dtype, f"{backend} G={G} D={D}")
        if backend == "triton":
            with no_host_sync():  # warmed up above: the launch itself never waits for the device
                again = _decode(backend, c, **opts)
            assert torch.equal(again, out)  # repeatable


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
def test_gpu_paged_extend(backend, dtype, tree):
    """Ragged new-token counts (0, 1, off the 64/128 tiles) over prefixes of any length, causal or
    by a tree mask, with max_q passed (no host sync) and without."""
    if dtype not in _paged_dtypes(backend):
        pytest.skip(f"{backend} takes fp16/bf16 only")
    if tree and backend == "flash_attn":
        pytest.skip("flash-attn has no tree mask")
    S = 256 if backend == "flash_attn" else 16
    need(backend, dtype, op="paged_attention_extend", page_size=S, tree_mask=tree)
    q_lens = big([0, 1, 17, 64, 200, 129, 3], [0, 1, 17, 5])
    lens = [n + p for n, p in zip(q_lens, big([5, 0, 300, 64, 1, 1000, 2], [5, 0, 20, 1]))]
    for G, D, opts in [(1, 64, {}), (2, 80, dict(softcap=20.0)), (4, 128, dict(scale=0.05))]:
        if not ON_GPU and D == 128:
            D = 32
        c = paged_case(S, 2, G, D, lens, q_lens, dtype, tree=tree, nan=backend != "flash_attn")
        out = _extend(backend, c, **opts)
        ref = paged_oracle(c, dtype=torch.float64, **opts)
        within_rule(out, ref, paged_oracle(c, dtype=dtype, **opts), dtype, f"{backend} G={G} D={D}")
        with no_host_sync() if backend == "triton" else _nothing():
            bound = _extend(backend, c, max_q=max(q_lens), **opts)
        assert torch.equal(bound, out)


class _nothing:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_write_kv_and_copy_pages(dtype):
    """Exact: write_kv puts each row at its slot and nowhere else; copy_pages copies as from a
    snapshot (a rotation of pages) on every layer; neither synchronizes on CUDA tensors."""
    dev = torch.device(DEVICE)
    P, S, Hkv, D, L = 64, 16, 2, 80, 3
    kc, vc = torch.randn(P, S, Hkv, D, device=dev).to(dtype), torch.randn(P, S, Hkv, D, device=dev).to(dtype)
    want_k, want_v = kc.clone(), vc.clone()
    slots = torch.randperm(P * S, device=dev)[:300]
    k, v = torch.randn(300, Hkv, D, device=dev).to(dtype), torch.randn(300, Hkv, D, device=dev).to(dtype)
    want_k.view(P * S, Hkv, D)[slots] = k
    want_v.view(P * S, Hkv, D)[slots] = v
    with no_host_sync():
        write_kv(kc, vc, slots, k, v)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    pool_k, pool_v = torch.randn(L, P, S, Hkv, D, device=dev).to(dtype), torch.randn(L, P, S, Hkv, D, device=dev).to(dtype)
    src = torch.tensor([1, 2, 3, 10, 40], device=dev)
    dst = torch.tensor([2, 3, 1, 50, 41], device=dev, dtype=torch.int32)  # a rotation and two plain copies
    ek, ev = pool_k.clone(), pool_v.clone()
    ek[:, dst.long()], ev[:, dst.long()] = pool_k[:, src].clone(), pool_v[:, src].clone()
    with no_host_sync() if ON_GPU else _nothing():
        copy_pages(pool_k, pool_v, src, dst)
    assert torch.equal(pool_k, ek) and torch.equal(pool_v, ev)


# =============================================================================================
# Speculative verification (chain and tree): exact against the float64 rule on the same draws


def _draws(B, K, V, seed):
    """The op's draws from a generator seeded ``seed`` on the device: u [B, K], then E [B, V]."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    u = torch.rand((B, K), dtype=torch.float64, device=DEVICE, generator=g)
    e = torch.empty((B, V), dtype=torch.float64, device=DEVICE).exponential_(generator=g)
    return u, e


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_speculative_verify_chain(backend, dtype):
    """Sampled, deterministic (q = None) and greedy drafts, ragged lengths, V with and without tile
    tails: the tokens of the rule written in float64 (tests/test_speculative_verify.naive_verify)
    on the same draws and the same (dtype-rounded) probabilities."""
    need(backend, dtype)
    from tests.test_speculative_verify import greedy_expected, naive_verify
    for V in big((100, 8193, 151936), (100, 257)):
        B, K = 6, 4
        g = torch.Generator(device=DEVICE).manual_seed(V)
        p = torch.softmax(torch.randn(B, K + 1, V, device=DEVICE, generator=g) * 3, -1).to(dtype)
        q = torch.softmax(p[:, :K].float().log() + torch.randn(B, K, V, device=DEVICE, generator=g), -1).to(dtype)
        x = torch.multinomial(q.float().reshape(-1, V), 1, generator=g).reshape(B, K)
        lens = torch.tensor([4, 3, 0, 4, 1, 2], device=DEVICE)
        for dq, greedy in ((q, False), (None, False), (q, True)):
            with ptcore.use_backend(backend), no_host_sync():
                n_acc, out = speculative_verify(x, dq, p, draft_lens=lens, greedy=greedy, validate=False,
                                                generator=torch.Generator(device=DEVICE).manual_seed(5))
            if greedy:
                want = greedy_expected(x.cpu(), p.cpu().double(), lens.cpu())
            else:
                u, e = _draws(B, K, V, 5)
                want = naive_verify(x.cpu(), None if dq is None else dq.cpu().double(), p.cpu().double(), lens.cpu(),
                                    u.cpu(), e.cpu())
            assert torch.equal(n_acc.cpu(), want[0]), (backend, V, greedy, dq is None)
            assert torch.equal(out.cpu(), want[1]), (backend, V, greedy, dq is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_speculative_verify_tree(dtype):
    """Trees on device tensors (the torch backend: there is no GPU tree kernel) give the tokens of
    the CPU float64 reference on the same draws; on a chain they equal the chain op."""
    from ptcore.ops.speculative import verify_tree_torch
    B, V = 5, big(3001, 67)
    parents = torch.tensor([-1, -1, -1, 0, 0, 1, 3, 3])
    N = parents.numel()
    g = torch.Generator(device=DEVICE).manual_seed(2)
    p = torch.softmax(torch.randn(B, N + 1, V, device=DEVICE, generator=g) * 2, -1).to(dtype)
    q = torch.softmax(p.float().log() + torch.randn(B, N + 1, V, device=DEVICE, generator=g), -1).to(dtype)
    x = torch.stack([torch.multinomial(q[:, int(par) + 1].float(), 1, generator=g)[:, 0] for par in parents], 1)
    for dq, greedy in ((q, False), (None, False), (q, True)):
        n_acc, out, path = speculative_verify_tree(x, parents.to(DEVICE), dq, p, greedy=greedy,
                                                   generator=torch.Generator(device=DEVICE).manual_seed(9))
        u, e = (None, None) if greedy else _draws(B, N, V, 9)
        want = [torch.empty(B, dtype=torch.int64), torch.empty(B, N + 1, dtype=torch.int64),
                torch.empty(B, N, dtype=torch.int64)]
        verify_tree_torch(x.cpu(), parents.expand(B, N).contiguous(), None if dq is None or greedy else dq.cpu().double(),
                          p.cpu().double(), None if u is None else u.cpu(), None if e is None else e.cpu(), greedy, *want)
        for got, w in zip((n_acc, out, path), want):
            assert torch.equal(got.cpu(), w), (greedy, dq is None)
    K = 4
    chain = torch.arange(K) - 1
    pc, qc, xc = p[:, :K + 1], q[:, :K], x[:, :K]
    a = speculative_verify(xc, qc, pc, generator=torch.Generator(device=DEVICE).manual_seed(3), validate=False)
    b = speculative_verify_tree(xc, chain.to(DEVICE), torch.cat([qc, qc[:, :1]], 1), pc,
                                generator=torch.Generator(device=DEVICE).manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# =============================================================================================
# The LM-head ops


def _lm_case(N, H, V, dtype, *, scale=3.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(N, H, device=DEVICE, generator=g)
    w = torch.randn(V, H, device=DEVICE, generator=g) * (scale / H ** 0.5)
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    t[::7] = -100
    return x, w, t


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
                                  dict(reduction="none")], ids=["plain", "all", "none"])
def test_gpu_cross_entropy(backend, dtype, opts):
    need(backend, dtype)
    N, H, V = big((257, 96, 50257), (33, 16, 301))
    x, w, t = _lm_case(N, H, V, dtype)
    params = [x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    with ptcore.use_backend(backend):
        loss = linear_cross_entropy(*params, t, **opts)
    gout = torch.randn(loss.shape, device=DEVICE) if loss.dim() else None
    grads = torch.autograd.grad(loss, params, None if gout is None else gout.to(loss.dtype))
    results = {}
    for name, dt in (("ref", torch.float64), ("naive", dtype)):
        p = [x.to(dt).requires_grad_(), w.to(dt).requires_grad_()]
        r = linear_cross_entropy_ref(*p, t, **opts)
        results[name] = (r, torch.autograd.grad(r, p, None if gout is None else gout.to(r.dtype)))
    (ref, ref_g), (naive, naive_g) = results["ref"], results["naive"]
    within_rule(loss, ref, naive, dtype, f"{backend} loss")
    for g_, r, n, name in zip(grads, ref_g, naive_g, ("input", "weight")):
        within_rule(g_, r, n, dtype, f"{backend} grad {name}")


def _logprobs_ref(x, w, t, temperature, dt):
    logs = torch.log_softmax((x.to(dt) @ w.to(dt).T) / temperature, -1)
    valid = t != -100
    lp = torch.where(valid, logs.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0)
    ent = torch.where(valid, -(logs.exp() * logs).sum(-1), 0)
    return lp, ent


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_logprobs(backend, dtype):
    """Log-probs and entropy and their input gradient against float64; deterministic mode too; an
    out-of-range target is NaN (no host sync to raise), never a finite lie."""
    need(backend, dtype)
    N, H, V = big((129, 64, 32001), (17, 16, 211))
    x, w, t = _lm_case(N, H, V, dtype, scale=1.0)
    for deterministic in (False, True):
        xx = x.to(dtype).requires_grad_()
        with ptcore.use_backend(backend):
            lp, ent = linear_logprobs(xx, w.to(dtype), t, temperature=0.7, return_entropy=True,
                                      deterministic=deterministic)
        g = torch.autograd.grad(lp.sum() + ent.sum(), xx)[0]
        outs = {}
        for name, dt in (("ref", torch.float64), ("naive", dtype)):
            xd = x.to(dt).requires_grad_()
            rlp, rent = _logprobs_ref(xd, w, t, 0.7, dt)
            outs[name] = (rlp, rent, torch.autograd.grad(rlp.sum() + rent.sum(), xd)[0])
        for got, r, n, what in zip((lp, ent, g), outs["ref"], outs["naive"], ("logp", "entropy", "grad")):
            within_rule(got, r, n, dtype, f"{backend} {what} deterministic={deterministic}")
    t_bad = t.clone()
    t_bad[7] = V + 3
    if ON_GPU:
        with ptcore.use_backend(backend):
            lp_bad = linear_logprobs(x.to(dtype), w.to(dtype), t_bad)
        assert torch.isnan(lp_bad[7]) and torch.isfinite(lp_bad[8:]).all()


def _token_logps(h, w, y, dt, temperature=1.0):
    z = torch.nn.functional.linear(h.to(dt), w.to(dt))
    logs = torch.log_softmax(z.float() / temperature if dt in LOW else z / temperature, -1)
    valid = y != -100
    lp = logs.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros((), dtype=lp.dtype)), -(logs.exp() * logs).sum(-1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_losses(backend, dtype):
    """linear_policy_loss (GRPO with KL, and DAPO) and linear_dpo_loss (sigmoid) from hidden
    states: loss and gradients against the unfused composition in float64 (full logits ->
    log-probs -> ptcore.ops.policy_loss / the DPO formula), naive baseline the same in dtype."""
    need(backend, dtype)
    from ptcore.ops import dpo_loss
    B, T, H, V = big((4, 33, 64, 4099), (4, 9, 16, 101))
    g = torch.Generator(device=DEVICE).manual_seed(1)
    h = torch.randn(B, T, H, device=DEVICE, generator=g)
    w = torch.randn(V, H, device=DEVICE, generator=g) / H ** 0.5
    y = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    mask = torch.ones(B, T, device=DEVICE)
    mask[:, :5] = 0
    mask[1, -3:] = 0
    old = torch.randn(B, T, device=DEVICE, generator=g) * 0.3 - math.log(V)
    ref_lp = old + 0.1 * torch.randn(B, T, device=DEVICE, generator=g)
    adv = torch.randn(B, device=DEVICE, generator=g)
    for loss_type, extra in (("grpo", dict(beta=0.04, ref_logps=ref_lp)), ("dapo", dict(epsilon_high=0.28))):
        hd, wd = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        with ptcore.use_backend(backend):
            out = linear_policy_loss(hd, wd, y, old, adv, mask, loss_type=loss_type, temperature=0.9, **extra)
        grads = torch.autograd.grad(out.loss, (hd, wd))
        res = {}
        for name, dt in (("ref", torch.float64), ("naive", dtype)):
            hr, wr = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
            lp, ent = _token_logps(hr, wr, torch.where(mask.bool(), y, -100), dt, 0.9)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            e = {k: (v.to(acc) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
            r = policy_loss(lp.to(acc), old.to(acc), adv.to(acc), mask, loss_type=loss_type, entropy=ent, **e)
            res[name] = (r.loss, torch.autograd.grad(r.loss, (hr, wr)))
        within_rule(out.loss, res["ref"][0], res["naive"][0], dtype, f"{backend} {loss_type} loss")
        for got, r, n, what in zip(grads, res["ref"][1], res["naive"][1], ("hidden", "weight")):
            within_rule(got, r, n, dtype, f"{backend} {loss_type} grad {what}")
    yc, yr = y[:2].masked_fill(mask[:2] == 0, -100), y[2:].masked_fill(mask[2:] == 0, -100)
    rc, rr = torch.full((2,), -3.0 * T, device=DEVICE), torch.full((2,), -3.1 * T, device=DEVICE)
    hd, wd = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    with ptcore.use_backend(backend):
        out = linear_dpo_loss(hd[:2], hd[2:], wd, yc, yr, rc, rr, beta=0.1, loss_type="sigmoid")
    grads = torch.autograd.grad(out.loss, (hd, wd))
    res = {}
    for name, dt in (("ref", torch.float64), ("naive", dtype)):
        hr, wr = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        acc = torch.float64 if dt == torch.float64 else torch.float32
        lc = _token_logps(hr[:2], wr, yc, dt)[0].to(acc).sum(-1)
        lr = _token_logps(hr[2:], wr, yr, dt)[0].to(acc).sum(-1)
        r = dpo_loss(lc, lr, rc.to(acc), rr.to(acc), beta=0.1, loss_type="sigmoid",
                     chosen_lengths=(yc != -100).sum(-1), rejected_lengths=(yr != -100).sum(-1))
        res[name] = (r.loss, torch.autograd.grad(r.loss, (hr, wr)))
    within_rule(out.loss, res["ref"][0], res["naive"][0], dtype, f"{backend} dpo loss")
    for got, r, n, what in zip(grads, res["ref"][1], res["naive"][1], ("hidden", "weight")):
        within_rule(got, r, n, dtype, f"{backend} dpo grad {what}")
