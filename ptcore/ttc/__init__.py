"""Test-time compute on ptcore's engine, with prefix reuse for the policy and the scorer:
best-of-N, weighted best-of-N, self-consistency, step-level beam search, DVTS and MCTS.
A scorer is any callable ``list[Candidate] -> list[float]``; :class:`RewardModelScorer` runs a
reward model on a second engine that keeps its own KV cache. Speculative decoding on the engine:
:func:`speculative_generate` (ptcore/ttc/speculative.py)."""
from ptcore.ttc.beam import beam_search, dvts
from ptcore.ttc.mcts import mcts
from ptcore.ttc.scorers import RewardModelScorer, from_text, from_tokens
from ptcore.ttc.speculative import (DraftModelDrafter, NGramDrafter, SpeculativeResult, SpeculativeStats,
                                   speculative_generate)
from ptcore.ttc.tree import Candidate, SearchResult, SearchStats, last_number
from ptcore.ttc.voting import best_of_n, self_consistency, weighted_best_of_n

__all__ = ["Candidate", "DraftModelDrafter", "NGramDrafter", "RewardModelScorer", "SearchResult", "SearchStats",
           "SpeculativeResult", "SpeculativeStats", "beam_search", "best_of_n", "dvts", "from_text", "from_tokens",
           "last_number", "mcts", "self_consistency", "speculative_generate", "weighted_best_of_n"]
