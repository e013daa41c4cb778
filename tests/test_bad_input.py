"""Bad input gets a clear Python exception that names the argument: from the Python layer, and
again from the C++ layer when it is called directly."""
import pytest
import torch

import ptcore
from ptcore.ops import linear_cross_entropy
from tests.conftest import cpu_backends


def good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case, exc, pattern", [
    (lambda x, w, t: (x[:, :7], w, t, {}), ValueError, "'weight' must be"),
    (lambda x, w, t: (x, w, t.int(), {}), TypeError, "'target' must have dtype"),
    (lambda x, w, t: (x, w, t.float(), {}), TypeError, "'target' must have dtype"),
    (lambda x, w, t: (x, w, t[:3], {}), ValueError, "'target' must have shape"),
    (lambda x, w, t: (x, w, torch.tensor([0, 1, 10, 2]), {}), ValueError, "'target' holds 10"),
    (lambda x, w, t: (x, w, torch.tensor([0, -1, 3, 2]), {}), ValueError, "'target' holds -1"),
    (lambda x, w, t: (x, w, t, {"bias": torch.randn(9)}), ValueError, "'bias' must have length"),
    (lambda x, w, t: (x, w, t, {"bias": torch.randn(10, 1)}), ValueError, "'bias' must be 1-D"),
    (lambda x, w, t: (x, w.double(), t, {}), TypeError, "'weight' has dtype"),
    (lambda x, w, t: (x.long(), w, t, {}), TypeError, "'input' must have dtype"),
    (lambda x, w, t: (x, w[0], t, {}), ValueError, "'weight' must be 2-D"),
    (lambda x, w, t: (x, w[:0], t, {}), ValueError, "V = 0"),
    (lambda x, w, t: (x, w, t, {"label_smoothing": 1.5}), ValueError, "'label_smoothing'"),
    (lambda x, w, t: (x, w, t, {"label_smoothing": -0.1}), ValueError, "'label_smoothing'"),
    (lambda x, w, t: (x, w, t, {"z_loss": -1.0}), ValueError, "'z_loss'"),
    (lambda x, w, t: (x, w, t, {"softcap": 0.0}), ValueError, "'softcap'"),
    (lambda x, w, t: (x, w, t, {"softcap": float("nan")}), ValueError, "'softcap'"),
    (lambda x, w, t: (x, w, t, {"reduction": "avg"}), ValueError, "'reduction'"),
    (lambda x, w, t: (x, w, t, {"ignore_index": 1.5}), TypeError, "'ignore_index'"),
    (lambda x, w, t: ([1.0], w, t, {}), TypeError, "'input' must be a torch.Tensor"),
    (lambda x, w, t: (x, w.to("meta"), t, {}), ValueError, "'weight' is on meta"),
])
def test_bad_arguments_named(backend, case, exc, pattern):
    x, w, t, kw = case(*good())
    with ptcore.use_backend(backend), pytest.raises(exc, match=pattern):
        linear_cross_entropy(x, w, t, **kw)


def test_cpp_layer_checks_again():
    """The compiled kernel raises ValueError itself when handed bad values (Python skipped)."""
    C = pytest.importorskip("ptcore._C", reason="ptcore._C is not built")
    logits = torch.randn(3, 5)
    t = torch.tensor([0, 7, 1])
    loss, lse = torch.empty(3), torch.empty(3)
    args = dict(logits=logits.data_ptr(), dtype="float32", rows=3, vocab=5, row_stride=5,
                target=t.data_ptr(), target_stride=1, loss=loss.data_ptr(), lse=lse.data_ptr(),
                scale=0, scale_stride=0, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                softcap=0.0, write_grad=True)
    with pytest.raises(ValueError, match="'target' holds 7 at row 1"):
        C.cross_entropy_rows(**args)
    t[1] = 2
    for bad, pattern in [(dict(dtype="int8"), "dtype 'int8'"), (dict(row_stride=4), "row stride"),
                         (dict(vocab=0), "'vocab'"), (dict(rows=-1), "'rows'"),
                         (dict(label_smoothing=2.0), "'label_smoothing'"), (dict(z_loss=-1.0), "'z_loss'"),
                         (dict(softcap=-1.0), "'softcap'"), (dict(target=0), "non-null")]:
        with pytest.raises(ValueError, match=pattern):
            C.cross_entropy_rows(**{**args, **bad})
    C.cross_entropy_rows(**args)
    assert torch.isfinite(loss).all()


