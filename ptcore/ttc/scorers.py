"""Scorers: callables ``list[Candidate] -> list[float]`` (higher is better).

:class:`RewardModelScorer` runs a reward model on its own :class:`~ptcore.engine.Engine`: each
candidate is scored from the logits after ``prompt + completion (+ suffix)``; the engine's radix
cache keeps what it encoded, so scoring many continuations of one prefix encodes that prefix
once, and a step-level (PRM) score of a partial solution reuses its parent's keys/values.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ptcore.engine import Engine
from ptcore.ttc.tree import Candidate


def from_text(fn: Callable[[str, str], float]):
    """A scorer from ``fn(prompt_text, completion_text) -> float`` (the engine needs a tokenizer)."""
    def score(candidates: list[Candidate]) -> list[float]:
        return [float(fn(c.prompt_text, c.text)) for c in candidates]
    return score


def from_tokens(fn: Callable[[list[int], list[int]], float]):
    """A scorer from ``fn(prompt_tokens, completion_tokens) -> float``."""
    def score(candidates: list[Candidate]) -> list[float]:
        return [float(fn(c.prompt, c.tokens)) for c in candidates]
    return score


class RewardModelScorer:
    """Scores candidates with a causal LM reward model on ``engine`` (its own KV cache).

    The score of a token sequence is ``score_fn(logits)`` of the next-token logits after it; by
    default (Math-Shepherd-style PRMs) ``p(positive) / (p(positive) + p(negative))`` for the two
    given token ids. ``suffix`` (token ids, e.g. a step tag) is appended before scoring.
    ``aggregate`` turns the scores of a candidate's step prefixes into one value: "last" (the
    score of the whole candidate, one position), "min" or "prod" over its steps (each step prefix
    is scored once and memoized, so ancestors scored earlier cost nothing). ``retokenize``: score
    ``engine.encode(prompt_text + text)`` instead of the policy's token ids (a reward model with a
    different tokenizer).
    """

    def __init__(self, engine: Engine, *, positive_token_id: int | None = None,
                 negative_token_id: int | None = None, score_fn: Callable[[torch.Tensor], float] | None = None,
                 suffix=(), aggregate: str = "last", retokenize: bool = False):
        if not isinstance(engine, Engine):
            raise ValueError(f"RewardModelScorer: 'engine' must be an Engine, got {type(engine).__name__}")
        if score_fn is None:
            for name, t in (("positive_token_id", positive_token_id), ("negative_token_id", negative_token_id)):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < engine.vocab_size:
                    raise ValueError(f"RewardModelScorer: '{name}' must be a token id in [0, {engine.vocab_size}) "
                                     f"when no 'score_fn' is given, got {t!r}")
        if aggregate not in ("last", "min", "prod"):
            raise ValueError(f"RewardModelScorer: 'aggregate' must be 'last', 'min' or 'prod', got {aggregate!r}")
        if retokenize and aggregate != "last":
            raise ValueError("RewardModelScorer: 'retokenize' supports aggregate='last' only")
        if retokenize and engine.tokenizer is None:
            raise ValueError("RewardModelScorer: 'retokenize' needs the reward engine's tokenizer")
        self.engine = engine
        self.pos, self.neg = positive_token_id, negative_token_id
        self.score_fn = score_fn
        self.suffix = engine._check_tokens("suffix", list(suffix), allow_empty=True)
        self.aggregate = aggregate
        self.retokenize = retokenize
        self.memo: dict[tuple, float] = {}

    def _value(self, logits: torch.Tensor) -> float:
        if self.score_fn is not None:
            return float(self.score_fn(logits))
        two = torch.stack([logits[self.pos], logits[self.neg]]).double()
        return float(torch.softmax(two, 0)[0])

    def _sequences(self, c: Candidate) -> list[list[int]]:
        """Token sequences to score for one candidate (one per step prefix unless 'last')."""
        if self.retokenize:
            if c.text is None or c.prompt_text is None:
                raise ValueError("RewardModelScorer: 'retokenize' needs candidates with text (a policy tokenizer)")
            return [self.engine.encode(c.prompt_text + c.text) + self.suffix]
        if self.aggregate == "last" or not c.steps:
            return [c.prompt + c.tokens + self.suffix]
        out, acc = [], list(c.prompt)
        for step in c.steps:
            acc = acc + step
            out.append(acc + self.suffix)
        return out

    def score_tokens(self, sequences: list[list[int]]) -> list[float]:
        """Scores of token sequences (memoized). The longest common prefix of the batch is encoded
        first, once, so the batch's sequences all find it in the radix cache."""
        todo = [t for t in dict.fromkeys(tuple(s) for s in sequences) if t not in self.memo]
        if todo:
            eng = self.engine
            if len(todo) > 1:
                lcp = list(_common_prefix(todo))
                if len(lcp) > 1 and eng.cache.radix.match_prefix(lcp).length < len(lcp):
                    eng.finish(eng.start(lcp))
            seqs = []
            try:
                for t in todo:  # appended one by one: a later start may raise (bad id, CacheFull)
                    seqs.append(eng.start(list(t), compute=False))
                logits = eng.forward(seqs, [[] for _ in seqs])
            except BaseException:
                for q in seqs:  # their keys/values may be unwritten: never cache them
                    eng.release(q)
                raise
            for q in seqs:
                eng.finish(q)
            for t, row in zip(todo, logits):
                self.memo[t] = self._value(row)
        return [self.memo[tuple(s)] for s in sequences]

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        per = [self._sequences(c) for c in candidates]
        flat = self.score_tokens([s for group in per for s in group])
        out, i = [], 0
        for group in per:
            vals = flat[i:i + len(group)]
            i += len(group)
            if self.aggregate == "min":
                out.append(min(vals))
            elif self.aggregate == "prod":
                out.append(math.prod(vals))
            else:
                out.append(vals[-1])
        return out


def _common_prefix(seqs) -> tuple:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        m = min(n, len(s))
        i = 0
        while i < m and s[i] == first[i]:
            i += 1
        n = i
    return first[:n]
