"""ptcore.ttc strategies on a tiny random model with deterministic toy scorers: each does what its
definition says (docs/ttc.md §3), prefix reuse is exact (tokens computed == tree tokens), the
reward-model scorer reuses its own KV cache, seeded searches repeat."""
import copy
from collections import Counter

import pytest
import torch
import transformers as tf

from ptcore import ttc
from ptcore.engine import Engine, SamplingParams
from tests.reference import assert_rule, rel_err, rule_bound

V = 512
DIGIT = 7  # the toy scorers count this token


def engine(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=3, bos_token_id=None)
    model = tf.LlamaForCausalLM(cfg).eval()  # near-uniform next tokens: siblings rarely share one
    return Engine(model, **{"page_size": 4, "max_cached_tokens": 16384, **kw})


def hf_logits(model, tokens, dtype):
    """Next-token logits of a plain HF forward of ``model`` in ``dtype``: float64 for the oracle,
    float32 for the naive baseline of the tolerance rule (tests/reference.py)."""
    with torch.no_grad():
        return copy.deepcopy(model).to(dtype)(torch.tensor([tokens])).logits[0, -1]


def hf_prob(model, tokens, pos, neg, dtype):
    """The reward-model score P(pos | pos or neg) from a plain HF forward, computed in ``dtype``."""
    return torch.softmax(hf_logits(model, tokens, dtype)[[pos, neg]], 0)[0]


def assert_score(score, model, tokens, pos, neg, what="score"):
    """An fp32 engine's score against the float64 HF forward under the tolerance rule."""
    ref, naive = (hf_prob(model, tokens, pos, neg, dt) for dt in (torch.float64, torch.float32))
    assert_rule(torch.tensor(score, dtype=torch.float64), ref, naive, what, dtype=torch.float32)


def assert_logits_agree(got, other, model, tokens):
    """Two fp32 engines' next-token logits: each within the tolerance rule of the float64 HF forward,
    and from each other by at most half the rule's bound."""
    ref, naive = hf_logits(model, tokens, torch.float64), hf_logits(model, tokens, torch.float32)
    assert_rule(got, ref, naive, "logits")
    assert_rule(other, ref, naive, "fresh engine logits")
    assert rel_err(got, other) <= rule_bound(naive, ref) / 2


def count_digit(candidates):
    return [float(c.tokens.count(DIGIT)) + 0.01 * (c.tokens[-1] % 10 if c.tokens else 0) for c in candidates]


PROMPT = list(range(10, 40))
STEP = SamplingParams(max_new_tokens=6, temperature=1.5, seed=1, stop_token_ids=(5,))


def test_best_of_n_picks_the_top_score_and_reuse_is_exact():
    eng = engine()
    r = ttc.best_of_n(eng, PROMPT, count_digit, n=8, params=SamplingParams(max_new_tokens=8, temperature=2.0, seed=4))
    assert len(r.candidates) == 8
    assert r.scores == count_digit(r.candidates)
    best = max(range(8), key=lambda i: (r.scores[i], -i))
    assert r.tokens == r.candidates[best].tokens and r.score == r.scores[best]
    assert r.stats.tokens_computed == r.stats.tree_tokens and r.stats.reuse_ratio == 1.0
    assert r.stats.tokens_cached == 8 * len(PROMPT)  # each fork shares the prompt


def test_weighted_best_of_n_sums_scores_per_answer():
    eng = engine()
    r = ttc.weighted_best_of_n(eng, PROMPT, count_digit, n=12, extract_answer=lambda c: c.tokens[0] % 3,
                               params=SamplingParams(max_new_tokens=4, temperature=2.0, seed=2))
    totals = {}
    for c, s in zip(r.candidates, r.scores):
        totals[c.tokens[0] % 3] = totals.get(c.tokens[0] % 3, 0.0) + s
    assert r.info["totals"] == pytest.approx(totals)
    assert r.answer == max(totals, key=totals.get)
    same = [s for c, s in zip(r.candidates, r.scores) if c.tokens[0] % 3 == r.answer]
    assert r.score == max(same) and r.tokens[0] % 3 == r.answer


