"""Reference-free losses: no reference model is built when every loss of a run is one of these.

``nll`` is the chosen completions' negative log-likelihood averaged over all their tokens in the
batch, ``-sum(log pi(y_w|x)) / sum(|y_w|)``, the same in ``cpo``, ``orpo`` and ``sft``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

import align
from align_dpo.losses._common import BetaLoss, mean, nll


class CPOLoss(BetaLoss):
    """CPO (Xu et al., 2024, "Contrastive preference optimization"):
    ``-log s(beta (log pi(y_w) - log pi(y_l))) + alpha * nll``, a reference-free DPO (sequence
    log-likelihoods) plus behaviour cloning of the chosen. The paper's ``L_NLL`` is taken per token
    (``nll``) so that ``alpha`` does not scale with the completions' length."""

    name: Literal["cpo"] = "cpo"
    alpha: float = Field(1.0, ge=0, description="Weight of the NLL term on the chosen completions.")


def cpo(cfg: CPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    preference = -F.logsigmoid(cfg.beta * (b.chosen_logps - b.rejected_logps)).mean()
    chosen_nll = nll(b)
    return align.LossOutput(
        preference + cfg.alpha * chosen_nll,
        {"preference_loss": preference.detach(), "nll": chosen_nll.detach()},
    )


class ORPOLoss(align.LossConfig):
    """ORPO (Hong et al., 2024, "Monolithic preference optimization without reference model"):
    ``nll + lambda * -log s(log(odds(y_w) / odds(y_l)))`` with ``odds(y) = P(y) / (1 - P(y))`` and
    ``P(y) = exp(mean token log pi(y|x))``."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term (TRL calls it beta).")


def _log_odds(mean_logps: Tensor) -> Tensor:
    """``log(P / (1 - P))`` for ``P = exp(mean_logps)``, stable for P near 0 and near 1."""
    m = mean_logps.clamp(max=-1e-6)
    return m - torch.log(-torch.expm1(m))


def orpo(cfg: ORPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    log_odds_ratio = _log_odds(b.chosen_logps_mean) - _log_odds(b.rejected_logps_mean)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio).mean()
    chosen_nll = nll(b)
    return align.LossOutput(
        chosen_nll + cfg.beta * odds_ratio_loss,
        {
            "nll": chosen_nll.detach(),
            "log_odds_ratio": mean(log_odds_ratio),
            "odds_ratio_loss": odds_ratio_loss.detach(),
        },
    )


class SFTLoss(align.LossConfig):
    """Supervised fine-tuning on the chosen completions: ``nll``. Add it to any loss through a
    weighted list, e.g. ``loss: [{name: dpo}, {name: sft, weight: 0.2}]`` (NeMo-Aligner's
    ``sft_loss_weight``)."""

    name: Literal["sft"] = "sft"


def sft(cfg: SFTLoss, b: align.PreferenceBatch) -> align.LossOutput:
    loss = nll(b)
    return align.LossOutput(loss, {"perplexity": loss.detach().exp()})


REFERENCE_FREE: list[tuple[type[align.LossConfig], align.LossFn]] = [
    (CPOLoss, cpo),
    (ORPOLoss, orpo),
    (SFTLoss, sft),
]
