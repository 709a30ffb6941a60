"""The ``align`` command: run, validate, list, schema. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from align.commands import Command, plugin_commands
from align.config import RunConfig
from align.errors import UserError
from align.learner import process_rank
from align.loading import apply_overrides, check_paths, read_yaml, validate_run_config
from align.plugins import GROUP, Plugins, default_plugins
from align.registry import KINDS
from align.schemas import render, schema_for
from align.trainer import RunResult, train

console = Console()
errors = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: `--resum` must be an error, not silently `--resume`. Subcommand
    parsers are made with the same class, so every one of them inherits this."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _parser(extra: dict[str, Command]) -> argparse.ArgumentParser:
    parser = _Parser(prog="align", description="LLM alignment algorithms as plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "train with a YAML config"),
        ("validate", "check a config without loading models"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20")
        cmd.add_argument("--algo", help="algorithm name (else the config's `algo:`)")
        if name == "run":
            cmd.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    listing = sub.add_parser(
        "list",
        help="installed algorithms, losses, engines, rewards, data formats, backends, callbacks, "
        "lifecycle plugins, backend wrappers and plugin commands",
    )
    listing.add_argument("--kind", choices=(*KINDS, *EXTENSION_KINDS))
    listing.add_argument("--json", action="store_true")
    gen = sub.add_parser("generate", help="completions (and rewards) for a file of prompts, as JSONL")
    gen.add_argument("--model", default="tiny", help="model folder, HF id, or tiny (the embedded default)")
    gen.add_argument("--prompts", required=True, help="prompts file (JSONL/Parquet/...; a `prompt` column)")
    gen.add_argument("--out", required=True, help="output JSONL (kept unless overwrite=true)")
    gen.add_argument("--engine", help="rollout engine (hf, vllm, ...; default hf)")
    gen.add_argument("--reward", help="score completions with this reward (see `align list --kind reward`)")
    gen.add_argument("overrides", nargs="*", help="n=4 temperature=0.7 max_tokens=64 reward.key=value ...")
    schema = sub.add_parser("schema", help="JSON Schema of an algorithm's full run config")
    schema.add_argument("name")
    for command in extra.values():
        command.arguments(sub.add_parser(command.name, help=f"{command.help} ({command.package})"))
    return parser


def load_config(path: str, overrides: Sequence[str], algo: str | None, plugins: Plugins) -> RunConfig:
    """The validated config, with its paths checked (before any model loads)."""
    notes: list[str] = []
    data = apply_overrides(read_yaml(path), list(overrides), notes, plugins.registry)
    for text in notes:
        errors.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True)
    cfg = validate_run_config(data, plugins.registry, algo=algo, source=path)
    check_paths(cfg)
    return cfg


def cmd_run(args: argparse.Namespace, plugins: Plugins) -> None:
    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    cfg = load_config(args.config, overrides, args.algo, plugins)
    processes = int(getattr(cfg.backend, "nproc_per_node", 1) or 1)
    if processes > 1 and "RANK" not in os.environ:  # not under torchrun yet: start it
        raise SystemExit(launch_processes(processes, args))
    result = train(cfg, plugins)
    if process_rank() == 0:  # one summary for a distributed run, from its main rank
        _print_result(result)


def launch_processes(processes: int, args: argparse.Namespace) -> int:
    """``align run`` with the same arguments in ``processes`` processes on this node, under
    ``torchrun --standalone`` (a free local port); its exit code. A distributed backend asks for
    it with ``backend.nproc_per_node``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    command += ["-m", "align.cli", "run", args.config, *args.overrides]
    command += ["--algo", args.algo] if args.algo else []
    command += ["--resume"] if args.resume else []
    # torchrun gets SIGTERM when this process dies, even by SIGKILL: it then stops the ranks,
    # and their children (a critic server) follow them; nothing is left running unseen.
    linux = sys.platform.startswith("linux")
    torchrun = subprocess.Popen(command, preexec_fn=_terminate_with_parent if linux else None)
    with _signals_forwarded_to(torchrun) as received:
        code = torchrun.wait()
    if received:
        errors.print(
            f"stopped by {signal.Signals(received[0]).name}; rerun with --resume to continue from "
            "the last checkpoint"
        )
        return 128 + received[0]
    return code


