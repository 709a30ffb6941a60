"""The ``scored`` data format: ``prompt``, ``completion`` and numeric attribute columns
(helpfulness, correctness, verbosity... as in SteerLM / HelpSteer), one regression head each.

A missing (``null``) attribute value is left out of the loss; a row with no attribute value
at all is skipped (counted in the log); a value that is not a number is an error naming the
file and row; an attribute that no row of a split has a value for is an error (a typo in
``data.attributes`` would otherwise train a head on nothing). Length rules are those of the
other formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import datasets
import torch
from pydantic import Field, field_validator
from torch import Tensor

import align


class AttributeColumns(align.StrictConfig):
    prompt: str = "prompt"
    completion: str = "completion"


class AttributeData(align.DataConfig):
    format: Literal["scored"] = "scored"
    columns: AttributeColumns = AttributeColumns()
    attributes: list[str] = Field(
        ..., min_length=1, description="Numeric columns to predict, one scalar head each, in this order."
    )

    @field_validator("attributes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"attributes are listed more than once: {', '.join(repeated)}")
        return value


@dataclass
class ScoredTokens:
    """Sequences with a target per attribute; ``labelled`` is false where a value is missing."""

    tokens: align.TokenBatch
    targets: Tensor
    labelled: Tensor
    example_ids: Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


class AttributeFormat(align.TokenizedFormat):
    cfg: AttributeData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        c = self.cfg.columns
        prompt, completion = align.prompt_and_completion(row, c.prompt, c.completion, source, index)
        targets, labelled = [], []
        for name in self.cfg.attributes:
            value = row.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise align.row_error(
                    source, index, f"attribute '{name}' must be a number or null, got {value!r:.40}"
                )
            labelled.append(value is not None)
            targets.append(float(value) if value is not None else 0.0)
        if not any(labelled):
            return {
                "prompt_ids": [],
                "completion_ids": [],
                "targets": targets,
                "labelled": labelled,
                "status": "skipped_unlabelled",
            }
        prompt_ids, completion_ids = self.encoder.encode(prompt, completion)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "targets": targets,
            "labelled": labelled,
            "status": status,
        }

    def check_loaded(self, split: str, rows: datasets.Dataset, sources: list[str]) -> None:
        labelled = torch.tensor(list(rows["labelled"]), dtype=torch.bool).reshape(len(rows), -1)
        counts = labelled.sum(dim=0).tolist() if len(rows) else [0] * len(self.cfg.attributes)
        absent = [name for name, count in zip(self.cfg.attributes, counts, strict=True) if count == 0]
        if absent:
            names = ", ".join(f"'{name}'" for name in absent)
            columns = sorted({column for source in sources for column in self.columns_of.get(source, [])})
            raise align.DataError(
                f"data.attributes: no row of data.{split} ({', '.join(sources)}) has a value for {names}; "
                f"its columns: {', '.join(columns)}"
            )

    def collate(self, rows: list[dict[str, Any]]) -> ScoredTokens:
        return ScoredTokens(
            tokens=align.lay_out(
                [(r["prompt_ids"], r["completion_ids"]) for r in rows], self.pad_id, self.cfg.padding_free
            ),
            targets=torch.tensor([r["targets"] for r in rows], dtype=torch.float32),
            labelled=torch.tensor([r["labelled"] for r in rows], dtype=torch.bool),
            example_ids=torch.tensor([r["example_id"] for r in rows]),
        )
