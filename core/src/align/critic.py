"""The critic (value function) of actor-critic methods such as PPO, as a plugin kind.

A critic plugin registers ``register_critics(register)``: ``register(MyCriticConfig)(factory)``
with ``factory(cfg, ctx, learner) -> Critic``. ``ctx`` is the run's ``align.Context`` (config,
backend, policy, output folder); ``learner`` is the run's ``align.Learner``, on which a critic
trained in this process registers its model (``learner.add_trainable("critic", ...)``) so that
the actor's checkpoints hold it. A critic in another process (a PyTriton server) ignores it.
The factory is called from the algorithm's ``setup``: before a resume restores anything.

``Critic`` is the seam between the algorithm and wherever the value model runs: a PPO driver
never knows whether its critic is local or remote.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import Field
from torch import Tensor

from align.batches import TokenBatch
from align.config import PluginConfig
from align.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

    from align.algorithm import Context
    from align.registry import Registry


class CriticConfig(PluginConfig):
    """Base of critic configs, discriminated by ``name`` (``local``, a remote server...).

    ``value_clip`` is the clipped value loss's range, which every critic applies in ``train``."""

    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="Clip the new values to old_values +- value_clip in the value loss (PPO's clipped "
        "value loss); null: the plain squared error.",
    )


class CriticError(UserError):
    """A critic failed: a server that is down, hangs past its timeout, or answers with the wrong
    shape. The message names the critic (and its server). The actor's last checkpoint is kept."""


@dataclass
class CriticBatch:
    """One critic optimizer step's data, in the layout of ``Critic.values``.

    ``tokens`` is the same kind of ``TokenBatch`` ``values`` takes. ``returns``, ``old_values``
    and ``mask`` are ``[tokens.num_sequences, T]`` (``T`` the most scored tokens of a sequence),
    row ``s`` holding sequence ``s``'s scored tokens left-aligned; ``returns`` and
    ``old_values`` are float32 and zero where ``mask`` (bool) is false. ``old_values`` are the
    critic's values when the rollout was scored (the clipped loss's anchor). A token whose
    ``mask`` is false is not trained on (it may still exist in ``tokens``)."""

    tokens: TokenBatch
    returns: Tensor
    old_values: Tensor
    mask: Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def to(self, device: torch.device | str) -> CriticBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (Tensor, TokenBatch))
        }
        return replace(self, **moved)


@runtime_checkable
class Critic(Protocol):
    """A value model ``V(s_t)`` over token sequences, trained with PPO's clipped value loss.

    Ordering: calls take effect in the order they are made. A ``values`` call made after some
    ``train`` calls sees the weights after all of them (a remote critic queues them in order);
    the caller never waits for a ``train`` unless it needs its metrics, so the actor and the
    critic train at the same time and the actor waits only for its next ``values``.

    Failures: a future never hangs forever. When the critic fails (a server down or dead, a
    request past the critic's own configured timeout after its bounded retries, an answer of
    the wrong shape or dtype, a non-finite loss) the future's ``result()`` raises
    ``align.CriticError`` naming the critic (and its URL); ``save``, ``load`` and ``close``
    raise it directly. After a failure the critic is unusable; the run stops, keeping its last
    checkpoint, and ``--resume`` reconnects.
    """

    def values(self, batch: TokenBatch) -> Future[Tensor]:
        """The value of each scored token of each sequence.

        ``batch`` is laid out by the caller (``align.lay_out``: padded rows, or packed with
        ``sequence_ids``/``position_ids``); ``batch.loss_mask`` marks each sequence's scored
        (completion) tokens. The result is a CPU float32 tensor ``[batch.num_sequences, T]``,
        ``T`` the most scored tokens of any sequence, in the layout of
        ``Backend.token_logps(...).values``: ``values[s, j]`` is the value read at the position
        *before* sequence ``s``'s ``j``-th scored token (the state in which that token was
        chosen: prompt plus the completion up to it, excluded), left-aligned, and ``0.0`` past
        the sequence's own count. The critic pads; the caller slices. No gradient."""
        ...

    def train(self, batch: CriticBatch) -> Future[dict[str, float]]:
        """Exactly one optimizer step on ``batch`` (a critic may split it into micro-batches to
        fit memory, accumulating gradients: the step equals one over the whole batch) with the
        clipped value loss, the mean over the tokens under ``batch.mask`` of

            max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) / 2

        (``c`` the config's ``value_clip``; without it ``(V - R)^2 / 2``), ``V`` the current
        values, ``R`` = ``batch.returns``, ``V_old`` = ``batch.old_values``. The future's
        result is the step's metrics as floats, at least ``loss`` (the value loss before the
        step), ``clip_fraction`` (share of masked tokens where the clipped term was taken) and
        ``grad_norm``. The caller need not wait for it."""
        ...

    def save(self, folder: Path) -> None:
        """Write the critic's whole training state that the actor's checkpoint does not already
        hold (weights, optimizer and LR schedule, step count, RNG) into ``folder`` (a path in
        the actor's checkpoint being written, ``<checkpoint>/critic``; the critic creates it;
        a remote critic must reach it, e.g. on a shared file system). First waits for every
        ``train`` made before the call. Blocks until written. A critic whose state the learner
        already holds (a local critic registered as trainable ``critic``) writes nothing."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote into ``folder`` (on ``--resume``; ``folder`` may be
        missing for a critic whose ``save`` writes nothing). Afterwards the same sequence of
        ``values``/``train`` calls gives bit-for-bit what the uninterrupted run gave."""
        ...

    def close(self) -> None:
        """Release the critic (stop a server this run started). Idempotent; called once the run
        ends, also on an error or Ctrl-C."""
        ...


def build_critic(cfg: CriticConfig, ctx: Context, learner: Any, registry: Registry | None = None) -> Critic:
    """The critic ``cfg`` names, built by its plugin (see the module docstring). A crash while
    building is a ``ConfigError`` naming the critic."""
    registry = registry or ctx.registry
    entry = registry.get("critic", cfg.name)
    try:
        critic: Critic = entry.factory(cfg, ctx, learner)
    except UserError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"critic '{cfg.name}' ({entry.package}) could not be built: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [
        name
        for name in ("values", "train", "save", "load", "close")
        if not callable(getattr(critic, name, None))
    ]
    if missing:
        raise ConfigError(
            f"critic '{cfg.name}' ({entry.package}) returned an object without {', '.join(missing)}"
        )
    return critic
