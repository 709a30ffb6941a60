"""align-sft: supervised fine-tuning, the token-mean negative log-likelihood of completions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import align


class SFTConfig(align.RunConfig):
    """``align run --algo sft``: prompt tokens are masked; the loss is on completions only."""

    algo: Literal["sft"] = "sft"


class SFT(align.Algorithm):
    def loss(self, batch: align.SFTTokens) -> align.LossOutput:
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        tokens = logps.count.sum().clamp(min=1)
        nll = -logps.sum.sum() / tokens
        return align.LossOutput(nll, {"perplexity": nll.detach().exp()}, weight=tokens)

    def evaluate(self, batches: Iterable[align.SFTTokens]) -> dict[str, float]:
        """The token-mean NLL over the whole split, and its perplexity (exp of that mean: a mean
        of per-batch perplexities would overstate it)."""
        metrics = super().evaluate(batches)
        metrics["perplexity"] = math.exp(metrics["loss"])
        return metrics


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(SFTConfig, batch=align.SFTTokens, data_format="sft")(SFT)
