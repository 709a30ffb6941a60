"""Derives the unpaired (KTO) example data from the shipped preference pairs (deterministic).

Training rows keep ONE completion per prompt, as unpaired data has: the chosen answer
(``label: true``, desirable) or the rejected one (``label: false``), picked at random.
Held-out rows keep both completions of every held-out pair, so the desirable and the
undesirable rewards are compared on the same prompts (tasks never seen in training); they are
shuffled, so that the two completions of a prompt are rarely neighbours (a batch's KL estimate
pairs each prompt with its neighbour's completion).

    python examples/data/make_unpaired.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def one_per_prompt(pairs: list[dict[str, str]], rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for pair in pairs:
        desirable = rng.random() < 0.5
        completion = pair["chosen"] if desirable else pair["rejected"]
        rows.append({"prompt": pair["prompt"], "completion": completion, "label": desirable})
    return rows


def both_per_prompt(pairs: list[dict[str, str]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    write(here / "unpaired_train.jsonl", one_per_prompt(read(here / "preference_train.jsonl"), rng))
    held_out = both_per_prompt(read(here / "preference_eval.jsonl"))
    rng.shuffle(held_out)
    write(here / "unpaired_eval.jsonl", held_out)


if __name__ == "__main__":
    main()
