"""Preference losses, each a plugin registered through ``register_losses``.

Notation: ``logits = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

import align


class DPOLoss(align.LossConfig):
    """Sigmoid DPO (Rafailov et al., 2023, eq. 7), with optional label smoothing ``eps``
    (conservative DPO, Mitchell 2023): ``-(1-eps) log s(beta z) - eps log s(-beta z)``."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


def dpo(cfg: DPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z = cfg.beta * b.logits
    loss = -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)
    return align.LossOutput(loss.mean())


@align.hookimpl
def register_losses(register: align.Register) -> None:
    register(DPOLoss, needs_reference=True)(dpo)
