"""Writes the arithmetic word problems of examples/real/grpo_arith.yaml: one-step additions and
subtractions with numbers up to 20, as conversations, each with its answer for exact match.

    python examples/real/make_word_problems.py   # rewrites examples/real/data/word_problems_*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "data"
NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Jack", "Lily"]
THINGS = [
    "apples",
    "marbles",
    "books",
    "stickers",
    "pencils",
    "cookies",
    "cards",
    "shells",
    "coins",
    "balloons",
]
ADD = [
    "{name} has {a} {things}. {name} gets {b} more. How many {things} does {name} have now?",
    "There are {a} {things} in a box. {name} puts in {b} more. How many {things} are in the box?",
    "{name} found {a} {things} on Monday and {b} {things} on Tuesday. How many {things} did {name} find?",
]
SUB = [
    "{name} has {a} {things}. {name} gives away {b}. How many {things} does {name} have left?",
    "There are {a} {things} on a table. {name} takes {b} of them. How many {things} are still on the table?",
    "{name} had {a} {things} and lost {b}. How many {things} does {name} have now?",
]
INSTRUCTION = "Answer with just the number."


def problem(rng: random.Random) -> dict[str, object]:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        text, answer = rng.choice(ADD).format(name=name, things=things, a=a, b=b), a + b
    else:
        a = rng.randint(2, 20)
        b = rng.randint(1, a - 1)
        text, answer = rng.choice(SUB).format(name=name, things=things, a=a, b=b), a - b
    return {"prompt": [{"role": "user", "content": f"{text} {INSTRUCTION}"}], "answer": str(answer)}


def unique(rng: random.Random, count: int, seen: set[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    while len(rows) < count:
        row = problem(rng)
        key = json.dumps(row["prompt"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def write(name: str, rows: list[dict[str, object]]) -> None:
    with (HERE / name).open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows -> {HERE / name}")


def main() -> None:
    rng, seen = random.Random(0), set[str]()
    HERE.mkdir(exist_ok=True)
    held_out = unique(rng, 64, seen)  # drawn first: training never repeats one of them
    write("word_problems_eval.jsonl", held_out)
    write("word_problems_train.jsonl", unique(rng, 512, seen))


if __name__ == "__main__":
    main()
