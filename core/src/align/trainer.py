"""``align.train``: run a config to the end. The work is split between the learner (models,
optimizers, checkpoints, hooks: ``align.learner``) and the algorithm's driver (the order of the
work: ``Algorithm.drive``); this module wires them to the run's lifecycle plugins.

``Trainer`` is the learner's former name, kept for code written against it.
"""

from __future__ import annotations

from typing import Any

from align.batching import BatchStream, DataPosition, eval_batches
from align.config import RunConfig
from align.learner import (
    EARLIER_RUN_OUTPUTS,
    Learner,
    RunInfo,
    RunResult,
    make_optimizer,
    process_rank,
    seed_everything,
    total_norm,
)
from align.plugins import Plugins

Trainer = Learner

__all__ = [
    "EARLIER_RUN_OUTPUTS",
    "BatchStream",
    "DataPosition",
    "Learner",
    "RunInfo",
    "RunResult",
    "Trainer",
    "eval_batches",
    "make_optimizer",
    "seed_everything",
    "total_norm",
    "train",
]


def train(cfg: RunConfig, plugins: Plugins | None = None) -> RunResult:
    """Run ``cfg`` to the end with the installed plugins; the library entry point."""
    from align.plugins import callbacks_for, default_plugins, registered_for_run

    plugins = plugins or default_plugins()
    # Metrics files are written by one process: the main rank of a distributed run.
    sinks = _sinks_for(cfg) if process_rank() == 0 else []
    lifecycle = [*sinks, *callbacks_for(cfg, plugins.registry)]
    with registered_for_run(plugins.manager, lifecycle):
        return Learner(cfg, plugins).run()


def _sinks_for(cfg: RunConfig) -> list[Any]:
    from align.builtin.sinks import sinks_for

    return sinks_for(cfg)
