"""Built-in metrics sinks: lifecycle plugins, registered per run by the trainer.

``metrics.jsonl`` gets one JSON object per logged step and per evaluation (``split`` says
which), each with ``step`` and ``loss``. TensorBoard event files are written when the
``tensorboard`` package is installed (``trainer.tensorboard: auto``) or asked for.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from align.hookspecs import hookimpl

if TYPE_CHECKING:
    from align.config import RunConfig
    from align.trainer import RunInfo


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None

    @hookimpl
    def on_train_start(self, run: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run.resumed_from is not None:
            self._drop_after(run.resumed_step)
        self.file = self.path.open("a")

    def _drop_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: forget their old lines."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    @hookimpl
    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short (a killed run, a full disk) counts as after
    every checkpoint, so a resumed run drops it."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    @hookimpl
    def on_train_start(self, run: RunInfo) -> None:
        # Created here, not in __init__: the writer makes its folder, which must not exist
        # before the trainer has checked output_dir for an earlier run.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @hookimpl
    def on_step_end(self, run: RunInfo, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        split = metrics.get("split", "train")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# Listed by `align list` as lifecycle plugins; the trainer registers them per run (sinks_for).
BUILTIN_SINKS: dict[str, type] = {"metrics_jsonl": JsonlSink, "tensorboard": TensorBoardSink}


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def sinks_for(cfg: RunConfig) -> list[Any]:
    output_dir = Path(cfg.output_dir)
    sinks: list[Any] = [JsonlSink(output_dir / "metrics.jsonl")]
    wanted = cfg.trainer.tensorboard
    if wanted is True and not _tensorboard_available():
        warnings.warn("trainer.tensorboard is true but tensorboard is not installed", stacklevel=2)
    elif wanted is True or (wanted == "auto" and _tensorboard_available()):
        sinks.append(TensorBoardSink(output_dir / "tensorboard"))
    return sinks
