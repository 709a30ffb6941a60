"""A progress bar with loss and throughput on a terminal; a few plain lines otherwise."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, done: int, enabled: bool | Literal["auto"]) -> None:
        self.total, self.done = total, done
        self.console = Console(stderr=True)
        live = sys.stderr.isatty() if enabled == "auto" else enabled
        self.bar: RichProgress | None = None
        if live:
            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", speed="-")
        self.every = max(1, total // 10)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def note(self, text: str) -> None:
        self.console.print(text)

    def advance(self, metrics: dict[str, Any]) -> None:
        self.done += 1
        loss, speed = f"{metrics['loss']:.4f}", f"{metrics['tokens_per_s']:,.0f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss, speed=speed)
        elif self.done % self.every == 0 or self.done == self.total:
            self.console.print(f"step {self.done}/{self.total}  loss {loss}  {speed} tok/s")
