"""Unpaired losses beside KTO, over ``align.UnpairedBatch``: APO-zero unpaired and BCO.

Notation: ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` is an example's implicit reward,
``s`` the logistic sigmoid, ``lambda_D``/``lambda_U`` the weights of desirable/undesirable
examples. Each loss is averaged over the examples of the batch, as TRL does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

import align


class UnpairedWeights(align.LossConfig):
    """Base of the unpaired losses with ``beta`` and per-label weights (not registered)."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature (KL strength) on the log-ratios.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of undesirable examples.")


def weighted_mean(cfg: UnpairedWeights, desirable: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    weights = torch.where(desirable, cfg.desirable_weight, cfg.undesirable_weight)
    return (weights * losses).mean()


class APOZeroUnpairedLoss(UnpairedWeights):
    """APO-zero, unpaired (D'Oosterlinck et al., 2024, "Anchored preference optimization", the
    unpaired form of eq. 7; TRL's KTO ``loss_type="apo_zero_unpaired"``): ``1 - s(r)`` for a
    desirable example, ``s(r)`` for an undesirable one, weighted by ``lambda_D``/``lambda_U``:
    raise desirable likelihoods and lower undesirable ones, anchored at the reference. Unlike KTO
    it needs no KL estimate (the mismatched pairs are still scored by the KTO algorithm)."""

    name: Literal["apo_zero_unpaired"] = "apo_zero_unpaired"


def apo_zero_unpaired(cfg: APOZeroUnpairedLoss, b: align.UnpairedBatch) -> align.LossOutput:
    r, desirable = cfg.beta * b.logratios, b.desirable
    losses = torch.where(desirable, 1 - torch.sigmoid(r), torch.sigmoid(r))
    return align.LossOutput(weighted_mean(cfg, desirable, losses))


class BCOLoss(UnpairedWeights):
    """BCO (Jung et al., 2024, "Binary classifier optimization for LLM alignment", eq. 5 with the
    reward shift of section 3.3): a logistic classifier of desirable vs undesirable whose logit is
    the implicit reward, ``-log s(r - delta)`` for a desirable example and ``-log s(-(r - delta))``
    for an undesirable one, with ``delta`` the running mean of every reward trained on so far,
    this batch included (``beta * running_logratio_mean``, kept by the KTO algorithm in its
    checkpoints, so a resumed run continues it; evaluation reads it without updating it).

    As TRL's ``BCOTrainer`` without its underlying-distribution matching (UDM, the optional
    density-ratio weights of undesirable prompts from an embedding classifier), which is not
    implemented here; ``lambda_D``/``lambda_U`` weights are an addition (1 by default, as TRL)."""

    name: Literal["bco"] = "bco"


def bco(cfg: BCOLoss, b: align.UnpairedBatch) -> align.LossOutput:
    if b.running_logratio_mean is None:
        raise ValueError("bco needs the running log-ratio mean that the kto algorithm keeps")
    r, desirable = cfg.beta * b.logratios, b.desirable
    delta = cfg.beta * b.running_logratio_mean.detach()
    losses = -F.logsigmoid(torch.where(desirable, r - delta, delta - r))
    return align.LossOutput(weighted_mean(cfg, desirable, losses), {"delta": delta})


UNPAIRED_LOSSES: list[tuple[type[align.LossConfig], align.LossFn]] = [
    (APOZeroUnpairedLoss, apo_zero_unpaired),
    (BCOLoss, bco),
]
