"""Resolving a run's ``loss`` (one config or a weighted list) into callables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from align.batches import LossOutput
from align.config import LossConfig
from align.errors import ConfigError
from align.plugins import default_plugins
from align.registry import Registry

LossFn = Callable[[Any, Any], LossOutput]


@dataclass(frozen=True)
class ResolvedLoss:
    config: LossConfig
    fn: LossFn
    needs_reference: bool


def resolve_losses(loss: LossConfig | Sequence[LossConfig], registry: Registry) -> list[ResolvedLoss]:
    configs = list(loss) if isinstance(loss, Sequence) else [loss]
    resolved = []
    for cfg in configs:
        entry = registry.get("loss", cfg.name)
        resolved.append(ResolvedLoss(cfg, entry.factory, bool(entry.meta.get("needs_reference", True))))
    return resolved


def loss_function(
    loss: str | LossConfig, registry: Registry | None = None, **settings: Any
) -> Callable[[Any], LossOutput]:
    """A registered loss, ready to call on a hand-built batch: what a loss's tests need.

    ``align.loss_function("simpo", beta=2.5)(batch)`` validates ``settings`` with the loss's
    own config class (a wrong key or value is an ``align.ConfigError``, as in a run config) and
    calls the registered function with that config. ``loss`` may also be a config instance.
    ``registry`` defaults to the installed plugins, plus those ``ALIGN_PLUGIN_MODULES`` names
    (a plugin under development). The result is the loss itself: ``LossConfig.weight`` applies
    only inside a weighted sum of losses, and nothing is detached.
    """
    registry = registry if registry is not None else default_plugins().registry
    name = loss if isinstance(loss, str) else loss.name
    entry = registry.get("loss", name)
    config = _loss_config(entry.config, loss, settings)
    factory: LossFn = entry.factory

    def registered_loss(batch: Any) -> LossOutput:
        return factory(config, batch)

    registered_loss.__name__ = registered_loss.__qualname__ = name
    return registered_loss


def _loss_config(cls: type[BaseModel], loss: str | LossConfig, settings: dict[str, Any]) -> BaseModel:
    given = {"name": loss, **settings} if isinstance(loss, str) else {**loss.model_dump(), **settings}
    try:
        return cls.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"loss '{given['name']}': {problems}") from None


def combine_losses(losses: Sequence[ResolvedLoss], batch: Any) -> LossOutput:
    """``sum(weight * loss)``; metrics of each term are prefixed with its name when several."""
    if len(losses) == 1 and losses[0].config.weight == 1.0:
        return losses[0].fn(losses[0].config, batch)
    total = torch.zeros(())
    metrics: dict[str, Any] = {}
    for term in losses:
        out = term.fn(term.config, batch)
        total = total + term.config.weight * out.loss
        metrics[f"{term.config.name}/loss"] = out.loss.detach()
        metrics |= {f"{term.config.name}/{k}": v for k, v in out.metrics.items()}
    return LossOutput(total, metrics)


def pairwise_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen scores above its rejected; a tie counts half, so a model
    that cannot tell them apart (every margin 0) scores exactly 0.5."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
