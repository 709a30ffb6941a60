"""Regenerates the small arithmetic task shipped beside this script (deterministic): a task with
a checkable answer, for online methods on the embedded tiny model.

Prompts are sums of two numbers below 20 ("7+12="), answers their sum ("19"). The sums of
held-out prompts are pairs never seen in training. ``arith_sft.jsonl`` holds a few worked
examples for a short warm-up SFT (a random model never writes a number, so rewards would all
be zero); the prompt files hold the answer in an ``answer`` column for the exact-match reward.

    python examples/data/make_arith.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LIMIT = 20


def write(name: str, rows: list[dict[str, str]]) -> None:
    (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(LIMIT) for b in range(LIMIT)]
    rng.shuffle(pairs)
    held_out, seen = pairs[:64], pairs[64:]
    write("arith_prompts_eval.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in held_out])
    write("arith_prompts_train.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in seen])
    write("arith_sft.jsonl", [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in seen[:256]])


if __name__ == "__main__":
    main()
