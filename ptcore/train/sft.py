"""Supervised fine-tuning: completion-only cross-entropy, fused through ptcore.patch.

``batch_size`` counts examples per micro-batch, packed or not (as TRL's does); by default each
micro-batch's examples are packed into rows of ``max_length`` tokens. Position ids restart at every
example and no attention mask is passed, from which transformers (>= 5) builds a block-diagonal
causal mask for sdpa / eager attention, and flash-attn (``flash_attention_2``, used on a GPU when
installed) runs varlen; labels are -100 on each example's first token, so nothing crosses from one
example into the next. The loss is the sum of token cross-entropies divided by the completion
tokens of the whole optimizer step (``num_items_in_batch``).
"""
from __future__ import annotations

import importlib.util

import torch

from ptcore.train import data as D
from ptcore.train.config import SFTConfig, TrainResult, objective_config
from ptcore.train.loop import train
from ptcore.train.objective import BaseObjective


def use_flash_attention(model) -> bool:
    """On a GPU with flash-attn installed, switch to its kernels (varlen for packed rows)."""
    if not next(model.parameters()).is_cuda or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        model.set_attn_implementation("flash_attention_2")
        return True
    except (ValueError, ImportError) as e:  # e.g. a dtype flash-attn does not take
        print(f"ptcore: flash-attn not used ({e}); packed rows use a block-diagonal mask")
        return False


class SFTObjective(BaseObjective):
    name = "sft"

    def __init__(self, examples, tokenizer, config: SFTConfig, **deprecated_options):
        # the objective's own options; the loop's stay those of the config given
        c = objective_config(SFTConfig, config, deprecated_options, "SFTObjective")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.packing, self.pad_id, self.max_length = c.packing, pad, config.max_length
        super().__init__(list(examples), config)  # items are examples: batch_size counts them

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        if self.packing:
            use_flash_attention(model)

    def collate(self, items) -> dict:
        if self.packing:  # this micro-batch's examples, packed into rows of max_length tokens
            rows = D.pack(items, self.max_length, self.pad_id)
            batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
            batch["attention_mask"] = None  # transformers derives the block-diagonal mask from positions
            tokens = sum(r["num_tokens"] for r in rows)
        else:
            b = D.pad_examples(items, self.pad_id)
            batch = {k: torch.tensor(v) for k, v in b.items()}
            batch["position_ids"] = None
            tokens = int(batch["attention_mask"].sum())
        batch = self.to_device(batch)
        batch["units"] = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        batch["tokens"] = tokens
        return batch

    def micro_batches(self, step, model):
        return [self.collate(items) for items in self.batches(step)]

    def units(self, mb) -> int:
        return mb["units"]

    def tokens(self, mb) -> int:
        return mb["tokens"]

    def loss(self, model, mb, global_units):
        kwargs = {k: mb[k] for k in ("attention_mask", "position_ids") if mb[k] is not None}
        out = model(input_ids=mb["input_ids"], labels=mb["labels"], use_cache=False,
                    num_items_in_batch=torch.tensor(max(global_units, 1.0), device=self.device), **kwargs)
        return out.loss, {}


def run_sft(model, tokenizer, data, config: SFTConfig, **deprecated_options) -> TrainResult:
    """Supervised fine-tuning of ``model`` on ``data`` (a jsonl path or a list of dicts with
    ``prompt``/``completion`` or ``messages``); the loss covers completions / assistant turns only.
    ``config``: an :class:`SFTConfig` (a plain :class:`TrainConfig` takes the SFT defaults); the
    old keyword ``packing=`` still works for one release, with a DeprecationWarning.

    Example:
        >>> from ptcore.train import SFTConfig, run_sft
        >>> from ptcore.train.tiny import load_model_and_tokenizer
        >>> model, tok = load_model_and_tokenizer("tiny")
        >>> rows = [{"prompt": "1+2=", "completion": "3"}] * 8
        >>> res = run_sft(model, tok, rows, SFTConfig("/tmp/ptcore-sft", max_steps=2, batch_size=2,
        ...               max_length=32, progress=False, save_final=False))
        >>> len(res.metrics)
        2
    """
    config = objective_config(SFTConfig, config, deprecated_options, "run_sft")
    records = D.load_records(data, "sft")
    examples = D.sft_examples(records, tokenizer, config.max_length, config.overflow)
    return train(model, SFTObjective(examples, tokenizer, config), config, tokenizer=tokenizer)
