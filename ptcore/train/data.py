"""Training data: the jsonl formats, their validation, and tokenization into training examples.

One JSON object per line (blank lines are skipped):

* SFT: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role": ..., "content": ...}]}``
  (the loss covers the completion, or the assistant turns, only);
* DPO: ``{"prompt": str, "chosen": str, "rejected": str}``;
* GRPO: ``{"prompt": str, "answer": str}`` (other keys are passed to custom reward functions).

A malformed line raises ``DataError`` naming the file and the line number (so do a line that is
not UTF-8, JSON nested too deeply, and a text the tokenizer cannot encode); an empty file raises
too. Examples longer than ``max_length`` tokens are truncated (completion side) or skipped, and the
count is always printed.
"""
from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

IGNORE = -100
KINDS = ("sft", "dpo", "grpo")


class DataError(ValueError):
    """A data file (or list of records) that cannot be used: says where and why."""


def _where(source: str, line: Optional[int]) -> str:
    return f"{source}:{line}" if line is not None else source


def read_jsonl(path: Union[str, Path]) -> list[dict]:
    """The objects of a jsonl file, each with its line number under ``"__line__"``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                f"{e.start + 1} of the line); the data must be UTF-8 jsonl") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: the JSON is nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            obj["__line__"] = number
            records.append(obj)
    if not records:
        raise DataError(f"{path}: the data file is empty (one JSON object per line expected)")
    return records


def _check_str(rec, key, where, *, allow_empty=False):
    value = rec.get(key)
    if value is None:
        raise DataError(f"{where}: missing key {key!r} (keys: {sorted(k for k in rec if k != '__line__')})")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise DataError(f"{where}: {key!r} is empty")


def _check_messages(rec, where):
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] must be an object with string 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to learn")


def load_records(data, kind: str) -> list[dict]:
    """Validated records from a jsonl path or a list of dicts, for ``kind`` in sft/dpo/grpo."""
    if kind not in KINDS:
        raise ValueError(f"load_records: 'kind' must be one of {KINDS}, got {kind!r}")
    if isinstance(data, (str, Path)):
        source, records = str(data), read_jsonl(data)
    elif isinstance(data, (list, tuple)):
        source = "data"
        records = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"data[{i}]: expected a dict, got {type(rec).__name__}")
            records.append(dict(rec))
        if not records:
            raise DataError("data: the list of records is empty")
    else:
        raise TypeError(f"data must be a path to a jsonl file or a list of dicts, got {type(data).__name__}")
    for i, rec in enumerate(records):
        line = rec.get("__line__")
        where = _where(source, line) if line is not None else f"{source}[{i}]"
        rec["__where__"] = where
        if kind == "sft":
            if "messages" in rec:
                _check_messages(rec, where)
            else:
                _check_str(rec, "prompt", where, allow_empty=True)
                _check_str(rec, "completion", where)
        elif kind == "dpo":
            _check_str(rec, "prompt", where, allow_empty=True)
            _check_str(rec, "chosen", where)
            _check_str(rec, "rejected", where)
        else:
            _check_str(rec, "prompt", where)
            if "answer" in rec and not isinstance(rec["answer"], (str, int, float)):
                raise DataError(f"{where}: 'answer' must be a string (or number), got {type(rec['answer']).__name__}")
    return records


# ---- tokenization ----

def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=special)["input_ids"]
    return list(out)


def _tokenized(where: str, fn, *args):
    """``fn(*args)``; a text the tokenizer cannot encode (e.g. a character outside its
    vocabulary) raises DataError naming the record's file and line."""
    try:
        return fn(*args)
    except DataError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: cannot tokenize this record: {e}") from None


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model sees it: with the tokenizer's leading special tokens (bos)."""
    return _ids(tokenizer, prompt, special=True)


def completion_ids(tokenizer, completion: str) -> list[int]:
    """A completion: its tokens, then eos (so the model learns to stop)."""
    ids = _ids(tokenizer, completion, special=False)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def chat_example(tokenizer, messages, where: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation: the mask is 1 on the tokens of the assistant turns.

    The assistant spans come from rendering prefixes of the conversation (``messages[:i]`` with
    the generation prompt, then ``messages[:i+1]``), which works with any chat template whose
    rendering of a prefix is a prefix of the rendering of the whole."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{where}: chat data ('messages') needs a tokenizer with a chat template, and "
                        f"the tokenizer of {name!r} has none: set tokenizer.chat_template, or give "
                        "the data as prompt/completion records")
    render = lambda msgs, gen: list(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen,
                                                                  tokenize=True, return_dict=False))
    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[:i + 1], False))
        if ids[:end] != render(messages[:i + 1], False) or end < start:
            raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's "
                            "prefix as a prefix of the whole; cannot find the assistant tokens")
        mask[start:end] = [1] * (end - start)
    return ids, mask


@dataclass
class Overflow:
    """Counts of examples longer than ``max_length`` (printed by :meth:`report`)."""
    truncated: int = 0
    skipped: int = 0

    def report(self, what: str, max_length: int, file=None) -> None:
        file = file or sys.stderr
        if self.truncated:
            print(f"ptcore: {self.truncated} {what} example(s) longer than max_length={max_length} "
                  "tokens were truncated", file=file, flush=True)
        if self.skipped:
            print(f"ptcore: {self.skipped} {what} example(s) longer than max_length={max_length} "
                  "tokens were skipped", file=file, flush=True)


