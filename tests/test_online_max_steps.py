"""``trainer.max_steps`` caps the policy's optimizer steps of an online run even inside an
iteration: PPO (several epochs per iteration) and GRPO stop there, save, and write final/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import DATA, QUIET_TRAINER, TINY_MODEL, read_metrics, run_cli, write_yaml


def tiny_online(algo: str, output_dir: Path, **sections: Any) -> dict[str, Any]:
    """3 iterations of 8 prompts x 4 samples in steps of 8 (4 steps per epoch), 2 epochs."""
    return {
        "algo": algo,
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {"format": "prompts", "train": str(DATA / "arith_prompts_train.jsonl"), "max_length": 32},
        "reward": {"name": "length", "target": 6},
        "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 4},
        "iterations": 3,
        "prompts_per_iteration": 8,
        "epochs": 2,
        "trainer": {**QUIET_TRAINER, "batch_size": 8, "max_steps": 3},
        "optim": {"lr": 1e-3},
        **sections,
    }


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_max_steps_stops_inside_an_iteration(
    algo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / algo
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", tiny_online(algo, out)))
    assert result.code == 0, result.err
    assert [row["step"] for row in read_metrics(out, "train")] == [1, 2, 3]  # not the 8 of an iteration
    assert [row["iteration"] for row in read_metrics(out, "rollout")] == [1]
    assert (out / "final" / "config.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_3"]
