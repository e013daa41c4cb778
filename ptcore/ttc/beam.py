"""Step-level search with a process reward scorer: beam search and diverse verifier tree search
(DVTS). A step ends at a delimiter (``step_params.stop_token_ids`` / ``stop_strings``), a solution
at EOS or after ``max_steps`` steps. Definitions: docs/ttc.md §3."""
from __future__ import annotations

from ptcore.engine import Engine, SamplingParams
from ptcore.ttc.tree import Scorer, Search, SearchResult

DEFAULT_STEP = SamplingParams(max_new_tokens=32)


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"ttc: '{name}' must be an int >= {low}, got {value!r}")


def _ranked(nodes, scores):
    """Indices by descending score, ties in order (deterministic)."""
    return sorted(range(len(nodes)), key=lambda i: (-scores[i], i))


def beam_search(engine: Engine, prompt, scorer: Scorer, *, num_beams: int = 4, expansions: int = 4,
                max_steps: int = 8, step_params: SamplingParams = DEFAULT_STEP,
                max_tokens: int | None = None) -> SearchResult:
    """Beam search over reasoning steps: the prompt is expanded into ``num_beams * expansions``
    first steps; at every step the ``num_beams`` best unfinished partial solutions by ``scorer``
    are kept and each is expanded ``expansions`` times (N = num_beams * expansions candidates
    per step, keeping N/M with M = expansions). Finished solutions leave the beam. Returns the
    best-scored solution among the finished ones and the beams left after ``max_steps``.
    ``info["history"]``: per step, the candidates' scores, which were finished and which kept."""
    _check_int("num_beams", num_beams)
    _check_int("expansions", expansions)
    _check_int("max_steps", max_steps)
    with Search(engine, prompt, scorer, step_params, max_tokens) as s:
        active = s.expand([s.root], num_beams * expansions, max_steps)[0]
        s.release(s.root)
        done, history, keep = [], [], []
        for step in range(1, max_steps + 1):
            scores = s.score(active)
            live = [i for i, n in enumerate(active) if not n.finished]
            done += [n for n in active if n.finished]
            order = [live[j] for j in _ranked([active[i] for i in live], [scores[i] for i in live])]
            kept = order[:num_beams]
            history.append({"scores": scores, "finished": [n.finished for n in active], "kept": kept})
            keep = [active[i] for i in kept]
            for i, n in enumerate(active):
                if i not in kept:
                    s.release(n)
            if not keep or step == max_steps:
                break
            active = [c for group in s.expand(keep, expansions, max_steps) for c in group]
            for n in keep:
                s.release(n)
            keep = []
        pool = done + keep
        scores = [n.value for n in pool]
        best = pool[_ranked(pool, scores)[0]] if pool else None
        res = s.result(best, pool, info={"history": history})
    return res


def dvts(engine: Engine, prompt, scorer: Scorer, *, num_trees: int = 4, expansions: int = 4,
         max_steps: int = 8, step_params: SamplingParams = DEFAULT_STEP,
         max_tokens: int | None = None) -> SearchResult:
    """Diverse verifier tree search: ``num_trees`` independent subtrees (N/M with M =
    ``expansions``); each step expands every unfinished tree's current node ``expansions`` times
    and keeps only its best child by ``scorer``. Returns the best-scored final node of all trees.
    ``info["paths"]``: per tree, the scores of the chosen nodes; ``info["history"]``: per step,
    {tree: {"scores": its children's scores, "kept": the index kept}}."""
    _check_int("num_trees", num_trees)
    _check_int("expansions", expansions)
    _check_int("max_steps", max_steps)
    with Search(engine, prompt, scorer, step_params, max_tokens) as s:
        first = s.expand([s.root], num_trees * expansions, max_steps)[0]
        s.release(s.root)
        groups = [first[t * expansions:(t + 1) * expansions] for t in range(num_trees)]
        current = [None] * num_trees
        paths = [[] for _ in range(num_trees)]
        history = []
        for step in range(1, max_steps + 1):
            history.append({})
            for t, group in enumerate(groups):
                if group is None:
                    continue
                scores = s.score(group)
                pick = _ranked(group, scores)[0]
                history[-1][t] = {"scores": scores, "kept": pick}
                best = group[pick]
                for n in group:
                    if n is not best:
                        s.release(n)
                if current[t] is not None:
                    s.release(current[t])
                current[t] = best
                paths[t].append(best.value)
            open_trees = [t for t in range(num_trees) if not current[t].finished]
            if not open_trees or step == max_steps:
                break
            kids = s.expand([current[t] for t in open_trees], expansions, max_steps)
            groups = [None] * num_trees
            for t, g in zip(open_trees, kids):
                groups[t] = g
        finals = [c for c in current if c is not None]
        scores = [n.value for n in finals]
        best = finals[_ranked(finals, scores)[0]]
        res = s.result(best, finals, info={"paths": paths, "history": history})
    return res
