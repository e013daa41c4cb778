"""ptcore.ttc.speculative_generate on the engine: greedy speculative decoding equals the target's
own greedy decoding token for token with both drafters; sampled output follows the target's
distribution (chi-square at a fixed seed); seeded runs repeat; rejected drafts leave both caches
(no page leaks); acceptance statistics; bad input."""
import pytest
import torch
import transformers as tf

from ptcore.engine import Engine, SamplingParams
from ptcore.ttc.speculative import DraftModelDrafter, NGramDrafter, speculative_generate
from tests.test_speculative_verify import ALPHA, chi2_pvalue

V = 24


def model(seed, *, layers=2, hidden=32, peak=25.0):
    """A tiny random float64 Llama over V tokens, its head scaled so distributions are peaked."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    m = tf.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(peak)
    return m


@pytest.fixture(scope="module")
def engines():
    target = Engine(model(0), page_size=4, max_cached_tokens=32768)
    draft = Engine(model(1, layers=1, hidden=16), page_size=4, max_cached_tokens=32768)
    same = Engine(model(0), page_size=4, max_cached_tokens=32768)  # the target's twin: always accepted
    return target, draft, same


PROMPTS = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [1, 2], [7], [8, 9, 10, 11, 12, 8, 9, 10]]


@pytest.mark.parametrize("drafter_kind", ["ngram", "draft model", "twin"])
@pytest.mark.parametrize("K", [1, 4])
def test_greedy_equals_plain_greedy(engines, drafter_kind, K):
    target, draft, same = engines
    sp = SamplingParams(max_new_tokens=19, temperature=0)
    plain = [c[0].tokens for c in target.generate(PROMPTS, sp)]
    drafter = {"ngram": NGramDrafter(), "draft model": DraftModelDrafter(draft), "twin": DraftModelDrafter(same)}[drafter_kind]
    res = speculative_generate(target, drafter, PROMPTS, num_draft_tokens=K, params=sp)
    assert [c.tokens for c in res.completions] == plain
    assert all(c.finish_reason == "length" and c.logprobs == [0.0] * 19 for c in res.completions)
    st = res.stats
    assert st.emitted == st.accepted + st.sequence_rounds == 4 * 19 + (st.emitted - 4 * 19)
    assert 0 <= st.acceptance_rate <= 1 and st.drafted > 0
    if drafter_kind == "twin":  # every draft is accepted: K+1 tokens per round but the last
        assert st.acceptance_rate == 1.0
        assert st.sequence_rounds == 4 * -(-19 // (K + 1))
    for eng in (target, draft, same):
        eng.cache.check()  # rolled-back drafts left no page behind
        assert not eng.cache.running


@pytest.mark.parametrize("drafter_kind", ["draft model", "ngram"])
def test_sampled_output_follows_the_target(engines, drafter_kind):
    """First two tokens of 1000 seeded samples vs the target's exact distributions, with sampled
    drafts (the draft model) and deterministic ones (n-gram lookup in a repetitive prompt)."""
    target, draft, _ = engines
    prompt = [5, 6, 7] if drafter_kind == "draft model" else [5, 6, 7, 9, 5, 6, 7, 9, 5, 6]
    N = 1000
    sp = SamplingParams(max_new_tokens=2, temperature=1.0, seed=100)
    drafter = DraftModelDrafter(draft) if drafter_kind == "draft model" else NGramDrafter()
    res = speculative_generate(target, drafter, [prompt] * N, num_draft_tokens=2, params=sp)
    toks = torch.tensor([c.tokens for c in res.completions])
    assert 0.02 < res.stats.acceptance_rate < 0.98, res.stats.acceptance_rate  # both paths are exercised
    hf = target.hf_model
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        p2 = torch.softmax(hf(torch.tensor([prompt + [t] for t in range(V)])).logits[:, -1], -1)  # row t1
    assert chi2_pvalue(torch.bincount(toks[:, 0], minlength=V), p1) > ALPHA
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((toks[:, 0], toks[:, 1]), torch.ones(N, dtype=torch.float64), accumulate=True)
    assert chi2_pvalue(counts, p2 * counts.sum(1, keepdim=True)) > ALPHA
    # the log-probs are the target's
    c = res.completions[0]
    assert abs(c.logprobs[0] - float(p1[c.tokens[0]].log())) < 1e-9


def test_seeded_runs_repeat(engines):
    target, draft, _ = engines
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=10, seed=7)
    runs = [[c.tokens for c in speculative_generate(target, d, PROMPTS, num_draft_tokens=3, params=sp).completions]
            for d in (DraftModelDrafter(draft), DraftModelDrafter(draft), NGramDrafter())]
    assert runs[0] == runs[1]
    other = speculative_generate(target, DraftModelDrafter(draft), PROMPTS, num_draft_tokens=3,
                                 params=SamplingParams(max_new_tokens=12, temperature=0.8, top_k=10, seed=8))
    assert [c.tokens for c in other.completions] != runs[0]


def test_ngram_lookup():
    d = NGramDrafter(max_ngram=3)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert d.lookup([1, 2, 3, 4, 5], 2) == []
    assert d.lookup([7, 8, 7], 4) == [8, 7]  # 1-gram fallback


def test_bad_input(engines):
    target, draft, _ = engines
    with pytest.raises(ValueError, match="'num_draft_tokens'"):
        speculative_generate(target, NGramDrafter(), PROMPTS, num_draft_tokens=-1)
    with pytest.raises(TypeError, match="'drafter'"):
        speculative_generate(target, object(), PROMPTS)
    with pytest.raises(ValueError, match="'prompts"):
        speculative_generate(target, NGramDrafter(), [[V + 3]])
    with pytest.raises(ValueError, match="'min_ngram'"):
        NGramDrafter(max_ngram=1, min_ngram=2)


def test_a_failing_drafter_leaves_no_sequence_and_caches_nothing(engines):
    """An error mid-decoding (here the drafter's) ends every sequence without putting its
    never-verified tail into the radix cache."""
    target = engines[0]

    class Failing(NGramDrafter):
        calls = 0

        def propose(self, *args):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("drafter failed")
            return super().propose(*args)

    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    cached_before = target.cache.radix.cached_tokens
    with pytest.raises(RuntimeError, match="drafter failed"):
        speculative_generate(target, Failing(), [prompt, prompt[::-1]], num_draft_tokens=3,
                             params=SamplingParams(max_new_tokens=20, temperature=0))
    assert not target.cache.running
    assert target.cache.radix.cached_tokens == cached_before
    target.cache.check()


@pytest.mark.parametrize("drafter_kind", ["ngram", "draft model"])
def test_min_new_tokens_equals_the_engine(engines, drafter_kind):
    """min_new_tokens: the stop tokens are suppressed in the target until then (a drafted stop
    token is rejected); greedy output equals Engine.generate's (which equals HF's, test_engine),
    sampled output never stops early and its log-probs are those of the suppressed distribution."""
    target, draft, _ = engines
    free = [c[0].tokens for c in target.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))]
    stop = free[0][1]
    early = target.generate(PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop]))
    assert len(early[0][0].tokens) == free[0].index(stop) + 1 <= 2  # it would stop at once
    drafter = NGramDrafter() if drafter_kind == "ngram" else DraftModelDrafter(draft)
    sp = SamplingParams(max_new_tokens=12, min_new_tokens=8, temperature=0, stop_token_ids=[stop])
    plain = [c[0].tokens for c in target.generate(PROMPTS, sp)]
    assert all(len(t) >= 8 and stop not in t[:8] for t in plain)
    res = speculative_generate(target, drafter, PROMPTS, num_draft_tokens=4, params=sp)
    assert [c.tokens for c in res.completions] == plain
    sp = SamplingParams(max_new_tokens=12, min_new_tokens=8, temperature=1.0, seed=3, stop_token_ids=[stop])
    res = speculative_generate(target, drafter, PROMPTS * 3, num_draft_tokens=4, params=sp)
    for c in res.completions:
        assert len(c.tokens) >= 8 and stop not in c.tokens[:8] and all(lp <= 0 for lp in c.logprobs)
    prompt = (PROMPTS * 3)[0]
    c = res.completions[0]
    for j, (t, lp) in enumerate(zip(c.tokens, c.logprobs)):
        s = target.start(prompt + c.tokens[:j])
        assert s.logits.dtype == torch.float64
        z = s.logits.clone()
        target.release(s)
        if j < 8:
            z[stop] = float("-inf")
        # float64 against float64: the engine runs this float64 model in float64 (its logits and
        # sampling_probs stay float64), so the bound is float64 rounding's, as for the first token
        # in test_sampled_output_follows_the_target (the verify forward and this prefill differ in shape)
        assert abs(lp - float(torch.log_softmax(z, -1)[t])) < 1e-9, (j, lp - float(torch.log_softmax(z, -1)[t]))
    for eng in (target, draft):
        eng.cache.check()
        assert not eng.cache.running
