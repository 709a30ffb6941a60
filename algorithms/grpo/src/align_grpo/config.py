"""Configs of the critic-free online family. The four algorithms share one config and differ only
in their defaults: the advantage estimator and the loss aggregation."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

import align
from align.objectives import Aggregation, KLEstimator


class KLConfig(align.StrictConfig):
    """KL to the reference model (built only when ``coef > 0``)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True
    )

    coef: float = Field(0.0, ge=0, description="Weight of the KL term; 0: no reference model is built.")
    estimator: KLEstimator = Field(
        "k3", description="k1 (log-ratio), k2 (half its square) or k3 (Schulman's)."
    )
    in_: Literal["loss", "reward"] = Field(
        "loss",
        alias="in",
        description="loss: coef x the aggregated per-token KL is added to the loss (GRPO); reward: coef x "
        "each completion's summed KL is subtracted from its reward before the advantages (REINFORCE++).",
    )


class SoftOverlongPenalty(align.StrictConfig):
    """DAPO's soft overlong punishment, added to the reward."""

    max_len: int = Field(gt=0, description="Completions longer than this get the full penalty (-coef).")
    cache_len: int = Field(gt=0, description="Length of the ramp below max_len where the penalty grows.")
    coef: float = Field(1.0, ge=0, description="Scale of the penalty.")

    @model_validator(mode="after")
    def _ramp_fits(self) -> SoftOverlongPenalty:
        if self.cache_len > self.max_len:
            raise ValueError(f"cache_len ({self.cache_len}) must be at most max_len ({self.max_len})")
        return self


class OverlongConfig(align.StrictConfig):
    mask_truncated: bool = Field(
        False, description="Train on no token of a completion cut by max_tokens (DAPO's overlong filtering)."
    )
    soft_penalty: SoftOverlongPenalty | None = None


class DynamicSamplingConfig(align.StrictConfig):
    """DAPO's dynamic sampling: groups whose rewards are all equal carry no gradient."""

    enabled: bool = Field(
        False, description="Drop groups whose rewards are all equal, and sample more prompts."
    )
    max_extra_rounds: int = Field(3, ge=0, description="Extra sampling rounds to refill the dropped groups.")


class ImportanceCorrectionConfig(align.StrictConfig):
    cap: float = Field(2.0, gt=0, description="Truncation of the trainer/engine probability ratio.")


class CriticFreeConfig(align.OnlineConfig):
    """What grpo, dr_grpo, rloo and reinforce_pp share (see docs/algorithms/grpo.md)."""

    advantage: align.AdvantageConfig = Field(
        default_factory=lambda: align.AdvantageConfig(name="grpo"),
        description="How each prompt's group of rewards becomes advantages (any installed estimator).",
    )
    sampling: align.SamplingConfig = Field(
        align.SamplingConfig(n=8, temperature=1.0, max_tokens=32),
        description="How rollouts are sampled; n is the group size (samples per prompt).",
    )
    prompts_per_iteration: int = Field(32, gt=0, description="Groups (prompts) per rollout batch.")
    epochs: int = Field(
        1,
        gt=0,
        description="Passes over each rollout batch, in minibatches of trainer.batch_size x grad_accum.",
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="The ratio is clipped below at 1 - clip_low.")
    clip_high: float = Field(
        0.2, ge=0, description="... and above at 1 + clip_high (DAPO's clip-higher: 0.28)."
    )
    dual_clip: float | None = Field(
        None, gt=1, description="Dual clip c: a negative-advantage token's loss <= -c A."
    )
    aggregation: Aggregation = Field(
        "token_mean", description="token_mean, seq_mean_token_mean (GRPO) or seq_mean_token_sum (Dr.GRPO)."
    )
    kl: KLConfig = KLConfig()
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    overlong: OverlongConfig = OverlongConfig()
    old_logps_pass: Literal["auto", "always"] = Field(
        "auto",
        description="auto: skip the trainer's pass over the rollout batch before training when it is "
        "redundant (epochs 1, the whole batch in one optimizer step, no KL in the reward): the old "
        "log-probs are then the training forward's own, detached, and the ratio is 1. always: run it.",
    )
    importance_correction: ImportanceCorrectionConfig | None = Field(
        None,
        description="Weigh each token by min(p_trainer / p_engine, cap) (truncated importance sampling); "
        "the mismatch is logged either way.",
    )


class GRPOConfig(CriticFreeConfig):
    """``align run --algo grpo``: group mean/std advantages (Shao et al. 2024)."""

    algo: Literal["grpo"] = "grpo"
    aggregation: Aggregation = "seq_mean_token_mean"


class DrGRPOConfig(CriticFreeConfig):
    """``align run --algo dr_grpo``: group-mean advantages, constant-length normaliser (Liu et al. 2025)."""

    algo: Literal["dr_grpo"] = "dr_grpo"
    advantage: align.AdvantageConfig = Field(default_factory=lambda: align.AdvantageConfig(name="dr_grpo"))
    aggregation: Aggregation = "seq_mean_token_sum"


class RLOOConfig(CriticFreeConfig):
    """``align run --algo rloo``: leave-one-out baselines (Ahmadian et al. 2024), a completion per action."""

    algo: Literal["rloo"] = "rloo"
    advantage: align.AdvantageConfig = Field(default_factory=lambda: align.AdvantageConfig(name="rloo"))
    aggregation: Aggregation = "seq_mean_token_sum"


class ReinforcePPConfig(CriticFreeConfig):
    """``align run --algo reinforce_pp``: batch-whitened rewards (Hu 2025), token-mean loss."""

    algo: Literal["reinforce_pp"] = "reinforce_pp"
    advantage: align.AdvantageConfig = Field(
        default_factory=lambda: align.AdvantageConfig(name="reinforce_pp")
    )
    aggregation: Aggregation = "token_mean"
