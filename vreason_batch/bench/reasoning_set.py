"""A small text reasoning set with answers known in code, for real-weight checks of text LMs.

Every row is generated from a seeded `random.Random`, so the same (n, seed) gives the same rows,
ids included, on every machine. Rows follow the manifest format (`video` is empty: text only):

    {"id", "dataset": "arith-reasoning", "question", "options" (multiple choice only),
     "answer", "problem_type", "video": ""}

Multiple-choice answers are the option letter ("B"); numerical answers are integer strings.
The problems need two or three steps each (order of operations, a comparison of two computed
values, a word problem), so that a reasoning prompt has something to reason about, with small
numbers that a reader can check by hand (SmolLM2-135M still fails them: docs/realweights.md).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

DATASET = "arith-reasoning"
LETTERS = "ABCDEFGH"

# A generator takes the shared rng and returns (question, answer, options or None).
Generator = Callable[[random.Random], tuple[str, str, list[str] | None]]


def _mc(rng: random.Random, question: str, right: str, wrong: list[str]) -> tuple[str, str, list[str]]:
    """Shuffle the right option among distinct wrong ones; return (question, letter, options)."""
    options = [right] + [w for w in dict.fromkeys(wrong) if w != right]
    rng.shuffle(options)
    return question, LETTERS[options.index(right)], options


def _order_of_operations(rng: random.Random) -> tuple[str, str, None]:
    a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} + {b} * {c}?", str(a + b * c), None


def _two_steps(rng: random.Random) -> tuple[str, str, None]:
    a, b = rng.randint(10, 40), rng.randint(2, 9)
    c = rng.randint(2, 5)
    return f"Compute ({a} - {b}) * {c}.", str((a - b) * c), None


def _shopping(rng: random.Random) -> tuple[str, str, None]:
    name = rng.choice(["Ana", "Ben", "Chen", "Dara", "Eli", "Femi"])
    n, price = rng.randint(2, 6), rng.randint(2, 9)
    paid = (n * price // 10 + 1) * 10  # the next multiple of 10 above the total: change is positive
    return (
        f"{name} buys {n} notebooks at {price} dollars each and pays with {paid} dollars. "
        f"How many dollars of change does {name} get?",
        str(paid - n * price),
        None,
    )


def _boxes(rng: random.Random) -> tuple[str, str, None]:
    boxes, per_box = rng.randint(2, 7), rng.randint(3, 12)
    given = rng.randint(1, boxes * per_box - 1)
    return (
        f"A shelf has {boxes} boxes with {per_box} apples in each box. {given} apples are sold. "
        "How many apples are left?",
        str(boxes * per_box - given),
        None,
    )


def _speed(rng: random.Random) -> tuple[str, str, None]:
    speed, hours, extra = rng.choice([30, 40, 50, 60, 70, 80]), rng.randint(2, 5), rng.randint(5, 40)
    return (
        f"A car drives at {speed} km per hour for {hours} hours, then {extra} km more. "
        "How many km does it drive in total?",
        str(speed * hours + extra),
        None,
    )


def _compare_expressions(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b, c, d = rng.randint(3, 12), rng.randint(3, 12), rng.randint(10, 60), rng.randint(10, 60)
    left, right = a * b, c + d
    if left == right:
        d += 1
        right += 1
    question = f"Which is larger: {a} * {b} or {c} + {d}?"
    winner, loser = (f"{a} * {b}", f"{c} + {d}") if left > right else (f"{c} + {d}", f"{a} * {b}")
    return _mc(rng, question, winner, [loser, "They are equal"])


def _mc_arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b, c = rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 9)
    value = a * b - c
    # distractors a model makes by skipping or misordering a step
    wrong = [str(a * (b - c)), str(a * b + c), str(value + rng.choice([-2, -1, 1, 2]))]
    return _mc(rng, f"What is {a} * {b} - {c}?", str(value), wrong)


def _youngest(rng: random.Random) -> tuple[str, str, list[str]]:
    names = rng.sample(["Ava", "Bo", "Cy", "Di", "Ed", "Flo", "Gus"], 3)
    oldest, middle, youngest = names
    question = f"{oldest} is older than {middle}. {middle} is older than {youngest}. Who is the youngest?"
    return _mc(rng, question, youngest, [oldest, middle])


def _even_odd_sum(rng: random.Random) -> tuple[str, str, list[str]]:
    nums = [rng.randint(1, 30) for _ in range(3)]
    total = sum(nums)
    question = f"Is the sum {nums[0]} + {nums[1]} + {nums[2]} even or odd?"
    right, wrong = ("even", "odd") if total % 2 == 0 else ("odd", "even")
    return _mc(rng, question, right, [wrong])


# Numerical and multiple-choice kinds interleaved, so any prefix of the set is a near-even mix.
GENERATORS: tuple[tuple[str, str, Generator], ...] = (
    ("order_of_operations", "numerical", _order_of_operations),
    ("compare_expressions", "multiple_choice", _compare_expressions),
    ("shopping", "numerical", _shopping),
    ("mc_arithmetic", "multiple_choice", _mc_arithmetic),
    ("boxes", "numerical", _boxes),
    ("youngest", "multiple_choice", _youngest),
    ("two_steps", "numerical", _two_steps),
    ("even_odd_sum", "multiple_choice", _even_odd_sum),
    ("speed", "numerical", _speed),
)


def make_reasoning_set(n: int = 48, seed: int = 0) -> list[dict]:
    """`n` rows cycling through the problem kinds; deterministic for (n, seed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind, problem_type, generate = GENERATORS[i % len(GENERATORS)]
        question, answer, options = generate(rng)
        row = {
            "id": f"{DATASET}-s{seed}-{i:04d}-{kind}",
            "dataset": DATASET,
            "question": question,
            "answer": answer,
            "problem_type": problem_type,
            "video": "",
        }
        if options is not None:
            row["options"] = options
        rows.append(row)
    return rows


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL (one object a line, UTF-8); the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
