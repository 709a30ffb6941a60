"""Reading data files with ``datasets``, with errors that name the file and the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from align.errors import DataError

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(spec: str) -> bool:
    return Path(spec).suffix in (*_LOADERS, ".arrow") or spec.startswith((".", "/", "~"))


def _first_bad_json_line(path: Path) -> str | None:
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}, row {number}: not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(value, dict):
                return f"{path}, row {number}: expected a JSON object, got {type(value).__name__}"
    return None


def load_table(spec: str) -> datasets.Dataset:
    """One file, saved dataset folder, or hub name -> a ``datasets.Dataset``."""
    path = Path(spec).expanduser()
    datasets.disable_progress_bars()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} is a DatasetDict; point at one split, e.g. {path}/train")
        return loaded
    if not path.exists():
        if _looks_local(spec):
            raise DataError(f"data file not found: {spec}")
        return datasets.load_dataset(spec, split="train")  # a hub name; needs a network
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    loader = _LOADERS.get(path.suffix)
    if loader is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet, .csv, .arrow)"
        )
    try:
        table = datasets.load_dataset(loader, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:
        where = _first_bad_json_line(path) if loader == "json" else None
        raise DataError(where or f"{path}: could not be read ({type(exc).__name__}: {exc})") from None
    mixed = [name for name, feature in table.features.items() if type(feature).__name__ == "Json"]
    if mixed and loader == "json":
        # datasets would decode such a column's strings as JSON ("2" -> 2): name the odd row instead.
        raise DataError(_first_mixed_row(path, mixed))
    return table


def _first_mixed_row(path: Path, columns: list[str]) -> str:
    first: dict[str, tuple[int, str]] = {}
    with path.open() as handle:
        rows = (json.loads(line) for line in handle if line.strip())
        for number, row in enumerate(rows, start=1):
            for column in columns:
                kind = _JSON_KINDS.get(type(row.get(column)), "value")
                seen = first.setdefault(column, (number, kind))
                if row.get(column) is not None and kind != seen[1]:
                    return (
                        f"{path}, row {number}: '{column}' must be a {seen[1]} like row {seen[0]} "
                        f"(a column holds one kind of value), got a {kind}"
                    )
    return f"{path}: columns {columns} mix kinds of values"


_JSON_KINDS = {str: "string", list: "list", dict: "mapping", int: "number", float: "number", bool: "boolean"}


def row_error(source: str, row: int, message: str) -> DataError:
    return DataError(f"{source}, row {row + 1}: {message}")


def text_or_messages(value: Any, field: str, source: str, row: int) -> str | list[dict[str, Any]]:
    """A column value must be a string or a list of chat messages ({role, content})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    if value is None:
        raise row_error(source, row, f"missing '{field}'")
    raise row_error(
        source, row, f"'{field}' must be a string or a list of {{role, content}} messages, got {value!r:.80}"
    )
