"""``--algo steerlm``: attribute-conditioned SFT. The attribute values are in the prompt (the
``steerlm`` data format writes them); the loss is the token-mean negative log-likelihood of
the answer's tokens only."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import align
from align_steerlm.data import SteeredTokens


class SteerLMConfig(align.RunConfig):
    """``align run --algo steerlm``: SFT on answers whose prompts carry their attribute values
    (``data.format: steerlm``; ``data.attributes``, ``data.template`` say how)."""

    algo: Literal["steerlm"] = "steerlm"


class SteerLM(align.Algorithm):
    def loss(self, batch: SteeredTokens) -> align.LossOutput:
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        tokens = logps.count.sum().clamp(min=1)
        nll = -logps.sum.sum() / tokens
        return align.LossOutput(nll, {"perplexity": nll.detach().exp()}, weight=tokens)

    def evaluate(self, batches: Iterable[SteeredTokens]) -> dict[str, float]:
        """The token-mean NLL of the held-out answers and its perplexity."""
        metrics = super().evaluate(batches)
        if "loss" in metrics:
            metrics["perplexity"] = math.exp(metrics["loss"])
        return metrics
