"""align-pytriton: critic and reward-model servers on NVIDIA PyTriton, and their clients.

- ``align serve reward CONFIG``: a reward server (model ``reward``) for any installed reward;
- ``align serve critic RUN_CONFIG``: a critic server (``critic_infer``, ``critic_train``,
  ``critic_save``, ``critic_load``) built from a PPO run config;
- ``reward: {name: remote, url: http://HOST:PORT}`` (or ``serve: {...}``) and
  ``critic: {name: remote}`` (or ``url: ...``): an online run's rewards and PPO's critic
  computed by those servers; without a url the run starts the server as a child process.

See docs/servers.md.
"""

from __future__ import annotations

from typing import Any

import align
from align_pytriton.config import ClientSettings, RemoteCriticConfig, RemoteRewardConfig, ServerSettings
from align_pytriton.errors import (
    CriticServerError,
    RewardServerError,
    ServerError,
    ServerReplyError,
    ServerStartError,
    ServerTimeout,
    ServerUnavailable,
)

__all__ = [
    "ClientSettings",
    "CriticServerError",
    "RemoteCriticConfig",
    "RemoteRewardConfig",
    "RewardServerError",
    "ServerError",
    "ServerReplyError",
    "ServerSettings",
    "ServerStartError",
    "ServerTimeout",
    "ServerUnavailable",
]


def remote_reward(cfg: RemoteRewardConfig) -> Any:
    from align_pytriton.reward import RemoteReward  # PyTriton loads only when a run uses it

    return RemoteReward(cfg)


@align.hookimpl
def register_rewards(register: align.Register) -> None:
    register(RemoteRewardConfig)(remote_reward)


def remote_critic(cfg: RemoteCriticConfig, ctx: align.Context, learner: Any) -> Any:
    from align_pytriton.critic import RemoteCritic

    return RemoteCritic(cfg, ctx, learner)


@align.hookimpl
def register_critics(register: align.Register) -> None:
    register(RemoteCriticConfig)(remote_critic)


@align.hookimpl
def register_commands(add_command: Any) -> None:
    from align_pytriton import serve

    add_command(
        "serve", "start a model server (reward or critic) in the foreground", serve.arguments, serve.run
    )
