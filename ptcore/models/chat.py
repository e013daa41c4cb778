"""Chat data for the real model: a small set of hand-written conversations, and chat-format
3-digit addition (SFT conversations, GRPO prompts rendered through the tokenizer's chat template,
and a reward that reads the last number of the answer).

The conversations are short factual and instruction-following exchanges written for ptcore (no
dataset is downloaded); :data:`CONVERSATIONS` holds them, :func:`conversations` splits them into
train and held-out parts.
"""
from __future__ import annotations

import re

from ptcore.train.tasks import AdditionTask

_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colors.", "The three primary colors are red, yellow and blue."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("What is the boiling point of water at sea level in Celsius?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("Give me a synonym for 'happy'.", "A synonym for 'happy' is 'joyful'."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("Who wrote 'Romeo and Juliet'?", "'Romeo and Juliet' was written by William Shakespeare."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Write a one-sentence summary of what a CPU does.",
     "A CPU executes the instructions of programs, doing the arithmetic, logic and control work of a computer."),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("Convert 2 kilometers to meters.", "2 kilometers is 2000 meters."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("Give an example of a mammal that can fly.", "The bat is a mammal that can fly."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Name the author of 'Pride and Prejudice'.", "'Pride and Prejudice' was written by Jane Austen."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many minutes are in two hours?", "There are 120 minutes in two hours."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
]
CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in _QA]

# Prompts that make the model write at length (greedy equality over 32+ new tokens).
OPEN_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a robot learning to paint.",
    "Describe the water cycle in a few sentences.",
    "What are the benefits of regular exercise?",
    "Explain what a neural network is to a child.",
    "Give me some tips for studying for an exam.",
    "Describe a typical day in the life of a farmer.",
    "Why is the sky blue?",
    "Write a poem about the ocean.",
    "How do airplanes stay in the air?",
]


def conversations(split: str = "train") -> list[dict]:
    """SFT records (``{"messages": ...}``): 18 train, 6 held-out (every fourth)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    keep = (lambda i: i % 4 == 3) if split == "heldout" else (lambda i: i % 4 != 3)
    return [{"messages": c} for i, c in enumerate(CONVERSATIONS) if keep(i)]


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}? Answer with the number only."


def addition_problems(n: int, *, seed: int = 0, split: str = "train", digits: int = 3):
    """``n`` distinct ``(a, b, sum)`` of the addition task's split (train and held-out disjoint)."""
    out = []
    for p in AdditionTask(digits).problems(n, seed=seed, split=split):
        a, b = (int(x) for x in p.prompt.rstrip("=").split("+"))
        out.append((a, b, a + b))
    return out


def addition_sft(n: int, *, seed: int = 0, split: str = "train", digits: int = 3) -> list[dict]:
    """Chat-format addition conversations: the answer is the bare sum."""
    return [{"messages": [{"role": "user", "content": addition_question(a, b)},
                          {"role": "assistant", "content": str(s)}]}
            for a, b, s in addition_problems(n, seed=seed, split=split, digits=digits)]


SYSTEM = "You are a calculator. Reply with the result only."


def addition_messages(a: int, b: int, system: str | None = SYSTEM) -> list[dict]:
    """The chat of one problem: an optional system turn (short answers: no truncated rambling),
    then the question."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": addition_question(a, b)}]


def addition_prompts(tokenizer, n: int, *, seed: int = 0, split: str = "train", digits: int = 3,
                     system: str | None = SYSTEM) -> list[dict]:
    """GRPO records: ``prompt`` is the question rendered by the tokenizer's chat template with
    the generation prompt (as text: the loops tokenize it), ``answer`` the sum."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("addition_prompts: the tokenizer has no chat template")
    out = []
    for a, b, s in addition_problems(n, seed=seed, split=split, digits=digits):
        text = tokenizer.apply_chat_template(addition_messages(a, b, system), add_generation_prompt=True,
                                             tokenize=False)
        out.append({"prompt": text, "answer": str(s)})
    return out


_NUMBER = re.compile(r"-?\d[\d,]*")


def last_number(text: str) -> int | None:
    """The last integer written in ``text`` (thousands commas allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None


def last_number_reward(prompts=None, completions=None, answer=None, **_) -> list[float]:
    """GRPO reward: 1.0 when the completion's last number equals ``answer`` ("12 + 35 = 47"
    counts: the model's own format), else 0.0."""
    return [float(last_number(c) == int(a)) for c, a in zip(completions, answer)]


def addition_reward(prompts=None, completions=None, answer=None, **_) -> list[float]:
    """GRPO reward with partial credit: 1.0 for the right sum (the completion's last number),
    else ``0.5 * max(0, 1 - |got - sum| / sum)`` (a near miss earns some), 0 with no number.
    A 135M model is rarely exactly right at first, and an all-zero group teaches nothing."""
    out = []
    for c, a in zip(completions, answer):
        got, want = last_number(c), int(a)
        if got is None:
            out.append(0.0)
        elif got == want:
            out.append(1.0)
        else:
            out.append(0.5 * max(0.0, 1.0 - abs(got - want) / max(abs(want), 1)))
    return out
