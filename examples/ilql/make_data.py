"""Regenerates the small ILQL task shipped beside this script (deterministic): offline rows of
(prompt, completion, reward) where imitating the data is worse than learning from its rewards.

A prompt is a random two-letter tag and a digit, ``"qx 4="``. The good completion repeats the
digit three times (``"444"``, reward 1.0); the bad one starts the same way and then trails off
(``"4xx"``, reward 0.0), so the two part at the second token. Bad rows are 70% of the data, so
a model that imitates every row (SFT) answers with the bad completion; a method that reads the
rewards (ILQL) can pick the good one. The held-out prompts (new tags) carry the good completion
in an ``answer`` column, for the exact-match reward of ``align generate``.

    python examples/ilql/make_data.py
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).parent
BAD_FRACTION = 0.7


def tag(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(2))


def row(rng: random.Random) -> dict[str, object]:
    digit = rng.randrange(10)
    good = rng.random() >= BAD_FRACTION
    completion = str(digit) * 3 if good else f"{digit}xx"
    return {"prompt": f"{tag(rng)} {digit}=", "completion": completion, "reward": 1.0 if good else 0.0}


def write(name: str, rows: list[dict[str, object]]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(0)
    write("train.jsonl", [row(rng) for _ in range(1024)])
    write("eval.jsonl", [row(rng) for _ in range(128)])
    prompts = []
    for _ in range(64):
        digit = rng.randrange(10)
        prompts.append({"prompt": f"{tag(rng)} {digit}=", "answer": str(digit) * 3})
    write("prompts_eval.jsonl", prompts)


if __name__ == "__main__":
    main()
