"""The tiny model's tokenizer against an oracle written from its specification alone: the
vocabulary order (six special tokens, newline, printable ASCII), special-token strings as single
ids, bos first with add_special_tokens, and the chat format ``<s>`` then ``<|role|>content</s>``
per turn. The expectations never call the tokenizer under test, so any implementation of it
(the Python one, a Hugging Face fast tokenizer) must give exactly these ids and strings."""
import random

import pytest
import torch

from ptcore.train.tasks import TASKS, write_jsonl
from ptcore.train.tiny import CharTokenizer, load_model_and_tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB = SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)]
ID = {t: i for i, t in enumerate(VOCAB)}
PAD, BOS, EOS = 0, 1, 2


def oracle_ids(text, bos=False):
    """Special-token strings (longest first) are one id each; every other character is its own."""
    out, i = ([BOS] if bos else []), 0
    while i < len(text):
        s = next((s for s in sorted(SPECIALS, key=len, reverse=True) if text.startswith(s, i)), None)
        out.append(ID[s or text[i]])
        i += len(s or text[i])
    return out


def oracle_chat(conv, generation_prompt=False):
    """(text, ids, assistant mask): the mask covers an assistant's content and its closing eos."""
    text, ids, mask = "<s>", [BOS], [0]
    for m in conv:
        body = oracle_ids(m["content"]) + [EOS]
        text += f"<|{m['role']}|>" + m["content"] + "</s>"
        ids += [ID[f"<|{m['role']}|>"]] + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    if generation_prompt:
        text, ids, mask = text + "<|assistant|>", ids + [ID["<|assistant|>"]], mask + [0]
    return text, ids, mask


def task_strings():
    """Every string the embedded tasks produce: prompts, answers, solutions and wrong solutions."""
    rng = random.Random(0)
    out = []
    for task in TASKS.values():
        for p in task.problems(40, seed=1) + task.problems(10, seed=1, split="heldout"):
            out += [p.prompt, p.answer, p.solution, task.wrong_solution(p, rng)]
    return out + ["", "\n", " ", "<", "<s", "<|user|", "<pad><s></s>", "a<|system|>b\n<|assistant|>"]


def test_vocabulary_order_and_special_tokens():
    tok = CharTokenizer()
    assert tok.get_vocab() == ID and tok.vocab_size == len(tok) == len(VOCAB) == 102
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert sorted(tok.all_special_ids) == list(range(6))
    assert sorted(tok.all_special_tokens, key=ID.get) == SPECIALS
    assert tok.convert_tokens_to_ids(VOCAB) == list(range(len(VOCAB)))
    assert tok.convert_ids_to_tokens(list(range(len(VOCAB)))) == VOCAB


def test_encode_decode_task_strings():
    tok = CharTokenizer()
    texts = task_strings()
    for text in texts:
        ids = oracle_ids(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [BOS] + ids
        assert tok(text)["input_ids"] == [BOS] + ids
        assert tok(text)["attention_mask"] == [1] * (len(ids) + 1)
        assert tok.tokenize(text) == [VOCAB[i] for i in ids]
        assert tok.decode([BOS] + ids) == "<s>" + text
        assert tok.decode(torch.tensor([BOS] + ids + [EOS, PAD])) == "<s>" + text + "</s><pad>"
        plain = "".join(VOCAB[i] for i in ids if i >= len(SPECIALS))
        assert tok.decode([BOS] + ids + [EOS], skip_special_tokens=True) == plain
    batch = tok(texts[:8], padding=True, return_tensors="pt")
    longest = max(len(oracle_ids(t)) + 1 for t in texts[:8])
    for row, mask, text in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts[:8]):
        n = len(oracle_ids(text)) + 1
        assert row == [BOS] + oracle_ids(text) + [PAD] * (longest - n) and mask == [1] * n + [0] * (longest - n)
    left = tok(texts[:8], padding=True, padding_side="left")
    for row, text in zip(left["input_ids"], texts[:8]):
        assert row == [PAD] * (longest - len(oracle_ids(text)) - 1) + [BOS] + oracle_ids(text)
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == [
        "".join(VOCAB[i] for i in oracle_ids(t) if i >= len(SPECIALS)) for t in texts[:8]]


