"""align-ppo: PPO (GAE, clipped policy and value losses, KL control) with a local or remote critic.

``--algo ppo`` (``algorithm.PPO``, config ``config.PPOConfig``) drives the learner through
generate -> score -> values -> GAE -> epochs of minibatches (actor and critic) -> refit. The
critic is a plugin of kind ``critic`` behind the ``align.Critic`` protocol; this package
registers ``local`` (``critic.LocalCritic``: trained in the actor's process). PPO's own math is
in ``objectives``, the shared policy-gradient math in ``align.objectives``; formulas and papers
in docs/algorithms/ppo.md.
"""

from __future__ import annotations

from typing import Any

import align
from align_ppo.algorithm import PPO
from align_ppo.config import LocalCriticConfig, PPOConfig
from align_ppo.critic import LocalCritic

__all__ = ["PPO", "LocalCritic", "LocalCriticConfig", "PPOConfig", "register_algorithms", "register_critics"]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(PPOConfig, batch=align.PromptBatch, data_format="prompts")(PPO)


@align.hookimpl
def register_critics(register: align.Register) -> None:
    @register(LocalCriticConfig)
    def local(cfg: LocalCriticConfig, ctx: align.Context, learner: Any) -> LocalCritic:
        return LocalCritic(cfg, ctx, learner)
