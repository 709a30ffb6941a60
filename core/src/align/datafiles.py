"""Reading data files with ``datasets``, with errors that name the file and the row."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import datasets

from align.errors import DataError

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED = "use .jsonl, .json, .parquet, .csv, .arrow or a folder saved with save_to_disk"


def _looks_local(spec: str) -> bool:
    return Path(spec).suffix in (*_LOADERS, ".arrow") or spec.startswith((".", "/", "~"))


def source_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be read as data (``None``: it can, or it is a hub dataset name, which
    only loading can tell). Cheap: looks at the file's kind and first byte, not its rows."""
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return _saved_dataset_problem(path)
        if not path.exists():
            return _not_found(spec, path) if _looks_local(spec) else None
        if path.suffix not in (*_LOADERS, ".arrow"):
            return f"{path}: unsupported file type '{path.suffix}' ({SUPPORTED})"
        with path.open("rb") as handle:
            if not handle.read(1):
                return f"{path} is empty"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    return None


def _not_found(spec: str, path: Path) -> str:
    if path.is_absolute():
        return f"data file not found: {spec}"
    # Relative paths are read from where align runs, not from the config file's folder.
    return (
        f"data file not found: {spec} (a relative path is read from the current working "
        f"directory, {Path.cwd()}, not from the config file's folder)"
    )


def _saved_dataset_problem(path: Path) -> str | None:
    if (path / "dataset_dict.json").is_file():
        return f"{path} is a saved DatasetDict; point at one split, e.g. {path}/train"
    if not (path / "state.json").is_file():
        return (
            f"{path} is a folder but not a dataset saved with save_to_disk (no state.json); "
            "to read the files in it, list them: [a.jsonl, b.jsonl]"
        )
    return None


def _non_utf8_line(path: Path) -> str | None:
    """The first line of a text file that is not UTF-8 (``datasets`` would take such bytes in
    and fail later, far from the file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # exc.object: the bytes decoded, with any held back from the previous chunk
                where = line + exc.object.count(b"\n", 0, exc.start)
                byte = exc.object[exc.start]
                return f"{path}, line {where}: not UTF-8 text (byte {byte:#04x}); save the file as UTF-8"
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path}, line {line}: the file ends inside a UTF-8 character (is it truncated?)"
    return None


def _first_bad_json_line(path: Path) -> str | None:
    with path.open(encoding="utf-8") as handle:
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
    problem = source_problem(spec)
    if problem:
        raise DataError(problem)
    if path.is_dir():
        return _binary(path, "a saved dataset", lambda: datasets.load_from_disk(str(path)))
    if not path.exists():
        return datasets.load_dataset(spec, split="train")  # a hub name; needs a network
    if path.suffix == ".arrow":
        table = _binary(path, "an Arrow file", lambda: datasets.Dataset.from_file(str(path)))
    elif path.suffix == ".parquet":
        table = _binary(path, "a Parquet file", lambda: _load_text_or_parquet(path, "parquet"))
    else:
        table = _load_text(path, _LOADERS[path.suffix])
    if len(table) == 0:
        raise DataError(f"{path} holds no rows")
    return table


def _binary(path: Path, kind: str, load: Any) -> datasets.Dataset:
    """Loads a binary format; anything it raises means the file is not what it claims."""
    try:
        loaded = load()
    except Exception as exc:
        raise DataError(f"{path} cannot be read as {kind} ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path} is a saved DatasetDict; point at one split, e.g. {path}/train")
    return loaded


def _load_text_or_parquet(path: Path, loader: str) -> datasets.Dataset:
    return datasets.load_dataset(loader, data_files=str(path), split="train", keep_in_memory=True)


def _load_text(path: Path, loader: str) -> datasets.Dataset:
    problem = _non_utf8_line(path)
    if problem:
        raise DataError(problem)
    try:
        table = _load_text_or_parquet(path, loader)
    except Exception as exc:
        where = _first_bad_json_line(path) if loader == "json" else None
        if where is None and not path.read_text(encoding="utf-8").strip():
            where = f"{path} holds no rows (only blank lines)"
        raise DataError(where or f"{path}: could not be read ({type(exc).__name__}: {exc})") from None
    mixed = [name for name, feature in table.features.items() if type(feature).__name__ == "Json"]
    if mixed and loader == "json":
        # datasets would decode such a column's strings as JSON ("2" -> 2): name the odd row instead.
        raise DataError(_first_mixed_row(path, mixed))
    return table


def _first_mixed_row(path: Path, columns: list[str]) -> str:
    first: dict[str, tuple[int, str]] = {}
    with path.open(encoding="utf-8") as handle:
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


def undecodable_row(table: datasets.Dataset, source: str) -> str:
    """Where a table's text is not UTF-8 (found by decoding row after row: only on that error)."""
    for index in range(len(table)):
        try:
            table[index]
        except UnicodeDecodeError:
            return f"{source}, row {index + 1}: holds text that is not UTF-8"
    return f"{source}: holds text that is not UTF-8"


def row_error(source: str, row: int, message: str) -> DataError:
    return DataError(f"{source}, row {row + 1}: {message}")


# Roles a chat message may have: what chat templates render. Anything else is a typo or another
# dataset's convention (ShareGPT's "human"/"gpt") that a template would mangle or drop.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def text_or_messages(value: Any, field: str, source: str, row: int) -> str | list[dict[str, Any]]:
    """A column value must be a string or a non-empty list of chat messages: ``{role, content}``
    with a known role and text content."""
    if isinstance(value, str):
        return value
    if value is None:
        raise row_error(source, row, f"missing '{field}'")
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for number, message in enumerate(value, start=1):
            problem = _message_problem(message)
            if problem:
                raise row_error(source, row, f"'{field}', message {number}: {problem}")
        return value
    if isinstance(value, list) and not value:
        raise row_error(source, row, f"'{field}' is an empty list of messages")
    raise row_error(
        source, row, f"'{field}' must be a string or a list of {{role, content}} messages, got {value!r:.80}"
    )


def _message_problem(message: dict[str, Any]) -> str | None:
    role, content = message.get("role"), message.get("content")
    if role is None or "content" not in message:
        return f"a message needs 'role' and 'content', got keys {sorted(message)}"
    if not isinstance(role, str):
        return f"the role must be a string, got {role!r:.40}"
    if role not in CHAT_ROLES:
        return f"unknown role {role!r:.40} (one of: {', '.join(CHAT_ROLES)})"
    if not isinstance(content, str):
        return f"the content must be a string, got {content!r:.60}"
    return None
