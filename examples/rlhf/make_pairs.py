"""Preference pairs from the SFT model's own samples, labelled by a checker: the RLHF example's
stand-in for human labellers (Ouyang et al. 2022 label the policy's samples, so the reward model
learns the mistakes the policy actually makes). For every prompt, each distinct wrong sample is
rejected in favour of the right answer (the prompt's ``answer`` column).

    align generate --model runs/rlhf/sft/final --prompts examples/data/arith_prompts_train.jsonl \\
        --out runs/rlhf/samples.jsonl n=8 temperature=1.0 max_tokens=4
    python examples/rlhf/make_pairs.py runs/rlhf/samples.jsonl runs/rlhf/pairs.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pairs_from_samples(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    wrong: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        key = (row["prompt"], str(row["answer"]).strip())
        answers = wrong.setdefault(key, [])
        completion = str(row["completion"]).strip()
        # An empty answer is wrong too, but the preference format needs text on both sides.
        if completion and completion != key[1] and completion not in answers:
            answers.append(completion)
    return [
        {"prompt": prompt, "chosen": answer, "rejected": rejected}
        for (prompt, answer), rejections in wrong.items()
        for rejected in rejections
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    pairs = pairs_from_samples(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    print(f"{len(pairs)} pairs from {len(rows)} samples in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
