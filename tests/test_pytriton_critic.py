"""align-pytriton's critic server and the `remote` critic (align.Critic): values equal the local
critic model's on the same weights (padded and packed), one train request is one step of the
clipped value loss (by hand) and the critic learns, calls keep their order without the actor
waiting for a train, save/load continue bit for bit, a dead server is an align.CriticError
naming it, and PPO runs with it (its state in the actor's checkpoint, a killed run resumed
bit-exact, and equal to the same run with the local critic).

One critic server (a child process) is shared by the module's unit tests.
"""

from __future__ import annotations

import os
import signal
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DATA,
    QUIET_TRAINER,
    TINY_MODEL,
    assert_same_weights,
    load_weights,
    merge,
    read_metrics,
    run_cli,
    write_yaml,
)
from helpers.online import kill_during_iteration_3

import align
from align_pytriton import CriticServerError
from align_pytriton.critic import STATE_FILE, RemoteCritic

SEQUENCES = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10]), ([11], [12])]


def run_config(output_dir: Path, **sections: Any) -> dict[str, Any]:
    """PPO on the arithmetic prompts with the embedded tiny model and a remote critic."""
    config = {
        "algo": "ppo",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {"format": "prompts", "train": str(DATA / "arith_prompts_train.jsonl"), "max_length": 32},
        "reward": {"name": "exact_match", "answer_key": "answer"},
        "critic": {"name": "remote", "value_clip": 0.2, "optim": {"lr": 1e-2}},
        "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 4},
        "iterations": 2,
        "prompts_per_iteration": 4,
        "epochs": 1,
        "trainer": {**QUIET_TRAINER, "batch_size": 8},
        "optim": {"lr": 3e-4},
    }
    return merge(config, sections)


@pytest.fixture(scope="module")
def plugins() -> align.Plugins:
    return align.load_plugins()


@pytest.fixture(scope="module")
def run(plugins: align.Plugins, tmp_path_factory: pytest.TempPathFactory) -> align.RunConfig:
    return align.validate_run_config(run_config(tmp_path_factory.mktemp("ppo") / "out"), plugins.registry)


@pytest.fixture(scope="module")
def critic(run: align.RunConfig, plugins: align.Plugins) -> Iterator[RemoteCritic]:
    ctx = types.SimpleNamespace(config=run, registry=plugins.registry)
    built = align.build_critic(run.critic, ctx, learner=None)  # type: ignore[attr-defined, arg-type]
    assert isinstance(built, RemoteCritic)
    yield built
    built.close()


def layout(packed: bool = False) -> align.TokenBatch:
    return align.lay_out(SEQUENCES, 0, packed)


def test_values_equal_the_local_critic_model_padded_and_packed(
    critic: RemoteCritic, run: align.RunConfig, plugins: align.Plugins
) -> None:
    """Before any training: the server built the same model from the same seed."""
    torch.manual_seed(run.seed)
    backend = align.build_backend(run, plugins)
    model = backend.build_model("critic", run.model)
    for packed in (False, True):
        with torch.no_grad():
            expected = backend.token_scores(model, layout(packed)).values  # type: ignore[attr-defined]
        remote = critic.values(layout(packed)).result()
        assert remote.shape == (3, 3) and remote.dtype == torch.float32
        assert torch.equal(remote, expected), (remote, expected)
    assert remote[2, 1:].eq(0).all()  # past the one-token sequence's count


def scored_mask() -> torch.Tensor:
    return torch.tensor([[True, True, False], [True, True, True], [True, False, False]])


