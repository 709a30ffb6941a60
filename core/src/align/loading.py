"""From YAML + dotted overrides to a validated run config, with errors a user can act on."""

from __future__ import annotations

import difflib
import json
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from align.config import PathRule, RunConfig
from align.datafiles import source_problem
from align.errors import ConfigError
from align.registry import KINDS, Entry, Registry
from align.widening import DEFAULT_OPTION, MANY, ONE, run_config_class


class ConfigLoader(yaml.SafeLoader):
    """Safe YAML with two fixes for configs: a key given twice in one mapping is an error
    (PyYAML silently keeps the last), and ``1e-5`` is a number, as in YAML 1.2 (YAML 1.1, which
    PyYAML follows, reads it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<: *base` may be overridden by the mapping's own
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first given on line {earlier}; YAML would silently keep "
                    "only the last)",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc.context}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character {exc.position + 1}: {exc.character!r} is not allowed in YAML"
    return str(exc)


def parse_yaml(text: str) -> Any:
    """``text`` as config YAML (see ``ConfigLoader``); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds plain data only


def _read_config_text(path: Path) -> str:
    try:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a YAML config file")
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8"
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = parse_yaml(_read_config_text(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    data.pop("_provenance", None)  # written beside outputs; lets a run's config.yaml be rerun
    return data


_KEY_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def _override_parts(item: str) -> tuple[list[str], str]:
    """``a.b.c=value`` -> (["a", "b", "c"], "value"), or a ``ConfigError`` saying what is wrong."""
    key, sep, raw = item.partition("=")
    example = "write key.path=value, e.g. trainer.max_steps=20"
    if not sep:
        raise ConfigError(f"override '{item}' has no '=': {example}")
    if not key:
        raise ConfigError(f"override '{item}' has no key before '=': {example}")
    parts = key.split(".")
    if "" in parts:
        raise ConfigError(
            f"override '{item}': the key '{key}' has an empty part (a leading, trailing or doubled "
            f"'.'): {example}"
        )
    odd = next((part for part in parts if not _KEY_PART.match(part)), None)
    if odd is not None:
        raise ConfigError(
            f"override '{item}': '{odd}' is not a key (keys are letters, digits, '_' and '-', without spaces)"
        )
    return parts, raw


def _override_value(item: str, raw: str) -> Any:
    if not raw:
        return ""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{item}': the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
            "quote it to pass it as text"
        ) from None


# What a plugin section keeps when an override switches it to another plugin: the rest of its
# settings were the old plugin's.
KEPT_ON_SWITCH = ("name", "weight")


def apply_overrides(
    data: dict[str, Any],
    overrides: list[str],
    notes: list[str] | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, bools, lists).

    With ``registry``, an override that switches a section to another installed plugin of the
    same kind (``loss.name=simpo`` where the YAML has ``loss: {name: dpo, beta: 0.1}``) drops
    the settings the YAML gave the old plugin, so the new one starts from its own defaults
    (SimPO's ``beta`` is 2.0, not DPO's 0.1); settings given as overrides (``loss.beta=2.5``)
    and ``weight`` are kept. What was dropped is told in ``notes``. A section that is no plugin
    (``optim.name=sgd``) keeps its settings."""
    parsed = [(item, *_override_parts(item)) for item in overrides]
    given = {tuple(parts) for _, parts, _ in parsed}
    for item, parts, raw in parsed:
        value = _override_value(item, raw)
        node: Any = data
        for part in parts[:-1]:
            node = _child(node, part, item)
        if parts[-1] == "name" and isinstance(node, dict) and _switches_plugin(registry, node, value):
            _forget_old_plugin(node, parts[:-1], value, given, notes)
        _assign(node, parts[-1], value, item)
    return data


def _switches_plugin(registry: Registry | None, section: dict[str, Any], name: Any) -> bool:
    old = section.get("name")
    if registry is None or not isinstance(old, str) or not isinstance(name, str) or old == name:
        return False
    return any({old, name} <= {entry.name for entry in registry.entries(kind)} for kind in _SWITCHABLE)


# Plugin kinds whose config a run names with ``name:`` (data formats switch by ``format``, whose
# section holds the files: never dropped).
_SWITCHABLE = ("loss", "reward", "rollout_engine", "backend", "callback", "advantage_estimator", "critic")


def _forget_old_plugin(
    section: dict[str, Any], where: list[str], name: Any, given: set[tuple[str, ...]], notes: list[str] | None
) -> None:
    old = section.get("name")
    dropped = {
        key: section.pop(key)
        for key in list(section)
        if key not in KEPT_ON_SWITCH and (*where, key) not in given
    }
    if dropped and notes is not None:
        key = ".".join(where)
        settings = ", ".join(f"{k}: {_shown(v)}" for k, v in dropped.items())
        notes.append(
            f"{key}.name={name}: the config's settings for '{old}' ({settings}) are not carried "
            f"over; '{name}' starts from its own defaults (set them with {key}.KEY=VALUE)"
        )


def _child(node: Any, part: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if not isinstance(node, dict):
        raise ConfigError(f"override '{item}': '{part}' is inside a value that is not a mapping")
    if node.get(part) is not None and not isinstance(node[part], (dict, list)):
        raise ConfigError(
            f"override '{item}': '{part}' holds a value ({_shown(node[part])}), not a mapping of keys"
        )
    if node.get(part) is None:
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
    # `backend.device=cuda` alone (no YAML section) names no backend: it is the default one.
    for key, (option, fallback) in DEFAULT_OPTION.items():
        default = algorithm.meta.get(option, fallback)
        if default and isinstance(data.get(key), dict) and "name" not in data[key]:
            data[key] = {"name": default, **data[key]}
    return data


def validate_run_config(
    data: dict[str, Any], registry: Registry, algo: str | None = None, source: str = "config"
) -> RunConfig:
    """Validate a whole run config tree; raise ``ConfigError`` naming every bad key/value."""
    name = algo or data.get("algo")
    if not name:
        raise ConfigError(f"{source}: no algorithm given: pass --algo NAME or set `algo:` in the YAML")
    algorithm = registry.get("algorithm", str(name))
    if algo and data.get("algo") not in (None, algo):
        raise ConfigError(
            f"{source}: --algo {algo} contradicts `algo: {data['algo']}` in the config; "
            "drop one of them or make them agree"
        )
    cls = run_config_class(algorithm, registry)
    data = _fill_defaults(data, algorithm)
    try:
        return cls.model_validate_json(_as_json(data, source), strict=True)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, cls, data, source, fits=PluginFit(registry, algorithm))
        ) from None


def _as_json(data: dict[str, Any], source: str) -> str:
    """The config as JSON, so that it validates strictly as plain data would (``true`` is not 1,
    ``"3"`` is not 3, ``2.0`` is not an integer) while a string still makes a path and a list a
    tuple. Values YAML has beyond JSON (dates) become strings."""
    try:
        return json.dumps(data, default=str)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: holds a value that is not plain data ({exc})") from None


# ---- paths: checked before any model loads -------------------------------------------------------


def check_paths(cfg: RunConfig) -> None:
    """Stop with one ``ConfigError`` listing every path of the wrong kind or permission: the
    folders the run writes (``output_dir`` and every plugin field typed ``align.WritableDir``),
    the data files, a local model folder. Run after validation, before any model is loaded or
    any pair scored (``align run``, ``align validate``). Creates nothing but a probe file, removed
    at once."""
    problems = [*_folder_problems(cfg), *_data_problems(cfg), *_model_problems(cfg)]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        lines = ["paths in the config that cannot work:", *(f"  - {p}" for p in problems)]
        raise ConfigError("\n".join(lines))


def _folder_problems(cfg: RunConfig) -> Iterator[str]:
    for key, path in _writable_dirs(cfg):
        problem = writable_dir_problem(path)
        if problem:
            yield f"{key}: {problem}"


def writable_dir_problem(path: Path) -> str | None:
    """Why align could not write into the folder ``path`` (``None``: it could)."""
    path = path.expanduser()
    try:
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        if path.is_symlink() and not path.exists():
            return f"{path} is a broken link"
        existing = path
        while not existing.exists():  # the nearest existing folder: where mkdir would start
            existing = existing.parent
        if not existing.is_dir():
            return f"{path} cannot be created: {existing} is a file"
        if not can_write(existing):
            if existing == path:
                return f"{path} is read-only"
            return f"{path} cannot be created: {existing} is read-only"
    except OSError as exc:
        return f"{path} cannot be checked: {exc.strerror}"
    return None


def can_write(folder: Path) -> bool:
    """Probe by creating a file: ``os.access`` answers yes to root on a read-only folder it may
    not write to, and knows nothing of quotas or some network file systems."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".align-write-probe-"):
            return True
    except OSError:
        return False


def _writable_dirs(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """(dotted key, path) of every field typed ``align.WritableDir`` that is set, at any depth."""
    for name, info in type(model).model_fields.items():
        value, key = getattr(model, name, None), f"{prefix}{name}"
        if isinstance(value, Path) and _has_rule(info.annotation, info.metadata, "writable_dir"):
            yield key, value
        children = value if isinstance(value, list) else [value]
        for index, child in enumerate(children):
            if isinstance(child, BaseModel):
                yield from _writable_dirs(child, f"{key}.{index}." if isinstance(value, list) else f"{key}.")


def _has_rule(annotation: Any, metadata: list[Any], kind: str) -> bool:
    if any(isinstance(item, PathRule) and item.kind == kind for item in metadata):
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _has_rule(args[0], list(annotation.__metadata__), kind)
    if origin in (Union, types.UnionType):
        return any(_has_rule(arg, [], kind) for arg in args)
    return False


def _data_problems(cfg: RunConfig) -> Iterator[str]:
    for split in ("train", "eval"):
        spec = getattr(cfg.data, split, None)
        sources = [spec] if isinstance(spec, str) else spec
        if sources is not None and (not sources or not all(source.strip() for source in sources)):
            yield f"data.{split}: {spec!r} names no data (give a file, a saved dataset or a list of them)"
            continue
        for source in sources or []:
            problem = source_problem(source)
            if problem:
                yield f"data.{split}: {problem}"


def _model_problems(cfg: RunConfig) -> Iterator[str]:
    """A local model or tokenizer path that does not exist (a hub id cannot be checked offline)."""
    for key in ("path", "tokenizer"):
        spec = getattr(cfg.model, key, None)
        if isinstance(spec, str) and spec.startswith((".", "/", "~")):
            try:
                found = Path(spec).expanduser().exists()
            except OSError:
                found = False
            if not found:
                yield f"model.{key}: no such file or folder: {spec}"


@dataclass(frozen=True)
class PluginFit:
    """What tells an unknown plugin name from an installed one that does not fit the algorithm
    (a data format yielding another batch type, a loss reading another)."""

    registry: Registry
    algorithm: Entry

    def note(self, tag: str, choices: list[str]) -> str | None:
        """Why the installed ``tag`` is not among ``choices``; None when it is not installed."""
        kind = self._kind_of(tag, choices)
        if kind is None:
            return None
        entry = self.registry.get(kind, tag)
        what, algo = kind.replace("_", " "), self.algorithm.name
        wanted = {"data_format": "batch", "loss": "loss_batch"}.get(kind)
        theirs, ours = entry.meta.get("batch"), self.algorithm.meta.get(wanted or "")
        verb, reads = ("yields", " reads") if kind == "data_format" else ("reads", "'s losses read")
        why = (
            f": it {verb} {theirs.__name__} and {algo}{reads} {ours.__name__}"
            if isinstance(theirs, type) and isinstance(ours, type)
            else ""
        )
        return (
            f"{what} {tag!r} is installed ({entry.package} {entry.version}) but does not fit "
            f"--algo {algo}{why}. Choices that fit: {', '.join(map(repr, choices)) or 'none'}"
        )

    def _kind_of(self, tag: str, choices: list[str]) -> str | None:
        for kind in KINDS:
            names = {entry.name for entry in self.registry.entries(kind)}
            if kind not in ("algorithm", "lifecycle") and tag in names and set(choices) <= names:
                return kind
        return None


def format_validation_error(
    exc: ValidationError,
    cls: type[BaseModel],
    data: dict[str, Any],
    source: str,
    fits: PluginFit | None = None,
) -> str:
    """One line per error, each at the key path the user wrote; with ``fits``, a plugin name
    that is installed but does not fit the algorithm is told apart from an unknown one."""
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        path = _user_path(err["loc"], data)
        lines.append(f"  - {'.'.join(map(str, path)) or '<root>'}: {_describe(err, cls, data, path, fits)}")
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
        elif isinstance(seg, str) and node is not None and not isinstance(node, (dict, list)):
            continue  # a plain value has no keys: `str` or `list[str]`, the member of a union tried
        else:
            node = None
        path.append(seg)
    return path


def _tags(node: dict[str, Any]) -> set[str]:
    return {str(node.get("name")), str(node.get("format")), str(node.get("algo"))}


def _describe(
    err: Any, cls: type[BaseModel], data: dict[str, Any], path: list[Any], fits: PluginFit | None = None
) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(cls, data, path[:-1])
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.5)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key{suggestion}. Allowed keys here: {', '.join(sorted(allowed))}"
    unfit = _unfit_plugin(err, path, fits)
    if unfit:
        return unfit
    if kind == "union_tag_invalid":
        key = ctx.get("discriminator", "name").strip("'")
        named = [str(p) for p in path if isinstance(p, str)]  # `loss`, not the `1` of loss.1
        what = " ".join(named[-1:]) + ("" if key == "name" else f" {key}")
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
    if kind == "value_error":  # our validators' messages name the keys and values themselves
        return str(ctx.get("error", err["msg"]))
    message = str(err["msg"]).replace("an object", "a mapping of keys").replace("a valid array", "a list")
    return f"{message}{_type_hint(kind, err.get('input'))} (got {_shown(err.get('input'))})"


def _unfit_plugin(err: Any, path: list[Any], fits: PluginFit | None) -> str | None:
    """The note for a plugin name that is installed but not a choice here (None otherwise)."""
    kind, ctx = err["type"], err.get("ctx", {})
    if fits is None:
        return None
    if kind == "union_tag_invalid":
        tag, choices = str(ctx.get("tag")), str(ctx.get("expected_tags", ""))
    elif kind == "literal_error" and path and path[-1] in ("name", "format"):
        tag, choices = str(err.get("input")), str(ctx.get("expected", ""))
    else:
        return None
    return fits.note(tag, re.findall(r"'([^']*)'", choices))


_NUMBER_ERRORS = ("int_type", "int_from_float", "float_type", "int_parsing", "float_parsing")


def _type_hint(kind: str, value: Any) -> str:
    """Why a value that lax parsing would have taken is refused."""
    if kind in _NUMBER_ERRORS and isinstance(value, bool):
        return ": true/false is not a number"
    if kind in _NUMBER_ERRORS and isinstance(value, str) and _is_number(value):
        return ": a quoted value is text, write the number without quotes"
    if kind in ("int_type", "int_from_float") and isinstance(value, float):
        return f": write it as a whole number{f' ({int(value)})' if value.is_integer() else ''}"
    if kind == "bool_type" and value is not None:
        return ": write true or false"
    return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML (``true``, ``null``), Python's repr otherwise."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value)


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
