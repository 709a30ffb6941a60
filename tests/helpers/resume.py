"""What the resume tests share: a run stopped after a given step by a lifecycle plugin (as a
user's would stop it), then resumed, against the same run left alone."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import align
from helpers import assert_same_weights, load_weights, read_metrics

STOP_PLUGIN = """
import align


@align.hookimpl
def on_step_end(run, step, metrics):
    if metrics["split"] == "train" and step == {step}:
        run.request_stop("stopped at step {step}")
"""


def train(config: dict[str, Any], plugins: align.Plugins | None = None) -> align.RunResult:
    plugins = plugins or align.default_plugins()
    return align.train(align.validate_run_config(config, plugins.registry), plugins)


def train_stopped_at(
    config: dict[str, Any], step: int, plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> align.RunResult:
    """``config`` trained with a plugin module (written to ``plugin_dir``, loaded through
    ALIGN_PLUGIN_MODULES) that requests a stop at the end of train step ``step``."""
    module = f"stop_at_step_{step}"
    (plugin_dir / f"{module}.py").write_text(STOP_PLUGIN.format(step=step))
    monkeypatch.syspath_prepend(str(plugin_dir))
    with monkeypatch.context() as patch:
        patch.setenv("ALIGN_PLUGIN_MODULES", module)
        try:
            return train(config, align.load_plugins())
        finally:
            sys.modules.pop(module, None)  # the next test's plugin of the same name is its own


def assert_resumes_bit_exact(
    config: Callable[[str], dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_at: int,
    steps: int,
) -> None:
    """``config(name)`` (its output folder named ``name``) run straight to ``steps``, and run
    again stopped at ``stop_at`` then resumed: same number of steps, the same final weights bit
    for bit and the same logged training losses, step by step."""
    straight = train(config("straight"))
    stopped = train_stopped_at(config("stopped"), stop_at, tmp_path, monkeypatch)
    assert stopped.steps == stop_at
    resumed = train(config("stopped") | {"resume": True})
    assert resumed.steps == straight.steps == steps
    assert_same_weights(load_weights(resumed.final_dir), load_weights(straight.final_dir))
    losses = [[row["loss"] for row in read_metrics(r.output_dir, "train")] for r in (resumed, straight)]
    assert losses[0] == losses[1]
