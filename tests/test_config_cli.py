"""Config loading and the CLI: bad configs stop with exit code 2 and a short message naming the
YAML path, the bad value and what was expected (no traceback, no model loaded); dotted overrides
are applied; ``align list`` reports what is installed."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import (
    ALIGN,
    EXAMPLES,
    assert_user_error,
    dpo_config,
    run_cli,
    sft_config,
    subprocess_env,
    write_yaml,
)

import align.cli
import align.hf_models
import align_hf.backend
from align import ConfigError, default_plugins
from align.cli import EXTENSION_KINDS, load_config
from align.loading import apply_overrides

KINDS = {
    "algorithm",
    "loss",
    "rollout_engine",
    "reward",
    "advantage_estimator",
    "critic",
    "data_format",
    "backend",
    "callback",
    "lifecycle",
}


@pytest.fixture
def dpo_yaml(tmp_path: Path) -> str:
    return write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a backend, tokenizer or model, or starting a training, fails the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation must not load a tokenizer or model, nor train")

    monkeypatch.setattr(align.hf_models, "load_causal_lm", forbidden)
    monkeypatch.setattr(align_hf.backend, "load_hf_tokenizer", forbidden)
    monkeypatch.setattr(align.cli, "train", forbidden)


# ---- bad configs ---------------------------------------------------------------------------------


def test_unknown_key_in_yaml_names_dotted_path_and_suggests(capsys, tmp_path, no_model_loading):
    config = dpo_config(tmp_path / "out", trainer={"max_step": 5})
    path = write_yaml(tmp_path / "bad.yaml", config)
    result = run_cli(capsys, "validate", path)
    assert_user_error(result, "trainer.max_step", "did you mean 'max_steps'", path)


@pytest.mark.parametrize(
    ("override", "path", "suggestion"),
    [
        ("loss.bta=0.2", "loss.bta", "beta"),  # inside a plugin's (discriminated) config
        ("model.tiny.hiden_size=16", "model.tiny.hiden_size", "hidden_size"),
        ("optim.lrr=3", "optim.lrr", "lr"),
        ("loss=[{name: dpo}, {name: dpo, bta: 1}]", "loss.1.bta", "beta"),  # a weighted sum of losses
    ],
)
def test_unknown_key_in_override(capsys, dpo_yaml, no_model_loading, override, path, suggestion):
    result = run_cli(capsys, "validate", dpo_yaml, override)
    assert_user_error(result, path, f"did you mean '{suggestion}'")


def test_every_bad_key_is_reported_at_once(capsys, dpo_yaml, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml, "trainer.bogus=1", "optim.lrr=3")
    assert_user_error(result, "trainer.bogus", "optim.lrr")


@pytest.mark.parametrize(
    ("override", "path", "shown"),
    [
        ("trainer.batch_size=many", "trainer.batch_size", "'many'"),
        ("optim.lr=-1", "optim.lr", "-1"),
        ("data.overlong=cut", "data.overlong", "'cut'"),
        ("loss.beta=[1,2]", "loss.beta", "[1, 2]"),
    ],
)
def test_wrong_type_names_path_and_bad_value(capsys, dpo_yaml, no_model_loading, override, path, shown):
    result = run_cli(capsys, "validate", dpo_yaml, override)
    assert_user_error(result, path, shown)


def test_wrong_type_in_yaml(capsys, tmp_path, no_model_loading):
    path = write_yaml(tmp_path / "bad.yaml", dpo_config(tmp_path / "out", trainer={"batch_size": "eight"}))
    result = run_cli(capsys, "validate", path)
    assert_user_error(result, "trainer.batch_size", "'eight'", "integer")


def test_unknown_algorithm(capsys, dpo_yaml, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml, "--algo", "nope")
    assert_user_error(result, "unknown algorithm 'nope'", "dpo", "sft")
    result = run_cli(capsys, "run", dpo_yaml, "algo=nope")
    assert_user_error(result, "unknown algorithm 'nope'")


def test_unknown_loss_name_lists_installed_choices(capsys, dpo_yaml, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml, "loss.name=nope")
    assert_user_error(result, "loss", "'nope'", "'dpo'")
    result = run_cli(capsys, "run", dpo_yaml, "loss.name=nope")
    assert_user_error(result, "'nope'")


def test_missing_config_file(capsys, tmp_path, no_model_loading):
    missing = str(tmp_path / "nowhere.yaml")
    for command in ("validate", "run"):
        assert_user_error(run_cli(capsys, command, missing), "config file not found", missing)


def test_config_that_is_not_a_mapping(capsys, tmp_path, no_model_loading):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert_user_error(run_cli(capsys, "validate", str(path)), str(path), "mapping")


def test_malformed_override(capsys, dpo_yaml, no_model_loading):
    assert_user_error(run_cli(capsys, "validate", dpo_yaml, "trainer.max_steps"), "key.path=value")


def test_missing_data_file_stops_the_run(capsys, tmp_path, monkeypatch):
    built: list[str] = []
    real = align.hf_models.load_causal_lm
    monkeypatch.setattr(
        align.hf_models, "load_causal_lm", lambda *a, **k: built.append("model") or real(*a, **k)
    )
    missing = str(tmp_path / "no_such_train.jsonl")
    config = dpo_config(tmp_path / "out", data={"train": missing})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "data file not found", missing)
    assert built == [], "the data is checked before any model is built"
    assert not (tmp_path / "out" / "final").exists()


def test_bad_config_in_a_real_process_exits_2_without_traceback(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", dpo_config(tmp_path / "out", trainer={"max_step": 5}))
    proc = subprocess.run(
        [*ALIGN, "run", path], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "trainer.max_step" in proc.stderr and "did you mean 'max_steps'" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for an invalid config"


# ---- validate and overrides ------------------------------------------------------------------


@pytest.mark.parametrize(("yaml_file", "algo"), [("dpo.yaml", "dpo"), ("sft.yaml", "sft")])
def test_validate_accepts_the_examples(capsys, no_model_loading, yaml_file, algo):
    path = str(EXAMPLES / yaml_file)
    result = run_cli(capsys, "validate", path)
    assert result.code == 0, result.err
    assert f"valid {algo} config" in result.out
    assert run_cli(capsys, "validate", path, "--algo", algo).code == 0


def test_validate_with_algo_flag_and_no_algo_key(capsys, tmp_path, no_model_loading):
    config = sft_config(tmp_path / "out", algo=None)
    path = write_yaml(tmp_path / "noalgo.yaml", config)
    result = run_cli(capsys, "validate", path, "--algo", "sft")
    assert result.code == 0, result.err
    assert "valid sft config" in result.out
    assert_user_error(run_cli(capsys, "validate", path), "no algorithm given", "--algo")


def test_dotted_overrides_are_applied(tmp_path, no_model_loading):
    path = write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))
    overrides = [
        "output_dir=/tmp/x",
        "trainer.max_steps=20",
        "optim.lr=1e-5",
        "loss.beta=0.25",
        "model.tiny.hidden_size=16",
        "data.overlong=drop",
        "trainer.max_grad_norm=null",
        "optim.betas=[0.8, 0.9]",
    ]
    cfg = load_config(path, overrides, None, default_plugins())
    assert cfg.output_dir == Path("/tmp/x")
    assert cfg.trainer.max_steps == 20
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.loss.beta == 0.25  # type: ignore[attr-defined]
    assert type(cfg.loss).__name__ == "DPOLoss"  # type: ignore[attr-defined]
    assert cfg.model.tiny.hidden_size == 16
    assert cfg.data.overlong == "drop"
    assert cfg.trainer.max_grad_norm is None
    assert cfg.optim.betas == (0.8, 0.9)
    # Untouched keys keep the YAML's values.
    assert cfg.trainer.batch_size == 8 and cfg.seed == 0


def test_overrides_may_come_before_or_after_the_flags(capsys, dpo_yaml, no_model_loading, monkeypatch):
    seen = []
    monkeypatch.setattr(align.cli, "train", lambda cfg, plugins: seen.append(cfg))
    monkeypatch.setattr(align.cli, "_print_result", lambda result: None)
    assert run_cli(capsys, "validate", dpo_yaml, "--algo", "dpo", "trainer.max_steps=20").code == 0
    result = run_cli(capsys, "validate", dpo_yaml, "trainer.max_steps=20", "--algo", "dpo", "optim.lrr=1")
    assert_user_error(result, "optim.lrr")
    argv = ["run", dpo_yaml, "optim.lr=1e-5", "--resume", "trainer.max_steps=20", "seed=3"]
    assert run_cli(capsys, *argv).code == 0
    cfg = seen[-1]
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.seed, cfg.resume) == (1e-5, 20, 3, True)
    # Anything else after the flags is still a usage error.
    assert run_cli(capsys, "validate", dpo_yaml, "--algo", "dpo", "--bogus").code == 2
    assert run_cli(capsys, "validate", dpo_yaml, "--algo", "dpo", "not-an-override").code == 2


def test_override_creates_missing_sections_and_indexes_lists():
    data = apply_overrides({"loss": [{"name": "dpo"}, {"name": "sft"}]}, ["loss.1.weight=0.5", "a.b.c=1"])
    assert data == {"loss": [{"name": "dpo"}, {"name": "sft", "weight": 0.5}], "a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"loss": [{"name": "dpo"}]}, ["loss.3.weight=1"])


def test_an_override_of_a_section_the_yaml_lacks_gets_the_default_plugin(dpo_yaml):
    """`backend.chunk_tokens=512` with no `backend:` in the YAML configures the default backend
    (hf) instead of failing on the missing `name`."""
    cfg = load_config(dpo_yaml, ["backend.chunk_tokens=512"], None, default_plugins())
    assert cfg.backend.name == "hf" and cfg.backend.chunk_tokens == 512


def test_validate_cli_applies_overrides(capsys, dpo_yaml, no_model_loading):
    assert run_cli(capsys, "validate", dpo_yaml, "trainer.max_steps=20", "optim.lr=1e-5").code == 0
    assert_user_error(run_cli(capsys, "validate", dpo_yaml, "trainer.max_steps=0"), "trainer.max_steps")


# ---- align list ------------------------------------------------------------------------------------


def test_list_json_reports_every_kind_with_its_package(capsys):
    result = run_cli(capsys, "list", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert isinstance(rows, list) and rows
    for row in rows:
        assert {"kind", "name", "package"} <= row.keys()
    ok = {(r["kind"], r["name"]): r for r in rows if r.get("status", "ok") == "ok"}
    assert {kind for kind, _ in ok} <= KINDS | set(EXTENSION_KINDS)
    assert ok["algorithm", "dpo"]["package"] == "align-dpo"
    assert ok["algorithm", "sft"]["package"] == "align-sft"
    assert ok["loss", "dpo"]["package"] == "align-dpo"
    assert ok["backend", "hf"]["package"] == "align-hf"
    assert ok["data_format", "preference"]["package"] == "align"
    assert ok["data_format", "sft"]["package"] == "align"
    assert ok["algorithm", "dpo"]["version"] == version("align-dpo")
    assert ok["data_format", "sft"]["version"] == version("align")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_list_kind_filters(capsys, kind):
    result = run_cli(capsys, "list", "--kind", kind, "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert {row["kind"] for row in rows} <= {kind}
    expected = {entry.name for entry in default_plugins().registry.entries(kind)}
    assert {row["name"] for row in rows} == expected
    if kind in ("algorithm", "loss", "backend", "data_format"):
        assert rows, f"the built-in plugins register at least one {kind}"


def test_list_shows_backend_wrappers_and_plugin_commands(capsys):
    """Hook-based contributions have no registry entry; the listing still names their package."""
    rows = json.loads(run_cli(capsys, "list", "--json").out)
    listed = {(r["kind"], r["name"]): r["package"] for r in rows}
    assert listed["backend_wrapper", "lora"] == "align-lora"
    assert listed["command", "align export"] == "align-lora"
    assert listed["command", "align serve"] == "align-pytriton"
    commands = json.loads(run_cli(capsys, "list", "--kind", "command", "--json").out)
    assert {r["kind"] for r in commands} == {"command"} and len(commands) >= 3


def test_list_table_and_unknown_kind(capsys):
    result = run_cli(capsys, "list")
    assert result.code == 0
    assert "align-dpo" in result.out and "preference" in result.out
    assert run_cli(capsys, "list", "--kind", "nope").code == 2  # argparse: invalid choice
