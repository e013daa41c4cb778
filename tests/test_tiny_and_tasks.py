"""The embedded tiny model, character tokenizer and synthetic verifiable tasks."""
import json
import random

import pytest
import torch

from ptcore.train.tasks import (TASKS, AdditionTask, CountdownTask, Problem, answer_reward,
                                evaluate_expression, get_task, write_jsonl)
from ptcore.train.tiny import (TOKENIZER_FILE, CharTokenizer, load_model_and_tokenizer,
                               tiny_config)


# -- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_round_trip_every_character():
    tok = CharTokenizer()
    text = "".join(tok.characters) + "12+34=46\n(3*5)-7/2"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one id per character
    assert tok.decode(ids) == text
    assert tok.encode(text)[0] == tok.bos_token_id
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert len(set(ids)) == len(set(text))
    assert max(ids) < tok.vocab_size == len(tok)


def test_tokenizer_special_tokens_are_single_ids():
    tok = CharTokenizer()
    ids = tok.encode("<s>1+1=</s><pad>", add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[-2:] == [tok.eos_token_id, tok.pad_token_id]
    assert len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "1+1="
    assert tok.encode("<x", add_special_tokens=False) == tok.convert_tokens_to_ids(["<", "x"])


@pytest.mark.parametrize("bad", ["caf\u00e9", "tab\there", "\u4e2d"])
def test_tokenizer_bad_character_is_a_clear_error(bad):
    tok = CharTokenizer()
    pos = next(i for i, c in enumerate(bad) if c not in tok.characters)
    with pytest.raises(ValueError, match=f"position {pos}"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="not in the character tokenizer"):
        tok([bad])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(12)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_tokenizer_call_padding_and_tensors():
    tok = CharTokenizer()
    enc = tok(["12", "3"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == [tok.encode("12"), tok.encode("3") + [tok.pad_token_id]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    left = tok(["12", "3"], padding=True, padding_side="left", return_tensors="pt")
    assert left["input_ids"][1].tolist() == [tok.pad_token_id] + tok.encode("3")
    assert tok("45", add_special_tokens=False)["input_ids"] == tok.encode("45", False)
    assert tok("12345", truncation=True, max_length=3)["input_ids"] == tok.encode("12")
    with pytest.raises(ValueError, match="padding=True"):
        tok(["12", "3"], return_tensors="pt")
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["12", "3"]


def test_chat_template_and_assistant_mask():
    tok = CharTokenizer()
    conv = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    assert tok.apply_chat_template(conv, tokenize=False) == "<s><|user|>1+2=</s><|assistant|>3</s>"
    assert (tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
            == "<s><|user|>1+2=</s><|assistant|>")
    enc = tok.apply_chat_template(conv, return_assistant_tokens_mask=True)
    assert enc["input_ids"] == tok.encode("<s><|user|>1+2=</s><|assistant|>3</s>", False)
    # loss on the assistant's content and the eos ending its turn, nothing else
    assert enc["assistant_masks"] == [0] * 8 + [1, 1]
    ids = tok.apply_chat_template(conv, return_dict=False)
    assert ids == enc["input_ids"]
    with pytest.raises(ValueError, match="conversation\\[0\\]"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer(padding_side="left")
    tok.save_pretrained(tmp_path)
    back = CharTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab() and back.padding_side == "left"
    assert back.encode("7*8=56") == tok.encode("7*8=56")
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid ptcore tokenizer"):
        CharTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no ptcore_tokenizer.json"):
        CharTokenizer.from_pretrained(tmp_path / "missing")


# -- tiny model ---------------------------------------------------------------------------------
def test_tiny_model_seeded_and_save_load(tmp_path):
    cfg = tiny_config()
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.num_key_value_heads < cfg.num_attention_heads
    m1, tok = load_model_and_tokenizer("tiny", seed=3, num_hidden_layers=2)
    m2, _ = load_model_and_tokenizer("tiny", seed=3, num_hidden_layers=2)
    m3, _ = load_model_and_tokenizer("tiny", seed=4, num_hidden_layers=2)
    assert m1.config.vocab_size == tok.vocab_size
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    m1.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m4, tok4 = load_model_and_tokenizer(tmp_path)
    assert isinstance(tok4, CharTokenizer)
    x = torch.tensor([tok.encode("12+34=")])
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m4(x).logits)
    out = m4.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= x.shape[1] + 3
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model_and_tokenizer(tmp_path / "nope")


# -- tasks --------------------------------------------------------------------------------------
def _problem_key(p):
    """Order-free identity of a problem: "2+3" is "3+2", puzzle "2,3,4->9" is "4,3,2->9"."""
    if "->" in p.answer:
        numbers, target = p.answer.split("->")
        return tuple(sorted(numbers.split(","))), target
    return tuple(sorted(p.prompt[:-1].split("+")))


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_disjoint_distinct_and_repeatable(name):
    task = TASKS[name]
    train = task.problems(1500, seed=0)
    train2 = task.problems(1500, seed=1)
    held = task.problems(300, seed=0, split="heldout")
    assert train == task.problems(1500, seed=0)  # same seed, same problems
    assert train != train2
    assert len({p.prompt for p in train}) == 1500
    assert not {_problem_key(p) for p in train + train2} & {_problem_key(p) for p in held}
    for p in train[:200] + held[:200]:
        assert task.reward(p.solution, p.answer) == 1.0
        assert answer_reward(p.solution, p.answer) == 1.0
    with pytest.raises(ValueError, match="split"):
        task.problems(3, split="test")


def test_addition_reward_and_extractor():
    t = AdditionTask(digits=3)
    assert t.reward("579", "579") == 1.0
    assert t.reward(" 579</s><pad>", "579") == 1.0  # decoded with special tokens
    assert t.reward("579\n123", "579") == 1.0       # first line is the answer
    assert t.reward("578", "579") == 0.0
    assert t.reward("0579", "579") == 1.0           # compared as numbers
    for malformed in ["", "57 9", "five", "579abc", "=579", "5+7"]:
        assert t.extract_answer(malformed) is None
        assert t.reward(malformed, "579") == 0.0


def test_reversed_addition():
    t = AdditionTask(digits=3, reverse=True)
    p = Problem("345+678=", "3201", "3201")
    assert t.reward("3201", p.answer) == 1.0 and answer_reward("3201", p.answer) == 1.0
    assert t.reward("1023", p.answer) == 0.0  # the unreversed sum is wrong in this format
    # a sum ending in zeros: leading zeros of the reversed answer are part of it
    assert t.reward("0001", "0001") == 1.0
    assert t.reward("1", "0001") == 0.0 and answer_reward("1", "0001") == 0.0
    assert t.reward("-1", "0001") == 0.0
    for q in t.problems(300, seed=0) + t.problems(100, seed=0, split="heldout"):
        a, b = map(int, q.prompt[:-1].split("+"))
        assert q.answer == str(a + b)[::-1] and t.reward(q.solution, q.answer) == 1.0
        assert t.reward(t.wrong_solution(q, random.Random(0)), q.answer) == 0.0
    # the same problems in every format get the same split
    plain = AdditionTask(digits=3)
    assert [q.prompt for q in plain.problems(50, seed=3)] == [q.prompt for q in t.problems(50, seed=3)]


def test_padded_addition():
    t = AdditionTask(digits=3, pad=True)
    for q in t.problems(300, seed=0):
        a, b = q.prompt[:-1].split("+")
        assert len(a) == len(b) == 3 and len(q.answer) == 4
        assert int(q.answer) == int(a) + int(b) and t.reward(q.solution, q.answer) == 1.0
        assert t.reward(q.answer.lstrip("0") or "0", q.answer) == (1.0 if q.answer[0] != "0" else 0.0)
        wrong = t.wrong_solution(q, random.Random(0))
        assert len(wrong) == 4 and t.reward(wrong, q.answer) == 0.0
    both = AdditionTask(digits=2, reverse=True, pad=True)
    assert both.reward("090", "090") == 1.0 and both.reward("09", "090") == 0.0
    assert repr(both) == "AdditionTask(digits=2, reverse=True, pad=True)"


def test_countdown_reward_checks_numbers_and_value():
    t = CountdownTask()
    assert t.reward("3*5+7", "3,5,7->22") == 1.0
    assert t.reward("7+5*3", "3,5,7->22") == 1.0       # any correct expression
    assert t.reward("(7+5)*3", "3,5,7->22") == 0.0     # wrong value
    assert t.reward("3*5+7+0", "3,5,7->22") == 0.0     # a number that is not given
    assert t.reward("22", "3,5,7->22") == 0.0          # numbers not used
    assert t.reward("3*5+7*1", "3,5,7->22") == 0.0
    assert t.reward("12/(3-3)+5", "12,3,3,5->5") == 0.0  # division by zero
    assert t.reward("6/4*2", "6,4,2->3") == 1.0        # exact fractions
    for malformed in ["", "3*5+", "__import__('os')", "3**5", "3;5", "abc"]:
        assert t.reward(malformed, "3,5,7->22") == 0.0
    assert evaluate_expression("2*(3+4)")[0] == 14
    with pytest.raises(ValueError, match="countdown puzzle"):
        t.reward("1+2", "3")


def test_wrong_solutions_are_wrong():
    rng = random.Random(0)
    for task in TASKS.values():
        for p in task.problems(200, seed=5):
            assert task.reward(task.wrong_solution(p, rng), p.answer) == 0.0


@pytest.mark.parametrize("kind,keys", [("sft", {"prompt", "completion"}),
                                       ("dpo", {"prompt", "chosen", "rejected"}),
                                       ("grpo", {"prompt", "answer"})])
@pytest.mark.parametrize("name", list(TASKS))
def test_write_jsonl_formats(tmp_path, kind, keys, name):
    path = write_jsonl(name, kind, tmp_path / f"{kind}.jsonl", n=50, seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50
    task = get_task(name)
    problems = task.problems(50, seed=2)
    for row, p in zip(rows, problems):
        assert set(row) == keys and all(isinstance(v, str) for v in row.values())
        assert row["prompt"] == p.prompt
        if kind == "sft":
            assert task.reward(row["completion"], p.answer) == 1.0
        if kind == "dpo":
            assert task.reward(row["chosen"], p.answer) == 1.0
            assert task.reward(row["rejected"], p.answer) == 0.0
        if kind == "grpo":
            assert answer_reward(p.solution, row["answer"]) == 1.0
    held = write_jsonl(name, "grpo", tmp_path / "held.jsonl", n=20, seed=2, split="heldout")
    held_prompts = {json.loads(x)["prompt"] for x in held.read_text().splitlines()}
    assert not held_prompts & {r["prompt"] for r in rows}


def test_bad_task_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="kind"):
        write_jsonl("addition", "ppo", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="path"):
        write_jsonl("addition", "sft")
    with pytest.raises(ValueError, match="distinct"):
        AdditionTask(digits=1).problems(100)  # only 55 unordered pairs exist
    assert isinstance(TASKS["addition"].problems(1)[0], Problem)
