"""Callbacks: lifecycle plugins a run enables in ``callbacks:``, each validated by its own config
class (also by ``align validate``), built per run and able to stop it cleanly. Early stopping is
the built-in one: hand-computed patience/min_delta sequences, a clear error for a metric the
run never reports, and a real run that stops early with exit 0, final/ and the reason printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_user_error, read_metrics, run_cli, sft_config, write_yaml

from align import ConfigError, RunConfig, default_plugins, load_plugins, train
from align.builtin.callbacks import EarlyStopping, EarlyStoppingConfig
from align.loading import validate_run_config
from align.trainer import RunInfo


def run_config(tmp_path: Path, **sections: Any) -> RunConfig:
    data = sft_config(tmp_path / "out", trainer={"eval_every": 2}, **sections)
    return validate_run_config(data, default_plugins().registry)


def stopper(tmp_path: Path, **options: Any) -> EarlyStopping:
    return EarlyStopping(EarlyStoppingConfig(**options), run_config(tmp_path))


def evals(callback: EarlyStopping, values: list[float], metric: str = "loss") -> list[bool]:
    """Feed one eval per value (steps 0, 2, 4, ...); whether the run should stop after each."""
    return [callback.observe(2 * i, {"split": "eval", metric: v}) for i, v in enumerate(values)]


def test_min_mode_counts_evaluations_without_an_improvement_beyond_min_delta(tmp_path):
    callback = stopper(tmp_path, metric="loss", mode="min", patience=2, min_delta=0.1)
    # 1.0 is the baseline; 0.95 is within min_delta (stale 1); 0.8 improves (stale 0);
    # 0.85 and then 0.79 (not below 0.8 - 0.1) make two stale evaluations: stop.
    assert evals(callback, [1.0, 0.95, 0.8, 0.85, 0.79]) == [False, False, False, False, True]
    assert (callback.best, callback.best_step) == (0.8, 4)
    reason = callback.reason()
    assert "eval loss did not improve by more than 0.1 in 2 evaluations" in reason
    assert "best 0.8 at step 4" in reason


def test_max_mode_and_nan_never_improves(tmp_path):
    callback = stopper(tmp_path, metric="accuracy", mode="max", patience=2)
    assert evals(callback, [0.5, 0.6, float("nan"), 0.6], metric="accuracy") == [False, False, False, True]
    assert callback.best == 0.6


def test_a_metric_the_run_never_reports_is_an_error_naming_the_available_ones(tmp_path):
    callback = stopper(tmp_path, metric="acuracy")
    with pytest.raises(ConfigError) as info:
        callback.observe(0, {"split": "eval", "loss": 1.0, "accuracy": 0.5})
    message = str(info.value)
    assert "early_stopping watches eval metric 'acuracy'" in message
    assert "Eval metrics: accuracy, loss" in message


def test_train_metrics_are_ignored_and_the_run_is_asked_to_stop_once(tmp_path):
    cfg = run_config(tmp_path)
    callback = EarlyStopping(EarlyStoppingConfig(patience=1), cfg)
    run = RunInfo(cfg, tmp_path, total_steps=10)
    callback.on_step_end(run, 0, {"split": "eval", "loss": 1.0})
    callback.on_step_end(run, 1, {"split": "train", "loss": 5.0})
    assert run.stop_reason is None
    callback.on_step_end(run, 2, {"split": "eval", "loss": 1.5})
    assert run.stop_reason is not None and "best 1 at step 0" in run.stop_reason
    first = run.stop_reason
    callback.on_step_end(run, 4, {"split": "eval", "loss": 2.0})
    assert run.stop_reason == first


def test_a_resumed_run_continues_counting_from_its_logged_evaluations(tmp_path):
    cfg = run_config(tmp_path)
    rows = [
        {"step": 0, "split": "eval", "loss": 1.0},
        {"step": 2, "split": "train", "loss": 0.1},
        {"step": 2, "split": "eval", "loss": 1.2},
        {"step": 4, "split": "eval", "loss": 0.5},  # after the checkpoint: not replayed
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    callback = EarlyStopping(EarlyStoppingConfig(patience=2), cfg)
    run = RunInfo(cfg, tmp_path, total_steps=10, resumed_from=tmp_path / "checkpoints" / "step_2")
    callback.on_train_start(run)
    assert (callback.best, callback.best_step, callback.stale) == (1.0, 0, 1)
    callback.on_step_end(run, 4, {"split": "eval", "loss": 1.1})
    assert run.stop_reason is not None


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"data": {"eval": None}}, "data.eval is not set"),
        ({"trainer": {"eval_every": 0}}, "set trainer.eval_every"),
    ],
)
def test_early_stopping_without_evaluations_is_refused_before_training(tmp_path, capsys, sections, fragment):
    config = sft_config(tmp_path / "out", callbacks=[{"name": "early_stopping"}], trainer={"eval_every": 2})
    for key, value in sections.items():
        config[key] = {**config[key], **value}
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, fragment)
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("callback", "fragment"),
    [
        (
            {"name": "early_stopping", "patince": 3},
            "callbacks.0.patince: unknown key (did you mean 'patience'?)",
        ),
        ({"name": "early_stopping", "patience": 0}, "callbacks.0.patience"),
        ({"name": "early_stopping", "mode": "lowest"}, "callbacks.0.mode"),
        ({"name": "early_stoping"}, "'early_stoping'"),
    ],
    ids=["misspelt-key", "bad-value", "bad-choice", "unknown-callback"],
)
def test_validate_rejects_a_bad_callback_config_naming_the_key(tmp_path, capsys, callback, fragment):
    path = write_yaml(tmp_path / "run.yaml", sft_config(tmp_path / "out", callbacks=[callback]))
    assert_user_error(run_cli(capsys, "validate", path), fragment)


def test_validate_accepts_callbacks_with_their_own_config(tmp_path, capsys):
    callbacks = [{"name": "early_stopping", "metric": "loss", "mode": "min", "patience": 3, "min_delta": 0.0}]
    path = write_yaml(tmp_path / "run.yaml", sft_config(tmp_path / "out", callbacks=callbacks))
    assert run_cli(capsys, "validate", path).code == 0
    cfg = validate_run_config(sft_config(tmp_path / "out", callbacks=callbacks), default_plugins().registry)
    assert isinstance(cfg.callbacks[0], EarlyStoppingConfig) and cfg.callbacks[0].patience == 3


def test_early_stopping_stops_a_run_cleanly(tmp_path, capsys):
    """min_delta larger than any change: no evaluation after the first improves, so with
    patience 2 and an eval every 2 steps the run stops after step 4 of 40."""
    out = tmp_path / "out"
    callbacks = [{"name": "early_stopping", "metric": "loss", "patience": 2, "min_delta": 100.0}]
    config = sft_config(out, callbacks=callbacks, trainer={"max_steps": 40, "eval_every": 2})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert result.code == 0, result.err
    text = result.out + result.err
    assert "early stopping: eval loss did not improve by more than 100 in 2 evaluations" in text
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "step_4").is_dir()
    assert max(row["step"] for row in read_metrics(out, "train")) == 4
    assert [row["step"] for row in read_metrics(out, "eval")][:3] == [0, 2, 4]


RECORDING_CALLBACK = """
from typing import Literal

