"""The DPO family's step: one concatenated forward pass over chosen and rejected, the
reference's log-probs, then the configured loss plugin(s)."""

from __future__ import annotations

from typing import Any, Literal

import torch

import align


class DPOConfig(align.RunConfig):
    """``align run --algo dpo``: preference pairs, any loss registered for PreferenceBatch."""

    algo: Literal["dpo"] = "dpo"
    loss: Any = None  # widened at load time to every installed preference loss


class DPO(align.Algorithm):
    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.losses = align.resolve_losses(self.config.loss, ctx.registry)  # type: ignore[attr-defined]
        self.needs_reference = any(term.needs_reference for term in self.losses)
        self.reference = ctx.backend.build_reference() if self.needs_reference else None
        self.beta = float(getattr(self.losses[0].config, "beta", 0.1))

    def preference_batch(self, batch: align.PairedTokens) -> align.PreferenceBatch:
        backend = self.ctx.backend
        chosen, rejected = backend.sequence_logps(self.ctx.policy, batch.tokens).split(batch.num_pairs)
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            with torch.no_grad():
                ref = backend.sequence_logps(self.reference, batch.tokens).split(batch.num_pairs)
            ref_chosen, ref_rejected = ref[0].sum, ref[1].sum
        return align.PreferenceBatch(
            chosen_logps=chosen.sum,
            rejected_logps=rejected.sum,
            chosen_lengths=chosen.count,
            rejected_lengths=rejected.count,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            reward_gap=batch.reward_gap,
        )

    def loss(self, batch: align.PairedTokens) -> align.LossOutput:
        pairs = self.preference_batch(batch)
        out = align.combine_losses(self.losses, pairs)
        out.metrics |= reward_metrics(pairs, self.beta)
        return out


def reward_metrics(b: align.PreferenceBatch, beta: float) -> dict[str, torch.Tensor]:
    """Implicit-reward accuracy (ties count half, so an untrained policy scores 0.5) and margin.
    Reference-free losses use the policy's mean log-prob as the reward."""
    with torch.no_grad():
        if b.ref_chosen_logps is not None:
            chosen, rejected = beta * b.chosen_logratios, beta * b.rejected_logratios
        else:
            chosen, rejected = b.chosen_logps_mean, b.rejected_logps_mean
        margin = chosen - rejected
        accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
        return {
            "reward_accuracy": accuracy.mean(),
            "reward_margin": margin.mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
        }
