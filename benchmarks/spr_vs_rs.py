"""SPR against rejection sampling at the same samples per prompt, on the shipped arithmetic task:
both from the same warm-up model (examples/sft_arith.yaml), both drawing 8 samples of each of
64 prompts per iteration with the same seeds, each at its example's settings (examples/rs.yaml:
best of 8 with reward 1, lr 1e-3; examples/spr.yaml: beta 0.1, lr 3e-4), and, for a like-for-like
learning rate, rejection sampling at SPR's lr too. Reports the held-out exact-match reward
(greedy, 64 unseen sums) before and after, per seed.

    python benchmarks/spr_vs_rs.py                       # 8 iterations, seeds 0 1 2
    python benchmarks/spr_vs_rs.py --iterations 4 --seeds 0 --model runs/sft_arith/final
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "rs (lr 1e-3)": ["examples/rs.yaml"],
    "rs (lr 3e-4)": ["examples/rs.yaml", "optim.lr=3e-4"],
    "spr (beta 0.1)": ["examples/spr.yaml"],
}


def align(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "align.cli", *argv], check=True, cwd=REPO, capture_output=True)


def heldout(run: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row["reward"] for row in rows if row.get("split") == "eval"]
    return evals[0], evals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="A warm-up model to start from (default: run the warm-up)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-spr-vs-rs-"))
    quiet = ["trainer.progress=false", "trainer.tensorboard=false", f"trainer.num_threads={args.threads}"]
    model = args.model
    if model is None:
        align("run", "examples/sft_arith.yaml", f"output_dir={work / 'sft'}", *quiet)
        model = work / "sft" / "final"
    after: dict[str, list[float]] = {}
    print("| variant | seed | held-out reward before | after |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        for name, argv in VARIANTS.items():
            slug = "".join(c if c.isalnum() else "_" for c in name)
            run = work / f"{slug}-seed{seed}"
            align(
                "run",
                *argv,
                f"output_dir={run}",
                f"model.path={model}",
                f"iterations={args.iterations}",
                f"seed={seed}",
                *quiet,
            )
            before, last = heldout(run)
            after.setdefault(name, []).append(last)
            print(f"| {name} | {seed} | {before:.3f} | {last:.3f} |", flush=True)
    print()
    for name, values in after.items():
        print(f"{name}: mean held-out reward after {statistics.mean(values):.3f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
