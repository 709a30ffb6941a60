"""The PyTriton critic server follows the run's LR schedule as the local critic does
(``trainer.lr_scheduler`` and ``warmup_steps`` over the critic's own planned steps), and its
checkpoint carries the schedule: a loaded state continues it."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from helpers import DATA, QUIET_TRAINER, TINY_MODEL

import align
from align_ppo.critic import planned_critic_steps
from align_pytriton.critic import RemoteCritic, critic_steps

LR = 1e-2
WARMUP = 2
ITERATIONS = 5  # one critic step per iteration: 4 prompts x 2 samples in minibatches of 8


def run_config(output_dir: Path) -> dict[str, object]:
    return {
        "algo": "ppo",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {"format": "prompts", "train": str(DATA / "arith_prompts_train.jsonl"), "max_length": 32},
        "reward": {"name": "exact_match", "answer_key": "answer"},
        "critic": {"name": "remote", "optim": {"lr": LR}},
        "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 4},
        "iterations": ITERATIONS,
        "prompts_per_iteration": 4,
        "epochs": 1,
        "trainer": {**QUIET_TRAINER, "batch_size": 8, "lr_scheduler": "linear", "warmup_steps": WARMUP},
    }


def linear_lr(step: int, total: int) -> float:
    """transformers' linear schedule with warm-up, by hand."""
    if step < WARMUP:
        return LR * step / WARMUP
    return LR * max(0.0, (total - step) / (total - WARMUP))


def test_the_critic_server_follows_the_runs_schedule_and_saves_it(tmp_path: Path) -> None:
    plugins = align.load_plugins()
    run = align.validate_run_config(run_config(tmp_path / "out"), plugins.registry)
    assert critic_steps(run) == planned_critic_steps(run) == ITERATIONS  # the local critic's length
    ctx = types.SimpleNamespace(config=run, registry=plugins.registry)
    critic = align.build_critic(run.critic, ctx, learner=None)  # type: ignore[attr-defined, arg-type]
    assert isinstance(critic, RemoteCritic)
    try:
        batch = align.lay_out([([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])], 0, False)
        mask = torch.tensor([[True, True, False], [True, True, True]])
        old = critic.values(batch).result()
        step = align.CriticBatch(batch, torch.ones(2, 3) * mask, old, mask)

        def train(steps: int) -> list[dict[str, float]]:
            return [future.result() for future in [critic.train(step) for _ in range(steps)]]

        first = train(2)
        critic.save(tmp_path / "critic")
        rest = train(3)
        lrs = [metrics["lr"] for metrics in first + rest]
        assert lrs == pytest.approx([linear_lr(s, ITERATIONS) for s in range(ITERATIONS)], abs=1e-12)
        critic.load(tmp_path / "critic")
        assert train(3) == rest  # the schedule (and everything else) continues from the saved step
    finally:
        critic.close()
