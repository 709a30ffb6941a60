"""align-reward: reward models and a reward source.

- ``reward``: a Bradley-Terry pairwise reward model on preference pairs;
- ``reward_regression``: a multi-attribute regression reward model (SteerLM) on the
  ``scored`` data format (rows with numeric attribute labels);
- the ``model`` reward source, which loads a saved reward model and scores
  (prompt, completion) pairs for online algorithms.
"""

import align
from align_reward.algorithm import (
    RegressionRewardConfig,
    RegressionRewardModel,
    RewardModel,
    RewardModelConfig,
    bradley_terry,
    build_attribute_scorer,
    build_pairwise_scorer,
    pair_metrics,
)
from align_reward.data import AttributeColumns, AttributeData, AttributeFormat, ScoredTokens
from align_reward.source import ModelReward, ModelRewardConfig

__all__ = [
    "AttributeColumns",
    "AttributeData",
    "AttributeFormat",
    "ModelReward",
    "ModelRewardConfig",
    "RegressionRewardConfig",
    "RegressionRewardModel",
    "RewardModel",
    "RewardModelConfig",
    "ScoredTokens",
    "bradley_terry",
    "pair_metrics",
]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    register(
        RewardModelConfig,
        batch=align.PairedTokens,
        data_format="preference",
        build_model=build_pairwise_scorer,
    )(RewardModel)
    register(
        RegressionRewardConfig,
        batch=ScoredTokens,
        data_format="scored",
        build_model=build_attribute_scorer,
    )(RegressionRewardModel)


@align.hookimpl
def register_data_formats(register: align.Register) -> None:
    register(AttributeData, batch=ScoredTokens)(AttributeFormat)


@align.hookimpl
def register_rewards(register: align.Register) -> None:
    register(ModelRewardConfig)(ModelReward)
