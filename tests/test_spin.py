"""SPIN (self-play fine-tuning) on the shipped arithmetic task as SFT data: the final model wins
against the start model on held-out prompts, each iteration trains against the policy it
started from, its model and generations are kept, the pair rules are the documented ones, and a
killed run resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DATA,
    TINY_MODEL,
    assert_same_weights,
    assert_user_error,
    load_weights,
    merge,
    read_metrics,
    run_cli,
    write_yaml,
)
from helpers.online import arith_config, kill_during_iteration_3

import align
from align_spin import SPIN, win_rate


def spin_config(output_dir: Path, model: Path, **sections: Any) -> dict[str, Any]:
    """SFT rows from the arithmetic prompts (the answer is the gold response)."""
    config = arith_config(
        "spin",
        output_dir,
        model,
        data={"format": "sft", "columns": {"completion": "answer"}},
        sampling={"n": 1},
        iterations=3,
        prompts_per_iteration=64,
        loss={"name": "dpo", "beta": 0.1},
        trainer={"batch_size": 16},
        optim={"lr": 3e-4},
    )
    return merge(config, sections)


def test_spin_final_model_wins_against_the_start_model(warm_model, tmp_path, capsys):
    out = tmp_path / "spin"
    result = run_cli(capsys, "run", write_yaml(tmp_path / "spin.yaml", spin_config(out, warm_model)))
    assert result.code == 0, result.err
    evals = read_metrics(out, "eval")
    assert evals[0]["win_rate_vs_start"] == 0.5  # the start model against itself
    assert evals[-1]["win_rate_vs_start"] > 0.53, evals
    assert evals[-1]["reward"] > evals[0]["reward"] and evals[-1]["gold_nll"] < evals[0]["gold_nll"]
    # Each iteration's model and generations are kept; the last model is the final one.
    data = [json.loads(line) for line in (DATA / "arith_prompts_train.jsonl").read_text().splitlines()]
    answers = {row["prompt"]: row["answer"] for row in data}
    for number in (1, 2, 3):
        lines = (out / "iterations" / f"iteration_{number}" / "generations.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 64 and all(answers[r["prompt"]] == r["gold"] for r in rows)
        assert {r["reward"] for r in rows} <= {0.0, 1.0}
    assert_same_weights(
        load_weights(out / "iterations" / "iteration_3" / "model"), load_weights(out / "final")
    )
    rollouts = read_metrics(out, "rollout")
    assert [row["pairs"] + row["skipped_identical"] + row["skipped_empty"] for row in rollouts] == [
        64,
        64,
        64,
    ]


@pytest.mark.parametrize("loss", [{"name": "dpo", "beta": 0.1}, {"name": "ipo", "beta": 0.1}])
def test_each_iteration_starts_from_its_own_reference(loss, warm_model, tmp_path, capsys):
    """The reference of iteration t is the policy as t starts: on its first step the policy's
    log-ratios are 0, so the implicit-reward margin is 0 (DPO's loss is log 2)."""
    out = tmp_path / "spin"
    sections = {"prompts_per_iteration": 16, "loss": loss, "trainer": {"batch_size": 8, "log_every": 1}}
    result = run_cli(
        capsys, "run", write_yaml(tmp_path / "spin.yaml", spin_config(out, warm_model, **sections))
    )
    assert result.code == 0, result.err
    train = {row["step"]: row for row in read_metrics(out, "train")}
    firsts = [1] + [row["step"] + 1 for row in read_metrics(out, "rollout")[:-1]]
    for step in firsts:
        assert abs(train[step]["reward_margin"]) < 1e-5, (step, train[step])
        if loss["name"] == "dpo":
            assert train[step]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    later = [row for step, row in train.items() if step not in firsts]
    assert any(abs(row["reward_margin"]) > 1e-3 for row in later)


def test_pairs_skip_empty_and_identical_answers_and_count_them():
    def sample(completion: list[int]) -> align.Sample:
        row = align.PromptRow(0, [1, 5], "p", {"completion_ids": [7, 8, 2]})
        return align.Sample(row, completion, [0.0] * len(completion), "stop", "")

    algorithm = object.__new__(SPIN)
    algorithm.tokenizer = type("T", (), {"eos_token_id": 2})()
    pairs, skipped = algorithm.make_pairs([sample([2]), sample([]), sample([7, 8, 2]), sample([7, 9, 2])])
    assert skipped == {"skipped_empty": 2, "skipped_identical": 1}
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([7, 8, 2], [7, 9, 2])]


