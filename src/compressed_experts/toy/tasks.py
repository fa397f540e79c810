"""The demo's downstream tasks, generated or read by code, deterministic by seed.

- ``math``: multi-step word problems (3 to 4 operations on small numbers) with a worked
  (chain-of-thought) answer ending in
  "The answer is N.", scored by exact match of the final number. Train and test problems
  are disjoint by construction: a problem's split is a hash of its text.
- ``domain``: domain adaptation on real text the bundled model never saw: the standard
  library's test suite, split by file into training and held-out parts, scored by held-out
  loss (nats per token; lower is better).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressedExpertsError
from .corpus import held_out_texts, write_jsonl

NAMES = [
    ("Ada", "She", "her"),
    ("Ben", "He", "his"),
    ("Cleo", "She", "her"),
    ("Dev", "He", "his"),
    ("Eva", "She", "her"),
    ("Finn", "He", "his"),
    ("Gia", "She", "her"),
    ("Hugo", "He", "his"),
]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pencils", "stickers", "tickets"]
FRIENDS = ["Ivy", "Jon", "Kai", "Lea", "Max", "Noa"]
TEST_SHARE = 10  # one problem in TEST_SHARE falls in the test split


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked answer, ending in "The answer is N."
    answer: int


@dataclass(frozen=True)
class Numbers:
    """The ranges a problem's operations draw from.

    The demo's (the defaults) stay small, counts below 50 and operands below 10: a model of the
    bundled size learns one-digit facts in a few minutes of fine-tuning but not two-digit
    carries, and what the task measures is carrying a count through several steps.
    ``scripts/math_task_probes.py`` tries larger ones.
    """

    operands: tuple[int, int] = (1, 9)  # bought or given away
    packs: tuple[int, int] = (4, 5)  # at most this many packs, of at most this many items
    buy_below: int = 41  # a count this large or larger buys no more
    packs_below: int = 30
    double_below: int = 25
    divisors: tuple[int, ...] = (2, 3)

    def __post_init__(self) -> None:
        # Every count must allow some operation (buying below buy_below, giving above the smallest
        # operand + 1), or drawing a problem would never end.
        low, high = self.operands
        if not (
            1 <= low <= high
            and min(self.packs) >= 2
            and min(self.divisors, default=2) >= 2
            and self.buy_below > low + 1
        ):
            raise CompressedExpertsError(
                f"number ranges that cannot make a problem: {self}; operands need 1 <= low <= high, packs and "
                f"divisors at least 2, and buy_below above the smallest operand + 1"
            )


def _step(
    rng: random.Random, value: int, pronoun: str, possessive: str, items: str, numbers: Numbers = Numbers()
) -> tuple[str, str, int] | None:
    """One operation on the running count: (sentence, worked line, new value), or None if it does not fit."""
    low, high = numbers.operands
    kind = rng.choice(["buy", "packs", "give", "double", "share"])
    if kind == "buy" and value < numbers.buy_below:
        b = rng.randint(low, high)
        return f"{pronoun} buys {b} more.", f"{value} + {b} = {value + b}.", value + b
    if kind == "packs" and value < numbers.packs_below:
        c, d = rng.randint(2, numbers.packs[0]), rng.randint(2, numbers.packs[1])
        return (
            f"{pronoun} buys {c} packs of {d} {items} each.",
            f"{c} packs of {d} is {c} * {d} = {c * d}. {value} + {c * d} = {value + c * d}.",
            value + c * d,
        )
    if kind == "give" and value > low + 1:
        e = rng.randint(low, min(high, value - 1))
        friend = rng.choice(FRIENDS)
        return f"{pronoun} gives {e} to {friend}.", f"{value} - {e} = {value - e}.", value - e
    if kind == "double" and value < numbers.double_below:
        return f"{pronoun} doubles {possessive} {items}.", f"{value} * 2 = {value * 2}.", value * 2
    divisors = [k for k in numbers.divisors if value % k == 0 and value > k]
    if kind != "share" or not divisors:
        return None
    k = rng.choice(divisors)
    return (
        f"{pronoun} splits them equally into {k} boxes and keeps one box.",
        f"{value} / {k} = {value // k}.",
        value // k,
    )


def make_problem(rng: random.Random, steps: int, numbers: Numbers = Numbers(), restate: bool = False) -> Problem:
    """One problem of ``steps`` operations on ``numbers``; ``restate`` starts each worked line
    with the sentence it works out (the demo does not; ``scripts/math_task_probes.py`` compares)."""
    name, pronoun, possessive = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    value = rng.randint(2, 20)
    opening = f"{name} has {value} {items}."
    sentences, lines = [opening], [opening if restate else f"{name} starts with {value} {items}."]
    while len(sentences) <= steps:
        drawn = _step(rng, value, pronoun, possessive, items, numbers)
        if drawn is None:
            continue
        sentence, line, value = drawn
        sentences.append(sentence)
        lines.append(f"{sentence[:-1]}: {line}" if restate else line)
    question = " ".join(sentences) + f" How many {items} does {name} have now?"
    return Problem(question, " ".join(lines) + f" The answer is {value}.", value)


def _split_of(question: str) -> str:
    digest = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
    return "test" if digest % TEST_SHARE == 0 else "train"


def math_problems(
    n: int,
    split: str,
    seed: int = 0,
    steps: tuple[int, int] = (3, 4),
    make: Callable[[random.Random, int], Problem] = make_problem,
) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train" or "test"), each with 3 to 4 operations
    (``steps``), drawn by ``make``."""
    rng = random.Random(f"math-{split}-{seed}")
    seen: set[str] = set()
    problems = []
    while len(problems) < n:
        problem = make(rng, rng.randint(*steps))
        if _split_of(problem.question) == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def write_math(path: Path, problems: list[Problem]) -> Path:
    """Training records: the question as the instruction, the worked answer as the output."""
    return _write(path, [{"instruction": p.question, "output": p.solution} for p in problems])


def write_math_eval(path: Path, problems: list[Problem]) -> Path:
    """Evaluation records in GSM8K's own format (``question``, ``answer`` ending in ``#### N``),
    so the ``gsm8k`` task of the evaluation code scores them."""
    return _write(path, [{"question": p.question, "answer": f"{p.solution}\n#### {p.answer}"} for p in problems])


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def domain_split(share_held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """The test-suite files as (training texts, held-out texts), split by a hash of the file name."""
    train, held = [], []
    for name, text in held_out_texts():
        digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        (held if digest % 1000 < share_held_out * 1000 else train).append(text)
    return train, held


def write_domain_train(path: Path, steps: int, batch_size: int, seq_len: int) -> Path:
    """The domain's training files, as many as ``steps`` of fine-tuning take, as plain-text JSONL.

    About 4 characters a token, with room to spare: tokenizing the whole test suite for every
    run would cost more than training on it.
    """
    budget, chosen = steps * batch_size * seq_len * 6, []
    for text in domain_split()[0]:
        chosen.append(("", text))
        budget -= len(text)
        if budget <= 0:
            break
    return write_jsonl(chosen, path)
