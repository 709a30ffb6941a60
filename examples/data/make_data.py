"""Regenerates the small example datasets shipped beside this script (deterministic).

Preference pairs share a prompt; the chosen answer is helpful and polite, the rejected one
dismissive. Held-out pairs use tasks never seen in training, so a rise in held-out
preference accuracy means the model learned the style, not the rows.

    python examples/data/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VERBS = [
    "bake",
    "fix",
    "paint",
    "plant",
    "clean",
    "build",
    "cook",
    "wash",
    "fold",
    "sort",
    "draw",
    "mend",
    "write",
    "pack",
    "tune",
    "carve",
    "brew",
    "sew",
    "knit",
    "frame",
]
NOUNS = [
    "bread",
    "a bike",
    "a fence",
    "tomatoes",
    "the oven",
    "a shelf",
    "rice",
    "a car",
    "shirts",
    "old letters",
    "a map",
    "a sock",
    "a poem",
    "a suitcase",
    "a guitar",
    "a pumpkin",
    "tea",
    "a button",
    "a scarf",
    "a picture",
]
STEPS = [
    "gather what you need",
    "read the instructions",
    "start slowly",
    "check each part",
    "ask a friend to help",
    "take short breaks",
    "measure twice",
    "keep things tidy",
]
ASK = [
    "How do I {task}?",
    "Can you explain how to {task}?",
    "What is the best way to {task}?",
    "Any tips to {task}?",
]
GOOD = [
    "Sure! To {task}, first {a}, then {b}. Hope this helps!",
    "Happy to help. To {task}, {a} and then {b}. Good luck!",
    "Great question! Begin when you {a}; after that, {b}. Have fun!",
]
BAD = [
    "No. Figure out how to {task} yourself.",
    "Why would I tell you? Just {task} somehow.",
    "Ugh, {task}? Not my problem.",
]


def pair(rng: random.Random, verbs: list[str]) -> dict[str, str]:
    task = f"{rng.choice(verbs)} {rng.choice(NOUNS)}"
    a, b = rng.sample(STEPS, 2)
    return {
        "prompt": "Q: " + rng.choice(ASK).format(task=task) + "\nA: ",
        "chosen": rng.choice(GOOD).format(task=task, a=a, b=b),
        "rejected": rng.choice(BAD).format(task=task),
    }


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    train_verbs, eval_verbs = VERBS[:15], VERBS[15:]
    write(here / "preference_train.jsonl", [pair(rng, train_verbs) for _ in range(512)])
    write(here / "preference_eval.jsonl", [pair(rng, eval_verbs) for _ in range(128)])
    sft = [pair(rng, train_verbs) for _ in range(256)]
    write(here / "sft_train.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in sft])
    sft_eval = [pair(rng, eval_verbs) for _ in range(64)]
    write(here / "sft_eval.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in sft_eval])


if __name__ == "__main__":
    main()
