"""The small interfaces between the pieces: an algorithm never knows which backend runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from align.batches import SequenceLogps, TokenBatch


@runtime_checkable
class Backend(Protocol):
    """Builds and runs models. ``hf`` (transformers) is the default; Megatron is another."""

    tokenizer: Any

    def build_policy(self) -> nn.Module:
        """The trainable model, with the configured initial weights."""
        ...

    def build_reference(self) -> nn.Module:
        """A frozen model with the initial weights (never a checkpoint's)."""
        ...

    def sequence_logps(self, model: nn.Module, batch: TokenBatch) -> SequenceLogps:
        """Per-sequence sums of log-probs of the tokens under ``batch.loss_mask``."""
        ...

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        """Weights (safetensors) + model config + tokenizer, loadable by the backend's ecosystem."""
        ...

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load weights written by ``save_pretrained`` into ``model`` in place."""
        ...


@runtime_checkable
class DataFormat(Protocol):
    """Loads and tokenizes a split, and collates rows into a batch."""

    def load(self, split: str) -> Any:
        """A sized, indexable collection of tokenized rows (a ``datasets.Dataset``), or None."""
        ...

    def collate(self, rows: list[dict[str, Any]]) -> Any:
        ...

    def stats(self) -> dict[str, int]:
        """Counts of rows truncated, dropped or skipped while loading, for the log."""
        ...
