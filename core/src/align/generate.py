"""``align generate``: completions (and rewards) for a file of prompts, as JSONL.

    align generate --model runs/sft/final --prompts prompts.jsonl --out samples.jsonl \\
        [--engine vllm] [--reward exact_match] [n=4 temperature=0.7 max_tokens=64 reward.answer_key=answer]

The same engines, data format (``prompts``) and rewards as online training, so what it shows
is what an online method would sample. ``data.format=...`` picks another installed prompts
format (one registered with ``batch=align.PromptBatch`` or a subclass), with its own ``data.*`` settings: a
plugin conditions prompts that way (SteerLM's ``steerlm_prompts`` puts the desired attribute
values into each prompt exactly as its training did). Each output row holds the prompt, one completion, its
index among the prompt's ``n``, why it stopped, its length in tokens, the reward when asked,
and the prompt row's other columns.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from align.builtin.prompts import PromptBatch, PromptData, PromptRow, prompt_rows
from align.config import ModelConfig, RunConfig, StrictConfig
from align.errors import ConfigError, UserError
from align.loading import apply_overrides, format_validation_error
from align.online import Rollouts, backend_device
from align.plugins import Plugins
from align.rewards import build_reward
from align.rollout import SamplingConfig

SAMPLING_KEYS = set(SamplingConfig.model_fields)


class GenerateConfig(StrictConfig):
    """What ``align generate`` runs; every plugin section is validated by its plugin's class."""

    model: ModelConfig = ModelConfig()
    backend: dict[str, Any] = Field(default_factory=lambda: {"name": "hf"})
    engine: dict[str, Any] = Field(default_factory=lambda: {"name": "hf"})
    reward: dict[str, Any] | None = None
    prompts: str
    prompt_column: str = "prompt"
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="The prompts' data format (data.format, default 'prompts': any installed format with "
        "batch align.PromptBatch or a subclass) and its settings; train, max_length and columns.prompt "
        "come from --prompts, max_length and prompt_column.",
    )
    max_length: int = Field(1024, gt=0, description="Prompt + completion tokens at most.")
    sampling: SamplingConfig = SamplingConfig()
    batch_size: int = Field(64, gt=0, description="Prompts handed to the engine at once.")
    out: Path
    overwrite: bool = False
    seed: int = 0
    logits_hook: bool = Field(
        True,
        description="Steer sampling with what a plugin saved beside the model, when one did (ILQL's "
        "heads: logits + beta (Q - V)); false: the plain policy.",
    )


def config_from_cli(
    model: str, prompts: str, out: str, engine: str | None, reward: str | None, overrides: Sequence[str]
) -> GenerateConfig:
    """Flags plus ``key=value`` overrides; a bare sampling key (``n=4``) means ``sampling.n``."""
    data: dict[str, Any] = {"model": {"path": model}, "prompts": prompts, "out": out}
    if engine:
        data["engine"] = {"name": engine}
    if reward:
        data["reward"] = {"name": reward}
    dotted = [f"sampling.{item}" if item.partition("=")[0] in SAMPLING_KEYS else item for item in overrides]
    data = apply_overrides(data, dotted)
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, GenerateConfig, data, "align generate")) from None


def _plugin_config(kind: str, section: str, data: dict[str, Any], plugins: Plugins) -> BaseModel:
    entry = plugins.registry.get(kind, str(data.get("name")))
    try:
        return entry.config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, entry.config, data, f"align generate, {section}")
        ) from None


def _check_out(cfg: GenerateConfig) -> None:
    """Never overwrite a user's file unless asked; fail before any model loads."""
    if cfg.out.exists() and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out} exists; choose another file or pass overwrite=true")
    if cfg.out.is_dir():
        raise ConfigError(f"--out {cfg.out} is a directory; give a .jsonl file")
    parent = cfg.out.parent if str(cfg.out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".align-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {cfg.out}: cannot write there ({exc.strerror or exc})") from None


