"""SFT: packing without cross-contamination (a packed example's loss equals its unpacked loss),
learning, chat data, the saved model. (The fused loss itself is tested with ptcore.patch.)"""
import pytest
import torch

import ptcore
from ptcore.train import data as D
from ptcore.train import run_sft
from tests.train_helpers import config, one_thread, sft_rows, tiny  # noqa: F401


def token_losses_sum(model, ids, labels, position_ids=None, attention_mask=None):
    out = model(input_ids=ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask,
                use_cache=False, num_items_in_batch=torch.tensor(1.0))  # sum over tokens
    return out.loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(attn):
    model, tok = tiny(dtype=torch.float64)
    model.set_attn_implementation(attn)
    ptcore.patch(model)
    recs = D.load_records([{"prompt": "12+34=", "completion": "46"},
                           {"prompt": "999+1=", "completion": "1000"},
                           {"prompt": "7+8=", "completion": "15"}], "sft")
    examples = D.sft_examples(recs, tok, 64, report=False)
    row, = D.pack(examples, 40, tok.pad_token_id)
    t = lambda k: torch.tensor([row[k]])
    packed = token_losses_sum(model, t("input_ids"), t("labels"), t("position_ids"))
    separate = 0.0
    for ids, mask in examples:
        b = D.pad_examples([(ids, mask)], tok.pad_token_id)
        separate = separate + token_losses_sum(model, torch.tensor(b["input_ids"]), torch.tensor(b["labels"]))
    torch.testing.assert_close(packed, separate, rtol=1e-8, atol=1e-8)
    # negative control: one causal sequence (positions not restarting) sees the other examples
    with torch.no_grad():
        crossed = token_losses_sum(model, t("input_ids"), t("labels"), torch.arange(40)[None])
    assert abs(float(crossed - separate.detach())) > 1e-3


def test_sft_learns_and_chat_data_runs(tmp_path):
    model, tok = tiny()
    rows = sft_rows(4)
    res = run_sft(model, tok, rows, config(tmp_path, "sft", max_steps=15, lr=1e-2, batch_size=1))
    losses = [m["loss"] for m in res.metrics]
    assert losses[-1] < 0.8 * losses[0]  # a tiny model memorizes 4 examples
    chat = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in rows]
    res = run_sft(model, tok, chat, config(tmp_path, "chat", max_steps=2, save_final=True))
    assert len(res.metrics) == 2 and (tmp_path / "chat" / "final" / "ptcore_tokenizer.json").is_file()
    from ptcore.train.tiny import load_model_and_tokenizer
    again, _ = load_model_and_tokenizer(res.final_dir)
    for p, q in zip(again.parameters(), res.model.parameters()):
        assert torch.equal(p, q)