def test_self_consistency_is_the_mode():
    eng = engine()
    r = ttc.self_consistency(eng, PROMPT, n=16, extract_answer=lambda c: c.tokens[0] % 4,
                             params=SamplingParams(max_new_tokens=3, temperature=2.0, seed=3))
    votes = Counter(c.tokens[0] % 4 for c in r.candidates)
    assert r.info["votes"] == dict(votes)
    assert votes[r.answer] == max(votes.values()) and len(votes) > 1


def test_beam_search_keeps_the_top_beams_by_score():
    eng = engine()
    r = ttc.beam_search(eng, PROMPT, count_digit, num_beams=2, expansions=3, max_steps=4, step_params=STEP)
    hist = r.info["history"]
    assert len(hist[0]["scores"]) == 6
    for h in hist:
        live = [i for i, f in enumerate(h["finished"]) if not f]
        assert len(h["kept"]) == min(2, len(live))
        kept_scores = [h["scores"][i] for i in h["kept"]]
        others = [h["scores"][i] for i in live if i not in h["kept"]]
        assert not others or min(kept_scores) >= max(others)
    for h, nxt in zip(hist, hist[1:]):
        assert len(nxt["scores"]) == 3 * len(h["kept"])  # each kept beam expanded M times
    assert r.score == max(r.scores)
    assert r.stats.reuse_ratio == 1.0


def test_dvts_keeps_one_best_child_per_tree():
    eng = engine()
    r = ttc.dvts(eng, PROMPT, count_digit, num_trees=3, expansions=2, max_steps=3, step_params=STEP)
    assert len(r.candidates) == 3 and len(r.info["paths"]) == 3
    for step in r.info["history"]:
        for t, h in step.items():
            assert len(h["scores"]) == 2 and h["scores"][h["kept"]] == max(h["scores"])
    assert len(r.info["history"][0]) == 3  # every tree expands the root on its own: 6 first steps
    for t, path in enumerate(r.info["paths"]):
        assert path == [step[t]["scores"][step[t]["kept"]] for step in r.info["history"] if t in step]
    assert r.score == max(r.scores)
    assert r.stats.reuse_ratio == 1.0


def test_mcts_visit_counts_and_answer():
    eng = engine()
    sims = 24
    r = ttc.mcts(eng, PROMPT, count_digit, num_simulations=sims, expansions=3, max_steps=4, step_params=STEP)
    root = r.info["root"]
    assert root.visits == sims and sum(r.info["root_visits"]) == sims

    def check(node):  # every visit below a node passed through exactly one child
        if node.children:
            kids = sum(c.visits for c in node.children)
            assert node.visits - kids in (0, 1) if node is not root else node.visits == kids
            for c in node.children:
                assert c.value is not None and c.visits >= 0
                check(c)
    check(root)
    node = root  # the answer follows the most visited children
    while node.children:
        node = max(node.children, key=lambda ch: (ch.visits, ch.value_sum / max(1, ch.visits)))
    assert r.tokens == node.tokens
    assert r.info["expanded_nodes"] >= 2
    assert r.stats.reuse_ratio == 1.0


def test_seeded_search_repeats():
    a = ttc.beam_search(engine(), PROMPT, count_digit, num_beams=2, expansions=2, max_steps=3, step_params=STEP)
    b = ttc.beam_search(engine(), PROMPT, count_digit, num_beams=2, expansions=2, max_steps=3, step_params=STEP)
    assert a.tokens == b.tokens and a.scores == b.scores


def test_reward_model_scorer_reuses_its_cache():
    policy = engine(0)
    rm = engine(1)
    scorer = ttc.RewardModelScorer(rm, positive_token_id=DIGIT, negative_token_id=8, aggregate="min")
    r = ttc.beam_search(policy, PROMPT, scorer, num_beams=2, expansions=2, max_steps=3, step_params=STEP)
    # scores equal a from-scratch HF forward of prompt + steps so far (min over step prefixes)
    for c, s in zip(r.candidates, r.scores):
        vals64, vals32 = [], []
        acc = list(PROMPT)
        for step in c.steps:
            acc = acc + step
            vals64.append(hf_prob(rm.hf_model, acc, DIGIT, 8, torch.float64))
            vals32.append(hf_prob(rm.hf_model, acc, DIGIT, 8, torch.float32))
        assert_rule(torch.tensor(s, dtype=torch.float64), min(vals64), min(vals32), "min score", dtype=torch.float32)
    st = r.stats
    assert st.scorer_tokens_computed <= st.scorer_tree_tokens + st.scorer_calls  # at most a token per call again
    assert st.scorer_tree_tokens > len(PROMPT)


