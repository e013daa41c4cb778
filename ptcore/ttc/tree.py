"""What every search strategy shares: candidates as scorers see them, search nodes over engine
sequences, batched expansion by sampling steps, and the result / statistics objects.

Token accounting: ``tokens_computed`` counts the positions the policy engine ran through the model
during the search; ``tree_tokens`` the distinct token prefixes whose keys/values the search needed
(every token of the tree except the last sampled token of each leaf, which is never fed back).
``reuse_ratio = tokens_computed / tree_tokens`` is 1.0 when no position was encoded twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ptcore.engine import Engine, EngineSeq, SamplingParams


@dataclass
class Candidate:
    """A (partial) solution as scorers and answer extractors see it.

    prompt: prompt token ids; tokens: the completion's token ids; steps: the completion split into
    reasoning steps (token lists); text / prompt_text: decoded (None without a tokenizer);
    finished: it ended (EOS, or the strategy's length limits); logprobs: per completion token.
    """
    prompt: list[int]
    tokens: list[int]
    steps: list[list[int]]
    text: str | None = None
    prompt_text: str | None = None
    finished: bool = False
    logprobs: list[float] = field(default_factory=list)


Scorer = Callable[[list[Candidate]], list[float]]


@dataclass
class SearchStats:
    """Policy work (``tokens_computed``, ``tokens_cached``, ``tree_tokens``, ``reuse_ratio``,
    ``forward_calls``), and the scorer engine's (``scorer_*``, 0 for scorers without an engine)."""
    tokens_computed: int = 0
    tokens_cached: int = 0
    tree_tokens: int = 0
    forward_calls: int = 0
    tokens_generated: int = 0
    scorer_tokens_computed: int = 0
    scorer_tree_tokens: int = 0
    scorer_calls: int = 0

    @property
    def reuse_ratio(self) -> float:
        return self.tokens_computed / max(1, self.tree_tokens)

    @property
    def scorer_reuse_ratio(self) -> float:
        return self.scorer_tokens_computed / max(1, self.scorer_tree_tokens)


@dataclass
class SearchResult:
    """The chosen completion (``tokens``, ``text``, ``score``, ``answer`` where answers were
    extracted), every final candidate with its score, the statistics, and strategy-specific
    details in ``info`` (vote counts, beam history, MCTS visit counts)."""
    tokens: list[int]
    text: str | None
    score: float | None
    answer: Any
    candidates: list[Candidate]
    scores: list[float | None]
    stats: SearchStats
    info: dict = field(default_factory=dict)


def last_number(candidate: Candidate):
    """Default answer extractor: the last number in the completion's text (None if there is none);
    without a tokenizer, the completion's last token id."""
    if candidate.text is None:
        return candidate.tokens[-1] if candidate.tokens else None
    found = re.findall(r"-?\d+(?:\.\d+)?", candidate.text)
    return found[-1] if found else None


def _mix(seed: int, counter: int) -> int:
    """A seed per expansion call from the search's seed (ints only: Python's str hashing is
    randomized per process, int hashing is not)."""
    return hash((seed, counter, 0x7474C)) & (2**62 - 1)


class Node:
    """A search-tree node: a live engine sequence ending with this node's step (its last sampled
    token pending), the step, scorer value and MCTS statistics."""

    __slots__ = ("seq", "parent", "children", "step", "logprobs", "depth", "finished", "value",
                 "visits", "value_sum", "prior", "tokens")

    def __init__(self, seq: EngineSeq | None, parent: "Node | None", step: list[int], logprobs: list[float],
                 finished: bool):
        self.seq = seq
        self.parent = parent
        self.children: list[Node] = []
        self.step = step
        self.logprobs = logprobs
        self.depth = 0 if parent is None else parent.depth + 1
        self.finished = finished
        self.value: float | None = None
        self.visits = 0
        self.value_sum = 0.0
        self.prior = 1.0
        self.tokens: list[int] = step if parent is None or parent.parent is None else parent.tokens + step

    def steps(self) -> list[list[int]]:
        out, node = [], self
        while node.parent is not None:
            out.append(node.step)
            node = node.parent
        return out[::-1]

    def all_logprobs(self) -> list[float]:
        out, node = [], self
        while node.parent is not None:
            out = node.logprobs + out
            node = node.parent
        return out


class Search:
    """The policy engine, the scorer and the accounting of one search call.

    ``with Search(engine, prompt, scorer, step_params) as s:`` starts the root, records the
    engine (and the scorer's engine, if it has one); on exit every live sequence is finished
    (its KV goes to the radix cache) and ``s.stats`` is filled."""

    def __init__(self, engine: Engine, prompt, scorer: Scorer | None, step_params: SamplingParams,
                 max_tokens: int | None = None):
        if not isinstance(engine, Engine):
            raise ValueError(f"ttc: 'engine' must be a ptcore.engine.Engine, got {type(engine).__name__}")
        if not isinstance(step_params, SamplingParams):
            raise ValueError(f"ttc: 'step_params' must be SamplingParams, got {type(step_params).__name__}")
        if scorer is not None and not callable(scorer):
            raise ValueError("ttc: 'scorer' must be callable (list[Candidate] -> list[float])")
        self.engine = engine
        self.scorer = scorer
        self.params = step_params
        self.prompt = engine.encode(prompt) if isinstance(prompt, str) else engine._check_tokens("prompt", prompt)
        self.prompt_text = prompt if isinstance(prompt, str) else engine.decode(self.prompt) if engine.tokenizer else None
        self.max_tokens = max_tokens
        self.stats = SearchStats()
        self._stack = contextlib.ExitStack()
        self._seed_counter = 0
        self.live: list[EngineSeq] = []

    def __enter__(self):
        self._rec = self._stack.enter_context(self.engine.record())
        s_engine = getattr(self.scorer, "engine", None)
        self._srec = None
        if isinstance(s_engine, Engine) and s_engine is not self.engine:
            self._srec = self._stack.enter_context(s_engine.record())
        try:
            self.root = Node(self.engine.start(self.prompt), None, [], [], False)
        except BaseException:
            self._stack.close()  # __exit__ does not run when __enter__ fails: stop recording here
            raise
        self.live.append(self.root.seq)
        return self

    def __exit__(self, exc_type, *exc):
        # After an error (CacheFull, a failing scorer, Ctrl-C) a sequence may hold positions whose
        # keys/values were never written: release them instead of caching them for later calls.
        end = self.engine.finish if exc_type is None else self.engine.release
        for seq in self.live:
            if seq.alive:
                end(seq)
        self._stack.close()
        r = self._rec
        self.stats.tokens_computed = r.stats.tokens_computed
        self.stats.tokens_cached = r.stats.tokens_cached
        self.stats.tree_tokens = r.tree_tokens
        self.stats.forward_calls = r.stats.forward_calls
        self.stats.tokens_generated = r.stats.tokens_generated
        if self._srec is not None:
            self.stats.scorer_tokens_computed = self._srec.stats.tokens_computed
            self.stats.scorer_tree_tokens = self._srec.tree_tokens
        return False

    # -- candidates and scoring --------------------------------------------------------------------
    def candidate(self, node: Node) -> Candidate:
        return Candidate(self.prompt, list(node.tokens), node.steps(), self.engine.decode(node.tokens),
                         self.prompt_text, node.finished, node.all_logprobs())

    def score(self, nodes: list[Node]) -> list[float]:
        """Scores nodes that have no value yet (one batched scorer call) and returns all values."""
        todo = [n for n in nodes if n.value is None]
        if todo:
            if self.scorer is None:
                raise ValueError("ttc: this strategy needs a 'scorer'")
            values = self.scorer([self.candidate(n) for n in todo])
            values = list(values)
            if len(values) != len(todo):
                raise ValueError(f"ttc: the scorer returned {len(values)} scores for {len(todo)} candidates")
            self.stats.scorer_calls += 1
            values = [float(v) for v in values]
            for i, v in enumerate(values):
                if v != v:  # NaN compares false with everything: max() would pick arbitrarily
                    raise ValueError(f"ttc: the scorer returned NaN for candidate {i} of {len(todo)}")
            for n, v in zip(todo, values):
                n.value = v
        return [n.value for n in nodes]

    def release(self, node: Node) -> None:
        """The node will not be expanded: its sequence goes to the radix cache."""
        if node.seq is not None and node.seq.alive:
            self.engine.finish(node.seq)
        node.seq = None

    # -- expansion -------------------------------------------------------------------------------
    def _generators(self, k: int):
        p = self.params
        if p.seed is None:
            return self.engine.generators(p, k)
        gens = self.engine.generators(SamplingParams(seed=_mix(p.seed, self._seed_counter)), k)
        self._seed_counter += 1
        return gens

    def expand(self, parents: list[Node], k: int | list[int], max_steps: int | None = None) -> list[list[Node]]:
        """Samples ``k`` next steps of each parent in one batch (each parent's pending token is
        encoded once, then the children fork from it, sharing its KV and logits). Returns the
        children per parent. A child is finished when its step ended with EOS or the completion
        reached ``max_tokens`` / ``max_steps``."""
        ks = [k] * len(parents) if isinstance(k, int) else list(k)
        for p in parents:
            if p.seq is None or not p.seq.alive:
                raise ValueError("ttc: cannot expand a released node")
        seal = [p.seq for p in parents if p.seq.logits is None or p.seq.num_computed != len(p.seq)]
        if seal:
            self.engine.forward(seal, [[] for _ in seal])
        seqs, owners, plist = [], [], []
        for p, kk in zip(parents, ks):
            budget = self.params.max_new_tokens
            if self.max_tokens is not None:
                budget = min(budget, self.max_tokens - len(p.tokens))
            params = self.params if budget == self.params.max_new_tokens else \
                dataclasses.replace(self.params, max_new_tokens=max(1, budget),
                                    min_new_tokens=min(self.params.min_new_tokens, max(1, budget)))
            for _ in range(kk):
                seqs.append(self.engine.fork(p.seq))
                self.live.append(seqs[-1])  # at once: a later fork may raise CacheFull
                owners.append(p)
                plist.append(params)
        done = self.engine.generate_from(seqs, plist, self._generators(len(seqs)))
        out = {id(p): [] for p in parents}
        eos = set(self.engine.eos_token_ids)
        for seq, parent, c in zip(seqs, owners, done):
            child = Node(seq, parent, c.tokens, c.logprobs, False)
            child.finished = (bool(c.tokens) and c.tokens[-1] in eos) \
                or (self.max_tokens is not None and len(child.tokens) >= self.max_tokens) \
                or (max_steps is not None and child.depth >= max_steps)
            parent.children.append(child)
            out[id(parent)].append(child)
        return [out[id(p)] for p in parents]

    def result(self, chosen: Node | None, candidates: list[Node], answer=None, info=None) -> SearchResult:
        return SearchResult(
            tokens=[] if chosen is None else list(chosen.tokens),
            text=None if chosen is None else self.engine.decode(chosen.tokens),
            score=None if chosen is None else chosen.value,
            answer=answer,
            candidates=[self.candidate(n) for n in candidates],
            scores=[n.value for n in candidates],
            stats=self.stats,
            info=info or {})
