"""``align serve reward CONFIG`` and ``align serve critic CONFIG``: a model server in the
foreground until Ctrl-C or SIGTERM. ``python -m align_pytriton.serve KIND CONFIG`` is the same
command without the CLI (how a run starts its child servers).

    reward: {name: model, path: runs/reward/final}   # any installed reward
    server: {host: 127.0.0.1, http_port: 8000, grpc_port: 8001, metrics_port: 8002}
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

import align
from align_pytriton.config import ServerSettings

KINDS = ("reward", "critic")


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which server: reward or critic")
    parser.add_argument(
        "config",
        help="reward: YAML with `reward:` and `server:` (host, ports, batching); critic: the PPO run config "
        "(its `critic:` section, with critic.server)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. server.http_port=9000")


def run(args: argparse.Namespace, plugins: align.Plugins) -> None:
    serve_kind(args.kind, args.config, list(args.overrides), plugins)


def child_arguments(parser: argparse.ArgumentParser) -> None:
    arguments(parser)
    parser.add_argument(
        "--folder",
        help="(a run's child server) the temporary folder of its config and log: PyTriton's workspace "
        "goes there, and it is removed if the run that started the server is gone when it stops",
    )


def serve_kind(
    kind: str, path: str, overrides: Sequence[str], plugins: align.Plugins, workspace: Path | None = None
) -> None:
    data = apply_overrides(read_config(path), overrides)
    if kind == "critic":
        _serve_critic(data, plugins, path, workspace)
        return
    unknown = sorted(set(data) - {kind, "server"})
    if unknown:
        raise align.ConfigError(
            f"{path}: unknown keys {unknown}; a {kind} server config has `{kind}:` and `server:`"
        )
    settings = validated(ServerSettings, data.get("server") or {}, f"{path}, server")
    _serve_reward(data.get(kind) or {}, settings, plugins, path, workspace)


def _serve_reward(
    section: dict[str, Any],
    settings: ServerSettings,
    plugins: align.Plugins,
    path: str,
    workspace: Path | None,
) -> None:
    from align_pytriton.reward import reward_endpoint
    from align_pytriton.server import serve

    if not section.get("name"):
        raise align.ConfigError(
            f"{path}: `reward:` needs a name, e.g. {{name: model, path: runs/reward/final}}"
        )
    if section["name"] == "remote":
        raise align.ConfigError(f"{path}: reward: a reward server cannot serve the 'remote' reward itself")
    entry = plugins.registry.get("reward", str(section["name"]))
    cfg = validated(entry.config, section, f"{path}, reward")
    reward = align.build_reward(cfg, plugins.registry)
    serve(settings, [reward_endpoint(reward)], f"reward server ({cfg.name})", workspace)


def _serve_critic(data: dict[str, Any], plugins: align.Plugins, path: str, workspace: Path | None) -> None:
    from align_pytriton.critic import CriticModel, critic_endpoints
    from align_pytriton.server import serve

    run = align.validate_run_config(data, plugins.registry, source=path)
    critic = CriticModel(run, plugins)
    serve(run.critic.server, critic_endpoints(critic), f"critic server ({run.model.path})", workspace)  # type: ignore[attr-defined]


def read_config(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise align.ConfigError(f"server config not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise align.ConfigError(f"{path}: cannot read the server config: {exc}") from None
    if not isinstance(data, dict):
        raise align.ConfigError(f"{path}: a server config is a mapping (`reward:`/`critic:` and `server:`)")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=value`` (value parsed as YAML) into ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise align.ConfigError(f"override {item!r} is not KEY=VALUE (e.g. server.http_port=9000)")
        *parents, last = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise align.ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[last] = yaml.safe_load(raw)
    return data


def validated(cls: type[BaseModel], data: Any, where: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise align.ConfigError(f"invalid server config ({where}): {problems}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command without the CLI's parser; user errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m align_pytriton.serve")
    child_arguments(parser)
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else None
    parent = os.getppid()
    try:
        serve_kind(
            args.kind,
            args.config,
            list(args.overrides),
            align.load_plugins(),
            folder / "workspace" if folder else None,
        )
    except align.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if folder is not None and os.getppid() != parent:  # orphaned: nobody else cleans up
            shutil.rmtree(folder, ignore_errors=True)
            # tritonserver's Python stubs outlive it by seconds: take this session's stragglers
            # down now, this process last (nobody waits for its exit code)
            if os.getpgid(0) == os.getpid():  # only a group of our own (a run's child server)
                os.killpg(os.getpid(), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
