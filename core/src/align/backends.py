"""Building a run's backend: the registered one, then whatever installed plugins wrap it with
(``wrap_backend`` hook: LoRA adapters, for one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from torch import nn

from align.config import ModelConfig, RunConfig
from align.errors import ConfigError
from align.protocols import Backend

if TYPE_CHECKING:
    from align.plugins import Plugins


def build_backend(config: RunConfig, plugins: Plugins) -> Backend:
    """The configured backend, wrapped by every plugin that implements ``wrap_backend`` (in
    the order pluggy calls hooks, each wrapping the previous result). A model section asking for LoRA
    when no installed plugin applies it is a config error, not a silently full fine-tune."""
    backend: Backend = plugins.registry.get("backend", config.backend.name).factory(config)
    for impl in reversed(plugins.manager.hook.wrap_backend.get_hookimpls()):  # pluggy runs newest first
        wrapped: Backend | None = impl.function(backend=backend, config=config)  # type: ignore[assignment]
        if wrapped is not None:
            backend = wrapped
    if not getattr(backend, "applies_lora", False):
        for where, section in model_sections(config):
            if section.lora is not None:
                raise ConfigError(
                    f"{where}.lora: no installed plugin applies LoRA adapters; install align-lora "
                    "(pip install align-lora) or remove the key"
                )
    return backend


def model_sections(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, ModelConfig]]:
    """Every model section in a config tree, with its dotted path (``model``, ``critic.model``...)."""
    for name in type(config).model_fields:
        value: Any = getattr(config, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            path = f"{prefix}{name}" if index is None else f"{prefix}{name}.{index}"
            if isinstance(item, ModelConfig):
                yield path, item
            elif isinstance(item, BaseModel):
                yield from model_sections(item, f"{path}.")


def save_merged(backend: Backend, model: nn.Module, path: Path) -> None:
    """``model`` as a full HF folder that an inference engine (or ``from_pretrained``) loads: the
    backend's ``save_merged`` where it has one (adapters merged into the weights), else its
    ``save_pretrained``."""
    merged = getattr(backend, "save_merged", None)
    if callable(merged):
        merged(model, path)
    else:
        backend.save_pretrained(model, path)
