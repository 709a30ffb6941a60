"""What the installed plugins registered: algorithms, losses, engines, rewards, data formats,
backends, callbacks, and the lifecycle plugins that are always on. Each entry has a name, a
pydantic config class, a factory and its package.

``register(ConfigClass, **options)`` checks its options against ``REGISTRATION_OPTIONS``: a
misspelt option is an error naming the plugin, never silently ignored.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from align.config import (
    AdvantageConfig,
    BackendConfig,
    CallbackConfig,
    DataConfig,
    LossConfig,
    RewardConfig,
    RolloutEngineConfig,
    RunConfig,
)
from align.critic import CriticConfig
from align.errors import ConfigError, UserError

Kind = Literal[
    "algorithm",
    "loss",
    "rollout_engine",
    "reward",
    "advantage_estimator",
    "critic",
    "data_format",
    "backend",
    "callback",
    "lifecycle",
]
KINDS: tuple[Kind, ...] = typing.get_args(Kind)

# The base config class of each kind that plugins register: a config field typed with one of
# these (or with an abstract subclass) is widened to the installed plugins of that kind.
# "lifecycle" entries are not registered but found: plugins with module-level lifecycle hooks
# and the built-in metrics sinks. They have no config.
CONFIG_BASES: dict[str, type[BaseModel]] = {
    "algorithm": RunConfig,
    "loss": LossConfig,
    "rollout_engine": RolloutEngineConfig,
    "reward": RewardConfig,
    "advantage_estimator": AdvantageConfig,
    "critic": CriticConfig,
    "data_format": DataConfig,
    "backend": BackendConfig,
    "callback": CallbackConfig,
}

# The config field that carries an entry's name, per kind.
DISCRIMINATORS: dict[str, str] = {"algorithm": "algo", "data_format": "format"}

# The options ``register(Config, **options)`` accepts per kind, with the type each must have.
REGISTRATION_OPTIONS: dict[str, dict[str, type | Callable[[Any], bool]]] = {
    "algorithm": {
        "batch": type,  # the token batch its loss reads: selects the data formats that fit
        "data_format": str,  # the default `data.format`
        "loss_batch": type,  # the log-prob batch its losses read: selects the losses that fit
        "default_loss": str,
        "default_backend": str,
        "build_model": callable,  # build_model(backend, cfg): the model trained instead of the policy
    },
    # needs_token_logps: the algorithm fills the batch's per-token log-probs (LD-DPO)
    "loss": {"batch": type, "needs_reference": bool, "needs_token_logps": bool},
    "data_format": {"batch": type},
    "rollout_engine": {"logits_hook": bool},  # it applies EngineSpec.logits_hook (steered sampling)
    "reward": {},
    "advantage_estimator": {},
    "critic": {},
    "backend": {},
    "callback": {},
}

Register = Callable[..., Callable[[Any], Any]]


class DuplicateRegistration(UserError):
    """Two packages registered the same name for the same kind."""


class RegistrationError(TypeError):
    """A plugin called ``register`` wrongly (an unknown option, a config of the wrong kind):
    a bug of that plugin, which is then reported as broken."""


class NoConfig(BaseModel):
    """The config of a lifecycle entry: it takes none from the run config."""


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


def kind_of_config(config: type[BaseModel]) -> str | None:
    """The plugin kind whose base ``config`` subclasses, if any."""
    for kind, base in CONFIG_BASES.items():
        if issubclass(config, base):
            return kind
    return None


def literal_name(config: type[BaseModel], kind: str) -> str | None:
    """The value of the config's discriminator when it is a one-value ``Literal`` (a concrete,
    registrable config), else None (an abstract base such as ``align.LossConfig``)."""
    info = config.model_fields.get(discriminator(kind))
    if info is None or get_origin(info.annotation) is not Literal:
        return None
    values = get_args(info.annotation)
    return str(values[0]) if len(values) == 1 else None


def declared_name(config: type[BaseModel], kind: str) -> str:
    """The single ``Literal`` value of a config's discriminator field."""
    name = literal_name(config, kind)
    if name is None:
        key = discriminator(kind)
        raise RegistrationError(
            f"{config.__name__}.{key} must be a Literal with one value, e.g. {key}: Literal['x'] = 'x'"
        )
    return name


def check_options(kind: str, name: str, package: str, options: dict[str, Any]) -> None:
    """Every registration option is known for ``kind`` and has the right type."""
    allowed = REGISTRATION_OPTIONS[kind]
    what = f"{kind.replace('_', ' ')} '{name}' of package '{package}'"
    for option, value in options.items():
        expected = allowed.get(option)
        if expected is None:
            hint = difflib.get_close_matches(option, list(allowed), n=1, cutoff=0.6)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            known = ", ".join(sorted(allowed)) or "none"
            raise RegistrationError(
                f"{what}: unknown registration option '{option}'{suggestion}. Options of a "
                f"{kind.replace('_', ' ')}: {known}"
            )
        valid = callable(value) if expected is callable else isinstance(value, expected)  # type: ignore[arg-type]
        if not valid:
            wanted = "a callable" if expected is callable else getattr(expected, "__name__", str(expected))
            raise RegistrationError(f"{what}: option '{option}' must be {wanted}, got {value!r}")


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

    def register_callable(
        self, kind: str, package: str, version: str, into: list[Entry] | None = None
    ) -> Register:
        """The ``register`` a plugin's hook receives, bound to its package for attribution.
        Entries go into ``into`` when given (the caller commits them once the plugin's whole
        hook has succeeded), else straight into the registry."""

        def register(config: type[BaseModel], **options: Any) -> Callable[[Any], Any]:
            base = CONFIG_BASES[kind]
            if not (isinstance(config, type) and issubclass(config, base)):
                raise RegistrationError(
                    f"package '{package}' registered {config!r} as a {kind.replace('_', ' ')}: its "
                    f"config must subclass align.{base.__name__}"
                )
            name = declared_name(config, kind)
            check_options(kind, name, package, options)

            def decorate(factory: Any) -> Any:
                meta = dict(options)
                if kind == "loss" and "batch" not in meta:
                    meta["batch"] = _batch_type_of(factory)
                entry = Entry(kind, name, config, factory, package, version, meta)
                into.append(entry) if into is not None else self.add(entry)
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
                f"Install a plugin that provides it (see `align list`).{self._broken_note()}"
            ) from None

    def _broken_note(self) -> str:
        if not self.broken:
            return ""
        names = ", ".join(f"'{b.name}' ({b.package})" for b in self.broken)
        return f" Broken plugins, not loaded: {names}."

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
        raise RegistrationError(f"cannot resolve the annotations of loss {loss_fn.__name__}: {exc}") from None
    params = [name for name in hints if name != "return"]
    if len(params) < 2 or not isinstance(hints[params[1]], type):
        raise RegistrationError(
            f"loss {loss_fn.__name__} must annotate its batch parameter (e.g. b: align.PreferenceBatch) "
            "or be registered with batch=..."
        )
    return hints[params[1]]
