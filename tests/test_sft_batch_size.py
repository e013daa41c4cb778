"""SFT's batch_size counts examples per micro-batch, packed or not (as TRL's per-device batch
does): packing changes how a micro-batch's examples are laid out, never how many there are."""
import pytest
import torch

from ptcore.train import SFTConfig
from ptcore.train import data as D
from ptcore.train.sft import SFTObjective
from ptcore.train.tiny import CharTokenizer


@pytest.mark.parametrize("packing", [True, False])
def test_batch_size_counts_examples(tmp_path, packing):
    tok = CharTokenizer()
    recs = D.load_records([{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(10, 30)], "sft")
    examples = D.sft_examples(recs, tok, 64)
    cfg = SFTConfig(str(tmp_path), max_steps=3, batch_size=6, grad_accum=2, max_length=64, progress=False,
                    packing=packing)
    obj = SFTObjective(examples, tok, cfg)
    assert len(obj.items) == 20  # the items are the examples, not packed rows
    seen = 0
    for step in range(3):
        for items, mb in zip(obj.batches(step), obj.micro_batches(step, None)):
            assert len(items) == 6
            want_units = sum(sum(m[1:]) for _, m in items)  # completion tokens, first token of each excluded
            assert mb["units"] == want_units and mb["tokens"] == sum(len(ids) for ids, _ in items)
            if packing:  # 6 short examples fit in one 64-token row
                assert mb["input_ids"].shape == (1, 64) and mb["attention_mask"] is None
            else:
                assert mb["input_ids"].shape[0] == 6
            seen += len(items)
    assert seen == 3 * 2 * 6
