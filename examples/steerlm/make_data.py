"""Regenerates SteerLM's tiny task beside the other example data (deterministic).

A "how do I ..." question is answered at five levels of verbosity: level ``v`` (0-4) is the
task's first sentence followed by ``v`` more, so the answer's length measures the attribute
(22 characters on average at 0, 65 at 4). Training rows hold every level for each task, with the
level in a ``verbosity`` column (HelpSteer's layout: the ``steerlm`` format and the attribute
model's ``scored`` format both read it); held-out rows and prompts use tasks never seen in
training.

    python examples/steerlm/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data"
VERBS = ["bake", "fix", "paint", "plant", "clean", "build", "cook", "wash", "fold", "sort", "draw", "pack"]
NOUNS = ["a cake", "a bike", "a fence", "a tree", "a shelf", "a kite", "a boat", "a lamp", "a rug", "a hat"]
MORE = [" Go slow.", " Be calm.", " Ask a friend.", " Then rest."]
LEVELS = range(5)


def question(verb: str, noun: str) -> str:
    return f"How do I {verb} {noun}?"


def answer(verb: str, noun: str, level: int) -> str:
    return f"{verb.capitalize()} {noun} with care." + "".join(MORE[:level])


def main() -> None:
    rng = random.Random(0)
    tasks = [(verb, noun) for verb in VERBS for noun in NOUNS]
    rng.shuffle(tasks)
    held_out, train = tasks[:24], tasks[24:]
    rows = [
        {"prompt": question(v, n), "completion": answer(v, n, level), "verbosity": level}
        for v, n in train
        for level in LEVELS
    ]
    rng.shuffle(rows)
    evals = [
        {"prompt": question(v, n), "completion": answer(v, n, level), "verbosity": level}
        for i, (v, n) in enumerate(held_out[:12])
        for level in (i % 5, (i + 2) % 5)
    ]
    prompts = [{"prompt": question(v, n)} for v, n in held_out[12:]]
    for name, data in (("train", rows), ("eval", evals), ("prompts", prompts)):
        path = OUT / f"steerlm_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
        print(f"{path}: {len(data)} rows")


if __name__ == "__main__":
    main()
