"""The ``unpaired`` data format: rows of ``prompt``, ``completion`` and a boolean ``label``
(true: desirable, false: undesirable), plain text or chat messages.

Length rules are those of the other formats (``max_prompt_length``, ``max_length``,
``overlong``). A missing or non-boolean label is an error naming the file and row.

A batch of ``n`` rows holds ``2n`` sequences for one forward pass: ``(x_i, y_i)`` for each
row, then the mismatched ``(x_i, y_{(i+1) mod n})``, the completions shifted by one within
the batch, from which KTO estimates KL(pi || pi_ref) (as the paper's implementation does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import align


class UnpairedColumns(align.StrictConfig):
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"


class UnpairedData(align.DataConfig):
    format: Literal["unpaired"] = "unpaired"
    columns: UnpairedColumns = UnpairedColumns()


@dataclass
class UnpairedTokens:
    """``num_examples`` labelled sequences, then as many mismatched ones, in one ``TokenBatch``."""

    tokens: align.TokenBatch
    num_examples: int
    labels: Tensor
    example_ids: Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


class UnpairedFormat(align.TokenizedFormat):
    cfg: UnpairedData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        c = self.cfg.columns
        prompt, completion = align.prompt_and_completion(row, c.prompt, c.completion, source, index)
        label = row.get(c.label)
        if not isinstance(label, bool):
            what = "missing" if label is None else f"{label!r:.40}"
            raise align.row_error(source, index, f"'{c.label}' must be true or false, got {what}")
        prompt_ids, completion_ids = self.encoder.encode(prompt, completion)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label, "status": status}

    def collate(self, rows: list[dict[str, Any]]) -> UnpairedTokens:
        n = len(rows)
        sequences = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
        for i, row in enumerate(rows):
            room = self.cfg.max_length - len(row["prompt_ids"])
            sequences.append((row["prompt_ids"], rows[(i + 1) % n]["completion_ids"][:room]))
        return UnpairedTokens(
            tokens=align.lay_out(sequences, self.pad_id, self.cfg.padding_free),
            num_examples=n,
            labels=torch.tensor([bool(r["label"]) for r in rows]),
            example_ids=torch.tensor([r["example_id"] for r in rows]),
        )
