"""examples/slurm: the sbatch script parses and, run against stand-in ``scontrol``/``srun``
commands that record their arguments, starts the reward server, the critic server and the
torchrun actor on the right nodes with the right urls; its configs validate."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, run_cli

SLURM = REPO / "examples" / "slurm"
SCRIPT = SLURM / "align.sbatch"


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_configs_validate(capsys: pytest.CaptureFixture[str], name: str) -> None:
    result = run_cli(capsys, "validate", str(SLURM / f"{name}.yaml"))
    assert result.code == 0, result.err
    assert f"valid {name} config" in result.out


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_script(
    tmp_path: Path, nodes: list[str], servers: int, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The script under stand-ins: ``scontrol`` lists ``nodes``; ``srun`` writes its arguments
    (one line per call) to a log, then a server sleeps until the script's SIGTERM, and the actor
    returns once the ``servers`` have logged (as a real actor outlives its servers' start)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", "printf '%s\\n' " + " ".join(nodes) + "\n")
    _executable(
        bin_dir / "srun",
        f'echo "$*" >> {log}\n'
        'if [[ "$*" == *" serve "* ]]; then exec sleep 30 >/dev/null 2>&1; fi\n'
        f'for _ in $(seq 300); do (($(grep -c " serve " {log}) >= {servers})) && exit 0; sleep 0.1; done\n'
        "exit 1\n",
    )
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "stand-in",
        "SLURM_JOB_ID": "77",
        **env,
    }
    done = subprocess.run(
        ["timeout", "60", "bash", str(SCRIPT)], env=environment, capture_output=True, text=True, cwd=REPO
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def test_ppo_job_starts_both_servers_and_points_the_actor_at_them(tmp_path: Path) -> None:
    done, calls = run_script(tmp_path, ["n1", "n2", "n3"], servers=2)
    assert done.returncode == 0, done.stderr
    reward, critic, actor = sorted(calls, key=lambda c: ("serve reward" not in c, "serve critic" not in c))
    assert "--relative=0" in reward and reward.endswith("serve reward examples/slurm/reward_server.yaml")
    assert "--relative=1" in critic and critic.endswith(
        "serve critic examples/slurm/ppo.yaml backend={name: hf}"
    )
    assert "--relative=2" in actor and "--nnodes=1 --nproc_per_node=1" in actor
    assert "--rdzv_endpoint=n3:29500" in actor and "--rdzv_id=77" in actor
    assert actor.endswith(
        "-m align.cli run examples/slurm/ppo.yaml reward.url=http://n1:8000 critic.url=http://n2:8100"
    )


def test_grpo_job_runs_the_actor_on_every_other_node(tmp_path: Path) -> None:
    done, calls = run_script(
        tmp_path,
        ["a", "b", "c", "d"],
        servers=1,
        CONFIG="examples/slurm/grpo.yaml",
        SERVE_CRITIC="0",
        GPUS_PER_NODE="8",
    )
    assert done.returncode == 0, done.stderr
    assert len(calls) == 2 and not any("serve critic" in call for call in calls)
    actor = next(call for call in calls if "align.cli run" in call)
    assert "--nodes=3" in actor and "--relative=1" in actor and "--nnodes=3 --nproc_per_node=8" in actor
    assert "--rdzv_endpoint=b:29500" in actor
    assert actor.endswith("run examples/slurm/grpo.yaml reward.url=http://a:8000")


def test_a_critic_server_with_several_actor_processes_is_refused(tmp_path: Path) -> None:
    done, calls = run_script(tmp_path, ["n1", "n2", "n3", "n4"], servers=2)
    assert done.returncode == 2 and calls == []
    assert "a critic server needs a single actor process" in done.stderr
