"""Lay tokenized (prompt, completion) sequences out as a ``TokenBatch``: padded rows, or one
packed row with no padding at all (position ids restart at every sequence)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from align.batches import TokenBatch

Pair = tuple[Sequence[int], Sequence[int]]


def pad_sequences(sequences: Sequence[Pair], pad_id: int) -> TokenBatch:
    """One row per sequence, right-padded to the longest."""
    width = max(len(p) + len(c) for p, c in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    sequence_ids = torch.full((n, width), -1, dtype=torch.long)
    for row, (prompt, completion) in enumerate(sequences):
        length = len(prompt) + len(completion)
        input_ids[row, :length] = torch.tensor([*prompt, *completion])
        attention[row, :length] = 1
        loss_mask[row, len(prompt) : length] = True
        sequence_ids[row, :length] = row
    return TokenBatch(input_ids, attention, loss_mask, sequence_ids, n)


def pack_sequences(sequences: Sequence[Pair]) -> TokenBatch:
    """All sequences back to back in a single row: no token is spent on padding."""
    ids: list[int] = []
    loss: list[bool] = []
    seq: list[int] = []
    pos: list[int] = []
    for index, (prompt, completion) in enumerate(sequences):
        length = len(prompt) + len(completion)
        ids += [*prompt, *completion]
        loss += [False] * len(prompt) + [True] * len(completion)
        seq += [index] * length
        pos += range(length)
    return TokenBatch(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        loss_mask=torch.tensor([loss]),
        sequence_ids=torch.tensor([seq]),
        num_sequences=len(sequences),
        position_ids=torch.tensor([pos]),
        packed=True,
    )


def lay_out(sequences: Sequence[Pair], pad_id: int, padding_free: bool) -> TokenBatch:
    return pack_sequences(sequences) if padding_free else pad_sequences(sequences, pad_id)


def row_lengths(rows: Any) -> list[int]:
    """The longest sequence each tokenized row lays out to: its ``prompt_ids`` plus its longest
    other ``*_ids`` column (the completion; the longer of chosen and rejected). What
    length-grouped batching sorts by. A ``datasets.Dataset`` is read through its arrow columns,
    without decoding a row."""
    if hasattr(rows, "with_format"):
        table = rows.with_format("arrow")[:]
        lengths = {
            name: np.asarray(pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False))
            for name in table.column_names
            if name.endswith("_ids")
        }
        prompt = lengths.pop("prompt_ids", np.zeros(table.num_rows, dtype=np.int64))
        longest = np.max(np.stack(list(lengths.values())), axis=0) if lengths else 0
        return [int(v) for v in prompt + longest]
    return [_row_length(row) for row in rows]


def _row_length(row: dict[str, Any]) -> int:
    others = [len(value) for name, value in row.items() if name.endswith("_ids") and name != "prompt_ids"]
    return len(row.get("prompt_ids", ())) + max(others, default=0)
