"""PPO with a remote critic and data-parallel actors (``backend.nproc_per_node: 2`` and
``critic: {name: remote}``): rank 0 alone talks to the critic server (every rank's values, one
train request per global minibatch) and deals the values out. The DP=2 run follows the DP=1 run
with the remote critic (same losses, critic metrics and critic steps); no server is left
behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    read_metrics,
    write_yaml,
)
from test_dp_actors import (
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


def server_processes() -> set[int]:
    """Pids of critic/reward servers and tritonservers on this machine."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "align_pytriton.serve" in command or "tritonserver" in command:
            found.add(int(entry))
    return found


def run(tmp_path: Path, name: str, ranks: int, critic: dict[str, Any], *extra: str) -> Path:
    out = tmp_path / name
    config = online_config("ppo", out, ranks, critic=critic, epochs=1, kl={"coef": 0.05})
    config["critic"] = critic  # replaced whole: the local and remote critics have other keys
    align_run(write_yaml(tmp_path / f"{name}.yaml", config), *extra, timeout_s=TIMEOUT_S)
    return out


def critic_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "critic" / STATE_FILE, weights_only=True)
    return {f"model.{k}": v for k, v in state["model"].items()} | {"step": torch.tensor(state["step"])}


def wait_until_gone(before: set[int]) -> set[int]:
    """The server processes started since ``before`` still there after up to 20 s."""
    deadline = time.monotonic() + 20
    while (left := server_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.slow
def test_dp2_with_a_remote_critic_follows_dp1(tmp_path: Path) -> None:
    before = server_processes()
    remote1 = run(tmp_path, "remote_dp1", 1, REMOTE)
    remote2 = run(tmp_path, "remote_dp2", 2, REMOTE)
    assert_same_trajectory(remote1, remote2)
    rows1, rows2 = read_metrics(remote1, "rollout"), read_metrics(remote2, "rollout")
    for one, two in zip(rows1, rows2, strict=True):
        for key in CRITIC_KEYS:  # one critic, trained on the same global minibatches
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), key
    # Both ranks' values came from the one server: the critic took one step per minibatch.
    assert critic_state(last_checkpoint(remote2))["step"] == critic_state(last_checkpoint(remote1))["step"]
    assert not wait_until_gone(before)  # every server a run started went with it
