"""Pieces shared by the preference losses."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

import align


class BetaLoss(align.LossConfig):
    """Base of the losses with an inverse temperature ``beta`` on log-ratios (not registered)."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature (KL strength) on the log-ratios.")


def mean(x: Tensor) -> Tensor:
    """A detached batch mean, for metrics."""
    return x.detach().float().mean()


def nll(b: align.PreferenceBatch) -> Tensor:
    """Negative log-likelihood of the chosen completions, averaged over all their tokens in the
    batch: ``-sum(chosen_logps) / sum(chosen_lengths)``."""
    return -b.chosen_logps.sum() / b.chosen_lengths.sum().clamp(min=1)


def reference_logps(b: align.PreferenceBatch) -> tuple[Tensor, Tensor]:
    """The reference's chosen and rejected log-probs; an error if the batch has none."""
    if b.ref_chosen_logps is None or b.ref_rejected_logps is None:
        raise ValueError("this loss needs reference log-probs; register it with needs_reference=True")
    return b.ref_chosen_logps, b.ref_rejected_logps