def test_win_rate_counts_ties_half():
    assert win_rate({1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}, {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}) == 0.5
    assert win_rate({1: 1.0, 2: 1.0}, {1: 0.0, 2: 1.0}) == 0.75


def test_killed_spin_run_resumes_to_the_same_weights(warm_model, tmp_path, capsys):
    sections = {"iterations": 4, "prompts_per_iteration": 16, "trainer": {"save_every": 2, "batch_size": 8}}
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_config = write_yaml(tmp_path / "killed.yaml", spin_config(killed, warm_model, **sections))
    kill_during_iteration_3(killed_config, killed, tmp_path)

    resumed = run_cli(capsys, "run", killed_config, "--resume")
    assert resumed.code == 0, resumed.err
    config = spin_config(straight, warm_model, **sections)
    assert run_cli(capsys, "run", write_yaml(tmp_path / "straight.yaml", config)).code == 0
    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    for number in (1, 2, 3, 4):
        folder = Path("iterations") / f"iteration_{number}"
        assert (killed / folder / "generations.jsonl").read_text() == (
            straight / folder / "generations.jsonl"
        ).read_text()
        assert_same_weights(
            load_weights(killed / folder / "model"), load_weights(straight / folder / "model")
        )
    assert read_metrics(killed, "eval")[-1] == read_metrics(straight, "eval")[-1]


def test_a_loss_that_needs_per_token_reference_logprobs_is_a_config_error(tmp_path, capsys):
    config = {
        "algo": "spin",
        "output_dir": str(tmp_path / "spin"),
        "model": TINY_MODEL,
        "data": {"format": "sft", "train": str(DATA / "sft_train.jsonl"), "max_length": 64},
        "loss": {"name": "ld_dpo"},
        "trainer": {"progress": False, "tensorboard": False},
    }
    result = run_cli(capsys, "run", write_yaml(tmp_path / "spin.yaml", config))
    assert_user_error(result, "loss: 'ld_dpo' needs per-token reference log-probs")


def test_reward_aware_losses_get_the_gold_minus_generated_reward_gap(warm_model, tmp_path, capsys):
    """With a reward, each pair carries reward(gold) - reward(generated), so rpo_* losses train;
    without one they stop with their own error."""
    sections = {
        "iterations": 1,
        "prompts_per_iteration": 16,
        "loss": {"name": "rpo_sq"},
        "trainer": {"log_every": 1},
    }
    out = tmp_path / "spin"
    result = run_cli(
        capsys, "run", write_yaml(tmp_path / "spin.yaml", spin_config(out, warm_model, **sections))
    )
    assert result.code == 0, result.err
    assert read_metrics(out, "rollout")[0]["pairs"] > 0
    # On the first step the policy is its reference (z = 0): rpo_sq is then (eta * gap)^2 > 0.
    assert read_metrics(out, "train")[0]["loss"] > 0
    config = spin_config(tmp_path / "no_reward", warm_model, reward=None, **sections)
    result = run_cli(capsys, "run", write_yaml(tmp_path / "no_reward.yaml", config))
    assert_user_error(result, "rpo_sq", "needs the reward model's score")


def test_an_earlier_runs_iterations_block_a_new_run_and_overwrite_replaces_them(warm_model, tmp_path, capsys):
    out = tmp_path / "spin"
    leftover = out / "iterations" / "iteration_9"
    leftover.mkdir(parents=True)  # from an earlier run with more iterations
    config = spin_config(out, warm_model, iterations=1, prompts_per_iteration=16)
    path = write_yaml(tmp_path / "spin.yaml", config)
    assert_user_error(run_cli(capsys, "run", path), "already holds a run", "iterations")
    assert leftover.is_dir()  # nothing was changed
    result = run_cli(capsys, "run", path, "overwrite=true")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (out / "iterations").iterdir()) == ["iteration_1"]