def test_train_is_one_step_of_the_value_loss_and_the_critic_learns(critic: RemoteCritic) -> None:
    mask = scored_mask()
    returns = torch.where(mask, torch.tensor([[1.0, 0.5, 0.0], [-1.0, 0.0, 1.0], [2.0, 0.0, 0.0]]), 0.0)
    before = critic.values(layout()).result()
    # old values = current ones: the clipped term equals the plain one, L = mean (V - R)^2 / 2
    first = critic.train(align.CriticBatch(layout(), returns, before, mask))
    after = critic.values(layout())  # sent without waiting for the train: it must see the step
    by_hand = 0.5 * float(((before - returns)[mask] ** 2).mean())
    metrics = first.result()
    assert metrics["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert {"loss", "clip_fraction", "grad_norm"} <= metrics.keys() and metrics["clip_fraction"] == 0.0
    assert not torch.equal(after.result(), before)
    assert torch.equal(after.result(), critic.values(layout()).result())  # nothing ran in between
    losses = [
        critic.train(align.CriticBatch(layout(), returns, critic.values(layout()).result(), mask))
        for _ in range(20)
    ]
    assert losses[-1].result()["loss"] < 0.2 * by_hand


def test_values_sent_after_trains_see_every_one_of_them(critic: RemoteCritic) -> None:
    mask = scored_mask()
    old = critic.values(layout()).result()
    steps = [critic.train(align.CriticBatch(layout(), torch.ones(3, 3) * mask, old, mask)) for _ in range(3)]
    seen = critic.values(layout())
    value = seen.result()
    assert all(step.done() for step in steps)
    again = critic.values(layout()).result()
    assert torch.equal(value, again)


def test_save_and_load_continue_bit_for_bit(critic: RemoteCritic, tmp_path: Path) -> None:
    mask = scored_mask()
    batch = align.CriticBatch(
        layout(), torch.full((3, 3), 0.3) * mask, critic.values(layout()).result(), mask
    )
    critic.save(tmp_path / "critic")
    assert (tmp_path / "critic" / STATE_FILE).is_file()

    def two_steps() -> tuple[torch.Tensor, list[dict[str, float]]]:
        metrics = [critic.train(batch) for _ in range(2)]
        return critic.values(layout(packed=True)).result(), [m.result() for m in metrics]

    values, metrics = two_steps()
    critic.load(tmp_path / "critic")
    values_again, metrics_again = two_steps()
    assert torch.equal(values, values_again)
    assert metrics == metrics_again
    with pytest.raises(align.CriticError, match="is missing"):
        critic.load(tmp_path / "nothing")


def test_a_dead_critic_server_is_a_critic_error_naming_it(critic: RemoteCritic) -> None:
    """Last user of the shared server: kills it."""
    assert critic.child is not None
    os.kill(critic.child.process.pid, signal.SIGKILL)
    critic.child.process.wait(10)
    with pytest.raises(
        align.CriticError, match=r"critic server \(child process \d+, http://127.0.0.1:\d+\) died"
    ) as info:
        critic.values(layout()).result()
    assert isinstance(info.value, CriticServerError)
    mask = scored_mask()
    failed = critic.train(align.CriticBatch(layout(), torch.zeros(3, 3), torch.zeros(3, 3), mask))
    with pytest.raises(align.CriticError):
        failed.result()


def test_align_serve_critic_config_must_name_the_remote_critic(
    tmp_path: Path, plugins: align.Plugins
) -> None:
    from align_pytriton.serve import serve_kind

    config = write_yaml(
        tmp_path / "ppo.yaml", run_config(tmp_path / "out", critic={"name": "local", "optim": None})
    )
    with pytest.raises(align.ConfigError, match=r"critic\.name is 'local'"):
        serve_kind("critic", config, [], plugins)


def critic_state(output_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    state = torch.load(newest / "critic" / STATE_FILE, weights_only=True)
    return {f"model.{k}": v for k, v in state["model"].items()} | {"step": torch.tensor(state["step"])}


@pytest.mark.slow
def test_killed_ppo_run_with_a_remote_critic_resumes_bit_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run starts its critic server itself; SIGKILL during iteration 3 takes the server down
    with it; --resume starts a new one, loads the critic's state from the checkpoint, and ends
    where the uninterrupted run ends (policy and critic)."""
    sections = {"iterations": 4, "trainer": {"save_every": 2}}
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_config = write_yaml(tmp_path / "killed.yaml", run_config(killed, **sections))
    kill_during_iteration_3(killed_config, killed, tmp_path)
    resumed = run_cli(capsys, "run", killed_config, "--resume")
    assert resumed.code == 0, resumed.err
    result = run_cli(capsys, "run", write_yaml(tmp_path / "straight.yaml", run_config(straight, **sections)))
    assert result.code == 0, result.err
    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    assert_same_weights(critic_state(killed), critic_state(straight))
    rows = read_metrics(straight, "rollout")
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert read_metrics(killed, "rollout")[-1]["critic_loss"] == rows[-1]["critic_loss"]
    # The same run with the local critic: at a constant learning rate the remote critic is the
    # same computation in another process, so the policy and the critic's metrics are the same.
    local = tmp_path / "local"
    local_config = run_config(local, critic={"name": "local", "optim": {"lr": 1e-2}}, **sections)
    local_config["critic"] = {"name": "local", "value_clip": 0.2, "optim": {"lr": 1e-2}}
    assert run_cli(capsys, "run", write_yaml(tmp_path / "local.yaml", local_config)).code == 0
    assert_same_weights(load_weights(local / "final"), load_weights(straight / "final"))
    keys = ("critic_loss", "critic_grad_norm", "critic_clip_fraction", "critic_explained_variance")
    assert [[row[k] for k in keys] for row in read_metrics(local, "rollout")] == [
        [row[k] for k in keys] for row in rows
    ]