import align

EVENTS = []


class Record(align.CallbackConfig):
    name: Literal["record"] = "record"
    tag: str = "x"


class RecordHooks:
    def __init__(self, cfg, run_config):
        self.cfg = cfg
        EVENTS.append(("built", cfg.tag, run_config.algo))

    @align.hookimpl
    def on_step_end(self, run, step, metrics):
        EVENTS.append((metrics["split"], step))

    @align.hookimpl
    def on_train_end(self, run, metrics):
        EVENTS.append(("end", run.stop_reason, run.is_main))

    def close(self):
        EVENTS.append(("closed",))


@align.hookimpl
def register_callbacks(register):
    register(Record)(RecordHooks)
"""


def test_a_third_party_callback_is_built_with_its_config_and_registered_for_one_run(tmp_path, monkeypatch):
    (tmp_path / "recording_callback.py").write_text(RECORDING_CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "recording_callback")
    try:
        plugins = load_plugins()
        data = sft_config(tmp_path / "out", callbacks=[{"name": "record", "tag": "mine"}])
        train(validate_run_config(data, plugins.registry), plugins)
        events = sys.modules["recording_callback"].EVENTS
        assert events[0] == ("built", "mine", "sft")
        assert ("eval", 0) in events and ("train", 4) in events
        assert events[-2:] == [("end", None, True), ("closed",)]  # one process: the main one
        before = len(events)
        plugins.manager.hook.on_step_end(run=None, step=9, metrics={"split": "train"})
        assert len(events) == before, "the callback's hooks are gone once its run ended"
    finally:
        sys.modules.pop("recording_callback", None)
