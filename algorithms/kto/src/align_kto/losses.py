"""The KTO loss (Ethayarajh et al., 2024, eq. 8) as a loss plugin over ``align.UnpairedBatch``.

With ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point
``z0 = max(0, mean over mismatched pairs (x, y') of log pi(y'|x) - log pi_ref(y'|x))`` (detached,
an estimate of KL(pi || pi_ref) that no gradient flows through),

    v(x, y) = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
              lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
    loss    = mean over the batch of (lambda_y - v(x, y))
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import align
from align_kto.unpaired_losses import UNPAIRED_LOSSES


class KTOLoss(align.LossConfig):
    """KTO. The paper suggests weights with ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3], where
    ``n_D``/``n_U`` count desirable/undesirable examples."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of undesirable examples.")


def kl_estimate(b: align.UnpairedBatch) -> torch.Tensor:
    """``z0``: the batch-mean log-ratio of the mismatched pairs, clamped at 0, detached."""
    return b.kl_logratios.detach().mean().clamp(min=0)


def kto(cfg: KTOLoss, b: align.UnpairedBatch) -> align.LossOutput:
    z0 = kl_estimate(b)
    r = b.logratios
    desirable = b.desirable
    value = torch.where(
        desirable,
        cfg.desirable_weight * torch.sigmoid(cfg.beta * (r - z0)),
        cfg.undesirable_weight * torch.sigmoid(cfg.beta * (z0 - r)),
    )
    weight = torch.where(desirable, cfg.desirable_weight, cfg.undesirable_weight)
    return align.LossOutput((weight - value).mean(), {"kl": z0})


@align.hookimpl
def register_losses(register: align.Register) -> None:
    register(KTOLoss, needs_reference=True)(kto)
    for config, fn in UNPAIRED_LOSSES:
        register(config, needs_reference=True)(fn)
