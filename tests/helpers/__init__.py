"""Helpers shared by the test files: paths, tiny configs, small data, CLI calls, weights."""

from __future__ import annotations

import json
import os
import random
import string
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import align.cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "data"

# The embedded default model, made smaller still: a forward+backward of a batch takes ms.
TINY_MODEL: dict[str, Any] = {
    "path": "tiny",
    "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
}
QUIET_TRAINER: dict[str, Any] = {"tensorboard": False, "progress": False, "num_threads": 1}


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CliResult:
    """``align ARGV`` in this process; returns the exit code and what it printed."""
    capsys.readouterr()
    try:
        code = align.cli.main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit code 2, a short ``error:`` message containing every fragment, no traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err and "Traceback" not in result.out
    # Progress lines may come first (training had started); the message is the tail.
    assert "error:" in result.err, result.err
    message = result.err[result.err.index("error:") :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert len(message.strip().splitlines()) <= 6, message


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def head_jsonl(source: Path, target: Path, limit: int) -> str:
    """The first ``limit`` rows of a shipped data file, as a new file."""
    lines = source.read_text().splitlines()[:limit]
    target.write_text("".join(line + "\n" for line in lines))
    return str(target)


def write_yaml(path: Path, data: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def read_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def dpo_config(output_dir: Path, **sections: Any) -> dict[str, Any]:
    """A small DPO run on the shipped preference pairs; ``sections`` update the top-level keys."""
    config: dict[str, Any] = {
        "algo": "dpo",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {
            "format": "preference",
            "train": str(DATA / "preference_train.jsonl"),
            "eval": str(DATA / "preference_eval.jsonl"),
            "max_length": 128,
        },
        "loss": {"name": "dpo", "beta": 0.1},
        "trainer": {"max_steps": 4, "batch_size": 8, **QUIET_TRAINER},
        "optim": {"lr": 1e-3},
    }
    return merge(config, sections)


def sft_config(output_dir: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "algo": "sft",
        "output_dir": str(output_dir),
        "seed": 0,
        "model": TINY_MODEL,
        "data": {
            "format": "sft",
            "train": str(DATA / "sft_train.jsonl"),
            "eval": str(DATA / "sft_eval.jsonl"),
            "max_length": 128,
        },
        "trainer": {"max_steps": 4, "batch_size": 8, **QUIET_TRAINER},
        "optim": {"lr": 1e-3},
    }
    return merge(config, sections)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A deep merge of ``update`` into a copy of ``base``; a ``None`` value removes the key."""
    out = dict(base)
    for key, value in update.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_metrics(output_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row for row in rows if split is None or row.get("split") == split]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder`` (a final/ or checkpoint model folder)."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights |= load_file(file)
    return weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0.0, atol=atol), (
            f"{name}: max |diff| {(a[name] - b[name]).abs().max().item():.3g}"
        )


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def subprocess_env(pythonpath: Sequence[Path] = (), **variables: str) -> dict[str, str]:
    """The current environment for a child ``python``, with extra import paths and variables."""
    env = dict(os.environ)
    for name in ("ALIGN_PLUGINS", "ALIGN_PLUGIN_MODULES", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    paths = [str(p) for p in pythonpath]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env["COLUMNS"] = "500"
    env.update(variables)
    return env


ALIGN = [sys.executable, "-m", "align.cli"]


RPO_LOSSES = ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl")
# The built-in preference losses that compare chosen with rejected through the reference.
PAIRED_LOSSES = (
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "aot",
    *RPO_LOSSES,
)
REFERENCE_FREE_LOSSES = ("cpo", "orpo", "sft")
