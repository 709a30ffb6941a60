"""What the online-algorithm tests share: the arithmetic task's run config, and a run killed
with SIGKILL between two checkpoints (after the checkpoint of iteration 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

from helpers import ALIGN, DATA, QUIET_TRAINER, merge, subprocess_env


def arith_config(algo: str, output_dir: Path, model: Path, **sections: Any) -> dict[str, Any]:
    """An online run on the shipped arithmetic prompts with the exact-match reward (hf engine)."""
    config: dict[str, Any] = {
        "algo": algo,
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"path": str(model)},
        "data": {
            "format": "prompts",
            "train": str(DATA / "arith_prompts_train.jsonl"),
            "eval": str(DATA / "arith_prompts_eval.jsonl"),
            "max_length": 32,
        },
        "rollout": {"name": "hf"},
        "reward": {"name": "exact_match", "answer_key": "answer"},
        "sampling": {"n": 8, "temperature": 1.0, "max_tokens": 4},
        "eval_sampling": {"n": 1, "temperature": 0.0, "max_tokens": 4},
        "trainer": QUIET_TRAINER,
    }
    return merge(config, sections)


# A hook that "hangs" once the given iteration's rollout row is logged (after the checkpoint of
# the iteration before it, given the run's trainer.save_every): the run is killed there, between
# two checkpoints. Hooks run on every rank of a distributed run.
HANG_AT_ITERATION = """
import time

import align


@align.hookimpl
def on_step_end(run, step, metrics):
    if metrics.get("split") == "rollout" and metrics.get("iteration") == {iteration}:
        time.sleep(600)
"""


def kill_during_iteration(
    config: str,
    output_dir: Path,
    tmp_path: Path,
    iteration: int,
    timeout_s: float = 300,
    signum: int = signal.SIGKILL,
) -> int:
    """Run ``align run config`` in a child process (the launcher alone: with nproc_per_node > 1 it
    starts torchrun and the ranks) and send it ``signum`` (to it alone, not to its process group)
    once ``iteration``'s rollout row is logged; its exit code."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    hook = HANG_AT_ITERATION.format(iteration=iteration)
    (plugin_dir / "hang_for_tests.py").write_text(textwrap.dedent(hook))
    env = subprocess_env([plugin_dir], ALIGN_PLUGIN_MODULES="hang_for_tests")
    log_path = tmp_path / f"{output_dir.name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*ALIGN, "run", config],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_sigint_as_in_a_terminal,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                rows = _complete_rows(output_dir / "metrics.jsonl")
                if any(row.get("split") == "rollout" and row.get("iteration") == iteration for row in rows):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            os.kill(proc.pid, signum)
            code = proc.wait(timeout=120)  # a caught signal: the launcher stops torchrun first
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert not (output_dir / "final").exists(), "the run was killed before it finished"
    return code


def _sigint_as_in_a_terminal() -> None:
    """In the child: SIGINT's default disposition. Tests started in the background by a
    non-interactive shell (a CI script's `... &`) ignore SIGINT, and a child inherits that;
    ``align run`` leaves an ignored signal ignored, so the signal the test sends would do
    nothing (the test hung in such a CI rehearsal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_mentioning(*texts: str, environ_entry: str | None = None) -> set[int]:
    """Pids of the processes (other than this one) whose command line holds one of ``texts``
    (and, given ``environ_entry`` such as ``"NAME=value"``, whose environment holds it)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") if environ_entry else []
        except OSError:
            continue
        if any(text in command for text in texts) and (
            environ_entry is None or environ_entry.encode() in environ
        ):
            found.add(int(entry))
    return found


def kill_during_iteration_3(config: str, output_dir: Path, tmp_path: Path) -> None:
    """``kill_during_iteration`` at iteration 3: after the checkpoint of iteration 2, with
    trainer.save_every: 2."""
    kill_during_iteration(config, output_dir, tmp_path, iteration=3)


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl being written (complete lines only)."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]
