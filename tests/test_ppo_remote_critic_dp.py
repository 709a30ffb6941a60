"""PPO with a remote critic and data-parallel actors (``backend.nproc_per_node: 2`` and
``critic: {name: remote}``): rank 0 alone talks to the critic server (every rank's values, one
train request per global minibatch) and deals the values out. The DP=2 run follows the DP=1 run
with the remote critic (same losses, critic metrics and critic steps) and the DP=2 run with the
local critic; a DP=2 run killed after a checkpoint leaves no server behind and, resumed, ends
bit-exact (policy and critic) with the uninterrupted one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_same_weights,
    load_weights,
    read_metrics,
    write_yaml,
)
from helpers.online import kill_during_iteration, processes_mentioning
from test_dp_actors import (
    ITERATIONS,
    align_run,
    assert_same_trajectory,
    last_checkpoint,
    online_config,
)

from align_pytriton.critic import STATE_FILE

# generous limits: on a loaded machine the server's start alone took over 180 s
REMOTE = {
    "name": "remote",
    "value_clip": 0.2,
    "optim": {"lr": 1e-2},
    "startup_timeout_s": 600,
    "timeout_s": 600,
}
LOCAL = {"name": "local", "value_clip": 0.2, "optim": {"lr": 1e-2}}
CRITIC_KEYS = ("critic_loss", "critic_explained_variance", "value_mean")
TIMEOUT_S = 900  # torchrun, two ranks and a critic server: minutes on a loaded 2-core machine


# Every process a run of this test process starts (align run, torchrun, the ranks, the critic
# server, tritonserver) inherits this variable: the checks below count only this process's own,
# not those of tests running beside it (pytest-xdist's other worker starts servers too).
OWNER = f"ALIGN_TEST_OWNER={os.getpid()}"
os.environ["ALIGN_TEST_OWNER"] = str(os.getpid())


def server_processes(*marks: str) -> set[int]:
    """Pids of the critic/reward servers and tritonservers this test process's runs started (or,
    given ``marks``, of its runs' processes whose command line holds one of them)."""
    marks = marks or ("align_pytriton.serve", "tritonserver")
    return processes_mentioning(*marks, environ_entry=OWNER)


def config_file(tmp_path: Path, name: str, ranks: int, critic: dict[str, Any]) -> str:
    """Two iterations (a checkpoint after each), a KL penalty, one epoch."""
    config = online_config("ppo", tmp_path / name, ranks, critic=critic, epochs=1, kl={"coef": 0.05})
    config["critic"] = critic  # replaced whole: the local and remote critics have other keys
    return write_yaml(tmp_path / f"{name}.yaml", config)


def run(tmp_path: Path, name: str, ranks: int, critic: dict[str, Any], *extra: str) -> Path:
    align_run(config_file(tmp_path, name, ranks, critic), *extra, timeout_s=TIMEOUT_S)
    return tmp_path / name


def critic_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "critic" / STATE_FILE, weights_only=True)
    return {f"model.{k}": v for k, v in state["model"].items()} | {"step": torch.tensor(state["step"])}


def wait_until_gone(before: set[int], *marks: str) -> set[int]:
    """The processes (``server_processes(*marks)``) started since ``before`` still there after
    up to 20 s."""
    deadline = time.monotonic() + 20
    while (left := server_processes(*marks) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def remote_dp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DP=2 run with the remote critic, uninterrupted (every test compares with it)."""
    before = server_processes()
    out = run(tmp_path_factory.mktemp("remote_dp2"), "remote_dp2", 2, REMOTE)
    assert not wait_until_gone(before)  # every server the run started went with it
    return out


@pytest.mark.slow
def test_dp2_with_a_remote_critic_follows_dp1(tmp_path: Path, remote_dp2: Path) -> None:
    before = server_processes()
    remote1 = run(tmp_path, "remote_dp1", 1, REMOTE)
    remote2 = remote_dp2
    assert_same_trajectory(remote1, remote2)
    rows1, rows2 = read_metrics(remote1, "rollout"), read_metrics(remote2, "rollout")
    for one, two in zip(rows1, rows2, strict=True):
        for key in CRITIC_KEYS:  # one critic, trained on the same global minibatches
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key
    # Both ranks' values came from the one server: the critic took one step per minibatch.
    assert critic_state(last_checkpoint(remote2))["step"] == critic_state(last_checkpoint(remote1))["step"]
    assert not wait_until_gone(before)  # every server a run started went with it


@pytest.mark.slow
def test_dp2_with_a_remote_critic_follows_dp2_with_the_local_critic(tmp_path: Path, remote_dp2: Path) -> None:
    """At a constant learning rate the server's critic is the local one's computation in another
    process: one step on the global minibatch (the local critic's ranks each take the whole
    minibatch and average the same gradient), so the runs agree."""
    local2 = run(tmp_path, "local_dp2", 2, LOCAL)
    assert_same_trajectory(local2, remote_dp2)
    keys = (*CRITIC_KEYS, "critic_grad_norm", "critic_clip_fraction")
    for local, remote in zip(
        read_metrics(local2, "rollout"), read_metrics(remote_dp2, "rollout"), strict=True
    ):
        for key in keys:
            assert local[key] == pytest.approx(remote[key], rel=1e-4, abs=1e-5), key


def first_checkpoint(output_dir: Path) -> Path:
    return min((output_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))


@pytest.mark.slow
def test_killed_dp2_run_with_a_remote_critic_resumes_bit_exact(tmp_path: Path, remote_dp2: Path) -> None:
    """Killed during iteration 2 (after the checkpoint of iteration 1): no rank, torchrun or
    server is left; --resume starts a new server, which loads the critic's state from the
    checkpoint, and the run ends where the uninterrupted one ends, policy and critic bit for bit."""
    before = server_processes()
    config = config_file(tmp_path, "killed", 2, REMOTE)
    killed = tmp_path / "killed"
    kill_during_iteration(config, killed, tmp_path, iteration=ITERATIONS, timeout_s=TIMEOUT_S)
    assert not wait_until_gone(before), "the killed run left its critic server"
    assert not wait_until_gone(before, str(killed)), "the killed run left torchrun or a rank"
    assert [p.name for p in (killed / "checkpoints").iterdir()] == [first_checkpoint(remote_dp2).name]
    align_run(config, "--resume", timeout_s=TIMEOUT_S)
    assert_same_weights(load_weights(killed / "final"), load_weights(remote_dp2 / "final"))
    assert_same_weights(critic_state(last_checkpoint(killed)), critic_state(last_checkpoint(remote_dp2)))
    rows, straight = read_metrics(killed, "rollout"), read_metrics(remote_dp2, "rollout")
    assert rows[-1]["iteration"] == ITERATIONS
    assert rows[-1]["critic_loss"] == straight[-1]["critic_loss"]
    assert not wait_until_gone(before)
