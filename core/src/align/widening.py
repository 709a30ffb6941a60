"""An algorithm's run config, widened to the installed plugins.

Every field typed with a plugin kind's base config (``align.BackendConfig``, ``DataConfig``,
``LossConfig``, ``RewardConfig``, ``RolloutEngineConfig``, ``CallbackConfig``,
``AdvantageConfig``, ``CriticConfig``), or with an
abstract subclass of one (its discriminator is not a one-value ``Literal``), becomes the
discriminated union of the installed plugins of that kind whose configs subclass it. This
holds at any depth: inside nested configs, lists, dicts, optionals and ``X | list[X]``, and
inside the chosen plugins' own configs. A field typed with a concrete config is not widened.

Narrowing by what the algorithm registered: data formats must yield its ``batch``, losses
must read its ``loss_batch``. A required backend or loss field defaults to the algorithm's
``default_backend`` (else ``hf``) or ``default_loss``.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from align.config import RunConfig
from align.registry import Entry, Registry, discriminator, kind_of_config, literal_name

# Tags of the two shapes of ``X | list[X]``; error messages drop them from paths.
ONE, MANY = "single", "list"

# Containers whose type arguments are widened in place (list[X] -> list[widened X]).
_CONTAINERS = (list, tuple, set, frozenset, dict)

# A required field of these kinds defaults to the entry named by this registration option.
DEFAULT_OPTION = {"backend": ("default_backend", "hf"), "loss": ("default_loss", None)}


def run_config_class(algorithm: Entry, registry: Registry) -> type[RunConfig]:
    """The algorithm's config with every plugin-kind field widened to the installed plugins
    that fit it."""
    base: type[RunConfig] = algorithm.config  # type: ignore[assignment]
    widener = _Widener(registry, algorithm.meta)
    fields = widener.widened_fields(base)
    return create_model(f"{base.__name__}Run", __base__=base, __module__=base.__module__, **fields)


def one_or_list(item: Any) -> Any:
    """``item | list[item]``, told apart by the input's shape so that an error is reported
    once, for the shape the user wrote (a plain union would report both)."""
    return Annotated[
        Union[Annotated[item, Tag(ONE)], Annotated[list[item], Tag(MANY), Field(min_length=1)]],  # noqa: UP007
        Discriminator(lambda value: MANY if isinstance(value, list) else ONE),
    ]


def union_of(entries: list[Entry], kind: str) -> Any:
    configs = tuple(e.config for e in entries)
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Discriminator(discriminator(kind))]  # noqa: UP007


@dataclass
class _Widener:
    registry: Registry
    meta: dict[str, Any]
    # Models already widened (or being widened: a config that contains itself is not widened
    # again inside itself).
    done: dict[type[BaseModel], type[BaseModel]] = field(default_factory=dict)

    def widened_fields(self, model: type[BaseModel]) -> dict[str, Any]:
        """``create_model`` field definitions for the fields of ``model`` that change."""
        fields: dict[str, Any] = {}
        for name, info in model.model_fields.items():
            annotation = self.widen(info.annotation)
            if annotation is not info.annotation:
                fields[name] = (annotation, self._field_info(info, annotation))
        return fields

    def widen(self, annotation: Any) -> Any:
        """``annotation`` with plugin-kind configs replaced; the same object when nothing is."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self._widen_model(annotation)
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is Annotated:
            inner = self.widen(args[0])
            return annotation if inner is args[0] else Annotated[(inner, *annotation.__metadata__)]
        if origin in (Union, types.UnionType):
            return self._widen_union(annotation, args)
        if origin in _CONTAINERS and args:
            widened = tuple(self.widen(arg) for arg in args)
            return annotation if _same(widened, args) else origin[widened]
        return annotation

    def _widen_model(self, model: type[BaseModel]) -> Any:
        kind = kind_of_config(model)
        if kind is not None and kind != "algorithm" and literal_name(model, kind) is None:
            return self._choices(model, kind)
        if model in self.done:
            return self.done[model]
        self.done[model] = model
        fields = self.widened_fields(model)
        if fields:
            self.done[model] = create_model(
                model.__name__, __base__=model, __module__=model.__module__, **fields
            )
        return self.done[model]

    def _widen_union(self, annotation: Any, args: tuple[Any, ...]) -> Any:
        options = [arg for arg in args if arg is not type(None)]
        nullable = len(options) < len(args)
        single = _single_of_one_or_list(options)
        if single is not None:
            item = self.widen(single)
            if item is single:
                return annotation
            widened: Any = one_or_list(item)
        else:
            members = tuple(self.widen(arg) for arg in options)
            if _same(members, tuple(options)):
                return annotation
            widened = Union[members]  # noqa: UP007
        return Union[widened, None] if nullable else widened  # noqa: UP007

    def _choices(self, base: type[BaseModel], kind: str) -> Any:
        entries = [e for e in self.registry.entries(kind) if issubclass(e.config, base) and self._fits(e)]
        if not entries:
            return Annotated[base, BeforeValidator(_nothing_installed(kind, base))]
        widened = [replace(e, config=self._widen_model(e.config)) for e in entries]
        return union_of(widened, kind)

    def _fits(self, entry: Entry) -> bool:
        """Narrowing by the algorithm's registration: the batch types its pieces exchange."""
        wanted = {"data_format": self.meta.get("batch"), "loss": self.meta.get("loss_batch")}.get(entry.kind)
        return wanted is None or entry.meta.get("batch") is wanted

    def _field_info(self, info: FieldInfo, annotation: Any) -> FieldInfo:
        widened = copy.copy(info)
        widened.annotation = annotation
        if info.default_factory is not None:
            factory = info.default_factory
            widened.default_factory = lambda: _as_data(factory())  # type: ignore[call-arg]
            widened.validate_default = True
        elif info.default is not PydanticUndefined:
            widened.default = _as_data(info.default)
            widened.validate_default = True
        else:
            default = self._default_entry(annotation)
            if default is not None:
                widened.default = default
                widened.validate_default = True
        return widened

    def _default_entry(self, annotation: Any) -> dict[str, str] | None:
        """The default of a required field of a kind the algorithm names a default for."""
        kind = _kind_in(annotation)
        if kind not in DEFAULT_OPTION:
            return None
        option, fallback = DEFAULT_OPTION[kind]
        name = self.meta.get(option, fallback)
        return {discriminator(kind): name} if name else None


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _single_of_one_or_list(options: list[Any]) -> Any:
    """``X`` when ``options`` are ``[X, list[X]]`` (in either order), else None."""
    if len(options) != 2:
        return None
    for one, many in (options, options[::-1]):
        if get_origin(many) is list and get_args(many) == (one,):
            return one
    return None


def _kind_in(annotation: Any) -> str | None:
    """The plugin kind of the first config class inside a (widened) annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return kind_of_config(annotation)
    for arg in get_args(annotation):
        kind = _kind_in(arg)
        if kind is not None:
            return kind
    return None


def _as_data(value: Any) -> Any:
    """A default as plain data, so that the widened field validates it into the plugin's own
    config class (a base-class instance such as ``RolloutEngineConfig(name='hf')`` is not one)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, (list, tuple)):
        return type(value)(_as_data(item) for item in value)
    if isinstance(value, dict):
        return {key: _as_data(item) for key, item in value.items()}
    return value


def _nothing_installed(kind: str, base: type[BaseModel]) -> Callable[[Any], Any]:
    def refuse(value: Any) -> Any:
        raise ValueError(
            f"no installed {kind.replace('_', ' ')} plugin fits here ({base.__name__}); "
            f"install one (see `align list`)"
        )

    return refuse
