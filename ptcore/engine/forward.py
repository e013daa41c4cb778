"""The batched forward: :class:`BatchedForward`, the part of :class:`ptcore.engine.Engine` that
appends new tokens to sequences and encodes them in one pass over the paged KV cache (decode
when every sequence has one new token, extend otherwise, optionally under a tree mask), rolling
everything back when the pass fails."""
from __future__ import annotations

import torch

from ptcore import ops
from ptcore.engine.sequences import EngineSeq


class BatchedForward:
    """Engine methods that run the model. They use the engine's ``cache``, ``pool``, ``model``,
    ``device``, ``stats``, ``_check_alive`` and ``_check_tokens``."""

    def forward(self, seqs: list[EngineSeq], new_tokens: list[list[int]], all_logits: bool = False,
                tree_mask: torch.Tensor | None = None):
        """Appends ``new_tokens[i]`` to ``seqs[i]`` and encodes them (after any pending tokens) in
        one batched pass. Returns the logits after the last token of each sequence ``[B, V]``, or
        with ``all_logits`` a list of ``[len(new_tokens[i]), V]`` tensors, row j being the logits
        after new token j (speculative verification scores K drafts in one pass this way).

        ``tree_mask`` bool ``[sum new, max new]``: row j says which new tokens of its own sequence
        token j may attend to (itself and its ancestors); positions follow the tree depth. The
        sequence's tokens are then stored in tree order: truncate back and re-feed the accepted
        path before generating on. Not allowed with pending tokens.

        If it raises (CacheFull, a kernel error, KeyboardInterrupt...), every sequence is left with
        the tokens it had before the call (``new_tokens`` are not appended; pending tokens stay
        pending), no KV position it did not compute, and ``logits`` None where they may be stale:
        the call can be retried, or the sequences finished / released."""
        if len(seqs) != len(new_tokens):
            raise ValueError(f"Engine.forward: {len(seqs)} 'seqs' but {len(new_tokens)} 'new_tokens' lists")
        if not seqs:
            raise ValueError("Engine.forward: 'seqs' is empty")
        checked = []
        for i, (seq, new) in enumerate(zip(seqs, new_tokens)):  # validate everything before changing anything
            self._check_alive(f"seqs[{i}]", seq)
            checked.append(self._check_tokens(f"new_tokens[{i}]", new, allow_empty=True))
            if tree_mask is not None and seq.num_computed != len(seq.tokens):
                raise ValueError(f"Engine.forward: seqs[{i}] has pending tokens; 'tree_mask' needs none")
            window = self.model.window
            if window is not None and len(seq.tokens) + len(checked[-1]) > window:
                raise ValueError(f"Engine.forward: seqs[{i}] would be longer than the model's sliding window "
                                 f"({window}); the engine runs full attention, exact only within the window")
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("Engine.forward: a sequence appears twice in 'seqs'")
        if tree_mask is not None:
            total, width = sum(map(len, checked)), max(map(len, checked))
            if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool \
                    or tuple(tree_mask.shape) != (total, width):
                raise ValueError(f"Engine.forward: 'tree_mask' must be a bool tensor of shape ({total}, {width}), "
                                 f"got {getattr(tree_mask, 'dtype', type(tree_mask).__name__)} "
                                 f"{tuple(getattr(tree_mask, 'shape', ()))}")
        if tree_mask is not None:
            self._check_tree_mask(tree_mask, [len(c) for c in checked])
        feeds, starts = [], []
        before = [(len(seq.tokens), seq.tokens[-1]) for seq in seqs]  # to roll the token lists back
        try:
            for seq, new in zip(seqs, checked):
                if seq.num_computed == len(seq.tokens) and not new and seq.logits is None:
                    # logits of a computed position are not kept: recompute the last token
                    last = seq.tokens[-1]
                    self.cache.truncate(seq.handle, seq.num_computed - 1)
                    seq.tokens.append(last)
                seq.tokens.extend(new)
                starts.append(seq.num_computed)
                feeds.append(seq.tokens[seq.num_computed:])
            lens = [len(f) for f in feeds]
            live = [i for i, n in enumerate(lens) if n]
            out_rows = [None] * len(seqs)
            if live:
                self._run([seqs[i] for i in live], [feeds[i] for i in live], [starts[i] for i in live],
                          [len(checked[i]) for i in live], all_logits, tree_mask, out_rows, live)
        except BaseException:
            # _run already took back the positions it reserved; drop this call's new tokens (a
            # retry must not append them twice), keep the pending ones
            for seq, (n, last) in zip(seqs, before):
                if seq.alive and not seq.handle.finished:
                    del seq.tokens[n:]
                    if len(seq.tokens) < n:  # interrupted between the truncate and the re-append
                        seq.tokens.append(last)
            raise
        if all_logits:
            return [out_rows[i] if out_rows[i] is not None else seqs[i].logits[None] for i in range(len(seqs))]
        return torch.stack([seqs[i].logits for i in range(len(seqs))])

    @staticmethod
    def _check_tree_mask(tree_mask: torch.Tensor, counts: list[int]) -> None:
        """Positions come from row sums: every row must see itself and nothing past its own
        sequence's new tokens, or the positions would be silently wrong."""
        total = sum(counts)
        if not total:
            return
        dev = tree_mask.device
        n = torch.tensor(counts, device=dev)
        own = torch.repeat_interleave(n, n)  # each row's sequence's new-token count
        j = torch.cat([torch.arange(c, device=dev) for c in counts])  # each row's index in its sequence
        outside = tree_mask & (torch.arange(tree_mask.shape[1], device=dev)[None, :] >= own[:, None])
        if bool(outside.any()):
            r, c = (int(x) for x in outside.nonzero()[0])
            raise ValueError(f"Engine.forward: 'tree_mask'[{r}, {c}] is True but row {r}'s sequence has only "
                             f"{int(own[r])} new tokens")
        diag = tree_mask[torch.arange(total, device=dev), j]
        if not bool(diag.all()):
            r = int((~diag).nonzero()[0, 0])
            raise ValueError(f"Engine.forward: 'tree_mask' row {r} does not see itself (column {int(j[r])})")

    def _run(self, seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index):
        lens = [len(f) for f in feeds]
        slots = self.cache.reserve([s.handle for s in seqs], lens)  # CacheFull changes nothing
        try:
            self._run_reserved(seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index, slots)
        except BaseException:
            # The reserved positions may hold no (or partial) K/V: give them back, so the sequences
            # never claim unwritten K/V (finish would put it in the radix cache for later requests,
            # and forward would take the old logits for the new ones). Their tokens stay pending
            # and the logits unknown.
            for seq, start in zip(seqs, starts):
                seq.logits = None
                h = seq.handle
                if h.finished or h.length <= start:
                    continue
                pending = h.tokens[start:]
                self.cache.truncate(h, start)  # start >= the locked prefix: only frees own pages
                h.tokens.extend(pending)
            raise

    def _run_reserved(self, seqs, feeds, starts, num_new, all_logits, tree_mask, out_rows, index, slots):
        dev = self.device
        lens = [len(f) for f in feeds]
        T = sum(lens)
        if not isinstance(slots, torch.Tensor):
            slots = torch.as_tensor(slots, dtype=torch.int64)
        slots = slots.to(dev)
        ids = torch.tensor([t for f in feeds for t in f], dtype=torch.int64, device=dev)
        if tree_mask is not None:
            depth = tree_mask.to(dev).sum(-1).long() - 1
            positions = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in zip(starts, lens)]).to(dev) + depth
        else:
            positions = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)], dtype=torch.int64, device=dev)
        handles = [s.handle for s in seqs]
        block_table = self.cache.block_table(handles).to(dev)
        seq_lens = self.cache.seq_lens(handles).to(dev)
        decode = tree_mask is None and all(n == 1 for n in lens)
        cu = None if decode else torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
        max_q = max(lens)  # known here: the kernels need no host sync for it
        kp, vp = self.pool.k, self.pool.v
        scale = self.model.scale

        def attention(layer, q, k, v):
            ops.write_kv(kp[layer], vp[layer], slots, k, v)
            if decode:
                return ops.paged_attention_decode(q, kp[layer], vp[layer], block_table, seq_lens, scale=scale)
            return ops.paged_attention_extend(q, kp[layer], vp[layer], block_table, seq_lens, cu,
                                              scale=scale, tree_mask=tree_mask, max_q=max_q)

        if decode:
            select = None  # one row per sequence: every row
        elif all_logits:
            # rows of the new tokens (the last num_new of each feed; at least the last row)
            ends = torch.tensor(lens).cumsum(0)
            select = torch.cat([torch.arange(int(e) - max(1, m), int(e)) for e, m in zip(ends, num_new)]).to(dev)
        else:
            select = (torch.tensor(lens).cumsum(0) - 1).to(dev)
        logits = self.model.forward(ids, positions, attention, select)
        logits = logits.float() if logits.dtype != torch.float64 else logits
        self.stats.tokens_computed += T
        self.stats.forward_calls += 1
        r = 0
        for j, (seq, m) in enumerate(zip(seqs, num_new)):
            if all_logits:
                rows = logits[r:r + max(1, m)]
                r += max(1, m)
                out_rows[index[j]] = rows
                seq.logits = rows[-1]
            else:
                seq.logits = logits[j]