def test_nan_logits_poison_the_row_not_hide():
    """A NaN in the inputs gives NaN in that row's loss on every backend, never a finite lie."""
    for backend in ("torch", "cpu"):
        x = torch.randn(3, 4)
        x[1, 2] = float("nan")
        with ptcore.use_backend(backend):
            loss = linear_cross_entropy(x, torch.randn(6, 4), torch.tensor([1, 2, 3]), reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), backend


# ---- issue 18: silent wrong answers become errors, or the reference's NaN ----

def _paged(nan_at=None):
    q = torch.randn(2, 2, 4)
    if nan_at is not None:
        q[nan_at] = float("nan")
    k, v = torch.randn(4, 4, 1, 4), torch.randn(4, 4, 1, 4)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return q, k, v, bt, torch.tensor([5, 3], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_paged_attention_nan_query_gives_nan_not_zeros(backend):
    from ptcore.ops import paged_attention_decode, paged_attention_extend
    if backend == "cpu":
        pytest.importorskip("ptcore._C", reason="ptcore._C is not built")
    q, k, v, bt, sl = _paged(nan_at=(0, 0, 1))
    with ptcore.use_backend(backend):
        out = paged_attention_decode(q, k, v, bt, sl)
        ext = paged_attention_extend(q, k, v, bt, sl, torch.tensor([0, 1, 2], dtype=torch.int32))
        big = paged_attention_decode(q.nan_to_num() * 1e20, k * 1e20, v, bt, sl, scale=1e30)
    for o in (out, ext):
        assert torch.isnan(o[0, 0]).all() and torch.isfinite(o[0, 1]).all() and torch.isfinite(o[1]).all()
    with ptcore.use_backend("torch"):
        ref = paged_attention_decode(q.nan_to_num() * 1e20, k * 1e20, v, bt, sl, scale=1e30)
    assert torch.equal(torch.isnan(big), torch.isnan(ref)) and torch.isnan(big).any()


@pytest.mark.parametrize("kw, name", [(dict(scale=1e300), "'scale'"), (dict(softcap=1e300), "'softcap'"),
                                      (dict(softcap=1e-300), "'softcap'"), (dict(scale=float("inf")), "'scale'")])
def test_paged_attention_rejects_scale_softcap_outside_float32(kw, name):
    from ptcore.ops import paged_attention_decode
    q, k, v, bt, sl = _paged()
    with pytest.raises(ValueError, match=name):
        paged_attention_decode(q, k, v, bt, sl, **kw)


def test_group_advantages_inf_reward_raises():
    from ptcore.ops import group_advantages
    for bad in (float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"'rewards'\[2\] is -?inf"):
            group_advantages(torch.tensor([1.0, 2.0, bad, 0.0]), 4)
    out = group_advantages(torch.tensor([1.0, 2.0, float("nan"), 0.0]), 4)  # NaN: missing
    assert torch.isfinite(out).all() and out[2] == 0


def test_dpo_orpo_positive_logp_and_extreme_beta():
    from ptcore.ops import dpo_loss
    one = torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="'policy_chosen_logps'.*not a log-probability"):
        dpo_loss(torch.tensor([0.5]), torch.tensor([-1.0]), loss_type="orpo", chosen_lengths=one,
                 rejected_lengths=one)
    z = torch.tensor([-1.0])
    with pytest.raises(ValueError, match="'beta'"):
        dpo_loss(z, z, z, z, beta=1e300)
    with pytest.raises(ValueError, match="'beta'"):
        dpo_loss(z, z, z, z, beta=1e-300, loss_type="ipo", chosen_lengths=one, rejected_lengths=one)
    assert torch.isfinite(dpo_loss(z, z - 1, z, z, beta=1e6).loss)  # the largest beta: finite


