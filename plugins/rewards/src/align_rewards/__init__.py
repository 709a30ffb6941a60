"""align-rewards: rewards for online methods.

- ``function``: any Python callable ``package.module:function`` scores a batch;
- ``exact_match``, ``regex``, ``length``: verifiable rewards (also callable through
  ``function`` as ``align_rewards:exact_match`` etc.);
- ``sum``: a weighted sum of any installed rewards.

Build them with ``align.build_reward(cfg, registry)``, which checks every result.
"""

import align
from align_rewards.function import BoundReward, FunctionRewardConfig, function_reward, import_callable
from align_rewards.named import (
    ExactMatchConfig,
    LengthConfig,
    RegexConfig,
    RewardTerm,
    SumReward,
    SumRewardConfig,
    exact_match_reward,
    length_reward,
    regex_reward,
)
from align_rewards.verifiable import exact_match, final_answer, length, regex

__all__ = [
    "BoundReward",
    "ExactMatchConfig",
    "FunctionRewardConfig",
    "LengthConfig",
    "RegexConfig",
    "RewardTerm",
    "SumReward",
    "SumRewardConfig",
    "exact_match",
    "final_answer",
    "import_callable",
    "length",
    "regex",
]


@align.hookimpl
def register_rewards(register: align.Register) -> None:
    register(FunctionRewardConfig)(function_reward)
    register(ExactMatchConfig)(exact_match_reward)
    register(RegexConfig)(regex_reward)
    register(LengthConfig)(length_reward)
    register(SumRewardConfig)(SumReward)
