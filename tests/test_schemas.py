"""JSON Schemas: ``schemas/`` holds one file per built-in algorithm and is current (CI fails
when it is stale); ``align schema NAME`` prints the full run config's schema with every
installed choice of loss, data format and backend."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, run_cli

import align
from align import default_plugins
from align.schemas import BUILTIN_PACKAGES, builtin_schemas, render, schema_for

SCHEMAS = REPO / "schemas"
STALE = "schemas/ is stale: run `make schemas` (python -m align.schemas schemas) and commit the result"


def test_one_checked_in_schema_per_builtin_algorithm():
    expected = builtin_schemas()
    on_disk = {path.name for path in SCHEMAS.glob("*.json")}
    missing, extra = sorted(expected.keys() - on_disk), sorted(on_disk - expected.keys())
    assert not missing and not extra, f"{STALE}. Missing: {missing}; no longer generated: {extra}"
    assert {"dpo.json", "sft.json"} <= on_disk


def test_checked_in_schemas_are_current():
    stale = [name for name, text in builtin_schemas().items() if (SCHEMAS / name).read_text() != text]
    assert not stale, f"{STALE}. Out of date: {stale}"


def test_builtin_packages_are_the_ones_in_this_repository():
    """Every algorithm the repository ships is covered by ``BUILTIN_PACKAGES``."""
    for pyproject in [*REPO.glob("algorithms/*/pyproject.toml"), *REPO.glob("plugins/*/pyproject.toml")]:
        name = next(
            line.split("=", 1)[1].strip().strip('"')
            for line in pyproject.read_text().splitlines()
            if line.startswith("name")
        )
        installed = {entry.package for entry in default_plugins().registry.entries()}
        if name in installed:
            assert name in BUILTIN_PACKAGES, f"{pyproject.parent} ({name}) is missing from BUILTIN_PACKAGES"


def discriminator_choices(node: Any) -> Iterator[str]:
    """Every tag of every discriminated union under ``node``."""
    if isinstance(node, dict):
        tag = node.get("discriminator")
        if isinstance(tag, dict):
            yield from tag.get("mapping", {})
        for value in node.values():
            yield from discriminator_choices(value)
    elif isinstance(node, list):
        for value in node:
            yield from discriminator_choices(value)


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_schema_command_prints_valid_json_with_the_loss_choices(capsys):
    result = run_cli(capsys, "schema", "dpo")
    assert result.code == 0, result.err
    schema = json.loads(result.out)
    assert result.out == render(schema_for("dpo", default_plugins()))
    assert schema["additionalProperties"] is False
    assert {"algo", "loss", "data", "model", "trainer", "optim", "backend"} <= schema["properties"].keys()
    registry = default_plugins().registry
    losses = {e.name for e in registry.entries("loss") if e.meta.get("batch") is align.PreferenceBatch}
    choices = set(discriminator_choices(schema["properties"]["loss"]))
    if len(losses) == 1:  # a single choice is no union: its config class is used directly
        choices = {resolve(schema, schema["properties"]["loss"]["anyOf"][0])["properties"]["name"]["const"]}
    assert "dpo" in choices
    assert choices == losses
    assert schema["properties"]["loss"]["default"] == {"name": "dpo"}
    dpo_loss = schema["$defs"]["DPOLoss"]
    assert dpo_loss["properties"]["beta"]["default"] == 0.1
    assert dpo_loss["additionalProperties"] is False


def test_schema_carries_field_constraints_and_descriptions(capsys):
    schema = json.loads(run_cli(capsys, "schema", "sft").out)
    trainer = resolve(schema, schema["properties"]["trainer"])
    assert trainer["properties"]["batch_size"]["exclusiveMinimum"] == 0
    assert "micro-batch" in trainer["properties"]["batch_size"]["description"]
    data = resolve(schema, schema["properties"]["data"])
    assert data["properties"]["overlong"]["enum"] == ["truncate", "drop"]
    assert schema["properties"]["algo"]["const"] == "sft"


def test_schema_of_unknown_algorithm_is_a_user_error(capsys):
    result = run_cli(capsys, "schema", "nope")
    assert result.code == 2
    assert "unknown algorithm 'nope'" in result.err and "Traceback" not in result.err


def test_builtin_schemas_ignore_third_party_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A third-party loss installed next to the built-ins must not change the checked-in files."""
    site = tmp_path / "site"
    info = site / "fake_schema_loss-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-schema-loss\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[align]\nfake_schema_loss = fake_schema_loss_mod\n")
    (site / "fake_schema_loss_mod.py").write_text(
        "from typing import Literal\nimport align\n\n"
        "class Extra(align.LossConfig):\n    name: Literal['schema_extra'] = 'schema_extra'\n\n"
        "@align.hookimpl\ndef register_losses(register):\n"
        "    @register(Extra, needs_reference=False)\n"
        "    def schema_extra(cfg: Extra, b: align.PreferenceBatch) -> align.LossOutput:\n"
        "        return align.LossOutput(b.chosen_logps.mean())\n"
    )
    before = builtin_schemas()
    monkeypatch.syspath_prepend(str(site))
    try:
        with_extra = align.load_plugins()
        assert "schema_extra" in set(discriminator_choices(schema_for("dpo", with_extra)))
        assert builtin_schemas() == before
    finally:
        sys.modules.pop("fake_schema_loss_mod", None)
