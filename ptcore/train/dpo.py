"""Direct preference optimization with the fused ``linear_dpo_loss`` (every loss type of
:func:`ptcore.ops.dpo_loss`).

The reference log-probs are constant, so they are computed once, before the first step, with the
frozen reference (``ref_model``, or the model itself before training when none is given), and
cached in memory and in ``output_dir/ref_logps.pt`` (a resumed run reads them back instead of
recomputing them with an already-trained model). Each micro-batch is one forward over its chosen
and rejected sequences; the loss is the mean over the pairs of the whole optimizer step.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ptcore.ops import linear_dpo_loss, linear_logprobs
from ptcore.ops.preference import REFERENCE_FREE
from ptcore.train import data as D
from ptcore.train.config import DPOConfig, TrainResult, objective_config
from ptcore.train.distributed import unwrap
from ptcore.train.loop import _autocast, train
from ptcore.train.objective import BaseObjective, head_of, patch, shift_targets


def pair_batch(pairs, pad_id: int) -> dict:
    """``input_ids`` / ``attention_mask`` ``[2B, T]`` (the B chosen rows, then the B rejected
    rows, right-padded) and next-token ``target`` with -100 outside the completions."""
    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    starts = [len(p["prompt"]) for p in pairs] * 2
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), D.IGNORE, dtype=torch.long)
    for i, (s, p0) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, p0:len(s)] = torch.tensor(s[p0:])
    return {"input_ids": ids, "attention_mask": mask, "target": shift_targets(labels),
            "index": torch.tensor([p["index"] for p in pairs])}


def sequence_logps(model, batch, *, bf16=None) -> torch.Tensor:
    """Summed completion log-probs ``[rows]`` of a pair batch under ``model`` (patched), no grad."""
    target = batch["target"]
    head = lambda hidden, weight, softcap: linear_logprobs(hidden, weight, target, softcap=softcap).sum(-1)
    with torch.no_grad(), _autocast(batch["input_ids"].device, bf16):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    head_loss=head, use_cache=False)
    return out.loss.double()


class DPOObjective(BaseObjective):
    name = "dpo"

    def __init__(self, pairs, tokenizer, config: DPOConfig, *, ref_model=None, ref_batch_size: int = None,
                 **deprecated_options):
        # the objective's own options; the loop's stay those of the config given
        c = objective_config(DPOConfig, config, deprecated_options, "DPOObjective")
        super().__init__(pairs, config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.ref_model = ref_model
        types = [c.loss_type] if isinstance(c.loss_type, str) else list(c.loss_type)
        self.needs_ref = any(t not in REFERENCE_FREE for t in types)
        self.opts = dict(beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing, gamma=c.gamma,
                         orpo_lambda=c.orpo_lambda, loss_weights=c.loss_weights)
        self.ref_batch_size = ref_batch_size or config.batch_size
        self.ref_logps = None  # [n, 2]: chosen, rejected per pair index
        self.ref_forward_tokens = 0

    def _cache_key(self) -> str:
        h = hashlib.sha256()
        for p in self.items:
            h.update(repr((p["index"], p["prompt"], p["chosen"], p["rejected"])).encode())
        return h.hexdigest()

    def setup(self, model, ctx, config) -> None:
        super().setup(model, ctx, config)
        if self.needs_ref and self.ref_logps is None:
            self.ref_logps = self.compute_reference(model)

    def compute_reference(self, model) -> torch.Tensor:
        """Reference log-probs of every pair, read from ``ref_logps.pt`` when it matches the data."""
        path = Path(self.config.output_dir) / "ref_logps.pt"
        key = self._cache_key()
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            if saved.get("key") == key:
                return saved["ref_logps"]
        ref = self.ref_model if self.ref_model is not None else unwrap(model)
        if self.ref_model is not None:
            patch(ref)
            ref.to(self.device)
        was_training = ref.training
        ref.eval()
        n = max(p["index"] for p in self.items) + 1
        out = torch.zeros(n, 2, dtype=torch.float64)  # 16 bytes a pair: keep every digit
        B = self.ref_batch_size
        for s in range(0, len(self.items), B):
            chunk = self.items[s:s + B]
            batch = self.to_device(pair_batch(chunk, self.pad_id))
            lp = sequence_logps(ref, batch, bf16=self.config.bf16).cpu()
            out[batch["index"].cpu(), 0] = lp[:len(chunk)]
            out[batch["index"].cpu(), 1] = lp[len(chunk):]
            self.ref_forward_tokens += int(batch["attention_mask"].sum())
        ref.train(was_training)
        if self.ctx.is_main:
            tmp = path.with_suffix(f".pt.{os.getpid()}.tmp")
            try:
                torch.save({"key": key, "ref_logps": out}, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return out

    def micro_batches(self, step, model):
        out = []
        for pairs in self.batches(step):
            b = pair_batch(pairs, self.pad_id)
            b["tokens"] = int(b["attention_mask"].sum())
            if self.ref_logps is not None:
                b["ref"] = self.ref_logps[b["index"]]
            out.append(self.to_device(b))
        return out

    def units(self, mb) -> int:
        return mb["input_ids"].shape[0] // 2

    def tokens(self, mb) -> int:
        return mb["tokens"]

    def loss(self, model, mb, global_units):
        B = self.units(mb)
        tgt = mb["target"]
        ref = mb.get("ref")
        rc, rr = (None, None) if ref is None else (ref[:, 0], ref[:, 1])

        def head(hidden, weight, softcap):
            return linear_dpo_loss(hidden[:B], hidden[B:], weight, tgt[:B], tgt[B:], rc, rr,
                                   softcap=softcap, **self.opts)

        out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], head_loss=head,
                    use_cache=False)
        res = head_of(out)
        metrics = {k: float(v) for k, v in res.metrics.items()}
        metrics["rewards/chosen"] = float(res.chosen_rewards.mean())
        metrics["rewards/rejected"] = float(res.rejected_rewards.mean())
        # linear_dpo_loss is the mean over this micro-batch's pairs: rescale to its share of the
        # mean over the step's pairs (all micro-batches, all ranks).
        return out.loss * (B / global_units), metrics

    def step_flops(self) -> float:
        return 0.0


def run_dpo(model, ref_model, tokenizer, data, config: DPOConfig, **deprecated_options) -> TrainResult:
    """DPO-family training of ``model`` on ``data`` (jsonl path or list of dicts with ``prompt``,
    ``chosen``, ``rejected``). ``ref_model`` None: the reference is ``model`` before training.
    ``config``: a :class:`DPOConfig` (``loss_type``: any of :data:`ptcore.ops.preference.LOSS_TYPES`
    or a list, with ``loss_weights``; simpo and orpo need no reference); a plain
    :class:`TrainConfig` takes the DPO defaults. Every option is checked when the config is
    built, before any work. The old keyword options (``beta=`` ...) still work for one release,
    with a DeprecationWarning."""
    config = objective_config(DPOConfig, config, deprecated_options, "run_dpo")
    records = D.load_records(data, "dpo")
    pairs = D.pair_examples(records, tokenizer, config.max_length, config.overflow)
    objective = DPOObjective(pairs, tokenizer, config, ref_model=ref_model)
    return train(model, objective, config, tokenizer=tokenizer)
