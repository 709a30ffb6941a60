"""What an algorithm is: its models, its loss over a batch, its evaluation metrics.

Offline methods (SFT, DPO family, KTO, RM) implement ``loss`` and let the shared trainer
loop do the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.batches import LossOutput
from align.config import RunConfig
from align.protocols import Backend
from align.registry import Registry


@dataclass
class Context:
    """What the trainer hands an algorithm.

    ``policy`` is the model the run trains, checkpoints and saves as ``final/``: the backend's
    ``build_policy()``, or what the algorithm's registration meta ``build_model(backend, cfg)``
    returns instead (a reward model registers one that builds a scorer).
    """

    config: RunConfig
    backend: Backend
    policy: nn.Module
    registry: Registry
    output_dir: Path
    train_data: Any = None
    eval_data: Any = None


class Algorithm:
    """Base of offline algorithms. Subclasses implement ``loss``; ``evaluate`` defaults to
    averaging the loss and its metrics over the eval batches."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates."""
        return self.ctx.policy

    def loss(self, batch: Any) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        for batch in batches:
            out = self.loss(batch)
            for key, value in {"loss": out.loss, **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        return {key: value / max(1, count) for key, value in totals.items()}
