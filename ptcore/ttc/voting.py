"""Strategies over N independent samples of one prompt (the prompt is encoded once, the N samples
fork from it): best-of-N, weighted best-of-N, self-consistency. Definitions: docs/ttc.md §3."""
from __future__ import annotations

from collections import Counter

from ptcore.engine import Engine, SamplingParams
from ptcore.ttc.tree import Scorer, Search, SearchResult, last_number


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ttc: 'n' must be an int >= 1, got {n!r}")


def _sample(s: Search, n: int):
    return s.expand([s.root], n)[0]


def best_of_n(engine: Engine, prompt, scorer: Scorer, *, n: int = 16,
              params: SamplingParams = SamplingParams(max_new_tokens=64)) -> SearchResult:
    """Samples ``n`` completions and returns the one ``scorer`` ranks highest (the first of equal
    scores)."""
    _check_n(n)
    with Search(engine, prompt, scorer, params) as s:
        nodes = _sample(s, n)
        scores = s.score(nodes)
        best = max(range(n), key=lambda i: (scores[i], -i))
        res = s.result(nodes[best], nodes)
    return res


def weighted_best_of_n(engine: Engine, prompt, scorer: Scorer, *, n: int = 16,
                       params: SamplingParams = SamplingParams(max_new_tokens=64),
                       extract_answer=last_number) -> SearchResult:
    """Samples ``n`` completions, groups them by extracted answer, sums the scores per answer and
    returns the answer with the largest sum (with its best-scored completion). ``info["totals"]``:
    answer -> summed score. Completions without an answer (None) do not vote."""
    _check_n(n)
    with Search(engine, prompt, scorer, params) as s:
        nodes = _sample(s, n)
        scores = s.score(nodes)
        answers = [extract_answer(s.candidate(x)) for x in nodes]
        totals: dict = {}
        for a, v in zip(answers, scores):
            if a is not None:
                totals[a] = totals.get(a, 0.0) + v
        if totals:
            answer = max(totals, key=lambda a: totals[a])  # first answer reaching the max wins ties
            pick = max((i for i in range(n) if answers[i] == answer), key=lambda i: (scores[i], -i))
        else:
            answer, pick = None, max(range(n), key=lambda i: (scores[i], -i))
        res = s.result(nodes[pick], nodes, answer, {"totals": totals, "answers": answers})
    return res


def self_consistency(engine: Engine, prompt, *, n: int = 16,
                     params: SamplingParams = SamplingParams(max_new_tokens=64),
                     extract_answer=last_number) -> SearchResult:
    """Majority vote: samples ``n`` completions and returns the most frequent extracted answer
    (ties: the answer seen first), with the first completion giving it. ``info["votes"]``:
    answer -> count. No scorer."""
    _check_n(n)
    with Search(engine, prompt, None, params) as s:
        nodes = _sample(s, n)
        answers = [extract_answer(s.candidate(x)) for x in nodes]
        votes = Counter(a for a in answers if a is not None)
        if votes:
            top = max(votes.values())
            answer = next(a for a in answers if a is not None and votes[a] == top)
            pick = answers.index(answer)
        else:
            answer, pick = None, 0
        res = s.result(nodes[pick], nodes, answer, {"votes": dict(votes), "answers": answers})
    return res
