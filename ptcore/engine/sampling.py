"""Sampling parameters and the sampler: temperature, then top-k, then top-p (Hugging Face's order),
one ``torch.Generator`` per request so that a request's tokens depend only on its own seed and
logits, never on what else is in the batch.

The log-prob returned with each token is that of the distribution actually sampled from (after
temperature and truncation, renormalized); greedy decoding (temperature 0) samples from a point
mass, so its log-probs are 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ptcore.ops.truncation import truncate_sorted


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    max_new_tokens: tokens to generate at most (>= 1).
    min_new_tokens: tokens to generate at least (0 <= min_new_tokens <= max_new_tokens), Hugging
        Face's meaning: until that many were generated, EOS and the stop tokens have logit -inf
        (the returned log-probs are of that distribution, the one sampled from) and stop strings
        are not checked. ``min_new_tokens == max_new_tokens`` forces the length (benchmarks).
    temperature: 0 for greedy (argmax), else > 0; logits are divided by it.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).
    seed: seeds this request's generator (None: drawn from torch's global generator, so a
        ``torch.manual_seed`` before the call makes the run repeatable too).
    stop_token_ids: generation stops after emitting one of these (it is included in the output).
    stop_strings: generation stops once the decoded completion contains one (needs a tokenizer);
        the token that completes the string is the last one kept.
    """
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple = field(default_factory=tuple)
    stop_strings: tuple = field(default_factory=tuple)

    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"SamplingParams: '{name}' {why}, got {value!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an int >= 1")
        m = self.min_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            bad("min_new_tokens", m, "must be an int >= 0")
        if m > self.max_new_tokens:
            bad("min_new_tokens", m, f"must be <= max_new_tokens ({self.max_new_tokens})")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "must be a finite number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an int >= 0 (0 disables it)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            bad("top_p", p, "must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "must be an int or None")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:  # what torch.Generator takes
            bad("seed", self.seed, "must be in [-2**63, 2**64)")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        for s in self.stop_token_ids:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                bad("stop_token_ids", self.stop_token_ids, "must hold non-negative ints")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                bad("stop_strings", self.stop_strings, "must hold non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def suppress_stops(logits: torch.Tensor, banned: list[tuple[int, ...]]) -> torch.Tensor:
    """``logits [B, V]`` with ``banned[b]`` (token ids; ids outside the vocabulary are ignored) set
    to -inf in row b: the min_new_tokens rule. Returns a new tensor when anything is banned."""
    V = logits.shape[1]
    rows = [b for b, ids in enumerate(banned) for t in ids if 0 <= t < V]
    if not rows:
        return logits
    cols = [t for ids in banned for t in ids if 0 <= t < V]
    out = logits.clone()
    idx = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    out.index_put_(idx, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    return out


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    g.manual_seed(seed % 2**64)  # torch's own mapping of negative seeds; seed + j may pass 2**64
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """Next tokens for each row of ``logits [B, V]``: ``(tokens [B] int64, logprobs [B] float32)``.

    Row b uses ``params[b]`` and draws one uniform from ``generators[b]`` (None only for greedy
    rows), then inverts the CDF of its truncated distribution in float64: the draw never depends
    on the other rows."""
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"sample: {B} rows of logits but {len(params)} params and {len(generators)} generators")
    device = logits.device
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(acc)
    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logps = torch.zeros(B, dtype=torch.float32, device=device)
    greedy = [b for b in range(B) if params[b].greedy]
    if greedy:
        idx = torch.tensor(greedy, device=device)
        tokens[idx] = logits[idx].argmax(dim=-1)
    rows = [b for b in range(B) if not params[b].greedy]
    if not rows:
        return tokens, logps
    idx = torch.arange(B, device=device) if len(rows) == B else torch.tensor(rows, device=device)
    z = logits if len(rows) == B else logits[idx]
    temps = [params[b].temperature for b in rows]
    if any(t != 1 for t in temps):
        z = z / torch.tensor(temps, dtype=acc, device=device)[:, None]
    truncate = any(params[b].top_k or params[b].top_p < 1 for b in rows)
    if truncate:
        # the kept set as the trainer's truncation-aware log-probs choose it (ptcore.ops.truncation)
        z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        k = torch.tensor([params[b].top_k or V for b in rows], device=device)
        top_p = torch.tensor([params[b].top_p for b in rows], dtype=acc, device=device)
        z = truncate_sorted(z, k, top_p)
    logp = torch.log_softmax(z, dim=-1)
    cdf = logp.double().exp().cumsum(-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=generators[b], device=device) for b in rows])
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=V - 1)
    chosen_logp = logp.gather(1, pick[:, None])[:, 0]
    bad = ~torch.isfinite(chosen_logp)
    if bool(bad.any()):  # u * total rounded up to total: take the last token of non-zero probability
        last = (torch.arange(V, device=device)[None, :] * torch.isfinite(logp)).amax(-1)
        pick = torch.where(bad, last, pick)
        chosen_logp = logp.gather(1, pick[:, None])[:, 0]
    if truncate:
        pick = order.gather(1, pick[:, None])[:, 0]
    tokens[idx] = pick
    logps[idx] = chosen_logp.float()
    return tokens, logps
