"""The third-party example package ``examples/plugins/align-simpo``, installed with pip exactly as
a user would, adds the ``simpo`` loss: ``align list`` shows it from its package and
``align run --algo dpo ... loss.name=simpo`` trains with it. Nothing else is configured.

pip installs into a folder of this test (``--target``) that the child processes get on their
``PYTHONPATH``: the same wheel build and the same entry-point metadata as an install into the
virtualenv, without changing the environment that other tests, running in parallel, load
their plugins from. The package is built from a copy, so no build files land in the repo.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ALIGN, DATA, EXAMPLES, dpo_config, read_metrics, read_yaml, subprocess_env, write_yaml

pytestmark = [pytest.mark.pip, pytest.mark.slow]


@pytest.fixture(scope="module")
def simpo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("simpo")
    source = tmp / "align-simpo"
    shutil.copytree(
        EXAMPLES / "plugins" / "align-simpo",
        source,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    site = tmp / "site"
    command = [
        sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
        "--no-input", "--disable-pip-version-check", "--target", str(site), str(source),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=subprocess_env())
    if proc.returncode != 0:
        pytest.skip(f"pip could not build align-simpo here:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    assert list(site.glob("align_simpo-0.1.0.dist-info")), sorted(p.name for p in site.iterdir())
    return site


def test_align_list_shows_simpo_from_its_package(simpo_site, tmp_path):
    proc = subprocess.run(
        [*ALIGN, "list", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env([simpo_site]),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    simpo = [row for row in rows if row["name"] == "simpo"]
    assert len(simpo) == 1
    assert simpo[0].items() >= {"kind": "loss", "package": "align-simpo", "version": "0.1.0"}.items()
    assert simpo[0].get("status", "ok") == "ok"
    assert not [row for row in rows if row.get("status") == "broken"]
    assert any(row["kind"] == "algorithm" and row["name"] == "dpo" for row in rows)


def test_training_with_the_simpo_loss(simpo_site, tmp_path):
    out = tmp_path / "out"
    config = dpo_config(
        out,
        data={"train": str(DATA / "preference_train.jsonl"), "eval": str(DATA / "preference_eval.jsonl")},
        trainer={"max_steps": 8, "batch_size": 8},
        optim={"lr": 1e-3},
    )
    path = write_yaml(tmp_path / "simpo.yaml", config)
    proc = subprocess.run(
        [*ALIGN, "run", "--algo", "dpo", path, "loss.name=simpo", "loss.beta=2.0"],
        capture_output=True,
        text=True,
        env=subprocess_env([simpo_site]),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    written = read_yaml(out / "config.yaml")
    assert written["loss"].items() >= {"name": "simpo", "beta": 2.0, "gamma": 0.5}.items()
    assert written["_provenance"]["versions"]["align-simpo"] == "0.1.0"

    train = read_metrics(out, "train")
    assert [row["step"] for row in train] == list(range(1, 9))
    assert "margin" in train[0]  # the plugin's own metric is logged
    evals = read_metrics(out, "eval")
    before, after = evals[0], evals[-1]
    assert after["loss"] < before["loss"] - 0.2
    assert after["reward_accuracy"] >= 0.8
    assert after["reward_accuracy"] > before["reward_accuracy"]
