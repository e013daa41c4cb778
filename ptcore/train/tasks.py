"""Synthetic verifiable tasks: problems with a checkable final answer, for SFT, DPO and GRPO.

``TASKS["addition"]``: ``"345+678="`` -> ``"1023"``. ``TASKS["countdown"]``: ``"3,5,7 to 22:"``
-> any expression using each given number exactly once with + - * / that equals the target, e.g.
``"3*5+7"``. A problem's ``answer`` is what the reward checks: the sum for addition, the puzzle
itself (``"3,5,7->22"``) for countdown, since many expressions are correct.

Train and held-out problems are disjoint by construction: a hash of the problem (order-free:
``a+b`` and ``b+a`` are one problem) puts each one in exactly one split, whatever the seeds.
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

HELDOUT_PERCENT = 20  # share of the problem space reserved for evaluation


@dataclass(frozen=True)
class Problem:
    prompt: str     # what the model sees
    answer: str     # what the reward checks (the GRPO "answer" field)
    solution: str   # one correct completion (the SFT target, DPO "chosen")


def _first_line(text: str) -> str:
    """The completion up to its end: generation stops at eos, but a decoded text may still carry
    special tokens or further lines; only the first line is the model's answer."""
    text = text.split("</s>")[0].split("<pad>")[0]
    return text.split("\n")[0].strip()


