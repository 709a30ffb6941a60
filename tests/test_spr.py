"""SPR (successive policy re-weighting) on the shipped arithmetic task: held-out reward rises
under a small budget, the weights and the loss are the documented formulas on fixed numbers, and
a killed run resumes to the uninterrupted run's weights."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import assert_same_weights, load_weights, merge, read_metrics, run_cli, write_yaml
from helpers.online import arith_config, kill_during_iteration_3

import align
from align_spr import SPR, WeightedTokens, spr_weights


def spr_config(output_dir: Path, model: Path, **sections: Any) -> dict[str, Any]:
    config = arith_config(
        "spr",
        output_dir,
        model,
        iterations=4,
        prompts_per_iteration=32,
        beta=0.1,
        trainer={"batch_size": 32},
        optim={"lr": 3e-4},
    )
    return merge(config, sections)


def test_spr_raises_heldout_reward(warm_model, tmp_path, capsys):
    out = tmp_path / "spr"
    result = run_cli(capsys, "run", write_yaml(tmp_path / "spr.yaml", spr_config(out, warm_model)))
    assert result.code == 0, result.err
    evals = read_metrics(out, "eval")
    before, after = evals[0]["reward"], evals[-1]["reward"]
    assert after > before + 0.05, (before, after)
    rollouts = read_metrics(out, "rollout")
    assert [row["iteration"] for row in rollouts] == [1, 2, 3, 4]
    for row in rollouts:
        # 32 prompts x 8 samples per iteration; a prompt with one right answer of 8 puts
        # 8 e^10 / (e^10 + 7) ~ 8 on it, uniform groups weigh 1 each.
        assert 0 < row["effective_samples"] <= 1.0
        assert 1.0 <= row["weight_max"] <= 8.0


def test_weights_are_n_softmax_of_reward_over_beta_per_prompt():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [2.0, 1.0, 0.0, -1.0]])
    weights = spr_weights(rewards, beta=0.5)
    e2 = math.exp(2.0)
    assert weights[0].tolist() == pytest.approx([4 * e2 / (e2 + 3), 4 / (e2 + 3), 4 / (e2 + 3), 4 / (e2 + 3)])
    assert weights[1].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # exp(A / beta) / mean_j exp(A_j / beta) with A = r - mean(r) = [1.5, 0.5, -0.5, -1.5]
    numerators = [math.exp(a / 0.5) for a in (1.5, 0.5, -0.5, -1.5)]
    assert weights[2].tolist() == pytest.approx([n / (sum(numerators) / 4) for n in numerators])
    # The baseline cancels under the per-prompt empirical normaliser; large rewards do not overflow.
    assert torch.allclose(spr_weights(rewards, 0.5, baseline="max"), weights)
    assert torch.isfinite(spr_weights(rewards * 1e4, beta=0.01)).all()


def test_loss_is_the_weighted_nll_over_the_batch_tokens():
    sums, counts = torch.tensor([-2.0, -4.0], requires_grad=True), torch.tensor([2, 4])
    backend = SimpleNamespace(sequence_logps=lambda policy, tokens: align.SequenceLogps(sums, counts))
    algorithm = object.__new__(SPR)
    algorithm.ctx = SimpleNamespace(backend=backend, policy=None)
    batch = WeightedTokens(tokens=None, example_ids=torch.tensor([0, 1]), weights=torch.tensor([1.5, 0.5]))
    out = algorithm.loss(batch)
    assert out.loss.item() == pytest.approx((1.5 * 2 + 0.5 * 4) / 6)
    assert out.metrics["nll"].item() == pytest.approx(6 / 6)  # unweighted: SFT's token-mean loss


def test_killed_spr_run_resumes_to_the_same_weights(warm_model, tmp_path, capsys):
    sections = {"prompts_per_iteration": 8, "trainer": {"save_every": 2, "batch_size": 16}}
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_config = write_yaml(tmp_path / "killed.yaml", spr_config(killed, warm_model, **sections))
    kill_during_iteration_3(killed_config, killed, tmp_path)

    resumed = run_cli(capsys, "run", killed_config, "--resume")
    assert resumed.code == 0, resumed.err
    config = spr_config(straight, warm_model, **sections)
    result = run_cli(capsys, "run", write_yaml(tmp_path / "straight.yaml", config))
    assert result.code == 0, result.err
    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    assert [row["iteration"] for row in read_metrics(killed, "rollout")][-2:] == [3, 4]
    # Offloading (engine restarted each iteration) and a kept engine (refit) sample the same.
    kept = tmp_path / "kept"
    config = spr_config(kept, warm_model, offload=False, **sections)
    assert run_cli(capsys, "run", write_yaml(tmp_path / "kept.yaml", config)).code == 0
    assert_same_weights(load_weights(kept / "final"), load_weights(straight / "final"))
