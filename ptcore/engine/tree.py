"""A plain token trie: counts the distinct prefixes (token positions) of a set of sequences, the
denominator of the search benchmarks' reuse ratio (tokens computed / tree tokens)."""
from __future__ import annotations


class TokenTrie:
    """``add(tokens)`` inserts a sequence; ``size`` is the number of distinct non-empty prefixes
    seen so far, i.e. the tokens of the tree they form."""

    __slots__ = ("root", "size")

    def __init__(self):
        self.root: dict = {}
        self.size = 0

    def add(self, tokens) -> int:
        """Inserts ``tokens``; returns how many of its positions were new."""
        node, new = self.root, 0
        for t in tokens:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
                new += 1
            node = child
        self.size += new
        return new

    def __len__(self):
        return self.size
