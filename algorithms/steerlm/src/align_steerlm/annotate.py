"""``align annotate``: label an SFT dataset with an attribute model's predictions.

    align annotate --model runs/attributes/final --data sft.jsonl --out annotated.jsonl \\
        [attributes=[helpfulness,verbosity]] [min_value=0 max_value=4] [overwrite=true]

The attribute model is what ``align run --algo reward_regression`` saves (one head per
attribute), loaded through the ``model`` reward source of ``align-reward``. Each prediction is
clipped to ``min_value..max_value`` and rounded half up. The output is a new JSONL file of the
input's rows in the input's layout: a plain row gains an ``attributes`` mapping, a NeMo-Aligner
SteerLM row a ``label`` on every assistant turn; both are what the ``steerlm`` format reads.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

import align
from align_steerlm.conditioning import Conditioning, Prompt, clip_round, format_label
from align_steerlm.data import SteerColumns


class AnnotateConfig(align.StrictConfig):
    model: str = Field(..., description="The attribute model folder (reward_regression's final/).")
    data: Path = Field(..., description="The JSONL file to label (plain SFT rows or NeMo SteerLM rows).")
    out: Path = Field(..., description="The labelled JSONL file to write (kept unless overwrite=true).")
    attributes: list[str] | None = Field(None, description="Heads to write, in order (default: all).")
    min_value: int = 0
    max_value: int = 4
    columns: SteerColumns = SteerColumns()
    overwrite: bool = False
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(1024, gt=1, description="Tokens of prompt + answer the model reads.")
    device: str = "cpu"


Assign = Callable[[dict[str, int]], None]


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="attribute model folder (reward_regression's final/)")
    parser.add_argument(
        "--data", required=True, help="JSONL to label: prompt/completion, messages or NeMo rows"
    )
    parser.add_argument("--out", required=True, help="labelled JSONL to write (kept unless overwrite=true)")
    parser.add_argument(
        "overrides", nargs="*", help="attributes=[a,b] min_value=0 max_value=4 overwrite=true ..."
    )


def run(args: argparse.Namespace, plugins: align.Plugins) -> None:
    cfg = config_from_cli(args.model, args.data, args.out, args.overrides)
    written = annotate(cfg, plugins)
    print(f"done: {written} rows labelled in {cfg.out}")


def config_from_cli(model: str, data: str, out: str, overrides: list[str]) -> AnnotateConfig:
    values: dict[str, Any] = {"model": model, "data": data, "out": out}
    for item in overrides:
        key, equals, raw = item.partition("=")
        if not equals or not key:
            raise align.ConfigError(f"align annotate: '{item}' is not key=value")
        values[key] = yaml.safe_load(raw)
    try:
        return AnnotateConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise align.ConfigError(f"align annotate: {problems}") from None


def annotate(cfg: AnnotateConfig, plugins: align.Plugins) -> int:
    """Write ``cfg.data``'s rows with predicted attribute values to ``cfg.out``; returns the count."""
    _check_files(cfg)
    heads = model_heads(cfg.model)
    names = cfg.attributes or heads
    unknown = [name for name in names if name not in heads]
    if unknown:
        raise align.ConfigError(
            f"attributes: the model at {cfg.model} has no head {', '.join(map(repr, unknown))} "
            f"(its heads: {', '.join(heads)})"
        )
    conditioning = Conditioning(attributes=names, min_value=cfg.min_value, max_value=cfg.max_value)
    rows = read_jsonl(cfg.data)
    prompts: list[Prompt] = []
    answers: list[str] = []
    assigns: list[Assign] = []
    for index, row in enumerate(rows):
        try:
            for prompt, answer, assign in answers_of(row, cfg.columns, conditioning):
                prompts.append(prompt)
                answers.append(answer)
                assigns.append(assign)
        except ValueError as exc:
            raise align.row_error(str(cfg.data), index, str(exc)) from None
    scores = score(cfg, plugins, len(heads), prompts, answers)
    columns = [heads.index(name) for name in names]
    for assign, row_scores in zip(assigns, scores.tolist(), strict=True):
        assign(
            {name: clip_round(row_scores[c], conditioning) for name, c in zip(names, columns, strict=True)}
        )
    return write_jsonl(cfg.out, rows)


