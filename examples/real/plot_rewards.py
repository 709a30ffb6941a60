"""The reward curve of a GRPO run as a PNG: the mean reward of each iteration's samples and the
held-out reward (greedy) of each evaluation, from the run's metrics.jsonl. Needs matplotlib.

    python examples/real/plot_rewards.py runs/real_grpo_arith docs/real-model-grpo-reward.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curves(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(iteration, sample reward) of each rollout and (iteration, held-out reward) of each
    evaluation; an evaluation at optimizer step s counts for the iteration that ended there."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rollouts = [r for r in rows if r.get("split") == "rollout" and "reward_mean" in r]
    samples = [(int(r["iteration"]), float(r["reward_mean"])) for r in rollouts]
    step_to_iteration = {int(r["step"]): int(r["iteration"]) for r in rollouts}
    evals = []
    for r in rows:
        if r.get("split") == "eval" and "reward" in r:
            done = [it for step, it in step_to_iteration.items() if step <= int(r["step"])]
            evals.append((max(done, default=0), float(r["reward"])))
    return samples, evals


def main(run: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, evals = curves(Path(run))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*samples, strict=True), marker="o", label="training samples (mean reward, T=1)")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", label="held-out accuracy (greedy, 64 problems)")
    ax.set_xlabel("iteration (0: before training)")
    ax.set_ylabel("exact-match reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("GRPO on SmolLM2-135M-Instruct: arithmetic word problems", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
