"""The DPO family's step: one concatenated forward pass over chosen and rejected, the
reference's log-probs (precomputed and cached, or live), then the configured loss plugin(s)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

import align
from align_dpo.reference import CachedReference, LiveReference, ReferenceConfig, precompute


class DPOConfig(align.RunConfig):
    """``align run --algo dpo``: preference pairs, any loss registered for PreferenceBatch."""

    algo: Literal["dpo"] = "dpo"
    # Widened at load time to every installed loss that reads this algorithm's loss batch;
    # a list is a weighted sum of losses.
    loss: align.LossConfig | list[align.LossConfig]
    reference: ReferenceConfig = ReferenceConfig()


class DPO(align.Algorithm):
    def __init__(self, ctx: align.Context) -> None:
        super().__init__(ctx)
        self.losses = align.resolve_losses(self.config.loss, ctx.registry)  # type: ignore[attr-defined]
        self.needs_reference = any(term.needs_reference for term in self.losses)
        self.needs_token_logps = any(
            ctx.registry.get("loss", term.config.name).meta.get("needs_token_logps", False)
            for term in self.losses
        )
        # Implicit rewards use the beta of the first reference-based loss (an `sft` term first in
        # a weighted list has none).
        with_beta = [t.config for t in self.losses if t.needs_reference and hasattr(t.config, "beta")]
        self.beta = float(getattr(with_beta[0] if with_beta else self.losses[0].config, "beta", 0.1))
        self.split = "train"
        self.live: LiveReference | None = None
        self.cached: CachedReference | None = None
        self._reference_copy: nn.Module | None = None
        ref: ReferenceConfig = self.config.reference  # type: ignore[attr-defined]
        if not self.needs_reference:
            return
        if ref.mode == "live" or self.needs_token_logps:
            # The cache holds sequence sums only, so per-token reference scores are taken live.
            self.live = LiveReference(ctx.backend, ctx.policy)
        else:
            self.cached = precompute(self.config, ref, ctx.backend, ctx.policy, *self._splits())

    def _splits(self) -> tuple[dict[str, Any], dict[str, int], Any]:
        """The data to score, each split's batch size (0: length-sorted batches of
        ``reference.batch_size``) and the collate function of the run's data format."""
        cfg = self.config
        splits: dict[str, Any] = {"train": self.ctx.train_data}
        sizes = {"train": 0}
        if self.ctx.eval_data is not None and len(self.ctx.eval_data):
            # Scored in the very batches evaluation uses, so an untrained policy's eval metrics
            # equal the reference's exactly (margin 0, accuracy 0.5).
            splits["eval"] = self.ctx.eval_data
            sizes["eval"] = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
        fmt = self.ctx.registry.get("data_format", cfg.data.format).factory(
            cfg.data, self.ctx.backend.tokenizer
        )
        return splits, sizes, fmt.collate

    @property
    def reference(self) -> nn.Module | None:
        """The reference model. In ``precompute`` mode training never needs it; reading this
        builds a copy with the initial weights (for inspection)."""
        if not self.needs_reference:
            return None
        if self.live is not None and self.live.model is not None:
            return self.live.model
        if self._reference_copy is None:
            self._reference_copy = self.ctx.backend.build_reference()
        return self._reference_copy

    def reference_logps(self, batch: align.PairedTokens) -> tuple[Tensor, Tensor] | None:
        if self.cached is not None:
            return self.cached.logps(self.split, batch)
        if self.live is not None:
            return self.live.logps(batch)
        return None

    def policy_logps(self, batch: align.PairedTokens) -> tuple[align.SequenceLogps, align.TokenLogps | None]:
        """The policy's sums per sequence and, when a loss needs them, its per-token log-probs
        (the sums then come from the same forward pass)."""
        backend = self.ctx.backend
        if not self.needs_token_logps:
            return backend.sequence_logps(self.ctx.policy, batch.tokens), None
        tokens = backend.token_logps(self.ctx.policy, batch.tokens)
        return summed(tokens), tokens

    def preference_batch(self, batch: align.PairedTokens) -> align.PreferenceBatch:
        logps, token_logps = self.policy_logps(batch)
        chosen, rejected = logps.split(batch.num_pairs)
        ref_token_logps = None
        if token_logps is not None and self.live is not None:
            ref_token_logps = self.live.token_logps(batch)
            ref_sums = summed(ref_token_logps).split(batch.num_pairs)
            ref: tuple[Tensor, Tensor] | None = (ref_sums[0].sum, ref_sums[1].sum)
        else:
            ref = self.reference_logps(batch)
        return align.PreferenceBatch(
            chosen_logps=chosen.sum,
            rejected_logps=rejected.sum,
            chosen_lengths=chosen.count,
            rejected_lengths=rejected.count,
            ref_chosen_logps=None if ref is None else ref[0],
            ref_rejected_logps=None if ref is None else ref[1],
            reward_gap=batch.reward_gap,
            token_logps=token_logps,
            ref_token_logps=ref_token_logps,
        )

    def loss(self, batch: align.PairedTokens) -> align.LossOutput:
        pairs = self.preference_batch(batch)
        out = align.combine_losses(self.losses, pairs)
        out.metrics |= reward_metrics(pairs, self.beta)
        return out

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        self.split = "eval"
        try:
            return super().evaluate(batches)
        finally:
            self.split = "train"


def summed(tokens: align.TokenLogps) -> align.SequenceLogps:
    """Per-sequence sums and counts of per-token log-probs."""
    return align.SequenceLogps((tokens.values * tokens.mask).sum(dim=1), tokens.mask.sum(dim=1))


def reward_metrics(b: align.PreferenceBatch, beta: float) -> dict[str, torch.Tensor]:
    """Implicit-reward accuracy (ties count half, so an untrained policy scores 0.5) and margin.
    Reference-free losses use the policy's mean log-prob as the reward."""
    with torch.no_grad():
        if b.ref_chosen_logps is not None:
            chosen, rejected = beta * b.chosen_logratios, beta * b.rejected_logratios
        else:
            chosen, rejected = b.chosen_logps_mean, b.rejected_logps_mean
        margin = chosen - rejected
        return {
            "reward_accuracy": align.pairwise_accuracy(margin),
            "reward_margin": margin.mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
        }
