"""Built-in callbacks: lifecycle plugins a run enables in its ``callbacks:`` list, written as a
third party would write one (a config class, a factory, lifecycle hooks).

``early_stopping`` watches an eval metric and stops the run cleanly (checkpoint, ``final/``,
exit 0, the reason printed) once it has not improved for ``patience`` evaluations::

    callbacks:
      - {name: early_stopping, metric: loss, mode: min, patience: 3, min_delta: 0.0}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from align.config import CallbackConfig, RunConfig
from align.errors import ConfigError
from align.hookspecs import hookimpl
from align.registry import Register

if TYPE_CHECKING:
    from align.trainer import RunInfo


class EarlyStoppingConfig(CallbackConfig):
    """Stop the run when an eval metric has stopped improving."""

    name: Literal["early_stopping"] = "early_stopping"
    metric: str = Field("loss", description="An eval metric the algorithm reports (see metrics.jsonl).")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    patience: int = Field(3, gt=0, description="Evaluations without improvement before the run stops.")
    min_delta: float = Field(0.0, ge=0, description="A change must exceed this to count as improvement.")


class EarlyStopping:
    """Counts evaluations since the best value of the metric; asks the run to stop at
    ``patience``. The evaluation before training is the first value to beat."""

    def __init__(self, cfg: EarlyStoppingConfig, run_config: RunConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_step = 0
        self.stale = 0  # evaluations since the best one
        _check_evaluations_happen(run_config)

    @hookimpl
    def on_train_start(self, run: RunInfo) -> None:
        if run.resumed_from is not None:
            self._replay(run.output_dir / "metrics.jsonl", _checkpoint_step(run.resumed_from))

    @hookimpl
    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, Any]) -> None:
        if metrics.get("split") != "eval":
            return
        if self.observe(step, metrics) and run.stop_reason is None:
            run.request_stop(self.reason())

    def observe(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record one evaluation; True when the run should stop."""
        value = self._value(metrics)
        if self.best is None or self._improves(value):
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        return self.stale >= self.cfg.patience

    def reason(self) -> str:
        c = self.cfg
        return (
            f"early stopping: eval {c.metric} did not improve by more than {c.min_delta:g} in "
            f"{c.patience} evaluations (best {self.best:.6g} at step {self.best_step})"
        )

    def _improves(self, value: float) -> bool:
        assert self.best is not None
        if math.isnan(value):
            return False
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def _value(self, metrics: dict[str, Any]) -> float:
        value = metrics.get(self.cfg.metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        available = sorted(
            k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step", "split")
        )
        raise ConfigError(
            f"callbacks: early_stopping watches eval metric '{self.cfg.metric}', which this run does "
            f"not report. Eval metrics: {', '.join(available) or 'none'}"
        )

    def _replay(self, metrics_file: Path, up_to_step: int) -> None:
        """A resumed run continues counting where the interrupted one was, from the eval rows
        it logged up to its checkpoint."""
        if not metrics_file.is_file():
            return
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("split") == "eval" and int(row.get("step", 0)) <= up_to_step:
                self.observe(int(row["step"]), row)


def _check_evaluations_happen(run_config: RunConfig) -> None:
    if getattr(run_config.data, "eval", None) is None:
        raise ConfigError("callbacks: early_stopping watches eval metrics, but data.eval is not set")
    if run_config.trainer.eval_every == 0:
        raise ConfigError(
            "callbacks: early_stopping needs evaluations during training: set trainer.eval_every "
            "(0 evaluates only before and after training)"
        )


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.removeprefix("step_")
    return int(suffix) if suffix.isdigit() else 0


def early_stopping(cfg: EarlyStoppingConfig, run_config: RunConfig) -> EarlyStopping:
    return EarlyStopping(cfg, run_config)


@hookimpl
def register_callbacks(register: Register) -> None:
    register(EarlyStoppingConfig)(early_stopping)
