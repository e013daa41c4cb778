"""Monte Carlo tree search over reasoning steps: PUCT selection, expansion by sampling ``k`` next
steps (one batch, sharing the node's KV), values from the scorer, backup of the mean along the
path. Definitions: docs/ttc.md §3."""
from __future__ import annotations

import math

from ptcore.engine import Engine, SamplingParams
from ptcore.ttc.tree import Node, Scorer, Search, SearchResult

DEFAULT_STEP = SamplingParams(max_new_tokens=32)


def puct_constant(parent_visits: int, c_init: float, c_base: float) -> float:
    """AlphaZero's exploration schedule: ``log((1 + N + c_base) / c_base) + c_init``."""
    return math.log((1 + parent_visits + c_base) / c_base) + c_init


def puct_score(child: Node, parent_visits: int, c: float) -> float:
    """``Q + c * P * sqrt(N_parent) / (1 + N)``; Q is the mean backed-up value (0 unvisited)."""
    q = child.value_sum / child.visits if child.visits else 0.0
    return q + c * child.prior * math.sqrt(parent_visits) / (1 + child.visits)


def _set_priors(children: list[Node], kind: str) -> None:
    if kind == "uniform":
        for c in children:
            c.prior = 1.0 / len(children)
        return
    # the policy's length-normalized log-likelihood of each sampled step, softmaxed over siblings
    lls = [sum(c.logprobs) / max(1, len(c.logprobs)) for c in children]
    m = max(lls)
    w = [math.exp(x - m) for x in lls]
    z = sum(w)
    for c, x in zip(children, w):
        c.prior = x / z


def mcts(engine: Engine, prompt, scorer: Scorer, *, num_simulations: int = 64, expansions: int = 4,
         max_steps: int = 8, step_params: SamplingParams = DEFAULT_STEP, c_init: float = 1.25,
         c_base: float = 19652.0, prior: str = "policy", max_tokens: int | None = None) -> SearchResult:
    """MCTS with PUCT. Each simulation descends from the root by PUCT to a node without
    children; if that node is unfinished, ``expansions`` next steps are sampled and scored (their
    priors: the policy's softmax over siblings of mean token log-prob, or ``"uniform"``) and the
    descent moves on to the best child by PUCT; the value of the node reached (its scorer value)
    is added to every node on the path (visits + 1). The answer follows the most visited child
    from the root down (ties: higher mean value). ``info``: root visit counts of the root's
    children, their mean values, number of expanded nodes."""
    for name, v in (("num_simulations", num_simulations), ("expansions", expansions), ("max_steps", max_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"ttc.mcts: '{name}' must be an int >= 1, got {v!r}")
    if prior not in ("policy", "uniform"):
        raise ValueError(f"ttc.mcts: 'prior' must be 'policy' or 'uniform', got {prior!r}")
    from ptcore.ops import checks
    checks.number("ttc.mcts", "c_init", c_init, low=0)  # NaN would make every PUCT score NaN
    checks.number("ttc.mcts", "c_base", c_base, low=0, low_open=True)  # divides
    with Search(engine, prompt, scorer, step_params, max_tokens) as s:
        root = s.root
        expanded = 0
        for _ in range(num_simulations):
            node, path = root, [root]
            while node.children:
                c = puct_constant(node.visits, c_init, c_base)
                node = max(node.children, key=lambda ch: puct_score(ch, node.visits, c))
                path.append(node)
            if not node.finished:
                kids = s.expand([node], expansions, max_steps)[0]
                expanded += 1
                s.score(kids)
                _set_priors(kids, prior)
                for k in kids:
                    if k.finished:
                        s.release(k)  # never expanded: its KV goes to the radix cache now
                s.release(node)  # the children hold its KV; it is never expanded again
                c = puct_constant(node.visits, c_init, c_base)
                parent = node
                node = max(kids, key=lambda ch: puct_score(ch, parent.visits, c))
                path.append(node)
            value = node.value if node.value is not None else 0.0
            for n in path:
                n.visits += 1
                n.value_sum += value
        node = root
        while node.children:
            node = max(node.children, key=lambda ch: (ch.visits, ch.value_sum / max(1, ch.visits)))
        leaves = _leaves(root)
        res = s.result(node, leaves, info={
            "root_visits": [ch.visits for ch in root.children],
            "root_values": [ch.value_sum / ch.visits if ch.visits else 0.0 for ch in root.children],
            "expanded_nodes": expanded, "root": root})
    return res


def _leaves(root: Node) -> list[Node]:
    out, stack = [], [root]
    while stack:
        n = stack.pop()
        if n.children:
            stack.extend(reversed(n.children))
        elif n is not root:
            out.append(n)
    return out
