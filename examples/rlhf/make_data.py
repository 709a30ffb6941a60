"""Regenerates the preference pairs of the RLHF example (deterministic): for each arithmetic
prompt of examples/data (a sum of two numbers below 20), the right sum is chosen over a wrong
one, half the time a near miss (off by 1 to 3), half the time any other number up to 38. The
training pairs use the training prompts, the eval pairs the held-out prompts, so the reward
model is judged on sums it never saw.

    python examples/rlhf/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE.parent / "data"
PAIRS_PER_PROMPT = 2


def wrong_answer(rng: random.Random, right: int) -> int:
    while True:
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < 0.5 else rng.randrange(39)
        if wrong != right and wrong >= 0:
            return wrong


def pairs(prompts: Path, rng: random.Random) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        right = int(row["answer"])
        for _ in range(PAIRS_PER_PROMPT):
            out.append(
                {"prompt": row["prompt"], "chosen": str(right), "rejected": str(wrong_answer(rng, right))}
            )
    return out


def main() -> None:
    rng = random.Random(0)
    for split, source in (("train", "arith_prompts_train.jsonl"), ("eval", "arith_prompts_eval.jsonl")):
        rows = pairs(DATA / source, rng)
        (HERE / f"arith_preferences_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
