"""PPO's ``old_logps_source: engine``: the hf engine samples with the policy's own fp32 weights,
so its per-token log-probs are the policy's to rounding; taking them as the old log-probs skips
the actor's scoring pass and leaves the iteration's losses, metrics and update as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import assert_user_error, load_weights, max_weight_diff, read_metrics, run_cli, write_yaml
from test_ppo import ppo_config

from align_ppo.algorithm import PPO, Experience

# Measured on the tiny warm model (fp32, hf engine, 2 x 16 samples of up to 4 tokens): the
# engine's log-probs differ from the scoring pass's by at most 2.4e-6 nats (a KV-cached,
# left-padded decode against one full forward); the logged metrics then agree to 2.6e-6 and the
# final weights to 1.1e-6. The bounds leave about 8x room.
LOGP_TOLERANCE = 2e-5
METRIC_TOLERANCE = 2e-5


def run_ppo(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> tuple[Path, list[Experience], int]:
    """Two PPO iterations (the second's policy is no longer the reference: a KL penalty) of two
    steps each; returns the output folder, the experience of both iterations and how many
    scoring passes the policy (not the reference) made."""
    experience: list[Experience] = []
    policy_passes = 0
    make_experience, completion_logps = PPO.make_experience, PPO.completion_logps

    def keep_experience(self: PPO, *args: Any, **kwargs: Any) -> list[Experience]:
        made = make_experience(self, *args, **kwargs)
        experience.extend(made)
        return made

    def count_policy_passes(self: PPO, model: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal policy_passes
        policy_passes += model is self.ctx.policy
        return completion_logps(self, model, *args, **kwargs)

    monkeypatch.setattr(PPO, "make_experience", keep_experience)
    monkeypatch.setattr(PPO, "completion_logps", count_policy_passes)
    out = tmp_path / source
    config = ppo_config(out, model, iterations=2, epochs=1, old_logps_source=source)
    config["trainer"]["batch_size"] = 8
    result = run_cli(capsys, "run", write_yaml(tmp_path / f"{source}.yaml", config))
    assert result.code == 0, result.err
    monkeypatch.undo()
    return out, experience, policy_passes


def test_engine_logps_skip_the_policy_pass_and_match_the_scored_ones(
    warm_model, tmp_path, capsys, monkeypatch
):
    scored_out, scored, scored_passes = run_ppo(warm_model, tmp_path, capsys, monkeypatch, "scored")
    engine_out, engine, engine_passes = run_ppo(warm_model, tmp_path, capsys, monkeypatch, "engine")
    # The policy's scoring pass runs once an iteration with `scored` (one call for the 16
    # rollouts) and never with `engine`; the reference's pass (the KL penalty) runs in both.
    assert (scored_passes, engine_passes) == (2, 0)
    # The same samples (seeded engine); with `engine` the old log-probs are the engine's own.
    assert [e.sample.completion_ids for e in engine] == [e.sample.completion_ids for e in scored]
    gap = max(float((e.old_logps - s.old_logps).abs().max()) for e, s in zip(engine, scored, strict=True))
    print(f"max |engine - scored| old log-prob: {gap:.3g}")
    assert gap < LOGP_TOLERANCE
    assert all(bool((e.old_logps == e.engine_logps).all()) for e in engine)
    # Each iteration: rollout metrics (the KL in the reward, advantages, critic), policy steps.
    scored_rows, engine_rows = read_metrics(scored_out, "rollout"), read_metrics(engine_out, "rollout")
    assert len(scored_rows) == len(engine_rows) == 2
    assert scored_rows[1]["kl"] != 0  # the second iteration's policy has moved: a penalty to compare
    keys = ["kl", "score_mean", "value_mean", "return_mean", "advantage_abs_mean", "critic_loss"]
    keys += ["train_loss", "train_clip_fraction", "train_approx_kl", "train_grad_norm"]
    worst = 0.0
    for scored_row, engine_row in zip(scored_rows, engine_rows, strict=True):
        for key in keys:
            worst = max(worst, abs(engine_row[key] - scored_row[key]))
            assert engine_row[key] == pytest.approx(scored_row[key], abs=METRIC_TOLERANCE), key
    scored_steps, engine_steps = read_metrics(scored_out, "train"), read_metrics(engine_out, "train")
    assert len(scored_steps) == len(engine_steps) == 4  # 16 samples in steps of 8, two iterations
    for a, b in zip(scored_steps, engine_steps, strict=True):
        worst = max(worst, abs(a["loss"] - b["loss"]))
        assert b["loss"] == pytest.approx(a["loss"], abs=METRIC_TOLERANCE)
    diff = max_weight_diff(load_weights(scored_out / "final"), load_weights(engine_out / "final"))
    print(f"max |engine - scored| metric: {worst:.3g}, final weight: {diff:.3g}")
    assert diff < METRIC_TOLERANCE


def test_engine_logps_with_the_importance_correction_is_a_config_error(warm_model, tmp_path, capsys):
    config = ppo_config(
        tmp_path / "run", warm_model, old_logps_source="engine", importance_correction={"cap": 2.0}
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "importance_correction", "old_logps_source")