def test_chat_format_on_task_conversations():
    tok = CharTokenizer()
    rng = random.Random(0)
    convs = []
    for task in TASKS.values():
        for p in task.problems(20, seed=2):
            convs.append([{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.solution}])
            convs.append([{"role": "system", "content": "Answer.\n"}, {"role": "user", "content": p.prompt},
                          {"role": "assistant", "content": task.wrong_solution(p, rng)},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": p.solution}])
    for conv in convs:
        text, ids, mask = oracle_chat(conv)
        assert tok.apply_chat_template(conv, tokenize=False) == text
        enc = tok.apply_chat_template(conv, return_assistant_tokens_mask=True)
        assert enc["input_ids"] == ids and enc["attention_mask"] == [1] * len(ids)
        assert enc["assistant_masks"] == mask
        assert tok.apply_chat_template(conv, return_dict=False) == ids
        gtext, gids, _ = oracle_chat(conv[:-1], generation_prompt=True)
        assert tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False) == gtext
        assert tok.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=False) == gids
        # continuing the final message: the same, without the eos that would close it
        assert tok.apply_chat_template(conv, continue_final_message=True, tokenize=False) == text[:-len("</s>")]
    pair = convs[:2]
    batch = tok.apply_chat_template(pair, padding=True, return_tensors="pt", return_assistant_tokens_mask=True)
    longest = max(len(oracle_chat(c)[1]) for c in pair)
    for c, row, am in zip(pair, batch["input_ids"].tolist(), batch["assistant_masks"].tolist()):
        _, ids, mask = oracle_chat(c)
        assert row == ids + [PAD] * (longest - len(ids)) and am == mask + [0] * (longest - len(ids))
    assert tok.apply_chat_template(pair, tokenize=False) == [oracle_chat(c)[0] for c in pair]
    # an empty conversation (the prefix before an opening assistant turn) is bos and the prompt
    assert tok.apply_chat_template([], tokenize=False) == "<s>"
    assert tok.apply_chat_template([], add_generation_prompt=True, return_dict=False) == oracle_chat([], True)[1]
    assert tok.apply_chat_template([])["input_ids"] == [BOS]


def test_written_task_files_tokenize_like_the_oracle(tmp_path):
    """The SFT records the CLI writes, through the loop's own tokenization (ptcore.train.data)."""
    from ptcore.train import data as D

    tok = CharTokenizer()
    for name in TASKS:
        path = write_jsonl(name, "sft", tmp_path / f"{name}.jsonl", n=30, seed=4)
        records = D.load_records(path, "sft")
        for (ids, mask), r in zip(D.sft_examples(records, tok, 256, report=False), records):
            p, c = oracle_ids(r["prompt"], bos=True), oracle_ids(r["completion"]) + [EOS]
            assert ids == p + c and mask == [0] * len(p) + [1] * len(c)


def test_save_load_round_trip_keeps_everything(tmp_path):
    tok = CharTokenizer(padding_side="left", model_max_length=300)
    tok.save_pretrained(tmp_path)
    back = CharTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == ID and back.padding_side == "left" and back.model_max_length == 300
    conv = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}]
    assert back.apply_chat_template(conv, tokenize=False) == oracle_chat(conv)[0]
    for text in task_strings():
        assert back.encode(text) == [BOS] + oracle_ids(text)
    model, tok2 = load_model_and_tokenizer("tiny", num_hidden_layers=1)
    model.save_pretrained(tmp_path / "m")
    tok2.save_pretrained(tmp_path / "m")
    _, tok3 = load_model_and_tokenizer(tmp_path / "m")
    assert isinstance(tok3, CharTokenizer) and tok3.get_vocab() == ID and tok3.padding_side == "right"


@pytest.mark.parametrize("text,pos", [("12+\u00e934", 3), ("\t", 0), ("<s>\u4e2d", 3)])
def test_characters_outside_the_vocabulary_are_named(text, pos):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=f"U\\+{ord(text[pos]):04X}\\) at position {pos} is not in"):
        tok.encode(text)
    with pytest.raises(ValueError, match="not in the character tokenizer's vocabulary"):
        tok(["ok", text], padding=True)
