"""align-grpo: the critic-free online family on the online loop, and its advantage estimators.

Four algorithms share one driver (``algorithm.CriticFree``) and differ in their defaults:

| ``--algo`` | advantage estimator | loss aggregation |
|---|---|---|
| ``grpo`` | ``grpo``: group mean and std (Shao et al. 2024) | ``seq_mean_token_mean`` |
| ``dr_grpo`` | ``dr_grpo``: group mean (Liu et al. 2025) | ``seq_mean_token_sum`` |
| ``rloo`` | ``rloo``: leave-one-out (Ahmadian et al. 2024) | ``seq_mean_token_sum`` |
| ``reinforce_pp`` | ``reinforce_pp``: batch whitening (Hu 2025) | ``token_mean`` |

Any algorithm takes any installed estimator (``advantage: {name: ...}``) and aggregation. The
estimators are plugins of kind ``advantage_estimator`` (``estimators``), the math is in
``align.objectives``; docs/algorithms/grpo.md has the formulas and the config.
"""

from __future__ import annotations

import align
from align_grpo.algorithm import CriticFree
from align_grpo.config import CriticFreeConfig, DrGRPOConfig, GRPOConfig, ReinforcePPConfig, RLOOConfig
from align_grpo.estimators import register_advantage_estimators

__all__ = [
    "CriticFree",
    "CriticFreeConfig",
    "DrGRPOConfig",
    "GRPOConfig",
    "RLOOConfig",
    "ReinforcePPConfig",
    "register_advantage_estimators",
    "register_algorithms",
]


@align.hookimpl
def register_algorithms(register: align.Register) -> None:
    for config in (GRPOConfig, DrGRPOConfig, RLOOConfig, ReinforcePPConfig):
        register(config, batch=align.PromptBatch, data_format="prompts")(CriticFree)
