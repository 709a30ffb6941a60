"""Configs of ``--algo ppo`` and of the local critic (docs/algorithms/ppo.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

import align
from align.objectives import Aggregation, KLEstimator


class AdaptiveKLConfig(align.StrictConfig):
    """Ziegler et al. (2019)'s adaptive KL controller: the coefficient follows a target KL."""

    target: float = Field(
        6.0, gt=0, description="The KL (nats per completion) the coefficient steers toward."
    )
    horizon: int = Field(10_000, gt=0, description="Samples over which the coefficient may change by e^0.2.")


class KLRewardConfig(align.StrictConfig):
    """The token-level KL penalty against the initial policy, in the reward."""

    coef: float = Field(
        0.05, ge=0, description="beta: r_t -= beta x KL_t (the initial value when adaptive); 0: no reference."
    )
    estimator: KLEstimator = Field("k1", description="Per-token KL estimate: k1 (log-ratio), k2 or k3.")
    adaptive: AdaptiveKLConfig | None = Field(
        None, description="Adapt beta toward a target KL (Ziegler et al. 2019); null: a fixed beta."
    )


class ImportanceCorrectionConfig(align.StrictConfig):
    cap: float = Field(2.0, gt=0, description="Truncation of the trainer/engine probability ratio.")


class LocalCriticConfig(align.CriticConfig):
    """``critic: {name: local}``: a value model trained in the actor's process, checkpointed
    with it as the learner's trainable ``critic``."""

    name: Literal["local"] = "local"
    init: Literal["policy", "reward"] = Field(
        "policy",
        description="Initial weights: the run's model (policy; a fresh value head) or a reward model "
        "(its head becomes the value head).",
    )
    path: str | None = Field(
        None,
        description="The reward model folder when init is reward; default: reward.path of the run.",
    )
    optim: align.OptimConfig | None = Field(
        None, description="The critic's optimizer; default the run's optim."
    )


class PPOConfig(align.OnlineConfig):
    """``align run --algo ppo``: PPO with a critic, GAE and a KL penalty in the reward."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True
    )

    algo: Literal["ppo"] = "ppo"
    critic: align.CriticConfig = Field(
        default_factory=lambda: LocalCriticConfig(),
        description="The value model: local (trained here) or a remote critic server.",
    )
    sampling: align.SamplingConfig = Field(
        align.SamplingConfig(n=1, temperature=1.0, max_tokens=32),
        description="How rollouts are sampled (PPO needs no group: n=1 by default).",
    )
    prompts_per_iteration: int = Field(64, gt=0, description="Prompts per rollout buffer.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, alias="lambda", description="GAE's lambda (bias/variance).")
    epochs: int = Field(
        4, gt=0, description="PPO epochs over each rollout buffer, in minibatches of batch_size x grad_accum."
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="The ratio is clipped below at 1 - clip_low.")
    clip_high: float = Field(0.2, ge=0, description="... and above at 1 + clip_high (clip-higher: 0.28).")
    dual_clip: float | None = Field(
        None, gt=1, description="Dual clip c: a negative-advantage token's loss <= -c A."
    )
    aggregation: Aggregation = Field("token_mean", description="How per-token policy losses are reduced.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the buffer's tokens.")
    kl: KLRewardConfig = KLRewardConfig()
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    critic_warmup_iterations: int = Field(
        0, ge=0, description="First iterations in which only the critic trains (the policy does not)."
    )
    eval_rewards: dict[str, align.RewardConfig] = Field(
        default_factory=dict,
        description="More rewards for the held-out evaluation only, by metric name, e.g. accuracy: "
        "{name: exact_match} while training on a reward model.",
    )
    importance_correction: ImportanceCorrectionConfig | None = Field(
        None,
        description="Weigh each token by min(p_trainer / p_engine, cap) (truncated importance sampling).",
    )
    old_logps_source: Literal["scored", "engine"] = Field(
        "scored",
        description="Where the old (behaviour) log-probs come from: scored (a pass of the policy over "
        "the rollouts) or engine (the rollout engine's own per-token log-probs, no pass; exact only "
        "when the engine samples with the policy's weights in the training precision, e.g. hf in fp32).",
    )

    @model_validator(mode="after")
    def _warmup_leaves_iterations(self) -> PPOConfig:
        if self.critic_warmup_iterations > self.iterations:
            raise ValueError(
                f"critic_warmup_iterations ({self.critic_warmup_iterations}) must be at most iterations "
                f"({self.iterations})"
            )
        return self

    @model_validator(mode="after")
    def _engine_logps_leave_nothing_to_correct(self) -> PPOConfig:
        # With the engine's log-probs as the old ones, pi_old / pi_engine is 1 at every token.
        if self.old_logps_source == "engine" and self.importance_correction is not None:
            raise ValueError(
                "importance_correction corrects for the engine's log-probs differing from the "
                "policy's; with old_logps_source: engine they are the same and the correction does "
                "nothing: drop importance_correction, or use old_logps_source: scored"
            )
        return self
