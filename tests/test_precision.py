"""trainer.precision: fp32, bf16_mixed (bfloat16 autocast, float32 master weights and optimizer
state) and bf16 (bfloat16 weights). One way to say it (model.dtype follows), a clear error when
the two settings contradict, bf16-mixed DPO learns as fp32 does, and it resumes bit-exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DATA, assert_same_weights, dpo_config, load_weights, read_metrics, run_cli, write_yaml
from helpers.online import arith_config
from helpers.resume import train_stopped_at

import align
from align.checkpoint import STATE_FILE
from align.loading import validate_run_config


def validated(config: dict[str, Any]) -> align.RunConfig:
    return validate_run_config(config, align.default_plugins().registry)


def train(config: dict[str, Any], plugins: align.Plugins | None = None) -> align.RunResult:
    plugins = plugins or align.default_plugins()
    return align.train(validate_run_config(config, plugins.registry), plugins)


@pytest.mark.parametrize(
    ("model", "trainer", "precision", "dtype"),
    [
        ({}, {}, "fp32", "float32"),
        ({}, {"precision": "bf16_mixed"}, "bf16_mixed", "float32"),
        ({}, {"precision": "bf16"}, "bf16", "bfloat16"),
        ({"dtype": "bfloat16"}, {}, "bf16", "bfloat16"),  # the older spelling of pure bf16
        ({"dtype": "bfloat16"}, {"precision": "bf16"}, "bf16", "bfloat16"),
        ({"dtype": "float32"}, {"precision": "bf16_mixed"}, "bf16_mixed", "float32"),
    ],
)
def test_model_dtype_follows_the_precision(
    tmp_path: Path, model: dict[str, Any], trainer: dict[str, Any], precision: str, dtype: str
) -> None:
    cfg = validated(dpo_config(tmp_path / "out", model=model, trainer=trainer))
    assert (cfg.trainer.precision, cfg.model.dtype) == (precision, dtype)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16_mixed", "bfloat16"), ("fp32", "bfloat16"), ("bf16", "float32")]
)
def test_a_precision_that_contradicts_model_dtype_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], precision: str, dtype: str
) -> None:
    config = dpo_config(tmp_path / "out", model={"dtype": dtype}, trainer={"precision": precision})
    result = run_cli(capsys, "validate", write_yaml(tmp_path / "run.yaml", config))
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert f"trainer.precision={precision}" in result.err and f"model.dtype is {dtype}" in result.err


def learning_run(output_dir: Path, precision: str) -> dict[str, Any]:
    """Six steps: held-out accuracy reaches 1.0 on these pairs, the reward margin is still rising
    (so it is the finer measure of how far each precision got)."""
    return dpo_config(
        output_dir,
        model={"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        data={"eval": str(DATA / "preference_eval.jsonl")},
        trainer={"max_steps": 6, "eval_batch_size": 64, "precision": precision, "save_every": 3},
        optim={"lr": 2e-3},
    )


@pytest.fixture(scope="module")
def fp32_and_mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, align.RunResult]:
    tmp = tmp_path_factory.mktemp("precision")
    return {p: train(learning_run(tmp / p, p)) for p in ("fp32", "bf16_mixed")}


def test_bf16_mixed_dpo_learns_as_fp32_does(fp32_and_mixed: dict[str, align.RunResult]) -> None:
    fp32, mixed = fp32_and_mixed["fp32"], fp32_and_mixed["bf16_mixed"]
    # The reference scores in the policy's precision: an untrained policy ties it exactly.
    assert mixed.eval_before["reward_margin"] == 0.0 and mixed.eval_before["reward_accuracy"] == 0.5
    before, after = mixed.eval_before["reward_accuracy"], mixed.eval_after["reward_accuracy"]
    assert after >= before + 0.25, (before, after)
    assert after >= fp32.eval_after["reward_accuracy"] - 0.05, (after, fp32.eval_after)
    margins = mixed.eval_after["reward_margin"], fp32.eval_after["reward_margin"]
    assert margins[1] > 1.0 and margins[0] == pytest.approx(margins[1], rel=0.1), margins


def test_bf16_mixed_computes_in_bf16_and_keeps_float32_weights_and_optimizer_state(
    fp32_and_mixed: dict[str, align.RunResult],
) -> None:
    fp32, mixed = fp32_and_mixed["fp32"], fp32_and_mixed["bf16_mixed"]
    # Same first loss (ln 2: policy == reference), then the bf16 forward passes show.
    losses = [[row["loss"] for row in read_metrics(r.output_dir, "train")] for r in (fp32, mixed)]
    assert losses[0][0] == losses[1][0] == pytest.approx(0.6931472, abs=1e-6)
    assert losses[0][1:] != losses[1][1:]
    assert losses[1][1:] == pytest.approx(losses[0][1:], rel=0.05)
    weights = load_weights(mixed.final_dir)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    state = torch.load(mixed.output_dir / "checkpoints" / "step_6" / STATE_FILE, weights_only=True)
    moments = [s[key] for s in state["optimizer"]["state"].values() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_pure_bf16_keeps_bfloat16_weights(tmp_path: Path) -> None:
    config = learning_run(tmp_path / "out", "bf16")
    result = train(config | {"trainer": {**config["trainer"], "max_steps": 2, "save_every": 0}})
    assert {w.dtype for w in load_weights(result.final_dir).values()} == {torch.bfloat16}


def test_bf16_mixed_resumes_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp32_and_mixed: dict[str, align.RunResult]
) -> None:
    straight = fp32_and_mixed["bf16_mixed"]
    config = learning_run(tmp_path / "stopped", "bf16_mixed")
    stopped = train_stopped_at(config, 2, tmp_path, monkeypatch)
    assert stopped.steps == 2
    resumed = train(config | {"resume": True})
    assert resumed.steps == 6
    assert_same_weights(load_weights(resumed.final_dir), load_weights(straight.final_dir))
    losses = [[row["loss"] for row in read_metrics(r.output_dir, "train")] for r in (resumed, straight)]
    assert losses[0] == losses[1]
    assert resumed.eval_after == straight.eval_after


def test_grpo_scores_old_log_probs_in_the_training_precision(
    warm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On-policy, the first update's importance ratio is exactly 1: the old log-probs come from a
    bf16-autocast forward pass like the step's own (float32 ones would be off by up to ~4%)."""
    out = tmp_path / "grpo"
    config = arith_config(
        "grpo",
        out,
        warm_model,
        iterations=1,
        prompts_per_iteration=16,
        trainer={"batch_size": 64, "precision": "bf16_mixed"},
        optim={"lr": 3e-4},
    )
    assert run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config)).code == 0
    first = read_metrics(out, "train")[0]
    assert first["ratio_max"] == 1.0 and first["approx_kl"] == 0.0