def test_bad_input():
    eng = engine()
    with pytest.raises(ValueError, match="'n'"):
        ttc.best_of_n(eng, PROMPT, count_digit, n=0)
    with pytest.raises(ValueError, match="num_beams"):
        ttc.beam_search(eng, PROMPT, count_digit, num_beams=0)
    with pytest.raises(ValueError, match="scorer"):
        ttc.mcts(eng, PROMPT, "not callable")
    with pytest.raises(ValueError, match="prompt"):
        ttc.best_of_n(eng, [], count_digit)
    with pytest.raises(ValueError, match="engine"):
        ttc.best_of_n(object(), PROMPT, count_digit)
    with pytest.raises(ValueError, match="positive_token_id"):
        ttc.RewardModelScorer(eng, positive_token_id=V, negative_token_id=0)
    with pytest.raises(ValueError, match="scores"):
        ttc.best_of_n(eng, PROMPT, lambda cs: [0.0], n=2)
    with pytest.raises(ValueError, match="NaN for candidate 1"):
        ttc.best_of_n(eng, PROMPT, lambda cs: [0.0, float("nan")], n=2)
    assert eng.cache.running == []


def test_seeded_search_repeats_across_processes():
    """Seeds derive from ints only (Python's str hashing changes per process)."""
    import os
    import subprocess
    import sys
    code = ("from tests.test_ttc import *; r = ttc.mcts(engine(), PROMPT, count_digit, num_simulations=6, "
            "expansions=2, max_steps=3, step_params=STEP); print(r.tokens)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}  # this process: a random one
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=root).stdout
    here = ttc.mcts(engine(), PROMPT, count_digit, num_simulations=6, expansions=2, max_steps=3, step_params=STEP)
    assert out == f"{here.tokens}\n"