def test_policy_normalizer_outside_float32_is_rejected():
    from ptcore.ops import policy_loss
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    for bad in (1e-300, 1e300, torch.tensor(1e-300, dtype=torch.float64)):
        with pytest.raises(ValueError, match="'normalizer'"):
            policy_loss(*args, normalizer=bad)
    assert float(policy_loss(*args, normalizer=0.5).loss) == pytest.approx(-2 / 0.5)  # dapo: sum / norm


def test_write_kv_into_an_expanded_cache_is_rejected():
    from ptcore.ops import copy_pages, write_kv
    k = torch.zeros(1, 4, 1, 2).expand(3, 4, 1, 2)
    with pytest.raises(ValueError, match="'k_cache' has overlapping memory"):
        write_kv(k, torch.zeros(3, 4, 1, 2), torch.tensor([0]), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    pool = torch.zeros(2, 3, 4, 1, 2)
    with pytest.raises(ValueError, match="'v_pool' has overlapping memory"):
        copy_pages(pool, pool[:, :1].expand(2, 3, 4, 1, 2), torch.tensor([0]), torch.tensor([1]))
    kc = torch.zeros(3, 4, 1, 2)
    write_kv(kc, torch.zeros(3, 4, 1, 2), torch.tensor([5]), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    assert kc.sum() == 2 and kc[1, 1].sum() == 2


@pytest.mark.parametrize("impl", ["RadixCache", "RadixModel"])
def test_radix_slot_ids_are_bounded_so_pages_fit_int64(impl):
    from ptcore.cache import RadixCache
    from tests.radix_oracle import RadixModel
    cache = (RadixCache if impl == "RadixCache" else RadixModel)(page_size=3)
    top = 2**63 - 2  # a page start (divisible by 3), whose page would end at 2**63
    with pytest.raises(ValueError, match=r"slots\[\d\] = \d+ lies in a page whose last slot is past 2\*\*63 - 1"):
        cache.insert([1, 2], [top, top + 1])
    ok = top - 3
    cache.insert([1, 2, 3], [ok, ok + 1, ok + 2])
    assert cache.owned_slots() == [ok, ok + 1, ok + 2] and cache.evict(3) == [ok, ok + 1, ok + 2]


def test_radix_cpp_layer_bounds_slots_too():
    C = pytest.importorskip("ptcore._C", reason="ptcore._C is not built")
    from array import array
    c = C.RadixCache(3)
    with pytest.raises(ValueError, match="past 2\\*\\*63 - 1"):
        c.insert(array("q", [1, 2]), array("q", [2**63 - 2, 2**63 - 1]))


# ---- issue 18: errors that name the argument (were AttributeError, RuntimeError from the
# custom-op schema, ZeroDivisionError, OverflowError, an allocator error, or silently accepted) ----

def _x():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


def _pl(**kw):
    from ptcore.ops import policy_loss
    args = dict(logps=torch.zeros(1, 4), old_logps=torch.zeros(1, 4), advantages=torch.ones(1),
                mask=torch.ones(1, 4))
    args.update(kw)
    return policy_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("mask"), **args)


def _lpl(**kw):
    from ptcore.ops import linear_policy_loss
    args = dict(hidden=torch.randn(1, 4, 8), weight=torch.randn(10, 8), target=torch.zeros(1, 4, dtype=torch.long),
                old_logps=torch.zeros(1, 4), advantages=torch.ones(1), mask=torch.ones(1, 4))
    args.update(kw)
    pos = [args.pop(k) for k in ("hidden", "weight", "target", "old_logps", "advantages", "mask")]
    return linear_policy_loss(*pos, **args)


def _sv(**kw):
    from ptcore.ops import speculative_verify
    tokens = kw.pop("tokens", torch.zeros(1, 2, dtype=torch.long))
    return speculative_verify(tokens, None, torch.full((1, 3, 10), 0.1), **kw)


def _paged_tree_mask_list():
    from ptcore.ops import paged_attention_extend
    q, k, v, bt, sl = _paged()
    return paged_attention_extend(q, k, v, bt, sl, torch.tensor([0, 1, 2], dtype=torch.int32), tree_mask=[[True]])


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: linear_cross_entropy(*_x(), ignore_index=2**63), ValueError, "'ignore_index' must be an int in"),
    (lambda: ptcore.ops.linear_logprobs(*_x(), ignore_index=-2**63 - 1), ValueError, "'ignore_index'"),
    (lambda: linear_cross_entropy(torch.randn(4, 0), torch.randn(10, 0), _x()[2]), ValueError, "'input' has H = 0"),
    (lambda: linear_cross_entropy(*(t.to("meta") for t in _x())), ValueError, "'input' is on meta"),
    (lambda: ptcore.ops.linear_logprobs(*_x(), return_entropy="no"), TypeError, "'return_entropy' must be True or False"),
    (lambda: ptcore.ops.linear_logprobs(*_x(), deterministic=1), TypeError, "'deterministic'"),
    (lambda: ptcore.ops.linear_logprobs(*_x()[:2], _x()[2].bool()), TypeError, "'target' must have dtype"),
    (lambda: _pl(advantages=torch.tensor([True])), TypeError, "'advantages' must hold real numbers"),
    (lambda: _pl(advantages=torch.tensor([1j])), TypeError, "'advantages' must hold real numbers"),
    (lambda: _pl(mask=torch.ones(1, 4) * 1j), TypeError, "'mask' must hold real numbers"),
    (lambda: _lpl(advantages=torch.tensor([True])), TypeError, "linear_policy_loss: 'advantages'"),
    (lambda: _lpl(old_logps=torch.zeros(1, 4, dtype=torch.long)), TypeError, "linear_policy_loss: 'old_logps'"),
    (lambda: _lpl(ref_logps=[0.0] * 4), (TypeError, ValueError), "'ref_logps'"),
    (lambda: ptcore.ops.gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3) * 1j), TypeError, "'mask'"),
    (lambda: _sv(draft_lens=[1.5]), TypeError, r"'draft_lens'\[0\] is 1.5"),
    (lambda: _sv(draft_lens=[True]), TypeError, "'draft_lens'"),
    (lambda: _sv(tokens=torch.zeros(1, 2, dtype=torch.bool)), TypeError, "'draft_tokens' must have dtype"),
    (lambda: _sv(validate="no"), TypeError, "'validate' must be True or False"),
    (_paged_tree_mask_list, TypeError, "'tree_mask' must be a torch.Tensor"),
])
def test_errors_name_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_linear_dpo_loss_empty_batch_is_zero():
    from ptcore.ops import linear_dpo_loss
    e = torch.zeros(0, 3, dtype=torch.long)
    out = linear_dpo_loss(torch.randn(0, 3, 8), torch.randn(0, 3, 8), torch.randn(10, 8), e, e, torch.zeros(0),
                          torch.zeros(0))
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("value", ["inf", "0", "-5", "nan", "lots"])
def test_chunk_mb_env_is_checked(monkeypatch, value):
    monkeypatch.setenv("PTCORE_CHUNK_MB", value)
    with pytest.raises(ValueError, match="PTCORE_CHUNK_MB must be a number of MiB in"):
        linear_cross_entropy(*_x())


def test_seeds_search_constants_and_pool_size():
    from ptcore.cache import KVPool
    from ptcore.engine.sampling import SamplingParams, make_generator
    with pytest.raises(ValueError, match="'seed' must be in"):
        SamplingParams(seed=2**64)
    SamplingParams(seed=2**64 - 1)
    make_generator(2**64 - 1 + 5, "cpu")  # seed + j past 2**64 wraps as torch maps seeds
    with pytest.raises(ValueError, match=r"'num_pages' = 1000000000000"):
        KVPool(2, 10**12, 16, 2, 8)
    from ptcore.ttc import mcts

    class FakeEngine:  # the constants are checked before the engine is touched
        pass
    for kw, name in ((dict(c_base=0), "'c_base'"), (dict(c_init=float("nan")), "'c_init'"),
                     (dict(c_base=float("nan")), "'c_base'")):
        with pytest.raises(ValueError, match=name):
            mcts(FakeEngine(), "x", lambda c: [0.0] * len(c), **kw)
