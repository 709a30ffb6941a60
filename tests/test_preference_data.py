"""The preference data format's bad-row rules (see docs/algorithms/dpo.md, "Data rules"):
identical pairs are skipped and counted, empty completions are errors naming file and row,
prompts that leave no room for a completion are dropped and counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import align
from align import byte_tokenizer

GOOD = {"prompt": "Q: hi?\nA: ", "chosen": "Hello, friend!", "rejected": "Go away."}


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def preference_format(train: str, **data: Any) -> Any:
    registry = align.load_plugins().registry
    entry = registry.get("data_format", "preference")
    return entry.factory(entry.config(train=train, **data), byte_tokenizer())


def test_identical_pairs_are_skipped_and_long_prompts_dropped_with_counts(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {**GOOD, "rejected": GOOD["chosen"]},  # no signal: skipped
        {**GOOD, "prompt": "x" * 200},  # 200+ prompt tokens > max_length 64: dropped
        {**GOOD, "chosen": "Hi!"},
    ]
    fmt = preference_format(write(tmp_path / "train.jsonl", rows), max_length=64)
    data = fmt.load("train")
    assert len(data) == 2
    assert sorted(data["example_id"]) == [0, 3]
    assert fmt.stats() == {"train_skipped_identical_pair": 1, "train_dropped_long_prompt": 1}


def test_long_prompt_is_kept_when_max_prompt_length_truncates_it(tmp_path: Path) -> None:
    fmt = preference_format(
        write(tmp_path / "train.jsonl", [{**GOOD, "prompt": "x" * 200}]), max_length=64, max_prompt_length=32
    )
    data = fmt.load("train")
    assert len(data) == 1 and len(data[0]["prompt_ids"]) == 32
    assert fmt.stats() == {"train_truncated": 1}


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_empty_completion_is_an_error_naming_file_and_row(tmp_path: Path, field: str) -> None:
    path = write(tmp_path / "train.jsonl", [GOOD, GOOD, {**GOOD, field: ""}])
    with pytest.raises(align.DataError) as error:
        preference_format(path).load("train")
    message = str(error.value)
    assert path in message and "row 3" in message and f"'{field}' is empty" in message
