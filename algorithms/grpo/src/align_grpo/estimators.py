"""The advantage estimators, registered as plugins of kind ``advantage_estimator``: each turns
the rewards of ``G`` prompts x ``n`` samples (``[G, n]``) into advantages of the same shape.
The formulas are in ``align.objectives`` (and docs/algorithms/grpo.md). An outside package adds one
the same way: a config class and a function, registered in ``register_advantage_estimators``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

import align
from align import objectives


class GroupMeanStd(align.AdvantageConfig):
    """GRPO: each sample's reward minus its group's mean, over the group's std."""

    name: Literal["grpo"] = "grpo"
    eps: float = Field(1e-6, gt=0, description="Added to the std (a group of equal rewards gets zeros).")


class GroupMean(align.AdvantageConfig):
    """Dr.GRPO: each sample's reward minus its group's mean (no std division)."""

    name: Literal["dr_grpo"] = "dr_grpo"


class LeaveOneOut(align.AdvantageConfig):
    """RLOO: each sample's reward minus the mean of the other samples of its prompt."""

    name: Literal["rloo"] = "rloo"


class BatchWhiten(align.AdvantageConfig):
    """REINFORCE++: the rewards whitened over the whole batch (no per-prompt baseline)."""

    name: Literal["reinforce_pp"] = "reinforce_pp"
    eps: float = Field(1e-6, gt=0, description="Added to the batch std.")


@align.hookimpl
def register_advantage_estimators(register: align.Register) -> None:
    @register(GroupMeanStd)
    def grpo(cfg: GroupMeanStd, rewards: Tensor) -> Tensor:
        return objectives.group_mean_std(rewards, cfg.eps)

    @register(GroupMean)
    def dr_grpo(cfg: GroupMean, rewards: Tensor) -> Tensor:
        return objectives.group_mean(rewards)

    @register(LeaveOneOut)
    def rloo(cfg: LeaveOneOut, rewards: Tensor) -> Tensor:
        return objectives.leave_one_out(rewards)

    @register(BatchWhiten)
    def reinforce_pp(cfg: BatchWhiten, rewards: Tensor) -> Tensor:
        return objectives.batch_whiten(rewards, cfg.eps)
