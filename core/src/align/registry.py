"""What the installed plugins registered: algorithms, losses, engines, rewards, data formats,
backends. Each entry has a name, a pydantic config class, a factory and its package."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from align.errors import ConfigError, UserError

Kind = Literal["algorithm", "loss", "rollout_engine", "reward", "data_format", "backend"]
KINDS: tuple[Kind, ...] = typing.get_args(Kind)

# The config field that carries an entry's name, per kind.
DISCRIMINATORS: dict[str, str] = {"algorithm": "algo", "data_format": "format"}

Register = Callable[..., Callable[[Any], Any]]


class DuplicateRegistration(UserError):
    """Two packages registered the same name for the same kind."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    config: type[BaseModel]
    factory: Any
    package: str
    version: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    package: str
    version: str
    error: str


def discriminator(kind: str) -> str:
    return DISCRIMINATORS.get(kind, "name")


def declared_name(config: type[BaseModel], kind: str) -> str:
    """The single ``Literal`` value of a config's discriminator field."""
    key = discriminator(kind)
    info = config.model_fields.get(key)
    values = get_args(info.annotation) if info is not None else ()
    if info is None or get_origin(info.annotation) is not Literal or len(values) != 1:
        raise TypeError(
            f"{config.__name__}.{key} must be a Literal with one value, e.g. {key}: Literal['x'] = 'x'"
        )
    return str(values[0])


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.broken: list[BrokenPlugin] = []

    def add(self, entry: Entry) -> None:
        existing = self._entries[entry.kind].get(entry.name)
        if existing is not None:
            raise DuplicateRegistration(
                f"{entry.kind} '{entry.name}' is registered twice: by package "
                f"'{existing.package}' and by package '{entry.package}'. Uninstall one, or "
                f"restrict loading with ALIGN_PLUGINS."
            )
        self._entries[entry.kind][entry.name] = entry

    def register_callable(self, kind: str, package: str, version: str) -> Register:
        """The ``register`` a plugin's hook receives, bound to its package for attribution."""

        def register(config: type[BaseModel], **meta: Any) -> Callable[[Any], Any]:
            name = meta.pop("name", None) or declared_name(config, kind)

            def decorate(factory: Any) -> Any:
                if kind == "loss" and "batch" not in meta:
                    meta["batch"] = _batch_type_of(factory)
                self.add(Entry(kind, name, config, factory, package, version, meta))
                return factory

            return decorate

        return register

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            installed = ", ".join(sorted(self._entries[kind])) or "none"
            raise ConfigError(
                f"unknown {kind.replace('_', ' ')} '{name}'. Installed: {installed}. "
                f"Install a plugin that provides it (see `align list`)."
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        for k in (kind,) if kind else KINDS:
            yield from (self._entries[k][n] for n in sorted(self._entries[k]))

    def matching(self, kind: str, predicate: Callable[[Entry], bool]) -> list[Entry]:
        return [e for e in self.entries(kind) if predicate(e)]


def _batch_type_of(loss_fn: Callable[..., Any]) -> type:
    """A loss reads the batch type its second parameter is annotated with."""
    try:
        hints = typing.get_type_hints(loss_fn)
    except NameError as exc:
        raise TypeError(f"cannot resolve the annotations of loss {loss_fn.__name__}: {exc}") from None
    params = [name for name in hints if name != "return"]
    if len(params) < 2 or not isinstance(hints[params[1]], type):
        raise TypeError(
            f"loss {loss_fn.__name__} must annotate its batch parameter (e.g. b: align.PreferenceBatch) "
            "or be registered with batch=..."
        )
    return hints[params[1]]
