"""What the megatron backend's tests share: the two-layer tiny model; the small runs on the
shipped preference pairs (DPO, a reward model) and the short online runs (GRPO, PPO) with a
length reward, as configs; a run in this process; and the ``torchrun`` launch of
helpers/megatron_checks.py (2 or 4 processes, gloo) with each rank's log on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import (
    DATA,
    REPO,
    TINY_MODEL,
    dpo_config,
    head_jsonl,
    merge,
    read_metrics,
    read_yaml,
    subprocess_env,
    write_yaml,
)
from helpers.online import arith_config

CHECKS = REPO / "tests" / "helpers" / "megatron_checks.py"
# The tiny model with two layers: one per stage at PP=2.
TWO_LAYERS: dict[str, Any] = {**TINY_MODEL, "tiny": {**TINY_MODEL["tiny"], "num_layers": 2}}


def pairs_config(
    folder: Path,
    name: str,
    backend: dict[str, Any],
    *,
    pairs: int = 32,
    max_length: int = 63,
    model: dict[str, Any] = TWO_LAYERS,
    **sections: Any,
) -> dict[str, Any]:
    """A run (DPO's 4 steps of 8 unless ``sections`` say otherwise; ``loss=None`` for a reward
    model) of ``model`` on the first ``pairs`` shipped preference pairs, no eval split, rows up
    to ``max_length`` tokens, on ``backend`` (a whole backend section), into ``folder/name``."""
    train = folder / f"train_{pairs}.jsonl"
    if not train.exists():
        folder.mkdir(parents=True, exist_ok=True)
        head_jsonl(DATA / "preference_train.jsonl", train, pairs)
    return dpo_config(
        folder / name,
        model=model,
        backend=backend,
        data={"train": str(train), "eval": None, "max_length": max_length},
        **sections,
    )


def small_dpo(folder: Path, name: str, backend: dict[str, Any], **sections: Any) -> str:
    """A 4-step DPO run of the two-layer tiny model on 32 shipped pairs on the megatron backend
    with ``backend``'s parallel sizes, as a config file (rows up to 63 tokens: odd, so sequence
    parallelism at TP=2 pads the width)."""
    config = pairs_config(folder, name, {"name": "megatron", **backend}, **sections)
    return write_yaml(folder / f"{name}.yaml", config)


def length_reward_run(
    algo: str,
    output_dir: Path,
    backend: dict[str, Any],
    *,
    samples: int,
    lr: float,
    model: dict[str, Any] = TWO_LAYERS,
    **sections: Any,
) -> dict[str, Any]:
    """Two iterations of 8 arithmetic prompts x ``samples`` (batches of 16, no eval split) on the
    megatron backend with ``backend``'s parallel sizes, rewarded for length: an untrained model's
    samples differ in length (exact match never pays them), so the policy gets advantages."""
    config = arith_config(
        algo,
        output_dir,
        Path("unused"),  # the model section is replaced below
        backend={"name": "megatron", **backend},
        data={"eval": None},
        iterations=2,
        prompts_per_iteration=8,
        sampling={"n": samples},
        trainer={"batch_size": 16},
        optim={"lr": lr},
    )
    config = merge(config, sections)
    config["model"] = model
    config["reward"] = {"name": "length", "target": 2}
    return config


def variant(config: str | Path, into: Path, **changes: Any) -> str:
    """The run of config file ``config`` with ``changes`` (whole top-level sections) and its
    output in ``into``, as a config file beside that folder (``into.yaml``)."""
    changed = read_yaml(Path(config)) | changes | {"output_dir": str(into)}
    return write_yaml(into.with_suffix(".yaml"), changed)


def run_in_process(config: str) -> None:
    """``align run config`` in this process (the megatron backend: a world of one)."""
    import align
    from align.cli import load_config
    from align.plugins import default_plugins

    plugins = default_plugins()
    align.train(load_config(config, [], None, plugins), plugins)


def torchrun(tmp_path: Path, tp: int, runs: list[str], nproc: int = 2, **options: Any) -> dict[str, Any]:
    """Run the conversion checks at ``tp`` (0: none) and ``runs`` under torchrun (``nproc``
    processes); rank 0's report. ``options`` go into the spec (see megatron_checks.main)."""
    spec = tmp_path / f"spec_tp{tp}.json"
    report = tmp_path / f"report_tp{tp}.json"
    spec.write_text(json.dumps({"tp": tp, "runs": runs, "report": str(report), **options}))
    logs = tmp_path / f"torchrun_logs_tp{tp}"
    # Each rank's stdout/stderr in its own file (torchrun's --redirects): a failed rank's own
    # traceback, not the launcher's summary of it.
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)),
        *("--master_port", str(29500 + os.getpid() % 1000)),
        *("--log-dir", str(logs), "--redirects", "3"),
        str(CHECKS),
        str(spec),
    ]
    # A ceiling for a hang, not a speed check: 4 processes on 2 busy CI cores took minutes.
    done = subprocess.run(
        ["timeout", "900", *command], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, (
        f"torchrun exited {done.returncode}\n{rank_logs(logs)}\n{done.stderr[-2000:]}"
    )
    print("torchrun report:", report.read_text()[-300:])
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def rank_logs(logs: Path, tail: int = 3000) -> str:
    """The end of each rank's stderr (``<log-dir>/<run>/attempt_<n>/<local rank>/stderr.log``)."""
    parts = []
    for log in sorted(logs.glob("*/attempt_*/*/stderr.log")):
        rank = log.parent.name
        parts.append(f"---- rank {rank} stderr ({log.parent.parent.name}) ----\n{log.read_text()[-tail:]}")
    return "\n".join(parts) or f"(no rank logs under {logs})"


def train_losses(output_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir, "train")]


def grad_norms(output_dir: Path) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(output_dir, "train")]
