"""The verifiable rewards as named rewards with typed configs, and ``sum``.

reward: {name: exact_match, answer_key: answer, graded: numeric}
reward:
  name: sum
  terms:
    - {reward: {name: exact_match}, weight: 1.0}
    - {reward: {name: length, target: 40}, weight: 0.1}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

import align
from align_rewards import verifiable
from align_rewards.function import BoundReward


class ExactMatchConfig(align.RewardConfig):
    name: Literal["exact_match"] = "exact_match"
    answer_key: str = Field("answer", description="The row field holding the reference answer (or a list).")
    marker: str | None = Field(
        None,
        description="The answer is the text after the last marker (e.g. '####', 'answer:'); "
        "null: the last number in the completion.",
    )
    graded: verifiable.Graded = Field(
        "none",
        description="Partial credit for a wrong answer: 'numeric' 1/(1+|answer-reference|), 'chars' "
        "the fraction of positions holding the same character; 'none': 0.",
    )
    case_sensitive: bool = False


class RegexConfig(align.RewardConfig):
    name: Literal["regex"] = "regex"
    pattern: str | list[str] = Field(..., description="A regular expression, or several.")
    score: verifiable.RegexScore = Field(
        "all", description="'all' / 'any': 1 when all / any patterns match, else 0; 'fraction' matched."
    )
    fullmatch: bool = Field(False, description="A pattern must match the whole stripped completion.")
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | list[str]) -> str | list[str]:
        verifiable.compile_patterns(value)  # ValueError -> a config error naming reward.pattern
        return value


class LengthConfig(align.RewardConfig):
    name: Literal["length"] = "length"
    target: int | None = Field(None, gt=0, description="Reward -|len - target| / target.")
    band: tuple[int, int] | None = Field(None, description="[low, high]: reward 1 inside, 0 outside.")
    unit: verifiable.LengthUnit = Field(
        "chars", description="chars, words, bytes (= byte-tokenizer tokens), or tokens of `tokenizer`."
    )
    tokenizer: str | None = Field(None, description="HF tokenizer path or name, for unit: tokens.")

    @model_validator(mode="after")
    def _consistent(self) -> LengthConfig:
        verifiable.check_length_options(self.target, self.band, self.unit, self.tokenizer)
        return self


def exact_match_reward(cfg: ExactMatchConfig) -> BoundReward:
    return BoundReward(verifiable.exact_match, _options(cfg), "reward 'exact_match'")


def regex_reward(cfg: RegexConfig) -> BoundReward:
    return BoundReward(verifiable.regex, _options(cfg), "reward 'regex'")


def length_reward(cfg: LengthConfig) -> BoundReward:
    if cfg.unit == "tokens" and cfg.tokenizer:
        verifiable.load_tokenizer(cfg.tokenizer)  # a bad tokenizer path fails now, not mid-run
    return BoundReward(verifiable.length, _options(cfg), "reward 'length'")


def _options(cfg: align.RewardConfig) -> dict[str, Any]:
    return cfg.model_dump(exclude={"name"})


# ---- sum --------------------------------------------------------------------------------


class RewardTerm(align.StrictConfig):
    reward: align.RewardConfig = Field(..., description="Any installed reward, with its own config.")
    weight: float = 1.0


class SumRewardConfig(align.RewardConfig):
    name: Literal["sum"] = "sum"
    terms: list[RewardTerm] = Field(..., min_length=1, description="Rewards added with their weights.")


class SumReward:
    """``sum_i weight_i * reward_i``; every term is built (and checked) by ``align.build_reward``."""

    label = "reward 'sum'"

    def __init__(self, cfg: SumRewardConfig, registry: align.Registry) -> None:
        self.terms = [(align.build_reward(term.reward, registry), term.weight) for term in cfg.terms]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for reward, weight in self.terms:
            total += weight * reward(prompts, completions, rows)
        return total

    def close(self) -> None:
        """Close every term that holds something (a remote term's server and client)."""
        for reward, _ in self.terms:
            align.close_reward(reward)
