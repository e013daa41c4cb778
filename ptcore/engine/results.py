"""What the engine hands back: :class:`Completion` (one generated continuation),
:class:`EngineStats` (token accounting) and :class:`Recording` (what :meth:`Engine.record` saw)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ptcore.engine.tree import TokenTrie

@dataclass
class Completion:
    """One generated continuation: its tokens, the log-prob of each under the distribution it was
    sampled from (after temperature / top-k / top-p), why it ended ("stop": a stop or EOS token or
    a stop string; "length": max_new_tokens), and its text when the engine has a tokenizer."""
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None


@dataclass
class EngineStats:
    """Token accounting: ``tokens_computed`` positions run through the model, ``tokens_cached``
    positions a new sequence or a fork got from the cache instead (radix matches and fork
    prefixes), ``forward_calls`` batched model calls, ``tokens_generated`` sampled tokens."""
    tokens_computed: int = 0
    tokens_cached: int = 0
    forward_calls: int = 0
    tokens_generated: int = 0

    def __sub__(self, other: "EngineStats") -> "EngineStats":
        return EngineStats(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))

    def copy(self) -> "EngineStats":
        return EngineStats(**self.__dict__)


@dataclass
class Recording:
    """What happened between entering and leaving :meth:`Engine.record`: the stats delta and the
    trie of every token context the model encoded (the KV of each finished sequence)."""
    stats: EngineStats = field(default_factory=EngineStats)
    trie: TokenTrie = field(default_factory=TokenTrie)

    @property
    def tree_tokens(self) -> int:
        """Distinct token positions (distinct prefixes) whose keys/values the work needed."""
        return self.trie.size

    @property
    def reuse_ratio(self) -> float:
        """tokens computed / tree tokens: 1.0 when no position was encoded twice."""
        return self.stats.tokens_computed / max(1, self.tree_tokens)

