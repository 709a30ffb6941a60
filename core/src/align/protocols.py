"""The small interfaces between the pieces: an algorithm never knows which backend runs it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from align.batches import SequenceLogps, TokenBatch, TokenLogps
from align.config import ModelConfig

# What ``Backend.build_model`` builds: causal LMs (the trained policy, the frozen reference) and
# one-head sequence scorers (the frozen reward model, the trained critic).
MODEL_ROLES: tuple[str, ...] = ("policy", "reference", "reward", "critic")


@runtime_checkable
class Backend(Protocol):
    """Builds and runs models. ``hf`` (transformers) is the default; Megatron is another."""

    tokenizer: Any
    is_main: bool
    """Whether this process writes outputs: always for a single process, rank 0 when distributed."""

    def build_model(self, role: str, model: ModelConfig | None = None) -> nn.Module:
        """A model for ``role`` (one of ``MODEL_ROLES``) from its own model section (default: the
        run's ``model``), so a reward model and a policy can come from different paths:
        ``policy`` a trainable causal LM, ``reference`` a frozen one, ``reward`` a frozen sequence
        scorer with one head (``model.path`` may be a saved reward model), ``critic`` a trainable
        one-head scorer. Initial weights always come from the model section, never a checkpoint."""
        ...

    def build_policy(self) -> nn.Module:
        """``build_model("policy")``: the trainable model, with the configured initial weights."""
        ...

    def build_reference(self) -> nn.Module:
        """``build_model("reference")``: a frozen model with the initial weights."""
        ...

    def named_weights(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """The model's weights as (name, detached tensor) pairs, named and deduplicated as in the
        ecosystem's checkpoints (HF names: tied weights once): what a rollout engine's refit takes.
        Streamed one tensor at a time; a distributed backend gathers each on the main process."""
        ...

    def sequence_logps(self, model: nn.Module, batch: TokenBatch) -> SequenceLogps:
        """Per-sequence sums of log-probs of the tokens under ``batch.loss_mask``."""
        ...

    def token_logps(self, model: nn.Module, batch: TokenBatch, *, with_entropy: bool = False) -> TokenLogps:
        """The log-prob of each token under ``batch.loss_mask``, ``[num_sequences, longest]``,
        one row per sequence, left-aligned, with its mask (and with ``with_entropy`` the entropy
        of each position's next-token distribution): what per-token policy losses read."""
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
class TokenScoringBackend(ScoringBackend, Protocol):
    """A scoring backend that also reads a one-head scorer at every token (a critic's values):
    optional, checked with ``isinstance`` by the critics that need it."""

    def token_scores(self, model: nn.Module, batch: TokenBatch) -> TokenLogps:
        """The score head (label 0) at the position before each token under
        ``batch.loss_mask``, in ``token_logps``'s layout (``[num_sequences, longest]``,
        left-aligned, float32, with its mask); differentiable when grad is enabled."""
        ...


@runtime_checkable
class HiddenStatesBackend(Backend, Protocol):
    """A backend that also hands out a causal LM's last hidden states, for heads trained on the
    policy's trunk (ILQL's Q and V): optional, checked with ``isinstance`` by the algorithms that
    need it."""

    def token_hidden_states(self, model: nn.Module, batch: TokenBatch) -> tuple[TokenLogps, Tensor]:
        """One forward pass: ``token_logps`` (the log-prob of each token under ``loss_mask``) and
        the last hidden state at the position before each such token (the state it was chosen
        in, what the LM head read), ``[num_sequences, longest, hidden_size]`` in the same
        left-aligned layout (zeros past a sequence's count); both differentiable."""
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
