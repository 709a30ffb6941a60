"""Rejection sampling, the first online algorithm: sample -> score -> keep the best -> SFT ->
refit, on the shipped arithmetic task. Held-out reward rises (with each installed engine), a
killed run resumes to the same weights, and the selection rule is what the docs say."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import (
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
from align_rs import RejectionSampling


def rs_config(output_dir: Path, model: Path, **sections: Any) -> dict[str, Any]:
    config = arith_config(
        "rs",
        output_dir,
        model,
        iterations=4,
        prompts_per_iteration=64,
        min_reward=1.0,
        trainer={"batch_size": 32},
        optim={"lr": 1e-3},
    )
    return merge(config, sections)


def installed_engines() -> list[str]:
    return align.default_plugins().registry.names("rollout_engine")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_rejection_sampling_raises_heldout_reward(engine, warm_model, tmp_path, capsys):
    if engine not in installed_engines():
        pytest.skip(f"the {engine} engine is not installed")
    out = tmp_path / "rs"
    config = rs_config(out, warm_model, rollout={"name": engine})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "rs.yaml", config))
    assert result.code == 0, result.err
    evals = read_metrics(out, "eval")
    before, after = evals[0]["reward"], evals[-1]["reward"]
    assert after > before + 0.05, (before, after)
    rollouts = read_metrics(out, "rollout")
    assert [row["iteration"] for row in rollouts] == [1, 2, 3, 4]
    for row in rollouts:
        # What every online step logs: generation speed, refit time, engine-trainer agreement.
        assert row["generation_tokens_per_s"] > 0 and row["refit_s"] >= 0
        assert row["kept"] > 0 and row["kept_reward_mean"] == 1.0
        assert 1.0 <= row["logprob_mismatch"] < 1.05


def test_select_keeps_the_best_of_each_prompt_above_the_threshold():
    def sample(prompt: int, reward: float) -> align.Sample:
        row = align.PromptRow(prompt, [1], "p", {})
        return align.Sample(row, [5], [0.0], "stop", f"{prompt}:{reward}", reward)

    groups = [
        [sample(0, 0.2), sample(0, 0.9), sample(0, 0.5)],
        [sample(1, 0.1), sample(1, 0.3)],
    ]
    algorithm = object.__new__(RejectionSampling)
    algorithm.config = type("C", (), {"keep_per_prompt": 2, "min_reward": 0.25})()  # type: ignore[assignment]
    kept = algorithm.select(groups)
    assert [s.text for s in kept] == ["0:0.9", "0:0.5", "1:0.3"]


def test_killed_rs_run_resumes_to_the_same_weights(warm_model, tmp_path, capsys):
    sections = {"iterations": 4, "prompts_per_iteration": 16, "trainer": {"save_every": 2, "batch_size": 8}}
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_config = write_yaml(tmp_path / "killed.yaml", rs_config(killed, warm_model, **sections))
    kill_during_iteration_3(killed_config, killed, tmp_path)

    resumed = run_cli(capsys, "run", killed_config, "--resume")
    assert resumed.code == 0, resumed.err
    result = run_cli(
        capsys, "run", write_yaml(tmp_path / "straight.yaml", rs_config(straight, warm_model, **sections))
    )
    assert result.code == 0, result.err
    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    resumed_rollouts = [row["iteration"] for row in read_metrics(killed, "rollout")]
    assert resumed_rollouts[-2:] == [3, 4]


def test_unknown_reward_is_a_user_error(warm_model, tmp_path, capsys):
    config = rs_config(tmp_path / "rs", warm_model, reward={"name": "no_such_reward", "answer_key": None})
    result = run_cli(capsys, "validate", write_yaml(tmp_path / "rs.yaml", config))
    assert_user_error(result, "no_such_reward")


# An engine that answers the evaluation before training and the first iteration, then dies.
DYING_ENGINE = """
from typing import Literal

import align


class DyingConfig(align.RolloutEngineConfig):
    name: Literal["dying"] = "dying"


class Dying:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def generate(self, prompts, sampling):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("engine worker died")
        return self.inner.generate(prompts, sampling)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@align.hookimpl
def register_rollout_engines(register):
    @register(DyingConfig)
    def dying(cfg, spec):
        hf = align.default_plugins().registry.get("rollout_engine", "hf")
        return Dying(hf.factory(hf.config(name="hf"), spec))
"""


def test_an_engine_that_dies_is_a_user_error_and_the_checkpoint_stays(
    warm_model, tmp_path, capsys, monkeypatch
):
    (tmp_path / "dying_engine_for_tests.py").write_text(textwrap.dedent(DYING_ENGINE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "dying_engine_for_tests")
    monkeypatch.setattr(align.cli, "default_plugins", align.load_plugins)
    out = tmp_path / "rs"
    config = rs_config(
        out,
        warm_model,
        rollout={"name": "dying"},
        prompts_per_iteration=8,
        trainer={"save_every": 1, "eval_batch_size": 64},  # one engine call per evaluation
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "rs.yaml", config))
    assert_user_error(result, "rollout engine 'dying' failed while generating", "engine worker died")
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_1"]
    assert not (out / "final").exists()
