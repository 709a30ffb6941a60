"""align-sft: supervised fine-tuning, the token-mean negative log-likelihood of completions."""

from __future__ import annotations

from typing import Literal

import align


class SFTConfig(align.RunConfig):
    """``align run --algo sft``: prompt tokens are masked; the loss is on completions only."""

    algo: Literal["sft"] = "sft"


class SFT(align.Algorithm):
    def loss(self, batch: align.SFTTokens) -> align.LossOutput:
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        nll = -logps.sum.sum() / logps.count.sum().clamp(min=1)
        return align.LossOutput(nll, {"perplexity": nll.detach().exp()})


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(SFTConfig, batch=align.SFTTokens, data_format="sft")(SFT)
