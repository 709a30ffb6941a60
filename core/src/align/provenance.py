"""Everything needed to reproduce a run, written beside its outputs as ``config.yaml``."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from align.config import RunConfig
from align.registry import Registry


def package_versions(registry: Registry) -> dict[str, str]:
    names = {"align", "torch", "transformers", "datasets", "pydantic", "pluggy"}
    names |= {entry.package for entry in registry.entries()}
    found = {}
    for name in sorted(names):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def git_state(cwd: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def write_run_config(cfg: RunConfig, output_dir: Path, registry: Registry) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    resolved["_provenance"] = {
        "versions": package_versions(registry),
        "python": platform.python_version(),
        "git": git_state(Path.cwd()),
    }
    path = output_dir / "config.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path
