"""align-ilql: ILQL (Snell et al., 2022), offline RL for language models with token-level Q and
V heads, on the ``rewarded`` data format (prompt, completion, reward).

Registers the ``ilql`` algorithm, the ``rewarded`` data format, and the logits hook that makes
``align generate`` on an ILQL output steer the ``hf`` engine with the saved heads.
"""

from __future__ import annotations

import align
from align_ilql import objectives
from align_ilql.algorithm import ILQL, ILQLConfig
from align_ilql.data import RewardedColumns, RewardedData, RewardedFormat, RewardedTokens
from align_ilql.heads import ILQLHeads, SteeringHook, load_heads, steering_for

__all__ = [
    "ILQL",
    "ILQLConfig",
    "ILQLHeads",
    "RewardedColumns",
    "RewardedData",
    "RewardedFormat",
    "RewardedTokens",
    "SteeringHook",
    "load_heads",
    "objectives",
    "steering_for",
]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(ILQLConfig, batch=RewardedTokens, data_format="rewarded")(ILQL)


@align.hookimpl
def register_data_formats(register: align.Register) -> None:
    register(RewardedData, batch=RewardedTokens)(RewardedFormat)


@align.hookimpl
def generation_logits_hook(model_path: str) -> align.LogitsHook | None:
    """``align generate --model <an ILQL final/>``: sample with β (Q̄ − V) added to the logits."""
    return steering_for(model_path)
