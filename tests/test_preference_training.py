"""Every paired preference loss trains the tiny embedded model on the shipped preference data:
held-out implicit-reward accuracy rises from the untrained 0.5 (policy == reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import PAIRED_LOSSES, RPO_LOSSES

import align
from align.loading import validate_run_config

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
RPO = RPO_LOSSES
PAIRED = PAIRED_LOSSES


def with_rewards(source: Path, target: Path, limit: int) -> str:
    """The shipped pairs plus reward-model scores (chosen above rejected by a varying gap)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:limit]]
    for i, row in enumerate(rows):
        row["score_chosen"], row["score_rejected"] = 1.0 + 0.5 * (i % 3), 0.0
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(target)


def run_config(loss: str, tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = {
        "train": str(DATA / "preference_train.jsonl"),
        "eval": str(DATA / "preference_eval.jsonl"),
        "max_length": 128,
    }
    if loss in RPO:
        data["train"] = with_rewards(DATA / "preference_train.jsonl", tmp_path / "train.jsonl", 256)
        data["eval"] = with_rewards(DATA / "preference_eval.jsonl", tmp_path / "eval.jsonl", 128)
        data["columns"] = {"chosen_reward": "score_chosen", "rejected_reward": "score_rejected"}
    return {
        "algo": "dpo",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "data": data,
        "loss": {"name": loss},
        "trainer": {
            "max_steps": 12,
            "batch_size": 8,
            "eval_batch_size": 64,
            "num_threads": 1,
            "progress": False,
            "tensorboard": False,
        },
        "optim": {"lr": 3e-3},
    }


@pytest.mark.parametrize("loss", PAIRED)
def test_paired_loss_raises_heldout_reward_accuracy(loss: str, tmp_path: Path) -> None:
    plugins = align.load_plugins()
    cfg = validate_run_config(run_config(loss, tmp_path), plugins.registry)
    result = align.train(cfg)
    before, after = result.eval_before["reward_accuracy"], result.eval_after["reward_accuracy"]
    assert before == pytest.approx(0.5)
    assert after >= before + 0.25, (loss, before, after)