def sft_examples(records, tokenizer, max_length: int, overflow: str = "truncate", *,
                 report: bool = True) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per SFT record; the mask is 1 on completion / assistant tokens."""
    out, counts = [], Overflow()
    for rec in records:
        where = rec.get("__where__", "data")
        if "messages" in rec:
            ids, mask = _tokenized(where, chat_example, tokenizer, rec["messages"], where)
        else:
            p = _tokenized(where, prompt_ids, tokenizer, rec["prompt"])
            c = _tokenized(where, completion_ids, tokenizer, rec["completion"])
            ids, mask = p + c, [0] * len(p) + [1] * len(c)
        if len(ids) > max_length:
            if overflow == "skip":
                counts.skipped += 1
                continue
            counts.truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:  # truncation ate the whole completion: nothing left to learn
            counts.skipped += 1
            continue
        out.append((ids, mask))
    if report:
        counts.report("SFT", max_length)
    if not out:
        raise DataError(f"no usable SFT example (all {len(records)} longer than max_length={max_length}?)")
    return out


def pair_examples(records, tokenizer, max_length: int, overflow: str = "truncate", *,
                  report: bool = True) -> list[dict]:
    """Per DPO record: ``prompt`` ids and ``chosen`` / ``rejected`` completion ids (with eos),
    each of prompt + completion fitting ``max_length`` (completions truncated, or the pair
    skipped); ``index`` is the record's position (the key of the cached reference log-probs)."""
    out, counts = [], Overflow()
    for i, rec in enumerate(records):
        where = rec.get("__where__", f"data[{i}]")
        p = _tokenized(where, prompt_ids, tokenizer, rec["prompt"])
        c = _tokenized(where, completion_ids, tokenizer, rec["chosen"])
        r = _tokenized(where, completion_ids, tokenizer, rec["rejected"])
        if len(p) + max(len(c), len(r)) > max_length:
            room = max_length - len(p)
            if overflow == "skip" or room < 1:
                counts.skipped += 1
                continue
            counts.truncated += 1
            c, r = c[:room], r[:room]
        out.append({"index": i, "prompt": p, "chosen": c, "rejected": r})
    if report:
        counts.report("DPO", max_length)
    if not out:
        raise DataError(f"no usable DPO pair (all {len(records)} longer than max_length={max_length}?)")
    return out


def prompt_examples(records, tokenizer, max_prompt_length: int, overflow: str = "truncate", *,
                    report: bool = True) -> list[dict]:
    """Per GRPO record: its prompt ids (left-truncated to ``max_prompt_length``: the end of a
    prompt is what the completion continues) and the record itself (for the rewards)."""
    out, counts = [], Overflow()
    for rec in records:
        ids = _tokenized(rec.get("__where__", "data"), prompt_ids, tokenizer, rec["prompt"])
        if len(ids) > max_prompt_length:
            if overflow == "skip":
                counts.skipped += 1
                continue
            counts.truncated += 1
            ids = ids[-max_prompt_length:]
        out.append({"prompt": ids, "record": rec})
    if report:
        counts.report("GRPO prompt", max_prompt_length)
    if not out:
        raise DataError(f"no usable GRPO prompt (all {len(records)} longer than {max_prompt_length} tokens?)")
    return out


def pack(examples: Iterable[tuple[list[int], list[int]]], max_length: int,
         pad_id: int) -> list[dict]:
    """Packs (ids, mask) examples into rows of exactly ``max_length`` tokens.

    Best-fit decreasing (longest example first, into the row it fills most tightly): few rows,
    little padding, deterministic. Each row holds whole examples. Position ids restart at 0 for
    every example, so attention never crosses examples (transformers builds a block-diagonal mask
    from them, or flash-attn runs varlen); labels are -100 on prompt tokens, on padding and on
    every example's first token, so no token learns from another example. The padding tail gets
    positions 0, 1, ... of its own (an inert segment)."""
    examples = list(examples)
    for ids, _ in examples:
        if len(ids) > max_length:
            raise ValueError(f"pack: an example has {len(ids)} tokens > max_length={max_length}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[list[int]] = []      # example indices per row
    free: list[tuple[int, int]] = []  # sorted (room left, row id)
    for i in order:
        n = len(examples[i][0])
        k = bisect.bisect_left(free, (n, -1))  # the tightest row with room for n tokens
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": [], "num_examples": len(members)}
        for i in sorted(members):  # dataset order inside a row
            ids, mask = examples[i]
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
            labels[0] = IGNORE
            row["input_ids"] += list(ids)
            row["labels"] += labels
            row["position_ids"] += list(range(len(ids)))
        n = row["num_tokens"] = len(row["input_ids"])
        pad = max_length - n
        row["input_ids"] += [pad_id] * pad
        row["labels"] += [IGNORE] * pad
        row["position_ids"] += list(range(pad))
        out.append(row)
    return out


def pad_examples(examples, pad_id: int) -> dict:
    """Right-pads (ids, mask) examples into a batch: input_ids, attention_mask, labels (-100 off
    the completion), as lists of lists."""
    T = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, mask in examples:
        pad = T - len(ids)
        batch["input_ids"].append(list(ids) + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        labels[0] = IGNORE
        batch["labels"].append(labels + [IGNORE] * pad)
    return batch
