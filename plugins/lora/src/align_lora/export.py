"""``align export``: a LoRA run's adapter as merged full weights (``--merge``), or as the adapter
alone in PEFT's format.

    align export runs/dpo-lora --merge --out merged/
    align export runs/dpo-lora/checkpoints/step-00000040 --merge --out merged-40/

The source is a run folder (its ``final/``), a ``final/`` folder, or a checkpoint folder (its
``model/``). The base model is rebuilt from the run's ``config.yaml`` (the embedded ``tiny`` model
has no path that peft could load it from), the adapter is loaded into it, and the result is
written with the backend's own save: ``from_pretrained`` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import align

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"


def add_export_command(add_command: Any) -> None:
    add_command(
        "export",
        "write a LoRA run's adapter as merged full weights (--merge) or as the PEFT adapter",
        _arguments,
        run_export,
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run folder, its final/ folder, or one of its checkpoint folders")
    parser.add_argument("--out", required=True, help="folder to write (new or empty)")
    parser.add_argument(
        "--merge", action="store_true", help="merge the adapter into full weights (else: the adapter alone)"
    )
    parser.add_argument("--config", help="the run's config.yaml (default: found beside the source)")


def run_export(args: argparse.Namespace, plugins: align.Plugins) -> None:
    source = Path(args.source)
    out = export(source, Path(args.out), plugins, merge=args.merge, config=args.config and Path(args.config))
    what = "merged full weights" if args.merge else "the LoRA adapter (PEFT format)"
    print(f"wrote {what} of {source} to {out}")


def export(
    source: Path, out: Path, plugins: align.Plugins, *, merge: bool = True, config: Path | None = None
) -> Path:
    """Write the adapter found at ``source`` (merged into full weights with ``merge``) to ``out``."""
    adapter = find_adapter(source)
    cfg = read_run_config(config or find_run_config(source), plugins)
    if cfg.model.lora is None:
        raise align.ConfigError(f"{source}: its run config has no model.lora: not a LoRA run")
    _check_out(out)
    backend = align.build_backend(cfg, plugins)
    build_model = plugins.registry.get("algorithm", cfg.algo).meta.get("build_model")
    model = build_model(backend, cfg) if build_model else backend.build_policy()
    backend.load_weights(model, adapter)
    if merge:
        align.save_merged(backend, model, out)
    else:
        backend.save_pretrained(model, out)
    return out


def find_adapter(source: Path) -> Path:
    """The folder holding the adapter: ``source`` itself, its ``final/`` (a run folder) or its
    ``model/`` (a checkpoint folder)."""
    for folder in (source, source / "final", source / "model"):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    if not source.exists():
        raise align.ConfigError(f"{source}: no such folder")
    raise align.ConfigError(
        f"{source}: no {ADAPTER_CONFIG} there, nor in its final/ or model/: not the output of a LoRA run "
        "(a full fine-tune's final/ already holds full weights)"
    )


def find_run_config(source: Path) -> Path:
    """The run's ``config.yaml``: in the run folder, beside ``final/``, or two levels above a
    checkpoint (``<run>/checkpoints/step-N``)."""
    for folder in (source, source.parent, source.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    raise align.ConfigError(f"{source}: no {RUN_CONFIG} of its run found near it; pass --config")


def read_run_config(path: Path, plugins: align.Plugins) -> align.RunConfig:
    data = align.read_yaml(path)
    data.pop("_provenance", None)
    data.pop("resume", None)  # the run's own resume setting says nothing about exporting
    return align.validate_run_config(data, plugins.registry, source=str(path))


def _check_out(out: Path) -> None:
    """Never write over what is there: ``out`` must be new or an empty folder."""
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise align.ConfigError(f"--out {out}: already exists and is not an empty folder; choose a new one")
