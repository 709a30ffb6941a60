"""The small interfaces between the pieces: an algorithm never knows which backend runs it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

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
class ScoringBackend(Backend, Protocol):
    """A backend that also builds and runs sequence scorers (reward models): optional, checked
    with ``isinstance(backend, ScoringBackend)`` by the algorithms that need it."""

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """A trainable model with ``num_labels`` scalar heads read at a sequence's last token."""
        ...

    def sequence_scores(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        """``[batch.num_sequences, num_labels]`` float scores, one row per sequence."""
        ...


@runtime_checkable
class RewardSource(Protocol):
    """What a ``register_rewards`` factory returns: scores (prompt, completion, row) triples.

    A prompt or completion is a string or a list of chat messages ({role, content}); ``rows``
    are the prompts' data rows (a verifiable reward reads its reference answer there), or None.
    """

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Tensor:
        """A float tensor ``[len(prompts)]``: one scalar reward per pair."""
        ...


@runtime_checkable
class DataFormat(Protocol):
    """Loads and tokenizes a split, and collates rows into a batch."""

    def load(self, split: str) -> Any:
        """A sized, indexable collection of tokenized rows (a ``datasets.Dataset``), or None."""
        ...

    def collate(self, rows: list[dict[str, Any]]) -> Any: ...

    def stats(self) -> dict[str, int]:
        """Counts of rows truncated, dropped or skipped while loading, for the log."""
        ...
