"""ptcore.train.data: the jsonl formats, errors naming file and line, overflow counts, packing."""
import json

import pytest

from ptcore.train import data as D
from ptcore.train.tiny import CharTokenizer


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_formats_load(tmp_path):
    sft = write(tmp_path, [json.dumps({"prompt": "1+1=", "completion": "2"}), "",
                           json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]})])
    recs = D.load_records(sft, "sft")
    assert len(recs) == 2 and recs[1]["__where__"] == f"{sft}:3"
    dpo = write(tmp_path, [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})], "p.jsonl")
    assert D.load_records(dpo, "dpo")[0]["chosen"] == "a"
    grpo = [{"prompt": "1+1=", "answer": "2", "level": 3}]
    assert D.load_records(grpo, "grpo")[0]["level"] == 3


@pytest.mark.parametrize("line, kind, message", [
    ('{"prompt": "a", "completion": ', "sft", "not valid JSON"),
    ('[1, 2]', "sft", "expected a JSON object"),
    ('{"prompt": "a"}', "sft", "missing key 'completion'"),
    ('{"prompt": "a", "completion": 3}', "sft", "'completion' must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "sft", "no assistant turn"),
    ('{"messages": [{"role": "user"}]}', "sft", "messages[0]"),
    ('{"prompt": "a", "chosen": "b"}', "dpo", "missing key 'rejected'"),
    ('{"answer": "2"}', "grpo", "missing key 'prompt'"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, kind, message):
    good = {"sft": {"prompt": "a", "completion": "b"}, "dpo": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "grpo": {"prompt": "a", "answer": "1"}}[kind]
    p = write(tmp_path, [json.dumps(good), json.dumps(good), line])
    with pytest.raises(D.DataError) as e:
        D.load_records(p, kind)
    assert f"{p}:3" in str(e.value) and message in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(D.DataError, match="empty"):
        D.load_records(write(tmp_path, ["", "  "]), "sft")
    with pytest.raises(D.DataError, match="no such data file"):
        D.load_records(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(D.DataError, match="empty"):
        D.load_records([], "dpo")
    with pytest.raises(ValueError, match="kind"):
        D.load_records([{"prompt": "a"}], "ppo")


def test_overflow_truncates_or_skips_with_a_printed_count(capsys):
    tok = CharTokenizer()
    recs = D.load_records([{"prompt": "12+34=", "completion": "46"},
                           {"prompt": "1+1=", "completion": "2" * 40}], "sft")
    ex = D.sft_examples(recs, tok, 16, "truncate")
    assert [len(i) for i, _ in ex] == [10, 16]
    assert "1 SFT example(s) longer than max_length=16 tokens were truncated" in capsys.readouterr().err
    ex = D.sft_examples(recs, tok, 16, "skip")
    assert len(ex) == 1
    assert "1 SFT example(s) longer than max_length=16 tokens were skipped" in capsys.readouterr().err
    with pytest.raises(D.DataError, match="no usable SFT example"):
        D.sft_examples(recs[1:], tok, 16, "skip")
    pairs = D.pair_examples(D.load_records([{"prompt": "q", "chosen": "a" * 30, "rejected": "b"}], "dpo"),
                            tok, 12, "truncate")
    assert len(pairs[0]["prompt"]) + len(pairs[0]["chosen"]) == 12
    assert "truncated" in capsys.readouterr().err


def test_completion_only_masks():
    tok = CharTokenizer()
    (ids, mask), = D.sft_examples(D.load_records([{"prompt": "ab", "completion": "cd"}], "sft"), tok, 32,
                                  report=False)
    assert tok.decode(ids) == "<s>abcd</s>" and mask == [0, 0, 0, 1, 1, 1]
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"},
            {"role": "user", "content": "w"}, {"role": "assistant", "content": "v"}]
    ids, mask = D.chat_example(tok, conv, "here")
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "yz</s>v</s>"


def test_pack_restarts_positions_and_blocks_labels():
    examples = [([1, 5, 6], [0, 1, 1]), ([1, 7], [0, 1]), ([1, 8, 9, 10], [0, 0, 1, 1])]
    rows = D.pack(examples, 6, pad_id=0)
    # best fit decreasing: the 4-token example first, the 2-token one fills its row
    assert [r["input_ids"] for r in rows] == [[1, 7, 1, 8, 9, 10], [1, 5, 6, 0, 0, 0]]
    assert rows[0]["position_ids"] == [0, 1, 0, 1, 2, 3]
    assert rows[0]["labels"] == [-100, 7, -100, -100, 9, 10]
    assert rows[1]["labels"] == [-100, 5, 6, -100, -100, -100]
    assert rows[1]["position_ids"] == [0, 1, 2, 0, 1, 2]
    assert [r["num_tokens"] for r in rows] == [6, 3] and [r["num_examples"] for r in rows] == [2, 1]
    with pytest.raises(ValueError, match="max_length"):
        D.pack([([1] * 7, [1] * 7)], 6, 0)


def test_pack_is_tight_and_keeps_every_token():
    import random
    rng = random.Random(0)
    examples = [([1] + [rng.randint(3, 90) for _ in range(rng.randint(8, 127))],) for _ in range(200)]
    examples = [(ids, [0] + [1] * (len(ids) - 1)) for (ids,) in examples]
    rows = D.pack(examples, 128, pad_id=0)
    total = sum(len(ids) for ids, _ in examples)
    assert sum(r["num_tokens"] for r in rows) == total and sum(r["num_examples"] for r in rows) == 200
    # the bin-packing lower bound: all tokens, and one row for each example of more than half a row
    bound = max(-(-total // 128), sum(len(ids) > 64 for ids, _ in examples))
    assert len(rows) <= 11 * bound // 9 + 1  # best fit decreasing's guarantee
    got = sorted(tuple(r["input_ids"][s:s + n]) for r in rows for s, n in _segments(r))
    assert got == sorted(tuple(ids) for ids, _ in examples)


def _segments(row):
    """(start, length) of the examples in a packed row, from the restarting position ids."""
    pos, out = row["position_ids"][:row["num_tokens"]], []
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b - a) for a, b in zip(starts[:-1], starts[1:])]
