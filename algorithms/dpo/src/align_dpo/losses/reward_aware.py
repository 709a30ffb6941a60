"""Reward-aware preference optimisation (RPO): NeMo-Aligner's losses from the Nemotron-4 340B
technical report (Nvidia, 2024, section 3.4.2). They read the reward model's score gap of each
pair, ``g = r*(x, y_w) - r*(x, y_l)`` (``PreferenceBatch.reward_gap``: data columns
``chosen_reward``/``rejected_reward``), and fit the policy's implicit reward gap ``beta * z``
(``z`` as in ``paired``) to ``eta * g`` instead of only ranking the pair.

NeMo-Aligner names: ``beta`` = ``ref_policy_kl_penalty`` (its default 0.2), ``eta`` =
``gt_reward_scale``; log-probs are sequence sums (``preference_average_log_probs: false``).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

import align
from align_dpo.losses._common import BetaLoss, mean


class RPOLoss(BetaLoss):
    """Base of the RPO losses (not registered)."""

    eta: float = Field(1.0, gt=0, description="Scale of the reward model's score gap.")


def _gaps(cfg: RPOLoss, b: align.PreferenceBatch) -> tuple[Tensor, Tensor]:
    """The policy's implicit reward gap ``beta * z`` and the target ``eta * g``."""
    if b.reward_gap is None:
        raise align.ConfigError(
            f"loss '{cfg.name}' needs the reward model's score of each response: set "
            "data.columns.chosen_reward and data.columns.rejected_reward to the data's reward columns"
        )
    z = cfg.beta * b.logits
    return z, cfg.eta * b.reward_gap.to(device=z.device, dtype=z.dtype)


def _bernoulli_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bernoulli(s(p)) || Bernoulli(s(q))) from the logits ``p`` and ``q``."""
    lp_w, lp_l = F.logsigmoid(log_p), F.logsigmoid(-log_p)
    lq_w, lq_l = F.logsigmoid(log_q), F.logsigmoid(-log_q)
    return lp_w.exp() * (lp_w - lq_w) + lp_l.exp() * (lp_l - lq_l)


class RPOSquaredLoss(RPOLoss):
    """RPO, squared distance: ``(beta * z - eta * g)^2``."""

    name: Literal["rpo_sq"] = "rpo_sq"


def rpo_sq(cfg: RPOSquaredLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, target = _gaps(cfg, b)
    return align.LossOutput(((z - target) ** 2).mean(), {"target_gap": mean(target)})


class RPOBackwardKLLoss(RPOLoss):
    """RPO, the report's distance: the KL from the reward model's preference probability to the
    policy's, ``KL(Bern(s(eta g)) || Bern(s(beta z)))`` =
    ``s(eta g) log[s(eta g) / s(beta z)] + s(-eta g) log[s(-eta g) / s(-beta z)]``."""

    name: Literal["rpo_bwd_kl"] = "rpo_bwd_kl"


def rpo_bwd_kl(cfg: RPOBackwardKLLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, target = _gaps(cfg, b)
    return align.LossOutput(_bernoulli_kl(target, z).mean(), {"target_gap": mean(target)})


class RPOForwardKLLoss(RPOLoss):
    """RPO, the reverse direction: ``KL(Bern(s(beta z)) || Bern(s(eta g)))``."""

    name: Literal["rpo_fwd_kl"] = "rpo_fwd_kl"


def rpo_fwd_kl(cfg: RPOForwardKLLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, target = _gaps(cfg, b)
    return align.LossOutput(_bernoulli_kl(z, target).mean(), {"target_gap": mean(target)})


REWARD_AWARE: list[tuple[type[align.LossConfig], align.LossFn]] = [
    (RPOSquaredLoss, rpo_sq),
    (RPOBackwardKLLoss, rpo_bwd_kl),
    (RPOForwardKLLoss, rpo_fwd_kl),
]
