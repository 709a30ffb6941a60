"""Reward models: a Bradley-Terry pairwise model on preference pairs (``reward``) and a
multi-attribute regression model (``reward_regression``). Both train a sequence scorer that
the backend builds (``align.ScoringBackend.build_scorer``) instead of the causal-LM policy; the
trainer checkpoints it and saves it as ``final/`` like any model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import align
from align_reward.data import ScoredTokens


def scoring_backend(backend: align.Backend) -> align.ScoringBackend:
    if not isinstance(backend, align.ScoringBackend):
        raise align.ConfigError(
            f"backend {type(backend).__name__} cannot build reward models: it lacks build_scorer and "
            "sequence_scores (see align.ScoringBackend)"
        )
    return backend


def bradley_terry(chosen: Tensor, rejected: Tensor) -> Tensor:
    """``-log sigmoid(r_chosen - r_rejected)``, averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """Accuracy (ties count half, so a constant scorer gets 0.5), margin and mean rewards."""
    with torch.no_grad():
        margin = chosen - rejected
        return {
            "accuracy": align.pairwise_accuracy(margin),
            "margin": margin.mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
        }


# ---- Bradley-Terry ---------------------------------------------------------------------


class RewardModelConfig(align.RunConfig):
    """``align run --algo reward``: a scalar reward model trained on preference pairs with the
    Bradley-Terry loss."""

    algo: Literal["reward"] = "reward"


def build_pairwise_scorer(backend: align.Backend, cfg: align.RunConfig) -> nn.Module:
    return scoring_backend(backend).build_scorer(1, ["reward"])


class RewardModel(align.Algorithm):
    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.backend = scoring_backend(ctx.backend)

    def pair_scores(self, batch: align.PairedTokens) -> tuple[Tensor, Tensor]:
        scores = self.backend.sequence_scores(self.ctx.policy, batch.tokens)[:, 0]
        return scores[: batch.num_pairs], scores[batch.num_pairs :]

    def loss(self, batch: align.PairedTokens) -> align.LossOutput:
        chosen, rejected = self.pair_scores(batch)
        return align.LossOutput(bradley_terry(chosen, rejected), pair_metrics(chosen, rejected))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[align.PairedTokens]) -> dict[str, float]:
        """Loss and accuracy over every held-out pair (not averaged per batch)."""
        chosen, rejected = [], []
        for batch in batches:
            c, r = self.pair_scores(batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        if not chosen:
            return {}
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {"loss": float(bradley_terry(c, r))} | {k: float(v) for k, v in pair_metrics(c, r).items()}


# ---- regression on attributes ----------------------------------------------------------


class RegressionRewardConfig(align.RunConfig):
    """``align run --algo reward_regression``: one scalar head per attribute listed in
    ``data.attributes``, trained with the mean squared error (SteerLM's attribute model)."""

    algo: Literal["reward_regression"] = "reward_regression"


def build_attribute_scorer(backend: align.Backend, cfg: align.RunConfig) -> nn.Module:
    attributes: list[str] = cfg.data.attributes  # type: ignore[attr-defined]
    return scoring_backend(backend).build_scorer(len(attributes), attributes)


class RegressionRewardModel(align.Algorithm):
    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.backend = scoring_backend(ctx.backend)
        self.attributes: list[str] = list(self.config.data.attributes)  # type: ignore[attr-defined]

    def errors(self, batch: ScoredTokens) -> tuple[Tensor, Tensor]:
        """Squared errors ``[n, attributes]`` and the mask of labelled entries."""
        scores = self.backend.sequence_scores(self.ctx.policy, batch.tokens)
        labelled = batch.labelled.to(scores.device)
        squared = (scores - batch.targets.to(scores.device)).square() * labelled
        return squared, labelled

    def metrics(self, squared: Tensor, labelled: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            per_attribute = squared.sum(0) / labelled.sum(0).clamp(min=1)
            return {
                f"mse_{name}": per_attribute[i]
                for i, name in enumerate(self.attributes)
                if labelled[:, i].any()
            }

    def loss(self, batch: ScoredTokens) -> align.LossOutput:
        squared, labelled = self.errors(batch)
        mse = squared.sum() / labelled.sum().clamp(min=1)
        return align.LossOutput(mse, self.metrics(squared, labelled))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[ScoredTokens]) -> dict[str, float]:
        """MSE over every labelled held-out value, overall and per attribute."""
        squared, labelled = [], []
        for batch in batches:
            s, m = self.errors(batch)
            squared.append(s.float().cpu())
            labelled.append(m.cpu())
        if not squared:
            return {}
        s, m = torch.cat(squared), torch.cat(labelled)
        overall = {"loss": float(s.sum() / m.sum().clamp(min=1))}
        return overall | {k: float(v) for k, v in self.metrics(s, m).items()}
