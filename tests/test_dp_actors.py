"""Data-parallel actors on the hf backend (``backend.nproc_per_node: 2``: `align run` launches
torchrun itself; gloo on CPU): the load-balanced generation queue hands every item out exactly
once and a slowed rank takes fewer; the ranks' step shares, metrics and gradients combine into
one step; GRPO and PPO at DP=2 follow DP=1 on the same global batch; only the main rank writes;
a resumed DP=2 run ends bit-exact."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ALIGN,
    DATA,
    QUIET_TRAINER,
    REPO,
    TINY_MODEL,
    load_weights,
    max_weight_diff,
    merge,
    read_metrics,
    run_cli,
    subprocess_env,
    write_yaml,
)
from helpers.online import kill_during_iteration, processes_mentioning

CHECKS = REPO / "tests" / "helpers" / "dp_checks.py"
PROMPTS = 8  # per iteration
ITERATIONS = 2
# Float32 on CPU: each rank sums its share of a step, then the ranks' gradients are averaged.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5
TIMEOUT_S = 420


def online_config(algo: str, output_dir: Path, ranks: int, **sections: Any) -> dict[str, Any]:
    """Two iterations of 8 prompts x 4 samples of the tiny random model, rewarded for 6-character
    answers (a reward with spread, so GRPO learns), in steps of 8 samples. The generation queue
    hands out 2 prompts at a time, the hf engine's own batch (8 sequences), so the samples are
    the same whichever rank draws them and with one rank."""
    config: dict[str, Any] = {
        "algo": algo,
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {
            "format": "prompts",
            "train": str(DATA / "arith_prompts_train.jsonl"),
            "eval": None,
            "max_length": 32,
        },
        "backend": {"name": "hf", "nproc_per_node": ranks},
        "rollout": {"name": "hf", "batch_size": 8},
        "reward": {"name": "length", "target": 6},
        "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 4},
        "iterations": ITERATIONS,
        "prompts_per_iteration": PROMPTS,
        "generation_chunk": 2,
        "trainer": {**QUIET_TRAINER, "batch_size": 8, "save_every": 1},
        "optim": {"lr": 1e-3},
    }
    return merge(config, sections)


def align_run(config: str, *extra: str, timeout_s: int = TIMEOUT_S) -> None:
    """``align run`` in a child process (it starts torchrun itself for nproc_per_node > 1)."""
    done = subprocess.run(
        [*ALIGN, "run", config, *extra],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def run_pair(tmp_path: Path, algo: str, **sections: Any) -> tuple[Path, Path]:
    """The same run at DP=1 and DP=2; their output folders."""
    import align.cli

    outs = []
    for ranks in (1, 2):
        out = tmp_path / f"{algo}_dp{ranks}"
        config = write_yaml(tmp_path / f"{algo}_dp{ranks}.yaml", online_config(algo, out, ranks, **sections))
        if ranks == 1:  # in this process: nothing to launch
            assert align.cli.main(["run", config]) == 0
        else:  # `align run` starts torchrun itself
            align_run(config)
        outs.append(out)
    return outs[0], outs[1]


def assert_same_trajectory(dp1: Path, dp2: Path) -> None:
    """The same samples (rewards), the same losses step by step, the same final weights."""
    train1, train2 = read_metrics(dp1, "train"), read_metrics(dp2, "train")
    assert len(train1) == len(train2) > 0  # rank 1 logged nothing of its own
    for one, two in zip(train1, train2, strict=True):
        assert one["tokens"] == two["tokens"]  # the step's tokens: both ranks' shares together
        assert abs(one["loss"] - two["loss"]) < LOSS_TOLERANCE, (one, two)
    rollouts1, rollouts2 = read_metrics(dp1, "rollout"), read_metrics(dp2, "rollout")
    assert [r["iteration"] for r in rollouts2] == list(range(1, ITERATIONS + 1))
    for one, two in zip(rollouts1, rollouts2, strict=True):
        key = "reward_mean" if "reward_mean" in one else "score_mean"
        assert one[key] == pytest.approx(two[key], abs=1e-6)
        # Every prompt of the iteration generated once, by one rank or the other.
        assert two["generated_prompts_rank0"] + two["generated_prompts_rank1"] == PROMPTS
    diff = max_weight_diff(load_weights(dp1 / "final"), load_weights(dp2 / "final"))
    assert diff < WEIGHT_TOLERANCE


def last_checkpoint(output_dir: Path) -> Path:
    return max((output_dir / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def test_work_queue_shares_and_reductions(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(CHECKS), str(report)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    out = json.loads(report.read_text())
    for call, checked in enumerate(out["calls"]):
        items = len(checked["results"])
        # Every item done exactly once, its result in item order on every rank.
        done_items = sorted(i for rank_items in checked["done_by_rank"] for i in rank_items)
        assert done_items == list(range(items))
        assert checked["results"] == [1000 * call + i * i for i in range(items)]
        for rank, rank_items in enumerate(checked["done_by_rank"]):
            assert all(checked["assignment"][i] == rank for i in rank_items)
        # Rank 1 sleeps 50x longer per item: rank 0 claims most of them.
        counts = [len(rank_items) for rank_items in checked["done_by_rank"]]
        assert counts[1] < counts[0], counts
    # 7 items over 2 ranks: 4 + 3 in order, 2 parts; 1 item: both ranks take it (1 part).
    assert out["share"]["seven"] == [[[0, 1, 2, 3], 2], [[4, 5, 6], 2]]
    assert out["share"]["one"] == [[[42], 1], [[42], 1]]
    # Averaged (loss: (1 + 2) / 2), summed (tokens), a key one rank has keeps its value.
    assert out["metrics"] == {"loss": 1.5, "tokens": 30.0, "only0": 5.0, "only1": 5.0}
    # Uneven shares (2 and 6 tokens): a ratio is weighted by each rank's count (1 clipped token of
    # 8, not the mean of 1/2 and 0/6); a loss normalised over the whole step is averaged; a max
    # is the max.
    uneven = out["uneven"]
    assert uneven["clip_fraction"] == pytest.approx(1 / 8) and uneven["loss"] == pytest.approx(0.3)
    assert uneven["ratio_max"] == 1.5 and uneven["tokens"] == 8
    assert out["grad"] == [1.5, 3.0, 4.5]  # the mean of [1, 2, 3] and [2, 4, 6]


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return run_pair(tmp_path_factory.mktemp("grpo"), "grpo")


@pytest.mark.slow
def test_grpo_dp2_matches_dp1(grpo_runs: tuple[Path, Path]) -> None:
    dp1, dp2 = grpo_runs
    assert_same_trajectory(dp1, dp2)
    # The token-mean ratios of each step: DP=2 weighs each rank's by its trained tokens, so they
    # are DP=1's over the whole step (a mean of the two ranks' means would not be).
    for one, two in zip(read_metrics(dp1, "train"), read_metrics(dp2, "train"), strict=True):
        for key in ("clip_fraction", "approx_kl", "ratio_mean", "ratio_max"):
            assert two[key] == pytest.approx(one[key], abs=1e-6), (key, one, two)
    # Only the main rank writes: rank 1's trainer state inside each checkpoint, nothing else.
    for step in sorted((dp2 / "checkpoints").iterdir()):
        assert sorted(p.name for p in (step / "ranks").iterdir()) == ["rank_1.pt"]
        assert not (dp1 / "checkpoints" / step.name / "ranks").exists()
    assert not (dp2 / "final.tmp").exists()


@pytest.mark.slow
def test_grpo_dp2_resumes_bit_exact(grpo_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Resume the DP=2 run from the checkpoint of iteration 1: iteration 2 is redone the same."""
    _, dp2 = grpo_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(dp2, resumed)
    shutil.rmtree(last_checkpoint(resumed))
    shutil.rmtree(resumed / "final")
    config = online_config("grpo", resumed, 2)
    align_run(write_yaml(tmp_path / "resume.yaml", config), "--resume")
    assert max_weight_diff(load_weights(dp2 / "final"), load_weights(resumed / "final")) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_alone_stops_every_rank(
    grpo_runs: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    """``kill -INT`` or ``kill -TERM`` to the ``align run`` launcher of a DP=2 run, during iteration
    2: it passes the signal on to torchrun, which stops the ranks (each runs in a session of its
    own, so nothing else reaches them), and exits 128 + the signal. Nothing of the run is left,
    and --resume ends where the uninterrupted run ends."""
    _, dp2 = grpo_runs
    stopped = tmp_path / "stopped"
    config = write_yaml(tmp_path / "stopped.yaml", online_config("grpo", stopped, 2))
    code = kill_during_iteration(config, stopped, tmp_path, iteration=ITERATIONS, signum=signum)
    assert code == 128 + signum
    deadline = time.monotonic() + 30
    while (left := processes_mentioning(config)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "the launcher left torchrun or a rank running"
    align_run(config, "--resume")
    assert max_weight_diff(load_weights(dp2 / "final"), load_weights(stopped / "final")) == 0.0


@pytest.mark.slow
def test_ppo_dp2_matches_dp1(tmp_path: Path) -> None:
    """PPO with the local critic (trained on the whole minibatch on every rank, its gradients
    averaged) and a KL penalty to the reference."""
    dp1, dp2 = run_pair(tmp_path, "ppo", epochs=2, kl={"coef": 0.05}, critic={"name": "local"})
    assert_same_trajectory(dp1, dp2)
    critic1, critic2 = (load_weights(last_checkpoint(out) / "roles" / "critic") for out in (dp1, dp2))
    assert max_weight_diff(critic1, critic2) < WEIGHT_TOLERANCE


def test_remote_critic_with_ranks_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0 alone drives a remote critic (tests/test_ppo_remote_critic_dp.py runs it), so the
    config is accepted."""
    config = online_config("ppo", tmp_path / "out", 2, critic={"name": "remote", "url": "http://127.0.0.1:1"})
    result = run_cli(capsys, "validate", write_yaml(tmp_path / "remote.yaml", config))
    assert result.code == 0 and "valid ppo config" in result.out


@pytest.mark.slow
def test_rejection_sampling_dp2_matches_dp1(tmp_path: Path) -> None:
    """Each SFT micro-batch of 4 winners split 2 + 2: each rank's token mean weighted by its
    share of the micro-batch's tokens, so the averaged gradient is the whole micro-batch's."""
    dp1, dp2 = run_pair(tmp_path, "rs", trainer={"batch_size": 4})
    assert_same_trajectory(dp1, dp2)