class Task:
    """Base class: subclasses define ``name``, ``_sample(rng) -> (key, Problem)``, ``extract_answer``
    and ``reward``."""

    name = "task"

    def split_of(self, key) -> str:
        h = zlib.crc32(repr((self.name, key)).encode()) % 100
        return "heldout" if h < HELDOUT_PERCENT else "train"

    def problems(self, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
        """``n`` distinct problems of ``split`` ("train" or "heldout"), the same for the same seed."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        rng = random.Random(f"{self.name}/{seed}/{split}")  # str seeds are hashed deterministically
        seen, out = set(), []
        for _ in range(50 * n + 1000):
            if len(out) == n:
                break
            key, problem = self._sample(rng)
            if key in seen or self.split_of(key) != split:
                continue
            seen.add(key)
            out.append(problem)
        if len(out) < n:
            raise ValueError(f"n: only {len(out)} distinct {split} problems of {self!r} found, asked "
                             f"for {n}; use a harder configuration for more")
        return out

    def extract_answer(self, text: str) -> str | None:
        raise NotImplementedError

    def reward(self, completion_text: str, answer: str) -> float:
        raise NotImplementedError

    def wrong_solution(self, problem: Problem, rng: random.Random) -> str:
        """A plausible incorrect completion (the DPO "rejected")."""
        raise NotImplementedError


class AdditionTask(Task):
    """``a+b=`` with operands below ``10**digits``; the completion is the decimal sum.

    ``reverse=True`` writes the sum least-significant digit first (``"345+678="`` -> ``"3201"``),
    the order in which carries propagate. ``pad=True`` writes operands with ``digits`` digits and
    the sum with ``digits + 1`` (``"045+678="`` -> ``"0723"``): every digit sits at a fixed
    position, which a small transformer picks up from far fewer examples. With either, ``answer``
    is compared as an exact string (its leading zeros matter)."""

    name = "addition"

    def __init__(self, digits: int = 3, reverse: bool = False, pad: bool = False):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.digits, self.reverse, self.pad = digits, bool(reverse), bool(pad)
        self.exact = self.reverse or self.pad  # answers with leading zeros compare as strings

    def __repr__(self):
        opts = "".join(f", {k}=True" for k in ("reverse", "pad") if getattr(self, k))
        return f"AdditionTask(digits={self.digits}{opts})"

    def _sample(self, rng):
        a, b = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)
        w = self.digits if self.pad else 0
        total = f"{a + b:0{w + 1 if w else 0}d}" if w else str(a + b)
        total = total[::-1] if self.reverse else total
        return (min(a, b), max(a, b)), Problem(f"{a:0{w}d}+{b:0{w}d}=" if w else f"{a}+{b}=", total, total)

    def extract_answer(self, text: str) -> str | None:
        line = _first_line(text)
        return line if re.fullmatch(r"\d+" if self.reverse else r"-?\d+", line) else None

    def reward(self, completion_text: str, answer: str) -> float:
        got = self.extract_answer(completion_text)
        if got is None:
            return 0.0
        return float(got == answer.strip() if self.exact else int(got) == int(answer))

    def wrong_solution(self, problem, rng):
        right = int(problem.answer[::-1] if self.reverse else problem.answer)
        delta = rng.choice([-1, 1]) * rng.choice([1, 10, 100, 1000][: self.digits + 1])
        wrong = str(right + delta if right + delta >= 0 else right - delta)
        wrong = wrong.zfill(self.digits + 1) if self.pad else wrong
        return wrong[::-1] if self.reverse else wrong


class _Expr:
    """An expression node: its text with minimal parentheses, its exact value, its precedence."""

    def __init__(self, text, value, prec):
        self.text, self.value, self.prec = text, value, prec

    @staticmethod
    def combine(a, op, b):
        left = a.text if a.prec >= (2 if op in "*/" else 1) else f"({a.text})"
        # the right operand of - and / needs parentheses at equal precedence: a-(b+c) != a-b+c
        need = {"+": 1, "-": 2, "*": 2, "/": 3}[op]
        right = b.text if b.prec >= need else f"({b.text})"
        if a.value is None or b.value is None or (op == "/" and b.value == 0):
            value = None  # a division by zero somewhere: the whole expression is undefined
        else:
            x, y = a.value, b.value
            value = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
        return _Expr(f"{left}{op}{right}", value, 2 if op in "*/" else 1)


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the numbers used, for + - * / over non-negative integers and parentheses;
    None for anything else (or a division by zero). Parsed with ``ast``: no ``eval``."""
    if len(expr) > 200 or not re.fullmatch(r"[\d+\-*/() ]+", expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    numbers = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return _Expr(str(node.value), Fraction(node.value), 3)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None:
                return None
            return _Expr.combine(a, ops[type(node.op)], b)
        return None

    out = walk(tree)
    if out is None or out.value is None:
        return None
    return out.value, numbers


class CountdownTask(Task):
    """Reach a target with ``count`` numbers in ``[1, max_number]``, each used exactly once, and
    + - * / (exact arithmetic). Every puzzle is solvable: it is built from a random expression."""

    name = "countdown"

    def __init__(self, count: int = 3, max_number: int = 12, max_target: int = 99):
        if count < 2 or max_number < 1 or max_target < 1:
            raise ValueError(f"need count >= 2, max_number >= 1, max_target >= 1; got {count}, "
                             f"{max_number}, {max_target}")
        self.count, self.max_number, self.max_target = count, max_number, max_target

    def __repr__(self):
        return f"CountdownTask(count={self.count}, max_number={self.max_number}, max_target={self.max_target})"

    def _sample(self, rng):
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            nodes = [_Expr(str(x), Fraction(x), 3) for x in numbers]
            while len(nodes) > 1:
                a = nodes.pop(rng.randrange(len(nodes)))
                b = nodes.pop(rng.randrange(len(nodes)))
                nodes.append(_Expr.combine(a, rng.choice("+-*/"), b))
            e = nodes[0]
            if e.value is not None and e.value.denominator == 1 and 1 <= e.value <= self.max_target:
                break
        target = int(e.value)
        shown = ",".join(map(str, numbers))
        key = (tuple(sorted(numbers)), target)
        return key, Problem(f"{shown} to {target}:", f"{shown}->{target}", e.text)

    @staticmethod
    def parse_answer(answer: str) -> tuple[list[int], int]:
        m = re.fullmatch(r"(\d+(?:,\d+)*)->(-?\d+)", answer.strip())
        if not m:
            raise ValueError(f"answer: expected a countdown puzzle like '3,5,7->22', got {answer!r}")
        return [int(x) for x in m.group(1).split(",")], int(m.group(2))

    def extract_answer(self, text: str) -> str | None:
        line = _first_line(text)
        return line if line and evaluate_expression(line) is not None else None

    def reward(self, completion_text: str, answer: str) -> float:
        numbers, target = self.parse_answer(answer)
        expr = self.extract_answer(completion_text)
        if expr is None:
            return 0.0
        value, used = evaluate_expression(expr)
        return float(sorted(used) == sorted(numbers) and value == target)

    def wrong_solution(self, problem, rng):
        for _ in range(100):
            chars = list(problem.solution)
            ops = [i for i, c in enumerate(chars) if c in "+-*/"]
            chars[rng.choice(ops)] = rng.choice("+-*/")
            text = "".join(chars)
            if self.reward(text, problem.answer) == 0.0:
                return text
        return problem.solution + "+1"  # uses a number that is not given: always wrong


TASKS: dict[str, Task] = {"addition": AdditionTask(), "countdown": CountdownTask()}


def get_task(task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; available: {', '.join(TASKS)}")
    return TASKS[task]


def answer_reward(completion_text: str, answer: str) -> float:
    """The built-in verifiable reward for any task's GRPO data: a countdown puzzle answer
    (``"3,5,7->22"``) is checked as countdown, anything else as an exact final answer (first line
    of the completion, whitespace stripped; integers compared as numbers unless the answer has
    leading zeros)."""
    answer = str(answer).strip()
    if re.fullmatch(r"\d+(?:,\d+)*->-?\d+", answer):
        return TASKS["countdown"].reward(completion_text, answer)
    got = _first_line(completion_text)
    # integers compare as numbers, unless the answer has leading zeros (a reversed sum): exact
    if re.fullmatch(r"-?\d+", got) and re.fullmatch(r"-?[1-9]\d*|0", answer):
        return float(int(got) == int(answer))
    return float(got == answer)


def write_jsonl(task, kind: str = "sft", path=None, n: int = 1000, seed: int = 0, *,
                split: str = "train") -> Path:
    """Write ``n`` problems of ``task`` in a loop's data format and return the path:
    sft ``{"prompt", "completion"}``, dpo ``{"prompt", "chosen", "rejected"}``, grpo
    ``{"prompt", "answer"}``. Completions carry no eos: the loops append the tokenizer's."""
    task = get_task(task)
    if kind not in ("sft", "dpo", "grpo"):
        raise ValueError(f"kind must be 'sft', 'dpo' or 'grpo', got {kind!r}")
    if path is None:
        raise ValueError("path: where to write the jsonl file is required")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"write_jsonl/{task.name}/{seed}")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never collide
    try:
        with open(tmp, "w") as f:
            for p in task.problems(n, seed, split):
                if kind == "sft":
                    row = {"prompt": p.prompt, "completion": p.solution}
                elif kind == "dpo":
                    row = {"prompt": p.prompt, "chosen": p.solution,
                           "rejected": task.wrong_solution(p, rng)}
                else:
                    row = {"prompt": p.prompt, "answer": p.answer}
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    finally:  # a failed write (bad n, interrupt, full disk) leaves no temporary file
        tmp.unlink(missing_ok=True)
    return path
