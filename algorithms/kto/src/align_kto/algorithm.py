"""KTO's step: one forward pass over the labelled and the mismatched sequences, the
reference's log-probs of both, then the configured loss plugin(s)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist

import align
from align_kto.data import UnpairedTokens


class KTOConfig(align.RunConfig):
    """``align run --algo kto``: unpaired desirable/undesirable examples, any loss registered
    for UnpairedBatch."""

    algo: Literal["kto"] = "kto"
    # Widened at load time to every installed loss that reads this algorithm's loss batch;
    # a list is a weighted sum of losses.
    loss: align.LossConfig | list[align.LossConfig]


class RunningMean:
    """The mean of every value seen so far (all ranks' when distributed), in float64: BCO's
    running reward shift (TRL's ``RunningMoments.mean``), kept across steps and checkpoints."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        total = values.detach().double().sum()
        stats = torch.stack([total, total.new_tensor(float(values.numel()))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        self.total += float(stats[0])
        self.count += int(stats[1])

    @property
    def value(self) -> float:
        """0 before any value, as TRL's running mean starts."""
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = float(state.get("total", 0.0)), int(state.get("count", 0))


class KTO(align.Algorithm):
    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.losses = align.resolve_losses(self.config.loss, ctx.registry)  # type: ignore[attr-defined]
        self.needs_reference = any(term.needs_reference for term in self.losses)
        self.reference = ctx.backend.build_reference() if self.needs_reference else None
        self.beta = float(getattr(self.losses[0].config, "beta", 0.1))
        self.logratio_mean = RunningMean()

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"logratio_mean": self.logratio_mean.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.logratio_mean.load_state_dict(state.get("logratio_mean", {}))

    def unpaired_batch(self, batch: UnpairedTokens, *, training: bool = False) -> align.UnpairedBatch:
        """The batch's log-probs; ``training`` also counts its log-ratios into the running mean."""
        backend, n = self.ctx.backend, batch.num_examples
        real, mismatched = backend.sequence_logps(self.ctx.policy, batch.tokens).split(n)
        ref_real = ref_mismatched = None
        if self.reference is not None:
            with torch.no_grad():
                ref = backend.sequence_logps(self.reference, batch.tokens).split(n)
            ref_real, ref_mismatched = ref[0].sum, ref[1].sum
        running_mean = None
        if ref_real is not None:
            if training:
                self.logratio_mean.update(real.sum.detach() - ref_real)
            running_mean = torch.tensor(self.logratio_mean.value, device=real.sum.device)
        return align.UnpairedBatch(
            logps=real.sum,
            labels=batch.labels.to(real.sum.device),
            lengths=real.count,
            ref_logps=ref_real,
            kl_logps=mismatched.sum,
            ref_kl_logps=ref_mismatched,
            running_logratio_mean=running_mean,
        )

    def rewards(self, b: align.UnpairedBatch) -> torch.Tensor:
        """Implicit rewards ``beta * (log pi - log pi_ref)``; the mean log-prob without a reference."""
        with torch.no_grad():
            if b.ref_logps is not None:
                return self.beta * b.logratios
            return b.logps / b.lengths.clamp(min=1)

    def loss(self, batch: UnpairedTokens) -> align.LossOutput:
        b = self.unpaired_batch(batch, training=True)
        out = align.combine_losses(self.losses, b)
        out.metrics |= reward_metrics(self.rewards(b), b.desirable)
        return out

    @torch.no_grad()
    def evaluate(self, batches: Iterable[UnpairedTokens]) -> dict[str, float]:
        """Loss and KL averaged over examples; rewards of desirable vs undesirable examples over
        the whole split, their gap, and ``reward_accuracy``: the chance that a desirable
        example's reward beats an undesirable one's (ROC AUC; ties count half)."""
        totals: dict[str, float] = {}
        rewards, labels = [], []
        count = 0
        for batch in batches:
            b = self.unpaired_batch(batch)
            out = align.combine_losses(self.losses, b)
            for key, value in {"loss": out.loss, **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * batch.num_examples
            count += batch.num_examples
            rewards.append(self.rewards(b).float().cpu())
            labels.append(b.desirable.cpu())
        metrics = {key: value / max(1, count) for key, value in totals.items()}
        if rewards:
            all_rewards, all_labels = torch.cat(rewards), torch.cat(labels)
            metrics |= {k: float(v) for k, v in reward_metrics(all_rewards, all_labels).items()}
            auc = reward_auc(all_rewards, all_labels)
            if auc is not None:
                metrics["reward_accuracy"] = auc
        return metrics


def reward_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean reward of desirable and of undesirable examples and the gap, for the groups present."""
    metrics: dict[str, torch.Tensor] = {}
    if desirable.any():
        metrics["reward_desirable"] = rewards[desirable].mean()
    if (~desirable).any():
        metrics["reward_undesirable"] = rewards[~desirable].mean()
    if len(metrics) == 2:
        metrics["reward_gap"] = metrics["reward_desirable"] - metrics["reward_undesirable"]
    return metrics


def reward_auc(rewards: torch.Tensor, desirable: torch.Tensor) -> float | None:
    """P(reward of a desirable example > reward of an undesirable one), ties half: the
    Mann-Whitney statistic from average ranks, O(n log n). None without both groups."""
    n_d, n_u = int(desirable.sum()), int((~desirable).sum())
    if n_d == 0 or n_u == 0:
        return None
    _, inverse, counts = torch.unique(rewards.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    rank_sum = float(ranks[desirable].sum())
    return (rank_sum - n_d * (n_d + 1) / 2) / (n_d * n_u)