def generate(cfg: GenerateConfig, plugins: Plugins) -> int:
    """Write the completions of every prompt to ``cfg.out``; returns the number of rows written."""
    registry = plugins.registry
    backend_cfg = _plugin_config("backend", "backend", cfg.backend, plugins)
    engine_cfg = _plugin_config("rollout_engine", "engine", cfg.engine, plugins)
    reward_cfg = _plugin_config("reward", "reward", cfg.reward, plugins) if cfg.reward else None
    data_cfg = _prompt_data(cfg, plugins)
    _check_out(cfg)
    run = RunConfig(algo="generate", model=cfg.model, backend=backend_cfg, data=data_cfg, seed=cfg.seed)
    backend = registry.get("backend", backend_cfg.name).factory(run)  # type: ignore[attr-defined]
    data_format = registry.get("data_format", data_cfg.format).factory(data_cfg, backend.tokenizer)
    rows = data_format.load("train")
    if rows is None or len(rows) == 0:
        raise ConfigError(f"--prompts {cfg.prompts}: no usable prompts")
    dropped = sum(count for status, count in data_format.stats().items() if "dropped" in status)
    if dropped:  # generate answers every prompt it is given, or says which it cannot
        raise ConfigError(
            f"--prompts {cfg.prompts}: {dropped} of {len(rows) + dropped} prompts leave no room for a "
            f"completion within max_length={cfg.max_length} tokens; raise max_length=... or shorten them"
        )
    reward = build_reward(reward_cfg, registry) if reward_cfg is not None else None  # type: ignore[arg-type]
    # A plugin that saved something beside the model to steer it with (ILQL's heads) hands it over.
    hook = plugins.manager.hook.generation_logits_hook(model_path=cfg.model.path) if cfg.logits_hook else None
    with tempfile.TemporaryDirectory(prefix="align-generate-") as folder:
        model_dir = Path(folder) / "model"
        backend.save_pretrained(backend.build_policy(), model_dir)
        rollouts = Rollouts(
            engine_cfg,  # type: ignore[arg-type]
            registry,
            backend.tokenizer,
            model_dir,
            dtype=cfg.model.dtype,
            max_model_len=cfg.max_length,
            seed=cfg.seed,
            reward=reward,
            logits_hook=hook,
            device=backend_device(backend),
        )
    try:
        return _write(cfg, rollouts, rows, data_cfg.columns.prompt)
    finally:
        rollouts.close()


def _prompt_data(cfg: GenerateConfig, plugins: Plugins) -> PromptData:
    """The prompts' data format config: ``prompts`` unless ``data.format`` names another format
    whose batch is a ``PromptBatch`` (a plugin's conditioning of prompts; a subclass keeps such a
    format out of online algorithms' ``data.format`` choices), validated by its class."""
    section = {
        "format": "prompts",
        **cfg.data,
        "train": cfg.prompts,
        "max_length": cfg.max_length,
        "columns": {"prompt": cfg.prompt_column, **cfg.data.get("columns", {})},
    }
    entry = plugins.registry.get("data_format", str(section["format"]))
    batch = entry.meta.get("batch")
    if not (isinstance(batch, type) and issubclass(batch, PromptBatch)):
        raise ConfigError(
            f"align generate: data.format={entry.name} ({entry.package}) is not a prompts format "
            "(registered with batch=align.PromptBatch); see `align list --kind data_format`"
        )
    try:
        data_cfg = entry.config.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, entry.config, section, "align generate, data")
        ) from None
    if not isinstance(data_cfg, PromptData):
        raise ConfigError(
            f"align generate: data.format={entry.name}: its config must subclass align.PromptData"
        )
    return data_cfg


def _batches(rows: Any, size: int, column: str) -> Iterator[list[PromptRow]]:
    for start in range(0, len(rows), size):
        yield prompt_rows([rows[i] for i in range(start, min(len(rows), start + size))], column)


def _write(cfg: GenerateConfig, rollouts: Rollouts, rows: Any, prompt_column: str) -> int:
    """Rows go to a hidden file beside ``out``, renamed when complete: an interrupted run never
    leaves a file that looks finished."""
    partial = cfg.out.with_name(f".{cfg.out.name}.partial")
    written = 0
    sampling = (
        cfg.sampling if cfg.sampling.seed is not None else cfg.sampling.model_copy(update={"seed": cfg.seed})
    )
    columns = (TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with partial.open("w") as handle, Progress(*columns, transient=True) as bar:
            task = bar.add_task("generate", total=len(rows))
            for batch in _batches(rows, cfg.batch_size, prompt_column):
                result = rollouts.generate(batch, sampling)
                for group in result.groups:
                    for index, sample in enumerate(group):
                        handle.write(json.dumps(_row(sample, index, prompt_column)) + "\n")
                        written += 1
                bar.advance(task, len(batch))
        os.replace(partial, cfg.out)
    except OSError as exc:
        raise UserError(f"writing {cfg.out} failed: {exc.strerror or exc}; nothing was replaced") from None
    finally:
        partial.unlink(missing_ok=True)
    return written


def _row(sample: Any, index: int, prompt_column: str) -> dict[str, Any]:
    extra = {k: v for k, v in sample.prompt.row.items() if k != prompt_column}
    out = {
        **extra,
        "prompt": sample.prompt.prompt,
        "completion": sample.text,
        "sample_index": index,
        "finish_reason": sample.finish_reason,
        "completion_tokens": len(sample.completion_ids),
    }
    if sample.reward == sample.reward:  # not NaN: a reward was asked for
        out["reward"] = sample.reward
    return out
