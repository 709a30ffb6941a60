"""The ``prompts`` data format: what online methods sample from.

Each row has a prompt (a string, or chat messages rendered with the tokenizer's chat template
and its generation prompt) and any other columns a reward may read (a reference answer, test
cases). Rows keep those columns as they are: ``PromptRow.row`` is the original mapping.
A prompt longer than ``max_prompt_length`` keeps its last tokens; one that leaves no room for
a completion within ``max_length`` is dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from align.builtin.data import TokenizedFormat
from align.config import DataConfig, StrictConfig
from align.datafiles import text_or_messages
from align.hookspecs import hookimpl
from align.registry import Register


class PromptColumns(StrictConfig):
    prompt: str = "prompt"


class PromptData(DataConfig):
    format: Literal["prompts"] = "prompts"
    columns: PromptColumns = PromptColumns()
    max_length: int = Field(512, gt=0, description="Prompt + completion tokens at most.")


@dataclass
class PromptRow:
    """One prompt to sample from: its token ids, the prompt as written, and the whole row."""

    example_id: int
    prompt_ids: list[int]
    prompt: str | list[dict[str, Any]]
    row: dict[str, Any]


@dataclass
class PromptBatch:
    rows: list[PromptRow]

    def __len__(self) -> int:
        return len(self.rows)


class PromptFormat(TokenizedFormat):
    cfg: PromptData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        column = self.cfg.columns.prompt
        prompt = text_or_messages(row.get(column), column, source, index)
        prompt_ids = self.encoder.encode_prompt(prompt)
        status, prompt_ids, _ = self.encoder.fit(prompt_ids, [])
        return {"prompt_ids": prompt_ids, "row_json": json.dumps(dict(row)), "status": status}

    def collate(self, rows: list[dict[str, Any]]) -> PromptBatch:
        return PromptBatch(prompt_rows(rows, self.cfg.columns.prompt))


def prompt_rows(rows: list[dict[str, Any]], prompt_column: str = "prompt") -> list[PromptRow]:
    """Tokenized rows of the ``prompts`` format (as its dataset holds them) -> ``PromptRow``s."""
    out = []
    for r in rows:
        original = json.loads(r["row_json"])
        out.append(PromptRow(int(r["example_id"]), list(r["prompt_ids"]), original[prompt_column], original))
    return out


@hookimpl
def register_data_formats(register: Register) -> None:
    register(PromptData, batch=PromptBatch)(PromptFormat)
