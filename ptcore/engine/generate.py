"""The generate loop: :class:`Generation`, the part of :class:`ptcore.engine.Engine` that samples
tokens from sequences' logits, decodes batches of sequences until each stops, and serves
:meth:`Generation.generate` (prompts in, completions out)."""
from __future__ import annotations

import torch

from ptcore.engine.results import Completion
from ptcore.engine.sampling import SamplingParams, make_generator, sample, suppress_stops
from ptcore.engine.sequences import EngineSeq


class Generation:
    """Engine methods that sample and generate. They use the engine's ``forward``, ``start``,
    ``fork``, ``finish``, ``release``, ``stats``, ``device``, ``tokenizer``, ``eos_token_ids``,
    ``encode``, ``decode`` and ``_check_tokens``."""

    def sample(self, logits: torch.Tensor, params, generators):
        """Samples one token per row of ``logits [B, V]`` (see ptcore.engine.sampling.sample);
        ``params``: one SamplingParams for all rows or one per row."""
        B = logits.shape[0]
        plist = [params] * B if isinstance(params, SamplingParams) else list(params)
        return sample(logits, plist, list(generators))

    # -- generation ------------------------------------------------------------------------------
    def _stop_check(self, params: SamplingParams, out: list[int]) -> str | None:
        if out[-1] in params.stop_token_ids or out[-1] in self.eos_token_ids:
            return "stop"  # never before min_new_tokens: their logits were -inf
        if params.stop_strings and len(out) >= params.min_new_tokens:
            # a string of n characters spans at most n tokens (+ a margin for multi-byte pieces):
            # decoding the tail keeps the check O(1) per token
            tail = self.decode(out[-(max(map(len, params.stop_strings)) + 8):])
            if any(s in tail for s in params.stop_strings):
                return "stop"
        if len(out) >= params.max_new_tokens:
            return "length"
        return None

    def generate_from(self, seqs: list[EngineSeq], params, generators, progress: bool = False) -> list[Completion]:
        """Samples on from the end of each sequence until it stops (batched decode). The sampled
        tokens are appended to the sequences (the last one pending: not encoded yet)."""
        B = len(seqs)
        plist = [params] * B if isinstance(params, SamplingParams) else list(params)
        generators = list(generators)
        if len(plist) != B or len(generators) != B or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError(f"Engine.generate_from: {B} 'seqs' need one SamplingParams (or one per seq) and "
                             f"{B} 'generators', got {len(plist)} and {len(generators)}")
        if any(p.stop_strings for p in plist) and self.tokenizer is None:
            raise ValueError("Engine: 'stop_strings' need a tokenizer")
        need = [s for s in seqs if s.logits is None or s.num_computed != len(s.tokens)]
        if need:
            self.forward(need, [[] for _ in need])
        outs = [[] for _ in range(B)]
        logps = [[] for _ in range(B)]
        reasons = [None] * B
        active = list(range(B))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max(p.max_new_tokens for p in plist), desc="decode", unit="tok", leave=False)
        while active:
            logits = torch.stack([seqs[i].logits for i in active])
            # min_new_tokens: EOS and the stop tokens cannot be sampled yet (Hugging Face's rule)
            banned = [plist[i].stop_token_ids + self.eos_token_ids if len(outs[i]) < plist[i].min_new_tokens else ()
                      for i in active]
            if any(banned):
                logits = suppress_stops(logits, banned)
            tok, lp = sample(logits, [plist[i] for i in active], [generators[i] for i in active])
            tok, lp = tok.tolist(), lp.tolist()
            self.stats.tokens_generated += len(active)
            nxt = []
            for j, i in enumerate(active):
                outs[i].append(tok[j])
                logps[i].append(lp[j])
                seqs[i].tokens.append(tok[j])
                seqs[i].logits = None
                reasons[i] = self._stop_check(plist[i], outs[i])
                if reasons[i] is None:
                    nxt.append(i)
            if nxt:
                self.forward([seqs[i] for i in nxt], [[] for _ in nxt])
            active = nxt
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return [Completion(outs[i], logps[i], reasons[i], self.decode(outs[i])) for i in range(B)]

    def generators(self, params: SamplingParams, n: int) -> list[torch.Generator]:
        """``n`` generators for one request: sample 0 uses ``params.seed`` itself, sample j a seed
        derived from (seed, j), so a request's samples never depend on what else runs with it."""
        if params.seed is None:
            return [make_generator(None, self.device) for _ in range(n)]
        return [make_generator(params.seed if j == 0 else hash((params.seed, j)) & (2**62 - 1), self.device)
                for j in range(n)]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *, n: int = 1,
                 progress: bool = False) -> list[list[Completion]]:
        """Samples ``n`` completions for each prompt (text with a tokenizer, or token ids; one
        prompt or a list). The prompts are encoded in one batched pass, their ``n`` samples fork
        from them, all decode together; afterwards everything stays in the radix cache.
        ``engine.last_stats`` tells tokens computed vs served from cache."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("Engine.generate: 'prompts' must be a non-empty list of prompts")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Engine.generate: 'n' must be an int >= 1, got {n!r}")
        params = SamplingParams() if params is None else params
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts) or not all(isinstance(p, SamplingParams) for p in plist):
            raise ValueError("Engine.generate: 'params' must be a SamplingParams or one per prompt")
        tokens = [self.encode(p) if isinstance(p, str) else self._check_tokens(f"prompts[{i}]", p)
                  for i, p in enumerate(prompts)]
        before = self.stats.copy()
        roots, seqs, sp, gens = [], [], [], []
        ok = False
        try:
            for t in tokens:
                roots.append(self.start(t, compute=False))
            self.forward(roots, [[] for _ in roots])
            for root, p in zip(roots, plist):
                seqs.append(root)
                for _ in range(n - 1):
                    seqs.append(self.fork(root))  # registered as soon as it exists
                sp += [p] * n
                gens += self.generators(p, n)
            done = self.generate_from(seqs, sp, gens, progress=progress)
            ok = True
        finally:
            # every live sequence ends: cached on success, released (nothing cached) on error
            for s in roots + seqs:
                if s.alive:
                    self.finish(s) if ok else self.release(s)
        self.last_stats = self.stats - before
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]