@contextmanager
def _signals_forwarded_to(child: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """Pass SIGINT, SIGTERM and SIGHUP on to ``child`` (torchrun) and keep waiting for it; yields
    the signals received, in order.

    torchrun starts each rank in a session of its own, so a Ctrl-C reaches the launcher and
    torchrun but no rank; torchrun then stops the ranks itself. Python's default (a
    KeyboardInterrupt here, and ``subprocess`` SIGKILLing torchrun a quarter-second later) would
    leave the ranks running with nobody to stop them.
    """

    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    # A signal this process ignores (SIGINT of a job a script started with `&`) stays ignored.
    caught = [
        s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN
    ]
    previous = {s: signal.signal(s, forward) for s in caught}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _terminate_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _print_result(result: RunResult) -> None:
    console.print(f"\n[bold green]done[/]: {result.steps} steps. Outputs in [bold]{result.output_dir}[/]")
    # A LoRA run's final/ is a PEFT adapter (align-lora); anything else loads with from_pretrained.
    if (result.final_dir / "adapter_config.json").is_file():
        how = f"a LoRA adapter, PEFT format; full weights: align export {result.output_dir} --merge"
    else:
        how = "transformers from_pretrained"
    console.print(f"  final model: {result.final_dir}  ({how})")
    console.print(f"  metrics:     {result.output_dir / 'metrics.jsonl'}")
    keys = [k for k in result.eval_after if k in result.eval_before]
    if not keys:
        return
    table = Table(title="held-out evaluation")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in keys:
        table.add_row(key, f"{result.eval_before[key]:.4f}", f"{result.eval_after[key]:.4f}")
    console.print(table)


def cmd_validate(args: argparse.Namespace, plugins: Plugins) -> None:
    cfg = load_config(args.config, args.overrides, args.algo, plugins)
    console.print(f"{args.config}: valid {cfg.algo} config")


# Plugin contributions that are hooks rather than registry entries, listed so that a user can
# see which package adds `align serve` or wraps every backend (align-lora).
EXTENSION_KINDS = ("backend_wrapper", "command")


def extension_rows(plugins: Plugins) -> list[dict[str, Any]]:
    versions = dict(plugins.origin.values())

    def row(kind: str, name: str, package: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "name": name,
            "package": package,
            "version": versions.get(package, ""),
            "status": "ok",
        }

    wrappers = [
        row(
            "backend_wrapper",
            impl.plugin_name,
            plugins.origin.get(impl.plugin_name, (impl.plugin_name, ""))[0],
        )
        for impl in plugins.manager.hook.wrap_backend.get_hookimpls()
    ]
    commands = [
        row("command", f"align {command.name}", command.package)
        for command in plugin_commands(plugins, dict.fromkeys(COMMANDS, "align")).values()
    ]
    return sorted(wrappers, key=lambda r: r["name"]) + sorted(commands, key=lambda r: r["name"])


def list_rows(plugins: Plugins, kind: str | None) -> list[dict[str, Any]]:
    if kind in EXTENSION_KINDS:
        return [r for r in extension_rows(plugins) if r["kind"] == kind]
    rows = [
        {
            "kind": e.kind,
            "name": e.name,
            "package": e.package,
            "version": e.version,
            "status": "ok",
            **({"hooks": list(e.meta["hooks"])} if e.kind == "lifecycle" else {}),
        }
        for e in plugins.registry.entries(kind)
    ]
    if kind is None:
        rows += extension_rows(plugins)
        rows += [
            {
                "kind": "plugin",
                "name": b.name,
                "package": b.package,
                "version": b.version,
                "status": "broken",
                "error": b.error,
            }
            for b in plugins.registry.broken
        ]
    return rows


def cmd_list(args: argparse.Namespace, plugins: Plugins) -> None:
    rows = list_rows(plugins, args.kind)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in ("kind", "name", "package", "version", "status"):
        table.add_column(column)
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"[red]broken: {row['error']}[/]"
        table.add_row(row["kind"], row["name"], row["package"], row["version"], status)
    console.print(table)


def cmd_schema(args: argparse.Namespace, plugins: Plugins) -> None:
    print(render(schema_for(args.name, plugins)), end="")


def cmd_generate(args: argparse.Namespace, plugins: Plugins) -> None:
    from align.generate import config_from_cli, generate

    cfg = config_from_cli(args.model, args.prompts, args.out, args.engine, args.reward, args.overrides)
    written = generate(cfg, plugins)
    console.print(f"[bold green]done[/]: {written} completions in [bold]{cfg.out}[/]")


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "list": cmd_list,
    "schema": cmd_schema,
    "generate": cmd_generate,
}


def _parse(argv: Sequence[str] | None, commands: dict[str, Command]) -> argparse.Namespace:
    """Overrides may also follow the flags (``align run cfg.yaml --resume trainer.max_steps=20``),
    which plain ``parse_args`` rejects once the ``overrides`` positional has been consumed."""
    parser = _parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def check_plugin_env() -> None:
    """``ALIGN_PLUGINS`` loads only the entry points it names: a name that matches none is a typo
    that would otherwise surface as a puzzling 'unknown algorithm'."""
    wanted = [name.strip() for name in os.environ.get("ALIGN_PLUGINS", "").split(",") if name.strip()]
    installed = sorted({ep.name for ep in entry_points(group=GROUP)})
    unknown = [name for name in wanted if name not in installed]
    if unknown:
        raise UserError(
            f"ALIGN_PLUGINS names {', '.join(unknown)}, which no installed package provides "
            f"(installed: {', '.join(installed) or 'none'})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        check_plugin_env()
        plugins = default_plugins()
        # Plugins' commands (`align serve`, ...) must be known before the command line is parsed.
        extra = plugin_commands(plugins, dict.fromkeys(COMMANDS, "align"))
        args = _parse(argv, extra)
        run = extra[args.command].run if args.command in extra else COMMANDS[args.command]
        run(args, plugins)
    except UserError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted; rerun with --resume to continue from the last checkpoint")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
