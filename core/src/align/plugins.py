"""Finds plugins (entry-point group ``align``), registers them with pluggy, fills the registry.

A plugin that fails to import is reported by name and skipped; the others still load.
``ALIGN_PLUGINS=a,b`` loads only the named entry points. ``ALIGN_PLUGIN_MODULES=pkg.mod``
additionally registers importable modules without installing them (handy while developing).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points, version
from types import ModuleType

import pluggy

from align import hookspecs
from align.registry import KINDS, BrokenPlugin, Registry

GROUP = "align"
HOOK_OF_KIND = {
    "algorithm": "register_algorithms",
    "loss": "register_losses",
    "rollout_engine": "register_rollout_engines",
    "reward": "register_rewards",
    "data_format": "register_data_formats",
    "backend": "register_backends",
}
BUILTIN_MODULES = ("align.builtin.data", "align.builtin.prompts")


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported; it is skipped."""


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registry: Registry


def _csv_env(name: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def _core_version() -> str:
    try:
        return version("align")
    except Exception:
        return "0+unknown"


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
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the others down
            message = f"{type(exc).__name__}: {exc}"
            registry.broken.append(BrokenPlugin(ep.name, package, pkg_version, message))
            warnings.warn(
                f"align plugin '{ep.name}' from package '{package}' failed to load and is "
                f"skipped ({message})",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        origin[ep.name] = (package, pkg_version)
    return origin


def _register_modules(manager: pluggy.PluginManager, names: list[str]) -> dict[str, tuple[str, str]]:
    origin = {}
    for name in names:
        module: ModuleType = importlib.import_module(name)
        manager.register(module, name=name)
        origin[name] = (name, "local")
    return origin


def _fill_registry(
    manager: pluggy.PluginManager, registry: Registry, origin: dict[str, tuple[str, str]]
) -> None:
    for kind in KINDS:
        hook = getattr(manager.hook, HOOK_OF_KIND[kind])
        # Called one implementation at a time so every entry knows which package made it.
        for impl in reversed(hook.get_hookimpls()):
            package, pkg_version = origin.get(impl.plugin_name, ("align", _core_version()))
            impl.function(register=registry.register_callable(kind, package, pkg_version))


def load_plugins(packages: frozenset[str] | None = None) -> Plugins:
    """A fresh plugin manager and registry with every installed plugin loaded (or only the
    entry points of the named distributions)."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry()
    origin = {name: ("align", _core_version()) for name in BUILTIN_MODULES}
    _register_modules(manager, list(BUILTIN_MODULES))
    origin |= _load_entry_points(manager, registry, packages)
    origin |= _register_modules(manager, _csv_env("ALIGN_PLUGIN_MODULES"))
    _fill_registry(manager, registry, origin)
    return Plugins(manager, registry)


@cache
def default_plugins() -> Plugins:
    """Plugins loaded once per process (the CLI and ``align.run`` use this)."""
    return load_plugins()
