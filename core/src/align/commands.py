"""Subcommands that plugins add to the ``align`` CLI through the ``register_commands`` hook.

A command is a name, a help line, a function adding its argparse arguments and a function
running it with the parsed arguments and the loaded plugins. They are collected after the
plugins load and before the command line is parsed, so ``align --help`` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from align.errors import UserError

if TYPE_CHECKING:
    from align.plugins import Plugins

Arguments = Callable[[argparse.ArgumentParser], None]
RunCommand = Callable[[argparse.Namespace, "Plugins"], None]


class AddCommand(Protocol):
    def __call__(self, name: str, help: str, arguments: Arguments, run: RunCommand) -> None: ...


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Arguments
    run: RunCommand
    package: str


def plugin_commands(plugins: Plugins, taken: dict[str, str]) -> dict[str, Command]:
    """Every plugin's commands by name. ``taken`` maps the names already used (the built-in
    commands) to their package; a plugin reusing one is a user error naming both packages."""
    commands: dict[str, Command] = {}
    owners = dict(taken)
    for impl in plugins.manager.hook.register_commands.get_hookimpls():
        package = _package_of(plugins, impl.plugin_name)

        def add_command(
            name: str, help: str, arguments: Arguments, run: RunCommand, package: str = package
        ) -> None:
            if name in owners:
                raise UserError(
                    f"the command 'align {name}' is registered by both '{owners[name]}' and '{package}'; "
                    "uninstall one, or restrict loading with ALIGN_PLUGINS"
                )
            owners[name] = package
            commands[name] = Command(name, help, arguments, run, package)

        impl.function(add_command=add_command)
    return commands


def _package_of(plugins: Plugins, plugin_name: str) -> str:
    return plugins.origin.get(plugin_name, (plugin_name, ""))[0]
