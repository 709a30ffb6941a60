"""The ``rewarded`` data format: rows of ``prompt``, ``completion`` and a scalar ``reward``
(offline RL data: what ILQL learns its Q and V heads from).

Prompts and completions are plain text or chat messages. A missing or non-numeric reward (a
boolean, a string, NaN or infinity) is an error naming the file and row; an empty completion too
(an empty completion has no token to put its reward on). Length rules are those of the other
formats (``max_prompt_length``, ``max_length``, ``overlong``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import align


class RewardedColumns(align.StrictConfig):
    prompt: str = "prompt"
    completion: str = "completion"
    reward: str = "reward"


class RewardedData(align.DataConfig):
    format: Literal["rewarded"] = "rewarded"
    columns: RewardedColumns = RewardedColumns()


@dataclass
class RewardedTokens:
    """``n`` (prompt, completion) sequences, the reward of each and the completion's tokens (the
    actions), left-aligned ``[n, longest completion]`` as ``align.TokenLogps`` lays them out,
    with ``action_mask`` marking real tokens."""

    tokens: align.TokenBatch
    rewards: Tensor
    actions: Tensor
    action_mask: Tensor
    example_ids: Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


def reward_value(value: Any, column: str, source: str, index: int) -> float:
    """The row's reward as a float, or the ``DataError`` naming the file and row."""
    if value is None:
        raise align.row_error(source, index, f"'{column}' is missing: every row needs a numeric reward")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise align.row_error(source, index, f"'{column}' must be a number, got {value!r:.40}")
    if not math.isfinite(value):
        raise align.row_error(source, index, f"'{column}' must be a finite number, got {value}")
    return float(value)


class RewardedFormat(align.TokenizedFormat):
    cfg: RewardedData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        c = self.cfg.columns
        prompt, completion = align.prompt_and_completion(row, c.prompt, c.completion, source, index)
        reward = reward_value(row.get(c.reward), c.reward, source, index)
        prompt_ids, completion_ids = self.encoder.encode(prompt, completion)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "reward": reward,
            "status": status,
        }

    def collate(self, rows: list[dict[str, Any]]) -> RewardedTokens:
        width = max(len(r["completion_ids"]) for r in rows)
        actions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids = r["completion_ids"]
            actions[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = True
        return RewardedTokens(
            tokens=align.lay_out(
                [(r["prompt_ids"], r["completion_ids"]) for r in rows], self.pad_id, self.cfg.padding_free
            ),
            rewards=torch.tensor([r["reward"] for r in rows], dtype=torch.float32),
            actions=actions,
            action_mask=mask,
            example_ids=torch.tensor([r["example_id"] for r in rows]),
        )
