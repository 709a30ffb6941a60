"""From YAML + dotted overrides to a validated run config, with errors a user can act on."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from align.config import RunConfig
from align.errors import ConfigError
from align.registry import Entry, Registry
from align.widening import MANY, ONE, run_config_class


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    data.pop("_provenance", None)  # written beside outputs; lets a run's config.yaml be rerun
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, bools, lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        value = yaml.safe_load(raw) if raw else ""
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, item)
        _assign(node, parts[-1], value, item)
    return data


def _child(node: Any, part: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if not isinstance(node, dict):
        raise ConfigError(f"override '{item}': '{part}' is inside a value that is not a mapping")
    if not isinstance(node.get(part), (dict, list)):
        node[part] = {}
    return node[part]


def _assign(node: Any, part: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, item)] = value
    else:
        node[part] = value


def _index(node: list[Any], part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{item}': '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def _fill_defaults(data: dict[str, Any], algorithm: Entry) -> dict[str, Any]:
    data = dict(data)
    data.setdefault("algo", algorithm.name)
    fmt = algorithm.meta.get("data_format")
    if fmt and isinstance(data.get("data"), dict):
        data["data"] = {"format": fmt, **data["data"]}
    if "output_dir" not in data:
        data["output_dir"] = f"runs/{algorithm.name}"
    return data


def validate_run_config(
    data: dict[str, Any], registry: Registry, algo: str | None = None, source: str = "config"
) -> RunConfig:
    """Validate a whole run config tree; raise ``ConfigError`` naming every bad key/value."""
    name = algo or data.get("algo")
    if not name:
        raise ConfigError(f"{source}: no algorithm given: pass --algo NAME or set `algo:` in the YAML")
    if algo and data.get("algo") not in (None, algo):
        data = {**data, "algo": algo}
    algorithm = registry.get("algorithm", str(name))
    cls = run_config_class(algorithm, registry)
    data = _fill_defaults(data, algorithm)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls, data, source)) from None


def format_validation_error(
    exc: ValidationError, cls: type[BaseModel], data: dict[str, Any], source: str
) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        path = _user_path(err["loc"], data)
        lines.append(f"  - {'.'.join(map(str, path)) or '<root>'}: {_describe(err, cls, data, path)}")
    return "\n".join(lines)


def _user_path(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """The error location as the user wrote it: drops the union tags pydantic inserts."""
    path: list[Any] = []
    node = data
    for position, seg in enumerate(loc):
        is_last = position == len(loc) - 1  # a tag is always followed by the key it selects
        if (isinstance(node, dict) and seg in node) or (
            isinstance(node, list) and isinstance(seg, int) and seg < len(node)
        ):
            node = node[seg]
        elif seg in (ONE, MANY) or (not is_last and isinstance(node, dict) and seg in _tags(node)):
            continue
        else:
            node = None
        path.append(seg)
    return path


def _tags(node: dict[str, Any]) -> set[str]:
    return {str(node.get("name")), str(node.get("format")), str(node.get("algo"))}


def _describe(err: Any, cls: type[BaseModel], data: dict[str, Any], path: list[Any]) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(cls, data, path[:-1])
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.5)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key{suggestion}. Allowed keys here: {', '.join(sorted(allowed))}"
    if kind == "union_tag_invalid":
        key = ctx.get("discriminator", "name").strip("'")
        what = " ".join(str(p) for p in path[-1:]) + ("" if key == "name" else f" {key}")
        return (
            f"unknown {what} {ctx.get('tag')!r}; installed choices: {ctx.get('expected_tags', '')}. "
            f"Install a plugin that provides it (see `align list`)."
        )
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error" and path and path[-1] in ("name", "format", "algo"):
        return (
            f"unknown choice {err.get('input')!r}; installed choices: {ctx.get('expected')}. "
            f"Install a plugin that provides it (see `align list`)."
        )
    return f"{err['msg']} (got {err.get('input')!r})"


def _allowed_keys(cls: type[BaseModel], data: Any, path: list[Any]) -> list[str]:
    model: Any = cls
    node = data
    for seg in path:
        if model is None:
            return []
        node = node[seg] if isinstance(node, (dict, list)) else None
        if isinstance(seg, int):
            model = _pick_model(model, node)
            continue
        field = (
            model.model_fields.get(seg) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        model = _pick_model(field.annotation, node) if field is not None else None
    model = _pick_model(model, node)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _pick_model(annotation: Any, node: Any) -> Any:
    """The pydantic model inside ``annotation`` (Annotated/Union/list) that ``node`` is meant for."""
    candidates = [m for m in _models_in(annotation)]
    if not candidates:
        return None
    if isinstance(node, dict):
        for model in candidates:
            for key in ("name", "format", "algo"):
                field = model.model_fields.get(key)
                if field is not None and node.get(key) == field.default:
                    return model
    return candidates[0]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, list, typing.Annotated) or origin is Annotated:
        return [m for arg in get_args(annotation) for m in _models_in(arg)]
    return []
