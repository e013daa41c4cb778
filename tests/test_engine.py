"""ptcore.engine against Hugging Face on tiny random models of every supported family (float64:
greedy token for token, logits to rounding), sampling (seeded, batch-independent, truncation),
prefix reuse and forks, rollback for speculative decoding, and bad input."""
import copy
import math

import pytest
import torch
import transformers as tf

from ptcore.engine import Engine, SamplingParams, sample
from tests.reference import assert_rule, rel_err, rule_bound
from tests.test_speculative_verify import ALPHA, chi2_pvalue

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "llama-tied-llama3rope": lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=True, attention_bias=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0}),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),  # q/k/v biases
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=20),  # q/k norms, head_dim != hidden / heads
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=256),
}


def tiny_model(family="llama", dtype=torch.float64, seed=0):
    """A random model whose biases and norm weights are non-trivial too (HF inits them to 0 / 1)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family]()).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name or "bias" in name else 0.02))
    return model


def hf_greedy(model, prompt, max_new):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_hf_generate(family):
    model = tiny_model(family)
    engine = Engine(model, page_size=4, max_cached_tokens=2048)
    prompts = [torch.randint(0, 131, (n,)).tolist() for n in (1, 6, 13)]
    prompts.append(prompts[2][:9] + [5, 7])  # shares a prefix (ending inside a page) with prompt 2
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=14, temperature=0))
    for p, (c,) in zip(prompts, outs):
        ref = hf_greedy(model, p, 14)
        assert c.tokens == ref[:len(c.tokens)], (family, p)
        assert c.finish_reason == "length" and len(c.tokens) == 14 or c.tokens[-1] in engine.eos_token_ids
        assert c.logprobs == [0.0] * len(c.tokens)  # a point mass


@pytest.mark.parametrize("family,fuse", [("llama", True), ("qwen3", True), ("qwen2", False), ("qwen3", False)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_logits_match_hf_forward(family, fuse, page_size):
    model = tiny_model(family)
    ids = torch.randint(0, 131, (1, 40))
    ref = model(ids).logits[0].double()
    engine = Engine(model, page_size=page_size, max_cached_tokens=1024, fuse_weights=fuse)
    assert engine.model.fused == fuse
    seq = engine.start(ids[0, :23].tolist())
    assert rel_err(seq.logits, ref[22]) < 1e-12
    rows = engine.forward([seq], [ids[0, 23:].tolist()], all_logits=True)[0]
    assert rows.shape == (17, 131) and rel_err(rows, ref[23:]) < 1e-12
    # fp32 engine against the float64 HF forward under the tolerance rule (docs/kernels.md §4),
    # the naive baseline being the plain HF forward of the same model in fp32
    model32 = copy.deepcopy(model).float()
    naive = model32(ids).logits[0, 23:].detach()
    engine32 = Engine(model32, page_size=page_size, max_cached_tokens=1024, fuse_weights=fuse)
    s32 = engine32.start(ids[0, :23].tolist())
    rows32 = engine32.forward([s32], [ids[0, 23:].tolist()], all_logits=True)[0]
    assert rows32.dtype == torch.float32
    assert_rule(rows32, ref[23:], naive, "fp32 engine logits")


def test_batched_ragged_forward_equals_one_by_one():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=2048)
    prompts = [torch.randint(0, 131, (n,)).tolist() for n in (3, 11, 1, 8)]
    first = [engine.start(p) for p in prompts]
    alone = [s.logits for s in first]
    for s in first:
        engine.release(s)  # not kept in the radix cache: the batch below computes everything
    seqs = [engine.start(p, compute=False) for p in prompts]
    before = engine.stats.copy()
    together = engine.forward(seqs, [[] for _ in seqs])
    assert (engine.stats - before).tokens_computed == sum(map(len, prompts))
    for a, b in zip(alone, together):
        assert rel_err(b, a) < 1e-12


def test_seeded_sampling_repeatable_and_batch_independent():
    model = tiny_model(dtype=torch.float32)
    p1, p2, p3 = (torch.randint(0, 131, (n,)).tolist() for n in (7, 12, 3))
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    other = SamplingParams(max_new_tokens=6, temperature=1.3, seed=5)
    engine = Engine(model, page_size=4, max_cached_tokens=4096)
    alone = engine.generate([p1], params, n=3)[0]
    fresh = Engine(model, page_size=4, max_cached_tokens=4096).generate([p1], params, n=3)[0]
    again = engine.generate([p1], params, n=3)[0]  # the prompt now comes from the radix cache
    mixed = engine.generate([p2, p1, p3], [other, params, other], n=3)[1]
    model64 = copy.deepcopy(model).double()

    def truncated_logprobs(net, acc, tokens):
        """Log-probs of ``tokens`` after p1 under temperature 0.9, top-k 50, top-p 0.95 (top-k,
        then top-p on the renormalized rest, as Hugging Face), the head in ``acc``."""
        ids = torch.tensor([p1 + tokens])
        with torch.no_grad():
            z = net(ids).logits[0, len(p1) - 1:-1].to(acc) / 0.9
        zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
        zs[:, 50:] = float("-inf")
        p = torch.softmax(zs, -1)
        drop = (p.cumsum(-1) - p) >= 0.95
        drop[:, 0] = False
        lp = torch.log_softmax(zs.masked_fill(drop, float("-inf")), -1)
        rank = (order == torch.tensor(tokens)[:, None]).int().argmax(-1)
        return lp.gather(-1, rank[:, None])[:, 0]

    for a, f, b, c in zip(alone, fresh, again, mixed):
        assert a.tokens == f.tokens and a.logprobs == f.logprobs  # bitwise, same engine state
        # other batch shapes / cache hits change fp32 GEMM rounding only: same tokens, and
        # log-probs each within the tolerance rule of a float64 copy of the model (the naive
        # baseline: the plain fp32 HF forward), within half its bound of each other
        assert a.tokens == b.tokens == c.tokens
        ref = truncated_logprobs(model64, torch.float64, a.tokens)
        naive = truncated_logprobs(model, torch.float32, a.tokens)
        assert ref.dtype == torch.float64 and naive.dtype == torch.float32
        lps = [torch.tensor(x.logprobs, dtype=torch.float32) for x in (a, b, c)]
        for x in lps:
            assert_rule(x, ref, naive, "fp32 engine log-probs")
        for x in lps[1:]:
            assert rel_err(x, lps[0]) <= rule_bound(naive, ref) / 2
        assert all(x < 0 for x in a.logprobs)
    assert len({tuple(c.tokens) for c in alone}) > 1  # the n samples differ
    torch.manual_seed(3)
    u1 = engine.generate([p1], SamplingParams(max_new_tokens=5))[0][0].tokens
    torch.manual_seed(3)
    assert engine.generate([p1], SamplingParams(max_new_tokens=5))[0][0].tokens == u1  # seed=None follows torch's seed


def _truncated_probs(z, temperature, top_k, top_p):
    """float64 oracle of the sampled distribution: temperature, then top-k, then top-p."""
    p = torch.softmax(z.double() / temperature, -1)
    order = torch.sort(p, descending=True, stable=True).indices
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[i] = True
        mass += float(p[i]) / float(p[order[:top_k or len(p)]].sum())
    q = torch.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.5), (1, 1.0), (0, 1e-9)])
def test_top_k_top_p_sample_inside_the_set_with_its_logprobs(top_k, top_p):
    z = torch.randn(3, 64) * 2
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    ref = [_truncated_probs(z[b], 0.8, top_k, top_p) for b in range(3)]
    reps = 400  # each row repeated with its own generator: one batched call
    gens = [torch.Generator().manual_seed(i) for i in range(3 * reps)]
    tok, lp = sample(z.repeat(reps, 1), [params] * (3 * reps), gens)
    counts = torch.zeros(3, 64)
    for i, (t, l) in enumerate(zip(tok.tolist(), lp.tolist())):
        b = i % 3
        assert ref[b][t] > 0, (top_k, top_p, t)
        assert math.isclose(l, math.log(ref[b][t]), rel_tol=1e-5, abs_tol=1e-6)
        counts[b, t] += 1
    for b in range(3):  # the counts fit the truncated distribution (chi-square, p > ALPHA)
        assert chi2_pvalue(counts[b], ref[b]) > ALPHA, (top_k, top_p, b)


def test_fork_reuses_the_prefix_and_stats():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=4096)
    prompt = torch.randint(0, 131, (21,)).tolist()
    seq = engine.start(prompt)
    before = engine.stats.copy()
    kids = [engine.fork(seq) for _ in range(3)]
    logits = engine.forward(kids, [[1], [2], [3]])
    d = engine.stats - before
    assert d.tokens_computed == 3 and d.tokens_cached == 3 * 21  # 0 prefix tokens recomputed
    ref = [engine.start(prompt + [t]).logits for t in (1, 2, 3)]
    for a, b in zip(logits, ref):
        assert rel_err(a, b) < 1e-12
    mid = engine.fork(kids[0], 10)  # inside the computed tokens: only the fork point's token again
    before = engine.stats.copy()
    out = engine.forward([mid], [[]])
    assert (engine.stats - before).tokens_computed == 1
    assert rel_err(out[0], engine.start(prompt[:10]).logits) < 1e-12
    for q in [seq, mid] + kids:
        engine.finish(q)
    # generate: the prompt (now in the radix cache) costs its last token, then n samples fork
    res = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=1.0, seed=0), n=4)
    st = engine.last_stats
    lens = [len(c.tokens) for c in res[0]]
    assert st.tokens_generated == sum(lens) and st.tokens_computed == 1 + sum(n - 1 for n in lens)
    assert st.tokens_cached == 20 + 3 * 21
    assert len({tuple(c.tokens) for c in res[0]}) > 1


def test_truncate_then_forward_equals_never_having_drafted():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=2048)
    prompt = torch.randint(0, 131, (9,)).tolist()
    seq = engine.start(prompt)
    drafts = [4, 8, 15, 16, 23]
    rows = engine.forward([seq], [drafts], all_logits=True)[0]
    assert rows.shape[0] == 5
    engine.truncate(seq, 11)  # keep two drafts
    assert len(seq) == 11 and seq.num_computed == 11
    out = engine.forward([seq], [[42]])[0]
    ref = engine.start(prompt + drafts[:2] + [42]).logits
    assert rel_err(out, ref) < 1e-12
    assert rel_err(rows[1], engine.start(prompt + drafts[:2]).logits) < 1e-12


def test_stop_tokens_strings_and_lengths():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=2048)
    prompt = torch.randint(0, 131, (5,)).tolist()
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    stop = free.tokens[4]
    first = free.tokens.index(stop)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop]))[0][0]
    assert c.tokens == free.tokens[:first + 1] and c.finish_reason == "stop"
    c = engine.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0))[0][0]
    assert c.tokens == free.tokens[:3] and c.finish_reason == "length"
    with pytest.raises(ValueError, match="stop_strings"):
        engine.generate([prompt], SamplingParams(stop_strings=["x"]))


def test_slots_are_returned():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=256)
    free0 = engine.pool.num_free
    for _ in range(6):  # more than the pool holds in total: the radix cache gets evicted
        prompt = torch.randint(0, 131, (30,)).tolist()
        engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), n=3)
    engine.cache.check()
    engine.flush()
    assert engine.pool.num_free == free0 == engine.pool.num_pages


def test_bad_input_names_the_argument():
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=256)
    with pytest.raises(ValueError, match="'tokens' is empty"):
        engine.start([])
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[1, 2, 131]])
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([])
    for kwargs, name in [(dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
                         (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"),
                         (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed=1.5), "seed"),
                         (dict(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="'n'"):
        engine.generate([[1, 2]], n=0)
    seq = engine.start([1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        engine.fork(seq, 4)
    with pytest.raises(ValueError, match="new_tokens"):
        engine.forward([seq], [[1], [2]])
    with pytest.raises(ValueError, match="new_tokens"):
        engine.forward([seq], [[1, 131]])
    with pytest.raises(ValueError, match="tree_mask"):
        engine.forward([seq], [[1, 2]], tree_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="twice"):
        engine.forward([seq, seq], [[1], [2]])
    assert len(seq) == 3  # nothing was appended by the failed calls
    other = Engine(tiny_model(), page_size=4, max_cached_tokens=256)
    with pytest.raises(ValueError, match="live EngineSeq of this engine"):
        other.forward([seq], [[1]])
    engine.finish(seq)
    with pytest.raises(ValueError, match="seq"):
        engine.fork(seq)
    with pytest.raises(ValueError, match="page_size"):
        Engine(tiny_model(), page_size=0)
    with pytest.raises(ValueError, match="model"):
        Engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_type"):
        Engine(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    cfg = tf.LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        Engine(tf.LlamaForCausalLM(cfg))
    mistral = Engine(tf.MistralForCausalLM(tf.MistralConfig(**{**COMMON, "max_position_embeddings": 64}, sliding_window=8)),
                     page_size=4, max_cached_tokens=256)
    mistral.start(list(range(8)))
    with pytest.raises(ValueError, match="sliding window"):
        mistral.start(list(range(9)))


def test_tree_mask_scores_branches_in_one_pass():
    """Tree verification (speculative decoding): two branches after the prompt, [a, b] and [c],
    scored in one pass equal each branch run on its own."""
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=1024)
    prompt = torch.randint(0, 131, (6,)).tolist()
    seq = engine.start(prompt)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)  # a; b after a; c after the prompt
    rows = engine.forward([seq], [[11, 12, 13]], all_logits=True, tree_mask=mask)[0]
    assert rel_err(rows[1], engine.start(prompt + [11, 12]).logits) < 1e-12
    assert rel_err(rows[2], engine.start(prompt + [13]).logits) < 1e-12
    engine.truncate(seq, 6)  # roll back to the prompt, re-feed the accepted path
    assert rel_err(engine.forward([seq], [[11, 12]])[0], rows[1]) < 1e-12


def test_local_path_and_text_prompts(tmp_path):
    from ptcore.train.tiny import CharTokenizer, tiny_config
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_config(max_position_embeddings=128)).eval()
    model.save_pretrained(tmp_path)
    from_path = Engine(tmp_path, tokenizer=tok, page_size=4, max_cached_tokens=512)
    direct = Engine(model, tokenizer=tok, page_size=4, max_cached_tokens=512)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    a = from_path.generate("12+30=", params)[0][0]
    b = direct.generate("12+30=", params)[0][0]
    assert a.tokens == b.tokens and a.text == tok.decode(a.tokens)
    stop = a.text[3:5]
    c = direct.generate("12+30=", SamplingParams(max_new_tokens=12, temperature=0, stop_strings=[stop]))[0][0]
    assert c.finish_reason == "stop" and stop in c.text and stop not in tok.decode(c.tokens[:-1])
    assert c.tokens == a.tokens[:len(c.tokens)]
    with pytest.raises(ValueError, match="model"):
        Engine(tmp_path / "missing")


# -- failures mid-forward: no sequence claims K/V that was never written, nothing leaks ----------

def _fail_on_call(monkeypatch, obj, name, at, exc=KeyboardInterrupt):
    """Makes obj.name raise ``exc`` on its ``at``-th call (1-based), then behave again."""
    real = getattr(obj, name)
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise exc("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, flaky)
    return lambda: monkeypatch.setattr(obj, name, real)


def _idle(engine):
    engine.cache.check()
    assert not engine.cache.running and engine.cache.radix.locks == 0


def test_interrupted_generate_caches_no_unwritten_kv(monkeypatch):
    """A failure at the 2nd layer's write_kv of generate's prefill: the prompt's positions were
    reserved but layer 1 was never written. They must not reach the radix cache (a later start
    reused 9 such tokens and its logits were off by 0.245)."""
    from ptcore import ops
    model = tiny_model()
    prompt = torch.randint(0, 131, (10,)).tolist()
    ref = Engine(model, page_size=4, max_cached_tokens=512).start(prompt).logits
    engine = Engine(model, page_size=4, max_cached_tokens=512)
    restore = _fail_on_call(monkeypatch, ops, "write_kv", 2)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0), n=3)
    restore()
    _idle(engine)
    seq = engine.start(prompt)
    assert rel_err(seq.logits, ref) < 1e-12
    engine.release(seq)
    engine.flush()
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.parametrize("where", ["write_kv", "model"])
def test_failed_forward_rolls_back(monkeypatch, where):
    """After a forward that raised mid-model, the sequence has its old tokens, no K/V past them
    and no stale logits: forward([seq], [[]]) recomputes instead of returning the old logits, and
    a retry appends the new tokens once."""
    from ptcore import ops
    model = tiny_model()
    ids = torch.randint(0, 131, (12,)).tolist()
    ref_engine = Engine(model, page_size=4, max_cached_tokens=512)
    ref5, ref12 = ref_engine.start(ids[:5]).logits, ref_engine.start(ids).logits
    engine = Engine(model, page_size=4, max_cached_tokens=512)
    seq = engine.start(ids[:5])
    restore = (_fail_on_call(monkeypatch, ops, "write_kv", 2, RuntimeError) if where == "write_kv"
               else _fail_on_call(monkeypatch, engine.model, "forward", 1, RuntimeError))
    with pytest.raises(RuntimeError, match="injected"):
        engine.forward([seq], [ids[5:]])
    restore()
    assert seq.tokens == ids[:5] and seq.num_computed <= 5 and seq.logits is None
    engine.cache.check()
    assert rel_err(engine.forward([seq], [[]])[0], ref5) < 1e-12
    assert rel_err(engine.forward([seq], [ids[5:]])[0], ref12) < 1e-12
    assert seq.tokens == ids
    engine.finish(seq)
    _idle(engine)


def test_generate_cachefull_in_a_fork_leaks_nothing():
    """8 pages and n=12: a fork runs out of pages. Every sequence made so far (the forks of the
    group too) is released: no lock, every page back after flush (flush failed forever before)."""
    from ptcore.cache import CacheFull
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=32)
    with pytest.raises(CacheFull):
        engine.generate([torch.randint(0, 131, (6,)).tolist()], SamplingParams(max_new_tokens=3), n=12)
    _idle(engine)
    engine.flush()
    assert engine.pool.num_free == engine.pool.num_pages


def test_start_cachefull_releases_the_sequence():
    from ptcore.cache import CacheFull
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=16)
    with pytest.raises(CacheFull):
        engine.start(torch.randint(0, 131, (40,)).tolist())
    _idle(engine)
    assert engine.pool.num_free == engine.pool.num_pages
    engine.finish(engine.start([1, 2, 3]))  # still usable


def test_forward_cachefull_keeps_tokens_for_a_retry():
    """CacheFull in reserve: the new tokens are not left pending (a retry appended them twice)."""
    from ptcore.cache import CacheFull
    model = tiny_model()
    ids = torch.randint(0, 131, (9,)).tolist()
    engine = Engine(model, page_size=4, max_cached_tokens=16)
    seq = engine.start(ids[:3])
    with pytest.raises(CacheFull):
        engine.forward([seq], [list(range(30))])
    assert seq.tokens == ids[:3] and seq.num_computed == 3 and seq.logits is not None
    out = engine.forward([seq], [ids[3:]])[0]
    assert seq.tokens == ids
    assert rel_err(out, Engine(model, page_size=4, max_cached_tokens=64).start(ids).logits) < 1e-12
    engine.finish(seq)
    _idle(engine)


def test_tree_mask_must_see_itself_and_stay_in_its_sequence():
    """Positions come from row sums: a True past the sequence's own new tokens or a row that does
    not see itself would give wrong positions silently."""
    engine = Engine(tiny_model(), page_size=4, max_cached_tokens=1024)
    a, b = engine.start([1, 2, 3]), engine.start([4, 5])
    ok = torch.tensor([[1, 0], [1, 1], [1, 0]], dtype=torch.bool)  # a: 2 tokens, b: 1
    past = ok.clone()
    past[2, 1] = True  # b has only 1 new token
    blind = ok.clone()
    blind[1, 1] = False
    for mask, msg in ((past, "only 1 new tokens"), (blind, "does not see itself")):
        with pytest.raises(ValueError, match=msg):
            engine.forward([a, b], [[7, 8], [9]], tree_mask=mask)
        assert a.tokens == [1, 2, 3] and b.tokens == [4, 5]
    engine.forward([a, b], [[7, 8], [9]], tree_mask=ok)


def test_without_the_compiled_module_the_engine_raises_a_clear_error(monkeypatch):
    """The engine's paged cache needs ptcore._C (its C++ radix tree; every install builds it):
    without it, Engine and PagedCache raise RuntimeError naming ptcore._C and the reinstall
    command, instead of silently running on a Python model."""
    from ptcore import _ext
    from ptcore.cache import KVPool, PagedCache

    model = tiny_model("llama")
    monkeypatch.setattr(_ext, "cpu_module", lambda: None)
    pattern = r"needs the compiled module ptcore\._C .*pip install -e \. --no-build-isolation"
    with pytest.raises(RuntimeError, match=pattern):
        Engine(model, page_size=4)
    pool = KVPool(num_layers=1, num_pages=4, page_size=4, num_kv_heads=1, head_dim=8)
    with pytest.raises(RuntimeError, match=pattern):
        PagedCache(pool)


# ---- min_new_tokens (Hugging Face's meaning) ----

def _eos_model(eos):
    """The tiny float64 llama with ``eos`` as its EOS token (read by the engine at construction)."""
    model = tiny_model()
    model.generation_config.eos_token_id = eos
    model.config.eos_token_id = eos
    return model


def test_min_new_tokens_greedy_equals_hf_generate():
    """EOS (and the stop tokens) are suppressed until min_new_tokens were generated, exactly as
    HF generate(min_new_tokens=...) does; afterwards they stop generation again."""
    prompt = torch.randint(0, 131, (7,)).tolist()
    free = Engine(tiny_model(), page_size=4, max_cached_tokens=1024).generate(
        [prompt], SamplingParams(max_new_tokens=14, temperature=0))[0][0].tokens
    eos, stop = free[1], free[3]  # greedy would stop at once on either
    model = _eos_model(eos)
    engine = Engine(model, page_size=4, max_cached_tokens=1024)
    assert engine.eos_token_ids == (eos,)
    early = engine.generate([prompt], SamplingParams(max_new_tokens=14, temperature=0))[0][0]
    assert early.tokens == free[:2] and early.finish_reason == "stop"
    ids = torch.tensor([prompt])
    for m in (0, 1, 2, 5, 9, 14):
        c = engine.generate([prompt], SamplingParams(max_new_tokens=14, min_new_tokens=m, temperature=0))[0][0]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, min_new_tokens=m,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert c.tokens == ref, m
        assert len(c.tokens) >= m and eos not in c.tokens[:m]
        assert c.finish_reason == ("stop" if c.tokens[-1] == eos else "length")
        assert c.logprobs == [0.0] * len(c.tokens)
        # a stop token is suppressed alike: HF with both as EOS ids
        c = engine.generate([prompt], SamplingParams(max_new_tokens=14, min_new_tokens=m, temperature=0,
                                                     stop_token_ids=[stop]))[0][0]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, min_new_tokens=m,
                             do_sample=False, pad_token_id=0, eos_token_id=[eos, stop])[0, len(prompt):].tolist()
        assert c.tokens == ref, ("stop", m)
    forced = engine.generate([prompt], SamplingParams(max_new_tokens=9, min_new_tokens=9, temperature=0))[0][0]
    assert len(forced.tokens) == 9 and forced.finish_reason == "length"  # a forced length


def test_min_new_tokens_sampling_logprobs_are_of_the_suppressed_distribution():
    """Sampled tokens never hit EOS / a stop token before min_new_tokens, and each returned log-prob
    is that of the distribution sampled from (the masked, renormalized softmax), checked against
    float64 logits recomputed from scratch."""
    prompt = torch.randint(0, 131, (6,)).tolist()
    probe = Engine(tiny_model(), page_size=4, max_cached_tokens=4096)
    z = probe.start(prompt).logits
    top = torch.sort(z, descending=True).indices.tolist()
    eos, stop = top[0], top[1]  # the two most likely first tokens
    model = _eos_model(eos)
    engine = Engine(model, page_size=4, max_cached_tokens=4096)
    temp = 0.05  # the tiny model's logits are nearly flat: sharpen them so EOS / stop are likely
    params = SamplingParams(max_new_tokens=8, min_new_tokens=5, temperature=temp, seed=3, stop_token_ids=[stop])
    outs = engine.generate([prompt], params, n=12)[0]
    ref = Engine(model, page_size=4, max_cached_tokens=4096, prefix_caching=False)
    for c in outs:
        assert len(c.tokens) >= 5 and not {eos, stop} & set(c.tokens[:5])
        for j, (t, lp) in enumerate(zip(c.tokens, c.logprobs)):
            s = ref.start(prompt + c.tokens[:j])
            logits = s.logits.double() / temp
            ref.release(s)
            if j < 5:
                logits[[eos, stop]] = float("-inf")
            assert math.isclose(lp, float(torch.log_softmax(logits, -1)[t]), rel_tol=1e-6, abs_tol=1e-9), (j, t)
    unmasked = torch.softmax(z.double() / temp, -1)
    assert float(unmasked[eos] + unmasked[stop]) > 0.3  # the suppression mattered
    # the same engine and seed without min_new_tokens stops early at least once in 12 samples
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=temp, seed=3,
                                                    stop_token_ids=[stop]), n=12)[0]
    assert any(len(c.tokens) < 5 for c in free)


def test_min_new_tokens_validation():
    for value, why in [(-1, ">= 0"), (1.5, ">= 0"), (True, ">= 0"), ("2", ">= 0"), (17, "<= max_new_tokens")]:
        with pytest.raises(ValueError, match=f"'min_new_tokens'.*{why}"):
            SamplingParams(max_new_tokens=16, min_new_tokens=value)
    assert SamplingParams(max_new_tokens=3, min_new_tokens=3).min_new_tokens == 3
    assert SamplingParams().min_new_tokens == 0


def test_default_page_size_is_16_off_flash_attn():
    from ptcore.engine.engine import default_page_size
    engine = Engine(tiny_model(), max_cached_tokens=256)
    assert engine.page_size == 16 == default_page_size(torch.device("cpu"), torch.float64)
    assert default_page_size(torch.device("cpu"), torch.float16) == 16
