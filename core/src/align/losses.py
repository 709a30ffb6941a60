"""Resolving a run's ``loss`` (one config or a weighted list) into callables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from align.batches import LossOutput
from align.config import LossConfig
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
