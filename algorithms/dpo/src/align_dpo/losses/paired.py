"""Paired, reference-based preference losses.

Notation (log-probs are sums over completion tokens): the log-ratios
``h_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``h_l`` likewise, the implicit rewards
``r_w = beta * h_w`` and ``r_l = beta * h_l``, and the DPO logit ``z = h_w - h_l``.
``s`` is the logistic sigmoid. Every loss is averaged over the pairs of the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

import align
from align_dpo.losses._common import BetaLoss, mean, reference_logps


class DPOLoss(BetaLoss):
    """DPO (Rafailov et al., 2023, eq. 7): ``-log s(beta * z)``."""

    name: Literal["dpo"] = "dpo"


def dpo(cfg: DPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z = cfg.beta * b.logits
    return align.LossOutput(-F.logsigmoid(z).mean(), {"p_chosen": mean(torch.sigmoid(z))})


class CDPOLoss(BetaLoss):
    """Conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences"): the labels are
    flipped with probability ``eps``, giving the label-smoothed
    ``-(1 - eps) log s(beta * z) - eps log s(-beta * z)``."""

    name: Literal["cdpo"] = "cdpo"
    label_smoothing: float = Field(0.1, gt=0, lt=0.5, description="eps: probability a label is flipped.")


def cdpo(cfg: CDPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, eps = cfg.beta * b.logits, cfg.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return align.LossOutput(loss.mean(), {"p_chosen": mean(torch.sigmoid(z))})


class RobustLoss(BetaLoss):
    """Robust DPO (Chowdhury et al., 2024, "Provably robust DPO"): the unbiased estimator of
    the clean-label DPO loss under label flips with probability ``eps``:
    ``[-(1 - eps) log s(beta * z) + eps log s(-beta * z)] / (1 - 2 eps)``."""

    name: Literal["robust"] = "robust"
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="eps: probability a label is flipped.")


def robust(cfg: RobustLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, eps = cfg.beta * b.logits, cfg.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return align.LossOutput(loss.mean(), {"p_chosen": mean(torch.sigmoid(z))})


class IPOLoss(BetaLoss):
    """IPO (Azar et al., 2023, "A general theoretical paradigm...", the empirical IPO loss):
    ``(z - 1 / (2 tau))^2`` with ``tau = beta``, on sequence log-likelihoods as in the paper
    (TRL averages log-probs per token instead; NeMo-Aligner sums by default, as here)."""

    name: Literal["ipo"] = "ipo"


def ipo(cfg: IPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    gap = b.logits - 1 / (2 * cfg.beta)
    return align.LossOutput((gap**2).mean(), {"margin_error": mean(gap)})


class HingeLoss(BetaLoss):
    """SLiC-HF's calibration loss (Zhao et al., 2023) on reference-normalised likelihoods as in
    RSO (Liu et al., 2024): ``max(0, 1 - beta * z)``, i.e. a margin of ``1 / beta`` nats."""

    name: Literal["hinge"] = "hinge"


def hinge(cfg: HingeLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z = cfg.beta * b.logits
    return align.LossOutput(F.relu(1 - z).mean(), {"violations": mean((z < 1).float())})


class EXOPairLoss(BetaLoss):
    """EXO for pairs (Ji et al., 2024, "Towards efficient exact optimization of LM alignment",
    eq. 16): the reverse KL from the policy's pair distribution ``(s(beta z), s(-beta z))`` to the
    label-smoothed preference ``(1 - eps, eps)``:
    ``s(beta z) [log s(beta z) - log(1 - eps)] + s(-beta z) [log s(-beta z) - log eps]``.
    (DPO is the forward KL of the same pair with ``eps -> 0``.)"""

    name: Literal["exo_pair"] = "exo_pair"
    label_smoothing: float = Field(1e-3, gt=0, lt=0.5, description="eps of the target (1 - eps, eps).")


def exo_pair(cfg: EXOPairLoss, b: align.PreferenceBatch) -> align.LossOutput:
    z, eps = cfg.beta * b.logits, cfg.label_smoothing
    log_pw, log_pl = F.logsigmoid(z), F.logsigmoid(-z)
    loss = log_pw.exp() * (log_pw - math.log1p(-eps)) + log_pl.exp() * (log_pl - math.log(eps))
    return align.LossOutput(loss.mean(), {"p_chosen": mean(log_pw.exp())})


class NCAPairLoss(BetaLoss):
    """NCA for pairs (Chen et al., 2024, "Noise contrastive alignment of LMs with explicit
    rewards"): ``-log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l)``; unlike DPO it anchors the
    absolute rewards, so the chosen likelihood does not fall with the rejected one."""

    name: Literal["nca_pair"] = "nca_pair"


def nca_pair(cfg: NCAPairLoss, b: align.PreferenceBatch) -> align.LossOutput:
    r_w, r_l = cfg.beta * b.chosen_logratios, cfg.beta * b.rejected_logratios
    loss = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return align.LossOutput(loss.mean(), {"chosen_reward": mean(r_w), "rejected_reward": mean(r_l)})


class BCOPairLoss(BetaLoss):
    """BCO for pairs (Jung et al., 2024, "Binary classifier optimization for LLM alignment"):
    ``-log s(r_w - delta) - log s(-(r_l - delta))``, chosen and rejected classified apart around
    the reward shift ``delta``. The paper keeps ``delta`` as a running mean of the rewards; this
    loss is stateless, so ``delta`` is the (detached) mean of all ``r_w`` and ``r_l`` of the batch."""

    name: Literal["bco_pair"] = "bco_pair"


def bco_pair(cfg: BCOPairLoss, b: align.PreferenceBatch) -> align.LossOutput:
    r_w, r_l = cfg.beta * b.chosen_logratios, cfg.beta * b.rejected_logratios
    delta = torch.cat([r_w, r_l]).detach().mean()
    loss = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    return align.LossOutput(loss.mean(), {"delta": delta})


class SPPOHardLoss(BetaLoss):
    """SPPO with hard labels (Wu et al., 2024, "Self-play preference optimization", with the
    win probability set to 1 for y_w and 0 for y_l): ``(h_w - eta/2)^2 + (h_l + eta/2)^2`` with
    ``eta = 1 / beta``."""

    name: Literal["sppo_hard"] = "sppo_hard"


def sppo_hard(cfg: SPPOHardLoss, b: align.PreferenceBatch) -> align.LossOutput:
    half_eta = 0.5 / cfg.beta
    h_w, h_l = b.chosen_logratios, b.rejected_logratios
    loss = (h_w - half_eta) ** 2 + (h_l + half_eta) ** 2
    return align.LossOutput(loss.mean(), {"chosen_logratio": mean(h_w), "rejected_logratio": mean(h_l)})


class APOZeroLoss(BetaLoss):
    """APO-zero (D'Oosterlinck et al., 2024, "Anchored preference optimization", eq. 7):
    ``s(r_l) - s(r_w)``: raise the chosen likelihood, lower the rejected (for chosen outputs
    better than the model's). In (-1, 1) as in the paper."""

    name: Literal["apo_zero"] = "apo_zero"


def apo_zero(cfg: APOZeroLoss, b: align.PreferenceBatch) -> align.LossOutput:
    r_w, r_l = cfg.beta * b.chosen_logratios, cfg.beta * b.rejected_logratios
    loss = torch.sigmoid(r_l) - torch.sigmoid(r_w)
    return align.LossOutput(loss.mean(), {"chosen_reward": mean(r_w), "rejected_reward": mean(r_l)})


class APODownLoss(BetaLoss):
    """APO-down (D'Oosterlinck et al., 2024, eq. 8): ``s(r_w) - s(r_w - r_l)``: lower both
    likelihoods, the rejected more (for chosen outputs worse than the model's). In (-1, 1)."""

    name: Literal["apo_down"] = "apo_down"


def apo_down(cfg: APODownLoss, b: align.PreferenceBatch) -> align.LossOutput:
    r_w, r_l = cfg.beta * b.chosen_logratios, cfg.beta * b.rejected_logratios
    loss = torch.sigmoid(r_w) - torch.sigmoid(r_w - r_l)
    return align.LossOutput(loss.mean(), {"chosen_reward": mean(r_w), "rejected_reward": mean(r_l)})


class AOTLoss(BetaLoss):
    """AOT, paired (Melnyk et al., 2024, "Distributional preference alignment of LLMs via optimal
    transport"): first-order stochastic dominance of the policy's chosen-vs-rejected log-ratio
    ``rho = log pi(y_w) - log pi(y_l)`` over the reference's ``rho_ref``, as a 1-D optimal transport
    solved by sorting each within the batch: ``mean_i -log s(beta (rho_(i) - rho_ref_(i)))`` with
    ``(i)`` the i-th smallest. Quantiles are matched across pairs, so it needs batches > 1."""

    name: Literal["aot"] = "aot"


def aot(cfg: AOTLoss, b: align.PreferenceBatch) -> align.LossOutput:
    ref_chosen, ref_rejected = reference_logps(b)
    rho = torch.sort(b.chosen_logps - b.rejected_logps).values
    rho_ref = torch.sort(ref_chosen - ref_rejected).values
    gap = cfg.beta * (rho - rho_ref)
    return align.LossOutput(-F.logsigmoid(gap).mean(), {"dominance_violation": mean((gap < 0).float())})


PAIRED: list[tuple[type[align.LossConfig], align.LossFn]] = [
    (DPOLoss, dpo),
    (CDPOLoss, cdpo),
    (RobustLoss, robust),
    (IPOLoss, ipo),
    (HingeLoss, hinge),
    (EXOPairLoss, exo_pair),
    (NCAPairLoss, nca_pair),
    (BCOPairLoss, bco_pair),
    (SPPOHardLoss, sppo_hard),
    (APOZeroLoss, apo_zero),
    (APODownLoss, apo_down),
    (AOTLoss, aot),
]
