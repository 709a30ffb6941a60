"""The order of training data: seeded micro-batches over epochs, resumable at any position, and
the plain in-order batches of an evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from align.layout import row_lengths


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0


class BatchStream:
    """Micro-batches over epochs in a seeded order per epoch, resumable at any position.

    With ``group_by_length``, each window of ``GROUP_WINDOW`` batches of the seeded order is
    sorted by row length (longest first) before it is cut into batches, and the batches are then
    shuffled (the last, partial batch stays last): batches hold rows of similar length, so far
    less padding. Every row still comes once per epoch, and the order is a pure function of
    (seed, epoch, lengths), so a resumed run continues exactly.
    """

    GROUP_WINDOW = 64

    def __init__(
        self, data: Any, collate: Any, batch_size: int, seed: int, group_by_length: bool = False
    ) -> None:
        self.data, self.collate, self.batch_size, self.seed = data, collate, batch_size, seed
        self.per_epoch = math.ceil(len(data) / batch_size)
        self.lengths = row_lengths(data) if group_by_length else None

    def batches(self, epoch: int) -> list[list[int]]:
        """Row indices of each micro-batch of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order: list[int] = torch.randperm(len(self.data), generator=generator).tolist()
        size = self.batch_size
        if self.lengths is not None:
            lengths, window = self.lengths, size * self.GROUP_WINDOW
            windows = [order[start : start + window] for start in range(0, len(order), window)]
            order = [i for rows in windows for i in sorted(rows, key=lambda i: -lengths[i])]
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if self.lengths is not None:
            full = len(order) // size
            shuffled = torch.randperm(full, generator=generator).tolist()
            batches = [batches[b] for b in shuffled] + batches[full:]
        return batches

    def order(self, epoch: int) -> list[int]:
        return [i for batch in self.batches(epoch) for i in batch]

    def iterate(self, position: DataPosition) -> Iterator[tuple[DataPosition, Any]]:
        epoch, start = position.epoch, position.batch
        while True:
            batches = self.batches(epoch)
            for b in range(start, self.per_epoch):
                yield DataPosition(epoch, b + 1), self.collate([self.data[i] for i in batches[b]])
            epoch, start = epoch + 1, 0


def eval_batches(data: Any, collate: Any, batch_size: int) -> Iterator[Any]:
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(len(data), start + batch_size))])
