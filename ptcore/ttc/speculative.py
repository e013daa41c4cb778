"""Speculative decoding on ptcore's engine (math: docs/ttc.md §2).

Each round, a drafter proposes up to K tokens per sequence; the target engine scores the last
emitted token and all drafts in ONE batched forward over its paged cache (``all_logits``), and
:func:`ptcore.ops.speculative_verify` accepts a prefix and emits one more token (correction or
bonus). Rejected drafts are rolled back from the target's cache (``Engine.truncate``) and from the
draft model's (its sequence is truncated to what the new context shares with it). The output is
distributed exactly as sampling from the target alone; greedy (temperature 0) gives the target's
greedy tokens.

Drafters:
* :class:`DraftModelDrafter`: a smaller model on its own :class:`~ptcore.engine.Engine`; samples
  its drafts from its own distribution after the same temperature / top-k / top-p (greedy: its
  argmax, a deterministic draft).
* :class:`NGramDrafter`: prompt lookup: the tokens that followed the latest earlier occurrence of
  the context's last n tokens (n from ``max_ngram`` down to ``min_ngram``); deterministic drafts,
  no model. Good on input-grounded text (summaries, edits, code that repeats the prompt).

A drafter is any object with ``start(i, tokens)``, ``propose(contexts, ids, k, params,
generators) -> list[(tokens, probs [len, V] or None)]`` and ``finish(i)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptcore.engine import Completion, Engine, SamplingParams
from ptcore.engine.sampling import make_generator
from ptcore.ops import speculative_verify


@dataclass
class SpeculativeStats:
    """Counters of one :func:`speculative_generate` call."""
    target_forwards: int = 0  # batched target passes (one per round)
    sequence_rounds: int = 0  # (sequence, round) pairs: each is one target forward of that sequence
    drafted: int = 0          # draft tokens proposed
    accepted: int = 0         # draft tokens accepted
    rejected: int = 0         # rounds that ended in a rejection (the other rounds accepted all drafts)
    emitted: int = 0          # tokens emitted (accepted + one correction / bonus per sequence round)
    draft_forwards: int = 0   # batched draft-model passes
    draft_lengths: list = field(default_factory=list)  # drafts proposed per (sequence, round)

    @property
    def acceptance_rate(self) -> float:
        """Per-position acceptance probability a: accepted / (accepted + rejected), over the drafts
        that were tested (those after a rejection never are). 0 when nothing was tested."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else 0.0

    @property
    def accepted_fraction(self) -> float:
        """accepted / drafted: the share of proposed drafts that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def expected_tokens_per_forward(self, a: float | None = None) -> float:
        """Theory for acceptance rate ``a`` (default: the measured one), averaged over the rounds'
        actual draft lengths L: mean of ``(1 - a^(L+1)) / (1 - a)`` (i.i.d. acceptance)."""
        a = self.acceptance_rate if a is None else a
        if not self.draft_lengths:
            return 0.0
        f = (lambda L: L + 1.0) if a >= 1 else (lambda L: (1 - a ** (L + 1)) / (1 - a))
        return sum(f(L) for L in self.draft_lengths) / len(self.draft_lengths)

    @property
    def tokens_per_target_forward(self) -> float:
        """Tokens emitted per sequence per target forward (1.0 without speculation)."""
        return self.emitted / self.sequence_rounds if self.sequence_rounds else 0.0


@dataclass
class SpeculativeResult:
    completions: list[Completion]
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim from elementwise ops: torch.softmax parallelizes even a [3, V]
    input, and on a busy CPU waking its second thread costs more than the softmax itself."""
    e = (z - z.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: softmax of the logits after temperature, top-k, top-p (the
    order of ptcore.engine.sampling / Hugging Face), float32 (float64 for float64 logits)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) / params.temperature
    V = z.shape[-1]
    if params.top_k and params.top_k < V:
        kth = z.topk(params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1:
        zs, order = torch.sort(z, dim=-1, descending=True, stable=True)
        p = _softmax(zs)
        drop = (p.cumsum(-1) - p) >= params.top_p
        drop[..., 0] = False
        z = z.scatter(-1, order, zs.masked_fill(drop, float("-inf")))
    return _softmax(z)


class NGramDrafter:
    """Prompt-lookup drafts: find the latest earlier occurrence of the context's last ``n`` tokens
    (``max_ngram`` down to ``min_ngram``) and propose the tokens that followed it."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"NGramDrafter: need 1 <= 'min_ngram' <= 'max_ngram', got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, i, tokens):
        pass

    def finish(self, i):
        pass

    def lookup(self, context: list[int], k: int) -> list[int]:
        """The continuation of the latest earlier occurrence of the longest matching suffix
        (the latest one with k tokens after it, else the longest continuation found)."""
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            suffix = context[L - n:]
            best: list[int] = []
            for pos in range(L - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
                if context[pos:pos + n] == suffix:
                    cont = context[pos + n:pos + n + k]
                    if len(cont) == k:
                        return cont
                    if len(cont) > len(best):
                        best = cont
            if best:
                return best
        return []

    def propose(self, contexts, ids, k, params, generators):
        return [(self.lookup(c, k), None) for c in contexts]


class DraftModelDrafter:
    """Drafts from a smaller model on its own engine (same tokenizer / vocabulary as the target).
    Each sequence keeps a draft sequence; before proposing, it is truncated to the longest prefix
    it shares with the current context (rejected drafts rolled back) and fed the rest."""

    def __init__(self, engine: Engine):
        if not isinstance(engine, Engine):
            raise TypeError(f"DraftModelDrafter: 'engine' must be a ptcore.engine.Engine, got {type(engine).__name__}")
        self.engine = engine
        self.seqs = {}
        self.forwards = 0  # batched draft passes so far

    def start(self, i, tokens):
        self.seqs[i] = self.engine.start(tokens)

    def finish(self, i):
        seq = self.seqs.pop(i, None)
        if seq is not None and seq.alive:
            self.engine.release(seq)

    def propose(self, contexts, ids, k, params, generators):
        eng = self.engine
        seqs = [self.seqs[i] for i in ids]
        feeds = []
        for seq, ctx in zip(seqs, contexts):
            toks = seq.tokens
            c = 0
            m = min(len(toks), len(ctx))
            while c < m and toks[c] == ctx[c]:
                c += 1
            c = max(c, 1)
            if c < len(toks):
                eng.truncate(seq, c)  # rejected drafts leave the draft cache
            feeds.append(list(ctx[len(seq.tokens):]))
        drafts = [[] for _ in seqs]
        probs = [[] for _ in seqs]
        if k == 0:
            return [([], None) for _ in seqs]
        for step in range(k):
            logits = eng.forward(seqs, feeds)
            self.forwards += 1
            if params.greedy:
                tok = logits.argmax(-1).tolist()
                q = None
            else:
                q = sampling_probs(logits, params)
                tok = [int(torch.multinomial(q[j].float(), 1, generator=generators[j])) for j in range(len(seqs))]
            for j, t in enumerate(tok):
                drafts[j].append(t)
                if q is not None:
                    probs[j].append(q[j])
            feeds = [[t] for t in tok] if step < k - 1 else None
        return [(d, torch.stack(p) if p else None) for d, p in zip(drafts, probs)]


def _check(target_engine, drafter, num_draft_tokens, params):
    if not isinstance(target_engine, Engine):
        raise TypeError(f"speculative_generate: 'target_engine' must be a ptcore.engine.Engine, got {type(target_engine).__name__}")
    for name in ("start", "propose", "finish"):
        if not callable(getattr(drafter, name, None)):
            raise TypeError(f"speculative_generate: 'drafter' has no {name}() (see NGramDrafter, DraftModelDrafter)")
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 0:
        raise ValueError(f"speculative_generate: 'num_draft_tokens' must be an int >= 0, got {num_draft_tokens!r}")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"speculative_generate: 'params' must be a SamplingParams, got {type(params).__name__}")
    if params.stop_strings:
        raise ValueError("speculative_generate: 'stop_strings' are not supported yet; use stop_token_ids")
    if isinstance(drafter, DraftModelDrafter) and drafter.engine.vocab_size != target_engine.vocab_size:
        raise ValueError(f"speculative_generate: the draft model's vocabulary ({drafter.engine.vocab_size}) "
                         f"differs from the target's ({target_engine.vocab_size})")


def speculative_generate(target_engine: Engine, drafter, prompts, *, num_draft_tokens: int = 4,
                         params: SamplingParams | None = None, progress: bool = False) -> SpeculativeResult:
    """Generates one completion per prompt with speculative decoding.

    Args:
        target_engine: the model whose distribution the output follows.
        drafter: :class:`NGramDrafter`, :class:`DraftModelDrafter` or any object with the same
            methods.
        prompts: token-id lists (or text, with a tokenizer on the target engine); one or a list.
        num_draft_tokens: K, drafts per round (0: plain decoding through the same loop).
        params: sampling (temperature 0: greedy; top-k / top-p apply to target and draft alike;
            ``seed`` makes the run repeatable); stop strings are not supported.

    Returns:
        :class:`SpeculativeResult`: the completions (``logprobs`` are those of the target's
        sampled distribution) and :class:`SpeculativeStats` (acceptance rate, tokens per target
        forward).
    """
    params = SamplingParams() if params is None else params
    _check(target_engine, drafter, num_draft_tokens, params)
    eng = target_engine
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("speculative_generate: 'prompts' must be a non-empty list of prompts")
    tokens = [eng.encode(p) if isinstance(p, str) else eng._check_tokens(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    B, K = len(tokens), num_draft_tokens
    stats = SpeculativeStats()
    draft_forwards_before = getattr(drafter, "forwards", 0)
    gens = [make_generator(None if params.seed is None else params.seed + j, eng.device) for j in range(B)]
    draft_gens = [make_generator(None if params.seed is None else params.seed + 7919 + j, eng.device) for j in range(B)]
    stop = set(params.stop_token_ids) | set(eng.eos_token_ids)
    stop_ids = sorted(t for t in stop if 0 <= t < eng.vocab_size)
    seqs, outs, logps, reasons = [], [[] for _ in range(B)], [[] for _ in range(B)], [None] * B
    head = [None] * B  # the last emitted token, not yet fed to the target
    bar, failed = None, False
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * params.max_new_tokens, desc="speculative decode", unit="tok", leave=False)
    try:
        for i, t in enumerate(tokens):
            seqs.append(eng.start(t))
            drafter.start(i, t)
        active = list(range(B))
        while active:
            contexts = [tokens[i] + outs[i] for i in active]
            budget = [params.max_new_tokens - len(outs[i]) for i in active]
            k = min(K, max(budget) - 1) if K else 0
            proposals = drafter.propose(contexts, active, k, params, [draft_gens[i] for i in active]) if k > 0 \
                else [([], None)] * len(active)
            drafts = [list(d[:max(0, min(k, b - 1))]) for (d, _), b in zip(proposals, budget)]
            feeds = [([head[i]] if head[i] is not None else []) + d for i, d in zip(active, drafts)]
            before = [seqs[i].logits for i in active]
            rows = eng.forward([seqs[i] for i in active], feeds, all_logits=True)
            stats.target_forwards += 1
            stats.sequence_rounds += len(active)
            nxt = []
            for j, i in enumerate(active):
                d = drafts[j]
                L = len(d)
                # target rows: the distribution after the head, then after each draft
                r = rows[j] if head[i] is not None else (torch.cat([before[j][None], rows[j]]) if d else before[j][None])
                r = r[:L + 1]
                # min_new_tokens: rows that would emit token number < min_new_tokens cannot emit a
                # stop token (-inf in the target; a draft of one is rejected: p = 0)
                ban = min(L + 1, params.min_new_tokens - len(outs[i]))
                if ban > 0 and stop_ids:
                    r = r.clone()
                    r[:ban, stop_ids] = float("-inf")
                x = torch.tensor([d], dtype=torch.int64, device=r.device).reshape(1, L)
                if params.greedy:  # only the argmax matters: the logits themselves, unchecked
                    n_acc, emitted = speculative_verify(x, None, r[None], greedy=True, validate=False)
                    lp_rows = None
                else:
                    pt = sampling_probs(r, params)
                    q_d = proposals[j][1]
                    q = None if q_d is None else q_d[:L].to(pt.dtype)[None]
                    n_acc, emitted = speculative_verify(x, q, pt[None], generator=gens[i])
                    lp_rows = pt.clamp_min(1e-45).log()
                n = int(n_acc[0])
                new = emitted[0, :n + 1].tolist()
                # roll back the rejected drafts: keep the context, the head and the accepted drafts
                keep = len(seqs[i].tokens) - L + n
                if keep < len(seqs[i].tokens):
                    eng.truncate(seqs[i], keep)
                stats.drafted += L
                stats.draft_lengths.append(L)
                stats.accepted += n
                stats.rejected += int(n < L)
                for pos, tok in enumerate(new):
                    outs[i].append(tok)
                    logps[i].append(0.0 if lp_rows is None else float(lp_rows[pos, tok]))
                    stats.emitted += 1
                    if tok in stop:
                        reasons[i] = "stop"
                        break
                    if len(outs[i]) >= params.max_new_tokens:
                        reasons[i] = "length"
                        break
                if bar is not None:
                    bar.update(len(new))
                head[i] = outs[i][-1]
                if reasons[i] is None:
                    nxt.append(i)
            active = nxt
    except BaseException:
        failed = True
        raise
    finally:
        if bar is not None:
            bar.close()
        for i, s in enumerate(seqs):
            if s.alive:  # a failed run caches nothing (release); a finished one keeps its KV for reuse
                (eng.release if failed else eng.finish)(s)
            drafter.finish(i)
    stats.draft_forwards = getattr(drafter, "forwards", 0) - draft_forwards_before
    return SpeculativeResult([Completion(outs[i], logps[i], reasons[i], eng.decode(outs[i])) for i in range(B)], stats)