def test_last_number_and_text_scorers():
    from ptcore.train.tiny import CharTokenizer
    tok = CharTokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=None)
    policy = Engine(tf.LlamaForCausalLM(cfg).eval(), tokenizer=tok, page_size=4, max_cached_tokens=4096)
    rm = Engine(tf.LlamaForCausalLM(cfg).eval(), tokenizer=tok, page_size=4, max_cached_tokens=4096)
    assert ttc.last_number(ttc.Candidate([], [], [], text="a 12 then -3.5 end")) == "-3.5"
    assert ttc.last_number(ttc.Candidate([], [], [], text="none")) is None
    length = ttc.from_text(lambda prompt, text: -abs(len(text) - 3))
    r = ttc.best_of_n(policy, "7+8=", length, n=4, params=SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert r.text == tok.decode(r.tokens) and r.score == max(r.scores)
    pos, neg = tok.encode("1", add_special_tokens=False)[0], tok.encode("0", add_special_tokens=False)[0]
    scorer = ttc.RewardModelScorer(rm, positive_token_id=pos, negative_token_id=neg, retokenize=True)
    scores = scorer(r.candidates)
    for c, s in zip(r.candidates, scores):  # the reward model reads the text through its own tokenizer
        assert_score(s, rm.hf_model, tok.encode(c.prompt_text + c.text), pos, neg)


def _no_running(eng):
    """Every sequence ended and every page accounted for (PagedCache.check)."""
    assert eng.cache.running == [] and eng.cache.radix.locks == 0
    eng.cache.check()


def test_no_sequence_leaks_after_a_search():
    eng = engine()
    ttc.best_of_n(eng, PROMPT, count_digit, n=3, params=SamplingParams(max_new_tokens=3, seed=0))
    ttc.dvts(eng, PROMPT, count_digit, num_trees=2, expansions=2, max_steps=2, step_params=STEP)
    ttc.mcts(eng, PROMPT, count_digit, num_simulations=4, expansions=2, max_steps=2, step_params=STEP)
    _no_running(eng)
    eng.flush()  # possible only when nothing is running
    assert eng.pool.num_free == eng.pool.num_pages


def test_cache_full_mid_expansion_leaks_nothing_and_caches_nothing_unwritten():
    """A pool too small for the N forks: CacheFull surfaces, every sequence the search made is
    released (not cached: an interrupted search may hold unwritten KV), the engine stays usable."""
    eng = engine(page_size=4, max_cached_tokens=48)  # 12 pages; the prompt takes 8, each fork copies 1
    prompt = PROMPT[:30]  # ends inside a page: every fork copies that page
    with pytest.raises(RuntimeError, match="KV cache full"):
        ttc.best_of_n(eng, prompt, count_digit, n=8, params=SamplingParams(max_new_tokens=2, seed=0))
    _no_running(eng)
    assert eng.cache.radix.cached_tokens <= len(prompt)  # at most the computed prompt (forks share it)
    seq = eng.start(prompt)  # what was cached is right: the logits of a fresh engine (fp32 rounding)
    fresh = engine().start(prompt).logits
    assert seq.handle.cached_len > 0
    assert_logits_agree(seq.logits, fresh, eng.hf_model, prompt)
    eng.release(seq)
    r = ttc.best_of_n(eng, prompt[:9], count_digit, n=2, params=SamplingParams(max_new_tokens=2, seed=0))
    assert len(r.candidates) == 2
    _no_running(eng)


def test_failing_scorer_releases_the_search():
    eng = engine()

    def broken(candidates):
        raise KeyError("scorer failed")
    with pytest.raises(KeyError, match="scorer failed"):
        ttc.beam_search(eng, PROMPT, broken, num_beams=2, expansions=2, max_steps=2, step_params=STEP)
    _no_running(eng)
    assert eng._recordings == []  # the search stopped recording


def test_reward_model_scorer_bad_token_leaks_nothing():
    """Candidate ids outside the reward model's vocabulary: a clear error, no sequence left."""
    rm = engine(1)
    scorer = ttc.RewardModelScorer(rm, positive_token_id=DIGIT, negative_token_id=8)
    good = ttc.Candidate(PROMPT, [1, 2], [[1, 2]])
    bad = ttc.Candidate(PROMPT, [1, V + 5], [[1, V + 5]])
    with pytest.raises(ValueError, match="outside"):
        scorer([good, bad])
    _no_running(rm)
    # afterwards the scorer still scores right: a plain HF forward
    assert_score(scorer([good])[0], rm.hf_model, PROMPT + [1, 2], DIGIT, 8)
    assert_score(scorer([good])[0], rm.hf_model, PROMPT + [1, 2], DIGIT, 8, "again, from its cache")
    _no_running(rm)


def test_interrupted_search_caches_no_unwritten_kv(monkeypatch):
    """Ctrl-C in the middle of a decode step (here: the 2nd layer's K/V write) leaves positions
    without keys/values: the search must not hand them to the radix cache, or the next search
    sharing the prefix would silently read garbage. Afterwards the same search gives what a fresh
    engine gives."""
    import ptcore.engine.engine as engine_module
    eng = engine()
    params = SamplingParams(max_new_tokens=4, seed=5)
    write_kv, calls = engine_module.ops.write_kv, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # prompt (2 layers), one decode step (2), then inside the next step
            raise KeyboardInterrupt
        return write_kv(*args, **kwargs)
    monkeypatch.setattr(engine_module.ops, "write_kv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ttc.best_of_n(eng, PROMPT, count_digit, n=3, params=params)
    monkeypatch.setattr(engine_module.ops, "write_kv", write_kv)
    _no_running(eng)
    fresh = engine()
    want = ttc.best_of_n(fresh, PROMPT, count_digit, n=3, params=params)
    for c in want.candidates:  # the two steps the interrupted search got into, then one more token
        tokens = PROMPT + c.tokens[:2] + [1]
        got, ref = eng.start(tokens), fresh.start(tokens)
        assert_logits_agree(got.logits, ref.logits, eng.hf_model, tokens)
        eng.release(got)
        fresh.release(ref)
    again = ttc.best_of_n(eng, PROMPT, count_digit, n=3, params=params)
    assert [c.tokens for c in again.candidates] == [c.tokens for c in want.candidates]