def _check_files(cfg: AnnotateConfig) -> None:
    """Fail before any model loads: the input must exist, the output must not (unless asked)."""
    if not cfg.data.is_file():
        raise align.ConfigError(f"--data {cfg.data}: no such file")
    if cfg.out.is_dir():
        raise align.ConfigError(f"--out {cfg.out} is a directory; give a .jsonl file")
    if cfg.out.exists() and not cfg.overwrite:
        raise align.ConfigError(f"--out {cfg.out} exists; choose another file or pass overwrite=true")


def model_heads(path: str) -> list[str]:
    """The attribute model's head names (``id2label`` of its config), in head order."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise align.ConfigError(
            f"--model {path}: not a saved attribute model ({config_file}: {reason})"
        ) from None
    id2label = config.get("id2label") or {}
    count = int(config.get("num_labels") or len(id2label) or 1)
    return [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(count)]


def answers_of(
    row: dict[str, Any], columns: SteerColumns, cfg: Conditioning
) -> list[tuple[Prompt, str, Assign]]:
    """Each answer of a row to score: (the prompt the attribute model reads, the answer, where its
    values go). A plain row has one; a NeMo row one per assistant turn."""
    if row.get(columns.conversations) is not None:
        return _nemo_answers(row, columns, cfg)
    if row.get(columns.messages) is not None:
        messages = row[columns.messages]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"'{columns.messages}' must be chat messages ending with an assistant message")
        prompt: Any = messages[:-1]
        answer = messages[-1].get("content")
    else:
        prompt, answer = row.get(columns.prompt), row.get(columns.completion)
        if isinstance(answer, list) and answer:
            answer = answer[-1].get("content")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise ValueError(
            f"missing '{columns.prompt}' (or '{columns.messages}', or NeMo '{columns.conversations}')"
        )
    if not isinstance(answer, str) or not answer:
        raise ValueError("the completion is missing or empty")

    def assign(values: dict[str, int]) -> None:
        row[columns.attributes] = values

    return [(prompt, answer, assign)]


def _nemo_answers(
    row: dict[str, Any], columns: SteerColumns, cfg: Conditioning
) -> list[tuple[Prompt, str, Assign]]:
    """Every assistant turn, scored after the turns before it: the user's text alone for a first
    answer (as HelpSteer's prompt/response columns read), the chat messages before it otherwise."""
    turns = row[columns.conversations]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"'{columns.conversations}' must be a list of {{from, value, label}} turns")
    user = str(row.get("mask") or "User")
    history: list[dict[str, Any]] = []
    out: list[tuple[Prompt, str, Assign]] = []
    for number, turn in enumerate(turns, start=1):
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {number}: 'value' must be a string")
        role = "user" if turn.get("from") == user else "assistant"
        if role == "assistant":
            if not history:
                raise ValueError(f"turn {number}: an answer before any user turn")
            if not value:
                raise ValueError(f"turn {number}: the answer is empty")
            prompt: Prompt = history[0]["content"] if len(history) == 1 else [dict(m) for m in history]

            def assign(values: dict[str, int], turn: dict[str, Any] = turn) -> None:
                turn["label"] = format_label(values, cfg)

            out.append((prompt, value, assign))
        history.append({"role": role, "content": value})
    if not out:
        raise ValueError("no assistant turn to label")
    return out


def score(
    cfg: AnnotateConfig, plugins: align.Plugins, heads: int, prompts: list[Prompt], answers: list[str]
) -> Any:
    """Every head's prediction ``[n, heads]``, from align-reward's ``model`` reward source."""
    entry = plugins.registry.get("reward", "model")
    settings = {
        "name": "model",
        "path": cfg.model,
        "weights": [1.0] * heads,  # required for a model with several heads; unused by scores()
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "device": cfg.device,
    }
    source = entry.factory(entry.config.model_validate(settings))
    if not callable(getattr(source, "scores", None)):
        raise align.ConfigError(
            f"the 'model' reward ({entry.package}) has no scores(prompts, completions) giving every head"
        )
    return source.scores(prompts, answers)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise align.row_error(str(path), number, f"not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise align.row_error(str(path), number, "a row must be a JSON object")
        rows.append(row)
    if not rows:
        raise align.DataError(f"--data {path}: no rows")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> int:
    """Written beside ``path`` and renamed when complete: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    except OSError as exc:
        raise align.UserError(f"writing {path} failed: {exc.strerror or exc}; nothing was replaced") from None
    finally:
        partial.unlink(missing_ok=True)
    return len(rows)
