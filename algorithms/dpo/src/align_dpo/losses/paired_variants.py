"""Paired, reference-based DPO variants that reshape DPO's logit or weight its pairs: DiscoPOP,
length-normalised DPO, f-DPO, DPO-Positive, WPO, AOT on unpaired quantiles and LD-DPO.

Notation as in ``paired.py``: log-probs are sums over completion tokens, ``h_w``/``h_l`` the
chosen/rejected log-ratios against the reference, ``z = h_w - h_l``, ``|y|`` a completion's token
count, ``s`` the logistic sigmoid. Every loss is averaged over the pairs of the batch, as TRL does;
the numbers equal TRL's (``DPOTrainer``, ``loss_type`` of the same name) unless a docstring says.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

import align
from align_dpo.losses._common import BetaLoss, mean

# exp() of log-ratios beyond this overflows float32; TRL clamps its alpha-divergence the same way.
_MAX_EXPONENT = 80.0


def _dpo_output(logit: Tensor) -> align.LossOutput:
    """``mean -log s(logit)`` with the chance the chosen wins as a metric."""
    return align.LossOutput(-F.logsigmoid(logit).mean(), {"p_chosen": mean(torch.sigmoid(logit))})


class DiscoPOPLoss(BetaLoss):
    """DiscoPOP (Chris Lu et al., 2024, "Discovering preference optimization algorithms with and
    for LLMs", eq. 5, the log-ratio modulated loss): with ``rho = beta * z`` and the mixing weight
    ``m = s(rho / tau)``, ``(1 - m) * -log s(rho) + m * exp(-rho)``: logistic (DPO) for pairs the
    policy gets wrong, exponential for the ones it gets right. TRL: ``loss_type="discopop"``,
    ``discopop_tau``. The loss is not monotonic in ``rho``: its slope at a tie (``rho = 0``) is
    ``(1 - log 2) / (4 tau) - 3/4``, positive for ``tau < 0.102`` (the paper's 0.05 included), so
    descent pushes tied pairs slightly the wrong way, as in the paper's figure of the loss."""

    name: Literal["discopop"] = "discopop"
    beta: float = Field(0.05, gt=0, description="Inverse temperature on the log-ratios (the paper's 0.05).")
    tau: float = Field(0.05, gt=0, description="Temperature of the mixing weight s(beta z / tau).")


def discopop(cfg: DiscoPOPLoss, b: align.PreferenceBatch) -> align.LossOutput:
    rho = cfg.beta * b.logits
    modulation = torch.sigmoid(rho / cfg.tau)
    loss = (1 - modulation) * -F.logsigmoid(rho) + modulation * torch.exp(-rho)
    return align.LossOutput(
        loss.mean(), {"p_chosen": mean(torch.sigmoid(rho)), "modulation": mean(modulation)}
    )


class SigmoidNormLoss(BetaLoss):
    """Length-normalised DPO (TRL's ``sigmoid_norm``; the per-token log-ratio of SimPO/R-DPO
    applied to DPO): ``-log s(beta * (h_w / |y_w| - h_l / |y_l|))``. ``beta`` acts per token, so
    it is typically larger than DPO's."""

    name: Literal["sigmoid_norm"] = "sigmoid_norm"


def sigmoid_norm(cfg: SigmoidNormLoss, b: align.PreferenceBatch) -> align.LossOutput:
    per_token_w = b.chosen_logratios / b.chosen_lengths.clamp(min=1)
    per_token_l = b.rejected_logratios / b.rejected_lengths.clamp(min=1)
    return _dpo_output(cfg.beta * (per_token_w - per_token_l))


FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


class FDPOLoss(BetaLoss):
    """f-DPO (Wang et al., 2023, "Beyond reverse KL: generalizing DPO with diverse divergence
    constraints", Theorem 1): DPO under an f-divergence penalty replaces each log-ratio ``h`` by
    ``f'(u)`` of the likelihood ratio ``u = exp(h)``: ``-log s(beta * (f'(u_w) - f'(u_l)))``.

    - ``reverse_kl``: ``f'(u) = log u + 1``, i.e. ``h``: plain DPO.
    - ``forward_kl``: ``f'(u) = 1 - 1/u``, i.e. ``-exp(-h)``.
    - ``js_divergence``: ``f'(u) = log(2u / (1 + u))``, i.e. ``log s(h)`` (the ``log 2`` cancels).
    - ``alpha_divergence``: ``f'(u) = (u^(alpha-1) - 1) / (alpha - 1)``, i.e.
      ``exp((alpha - 1) h) / (alpha - 1)``; ``alpha -> 1`` is reverse KL, ``alpha = 0`` forward KL.

    Constants of ``f'`` cancel in the difference. Names and the alpha convention follow TRL 1.x
    (``f_divergence_type``, ``f_alpha_divergence_coef``, default 0.5); the exponent is clamped at
    80 as TRL does for float32. (TRL before 1.0 used ``(1 - u^-alpha) / alpha``: its ``alpha`` is
    1 minus this one.)"""

    name: Literal["f_dpo"] = "f_dpo"
    f_divergence_type: FDivergence = Field(
        "reverse_kl", description="The divergence from the reference that regularises the policy."
    )
    f_alpha_divergence_coef: float = Field(
        0.5, description="alpha of the alpha-divergence (1 is reverse KL, 0 forward KL)."
    )


def f_divergence_scores(cfg: FDPOLoss, logratios: Tensor) -> Tensor:
    """``f'(exp(h))`` up to a constant, for each log-ratio ``h``."""
    kind, alpha = cfg.f_divergence_type, cfg.f_alpha_divergence_coef
    if kind == "forward_kl":
        return -torch.exp((-logratios).clamp(max=_MAX_EXPONENT))
    if kind == "js_divergence":
        return F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return torch.exp(((alpha - 1.0) * logratios).clamp(max=_MAX_EXPONENT)) / (alpha - 1.0)
    return logratios


def f_dpo(cfg: FDPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    gap = f_divergence_scores(cfg, b.chosen_logratios) - f_divergence_scores(cfg, b.rejected_logratios)
    return _dpo_output(cfg.beta * gap)


class DPOPLoss(BetaLoss):
    """DPO-Positive (Pal et al., 2024, "Smaug: fixing failure modes of preference optimisation
    with DPO-Positive", eq. 3): ``-log s(beta * (z - lambda * max(0, -h_w)))``: a penalty once the
    chosen likelihood falls below the reference's, so the pair cannot be separated by lowering
    both. (TRL has no DPOP.)"""

    name: Literal["dpop"] = "dpop"
    dpop_lambda: float = Field(
        50.0, ge=0, description="lambda: weight of the chosen log-ratio drop (paper: 50)."
    )


def dpop(cfg: DPOPLoss, b: align.PreferenceBatch) -> align.LossOutput:
    drop = F.relu(-b.chosen_logratios)
    out = _dpo_output(cfg.beta * (b.logits - cfg.dpop_lambda * drop))
    out.metrics["chosen_drop"] = mean(drop)
    return out


class WPOLoss(BetaLoss):
    """WPO (Zhou et al., 2024, "WPO: enhancing RLHF with weighted preference optimization", eq. 2):
    DPO with each pair weighted by how likely the policy itself is to produce it,
    ``w = exp(mean token log pi(y_w)) * exp(mean token log pi(y_l))`` (detached, no clamp):
    ``w * -log s(beta * z)``, so off-policy pairs count less.

    Differs from TRL's ``use_weighting``, which uses eq. 3's "sampled alignment": each token's
    log-prob minus ``log sum_v pi(v)^2`` over the vocabulary. That needs full-vocabulary
    statistics the PreferenceBatch does not carry; without them align's weight is TRL's times
    ``exp(mean token log sum_v pi(v)^2)`` per sequence, i.e. smaller and not normalised to the
    policy's greedy likelihood."""

    name: Literal["wpo"] = "wpo"


def wpo(cfg: WPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    weight = torch.exp(b.chosen_logps_mean + b.rejected_logps_mean).detach()
    z = cfg.beta * b.logits
    loss = weight * -F.logsigmoid(z)
    return align.LossOutput(loss.mean(), {"p_chosen": mean(torch.sigmoid(z)), "weight": mean(weight)})


class AOTUnpairedLoss(BetaLoss):
    """AOT for unpaired data (Melnyk et al., 2024, "Distributional preference alignment of LLMs via
    optimal transport", the unpaired formulation): the distribution of chosen log-ratios ``h_w``
    should dominate that of rejected ``h_l``, pairing ignored: sort each within the batch and take
    ``mean_i -(1 - eps) log s(beta (h_w(i) - h_l(i))) - eps log s(-beta (h_w(i) - h_l(i)))`` with
    ``(i)`` the i-th smallest. TRL: a ``DPOTrainer`` loss type (not a KTO one) on paired batches,
    so it is registered here, for PreferenceBatch. Needs batches > 1."""

    name: Literal["aot_unpaired"] = "aot_unpaired"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="eps: probability a label is flipped.")


def aot_unpaired(cfg: AOTUnpairedLoss, b: align.PreferenceBatch) -> align.LossOutput:
    chosen = torch.sort(b.chosen_logratios).values
    rejected = torch.sort(b.rejected_logratios).values
    gap = cfg.beta * (chosen - rejected)
    eps = cfg.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(gap) - eps * F.logsigmoid(-gap)
    return align.LossOutput(loss.mean(), {"dominance_violation": mean((gap < 0).float())})


class LDDPOLoss(BetaLoss):
    """LD-DPO (Liu et al., 2024, "Length desensitization in directed preference optimization"):
    DPO on length-desensitised likelihoods. With the pair's shared length
    ``l_p = min(|y_w|, |y_l|)``, each completion's log-likelihood becomes
    ``sum_{t <= l_p} log pi(y_t) + alpha * sum_{t > l_p} log pi(y_t)``: the tokens past the shorter
    completion count ``alpha`` times. Then ``-log s(beta * (h^_w - h^_l))`` with ``h^`` the
    difference of the policy's and the reference's desensitised log-likelihoods (TRL 1.x's
    ``ld_alpha`` desensitises both; its first version, 0.19, the policy only). ``alpha = 1`` is
    DPO. Reads per-token log-probs (``needs_token_logps``), so the reference is scored live on
    every batch even with ``reference.mode: precompute``."""

    name: Literal["ld_dpo"] = "ld_dpo"
    ld_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the tokens past the shared length (the paper tunes it in (0, 1)).",
    )


def desensitised(tokens: align.TokenLogps, shared: Tensor, alpha: float) -> Tensor:
    """Per-sequence sums of token log-probs, those past ``shared`` tokens weighted ``alpha``."""
    position = torch.arange(tokens.values.shape[1], device=tokens.values.device)[None, :]
    weight = torch.where(position < shared[:, None].to(position.device), 1.0, alpha)
    return (tokens.values * tokens.mask * weight).sum(dim=1)


def ld_dpo(cfg: LDDPOLoss, b: align.PreferenceBatch) -> align.LossOutput:
    if b.token_logps is None or b.ref_token_logps is None:
        raise ValueError(
            "ld_dpo needs per-token log-probs (policy and reference); register it with needs_token_logps=True"
        )
    n = b.chosen_logps.shape[0]
    shared = torch.minimum(b.chosen_lengths, b.rejected_lengths).repeat(2)
    logratios = desensitised(b.token_logps, shared, cfg.ld_alpha) - desensitised(
        b.ref_token_logps, shared, cfg.ld_alpha
    )
    return _dpo_output(cfg.beta * (logratios[:n] - logratios[n:]))


PAIRED_VARIANTS: list[tuple[type[align.LossConfig], align.LossFn]] = [
    (DiscoPOPLoss, discopop),
    (SigmoidNormLoss, sigmoid_norm),
    (FDPOLoss, f_dpo),
    (DPOPLoss, dpop),
    (WPOLoss, wpo),
    (AOTUnpairedLoss, aot_unpaired),
]
