"""Finds plugins (entry-point group ``align``), registers them with pluggy, fills the registry.

A plugin that fails to import, or whose ``register_*`` hook raises (a misspelt registration
option, for one), is reported by name and skipped, with none of its entries or hooks; the
others still load. ``ALIGN_PLUGINS=a,b`` loads only the named entry points.
``ALIGN_PLUGIN_MODULES=pkg.mod`` additionally registers importable modules without installing
them (handy while developing).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points, version
from typing import Any

import pluggy

from align import hookspecs
from align.config import RunConfig
from align.registry import BrokenPlugin, Entry, NoConfig, Registry

GROUP = "align"
HOOK_OF_KIND = {
    "algorithm": "register_algorithms",
    "loss": "register_losses",
    "rollout_engine": "register_rollout_engines",
    "reward": "register_rewards",
    "advantage_estimator": "register_advantage_estimators",
    "critic": "register_critics",
    "data_format": "register_data_formats",
    "backend": "register_backends",
    "callback": "register_callbacks",
}
LIFECYCLE_HOOKS = ("on_train_start", "on_step_end", "on_checkpoint", "on_train_end")
BUILTIN_MODULES = ("align.builtin.data", "align.builtin.prompts", "align.builtin.callbacks")


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported or registered; it is skipped."""


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registry: Registry
    # pluggy plugin name -> (distribution, version): who registered a hook implementation
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)


def _csv_env(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _core_version() -> str:
    try:
        return version("align")
    except Exception:
        return "0+unknown"


def _report_broken(registry: Registry, name: str, package: str, pkg_version: str, exc: Exception) -> None:
    message = f"{type(exc).__name__}: {exc}"
    registry.broken.append(BrokenPlugin(name, package, pkg_version, message))
    warnings.warn(
        f"align plugin '{name}' from package '{package}' failed to load and is skipped ({message})",
        PluginLoadWarning,
        stacklevel=3,
    )


def _load_entry_points(
    manager: pluggy.PluginManager, registry: Registry, packages: frozenset[str] | None
) -> dict[str, tuple[str, str]]:
    wanted = set(_csv_env("ALIGN_PLUGINS"))
    origin: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group=GROUP):
        if wanted and ep.name not in wanted:
            continue
        dist = ep.dist
        package, pkg_version = (dist.name, dist.version) if dist else (ep.value, "?")
        if packages is not None and package not in packages:
            continue
        try:
            manager.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the others down
            _report_broken(registry, ep.name, package, pkg_version, exc)
            continue
        origin[ep.name] = (package, pkg_version)
    return origin


def _register_modules(
    manager: pluggy.PluginManager, registry: Registry, names: list[str], package: str | None = None
) -> dict[str, tuple[str, str]]:
    """Modules by import path: the core's built-ins (``package`` align), or the developer's own
    (``ALIGN_PLUGIN_MODULES``, each its own package, reported as broken when it fails)."""
    origin = {}
    for name in names:
        attribution = (package, _core_version()) if package else (name, "local")
        if package:  # a built-in that fails to import is a bug of the core: let it raise
            manager.register(importlib.import_module(name), name=name)
        else:
            try:
                manager.register(importlib.import_module(name), name=name)
            except Exception as exc:
                _report_broken(registry, name, *attribution, exc)
                continue
        origin[name] = attribution
    return origin


def _hookimpls_of(manager: pluggy.PluginManager, plugin: object) -> dict[str, Any]:
    """Hook name -> this plugin's implementation of it."""
    return {
        caller.name: impl
        for caller in manager.get_hookcallers(plugin) or []
        for impl in caller.get_hookimpls()
        if impl.plugin is plugin
    }


def _registrations(impls: dict[str, Any], registry: Registry, package: str, pkg_version: str) -> list[Entry]:
    """Everything one plugin registers, from all its ``register_*`` hooks (raises if one does)."""
    entries: list[Entry] = []
    for kind, hook in HOOK_OF_KIND.items():
        if hook in impls:
            impls[hook].function(register=registry.register_callable(kind, package, pkg_version, entries))
    return entries


def _lifecycle_entry(name: str, plugin: object, hooks: list[str], package: str, pkg_version: str) -> Entry:
    return Entry("lifecycle", name, NoConfig, plugin, package, pkg_version, {"hooks": tuple(hooks)})


def _fill_registry(
    manager: pluggy.PluginManager, registry: Registry, origin: dict[str, tuple[str, str]]
) -> None:
    # One plugin at a time, so every entry knows which package made it, and a plugin whose
    # hook raises leaves nothing half-registered behind.
    for name, plugin in manager.list_name_plugin():
        package, pkg_version = origin.get(name, ("align", _core_version()))
        impls = _hookimpls_of(manager, plugin)
        try:
            entries = _registrations(impls, registry, package, pkg_version)
        except Exception as exc:
            manager.unregister(plugin)
            _report_broken(registry, name, package, pkg_version, exc)
            continue
        for entry in entries:
            registry.add(entry)
        hooks = [hook for hook in LIFECYCLE_HOOKS if hook in impls]
        if hooks:
            registry.add(_lifecycle_entry(name, plugin, hooks, package, pkg_version))


def _add_builtin_sinks(manager: pluggy.PluginManager, registry: Registry) -> None:
    """The metrics sinks are registered per run by the trainer; listed here so that `align
    list` shows every lifecycle plugin."""
    from align.builtin.sinks import BUILTIN_SINKS

    for name, sink in BUILTIN_SINKS.items():
        # hasattr first: pluggy < 1.7 raises on a name the object lacks instead of returning None.
        hooks = [h for h in LIFECYCLE_HOOKS if hasattr(sink, h) and manager.parse_hookimpl_opts(sink, h)]
        registry.add(_lifecycle_entry(name, sink, hooks, "align", _core_version()))


def load_plugins(packages: frozenset[str] | None = None) -> Plugins:
    """A fresh plugin manager and registry with every installed plugin loaded (or only the
    entry points of the named distributions)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry()
    origin = _register_modules(manager, registry, list(BUILTIN_MODULES), package="align")
    origin |= _load_entry_points(manager, registry, packages)
    origin |= _register_modules(manager, registry, _csv_env("ALIGN_PLUGIN_MODULES"))
    _fill_registry(manager, registry, origin)
    _add_builtin_sinks(manager, registry)
    return Plugins(manager, registry, origin)


@cache
def default_plugins() -> Plugins:
    """Plugins loaded once per process (the CLI and ``align.run`` use this)."""
    return load_plugins()


def callbacks_for(cfg: RunConfig, registry: Registry) -> list[Any]:
    """The lifecycle objects of the callbacks a run enables (its ``callbacks:`` list)."""
    return [registry.get("callback", c.name).factory(c, cfg) for c in cfg.callbacks]


@contextmanager
def registered_for_run(manager: pluggy.PluginManager, objects: list[Any]) -> Iterator[None]:
    """Registers lifecycle objects (sinks, callbacks) for the duration of one run, then closes
    (when they have ``close``) and unregisters them."""
    added = [obj for obj in objects if not manager.is_registered(obj)]
    for obj in added:
        manager.register(obj)
    try:
        yield
    finally:
        for obj in added:
            close = getattr(obj, "close", None)
            if callable(close):
                close()
            manager.unregister(obj)
