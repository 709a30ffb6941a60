"""Where an online iteration's time goes: rejection sampling on the shipped arithmetic task
(examples/rs.yaml: 64 prompts x 8 samples, exact-match reward, one SFT pass on the winners,
refit), with each engine, on the warm-up SFT model (examples/sft_arith.yaml).

    python benchmarks/online_iteration.py                   # hf and vllm engines, 2 threads
    python benchmarks/online_iteration.py --engines hf --iterations 4

Reads the ``split: rollout`` rows of each run's metrics.jsonl (seconds per phase, measured by
the algorithm itself) and prints a markdown table of the mean per iteration, after the first
(which includes the engine's warm-up).
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
PHASES = ("generate_s", "score_s", "train_s", "refit_s")


def align(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "align.cli", *argv], check=True, cwd=REPO)


def phases(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rollouts = [row for row in rows if row.get("split") == "rollout"][1:]
    means = {phase: statistics.mean(row.get(phase, 0.0) for row in rollouts) for phase in PHASES}
    means["tokens_per_s"] = statistics.mean(row["generation_tokens_per_s"] for row in rollouts)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align-online-bench-"))
    quiet = ["trainer.progress=false", "trainer.tensorboard=false", f"trainer.num_threads={args.threads}"]
    align("run", "examples/sft_arith.yaml", f"output_dir={work / 'sft'}", *quiet)
    print("| engine | generate s | score s | train s | refit s | refit share | gen tok/s |")
    print("|---|---|---|---|---|---|---|")
    for engine in args.engines:
        run = work / engine
        align(
            "run",
            "examples/rs.yaml",
            f"output_dir={run}",
            f"model.path={work / 'sft' / 'final'}",
            f"rollout.name={engine}",
            f"iterations={args.iterations}",
            "trainer.save_every=0",
            *quiet,
        )
        m = phases(run)
        total = sum(m[p] for p in PHASES)
        print(
            f"| {engine} | {m['generate_s']:.2f} | {m['score_s']:.3f} | {m['train_s']:.2f} | "
            f"{m['refit_s']:.3f} | {m['refit_s'] / total:.1%} | {m['tokens_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
