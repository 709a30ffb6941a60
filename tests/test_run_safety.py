"""What align promises about a run's outputs (docs/guarantees.md): resume never deletes; one run
per output folder; divergence is caught before a bad update is applied or saved and the
checkpoint named as good is verified; changed hyperparameters on resume apply (or are refused);
corrupt checkpoints are skipped; a full disk is a clear error that keeps the last checkpoint."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DATA,
    assert_same_weights,
    assert_user_error,
    dpo_config,
    head_jsonl,
    load_weights,
    read_metrics,
    read_yaml,
    run_cli,
    sft_config,
    subprocess_env,
    write_yaml,
)

import align.cli
from align import checkpoint, load_plugins
from align.builtin.sinks import JsonlSink
from align.checkpoint import MANIFEST_FILE, STATE_FILE
from align.lock import LOCK_FILE, OutputLock


def sft_run(tmp_path: Path, out: Path, **sections: Any) -> str:
    """A small SFT config (32 rows, batch 4: 8 steps an epoch) written to a YAML file."""
    data = head_jsonl(DATA / "sft_train.jsonl", tmp_path / "sft_train.jsonl", 32)
    trainer = {"max_steps": 4, "batch_size": 4, "save_every": 2, "keep_checkpoints": 10}
    config = sft_config(out, data={"train": data, "eval": None}, trainer=trainer, optim={"lr": 1e-3})
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return write_yaml(tmp_path / f"{out.name}.yaml", config)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (the lock file aside)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Registers a test-only plugin module (source text) for the runs of this test."""

    def install(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("ALIGN_PLUGIN_MODULES", name)
        monkeypatch.setattr(align.cli, "default_plugins", load_plugins)
        installed.append(name)

    installed: list[str] = []
    yield install
    for name in installed:
        sys.modules.pop(name, None)


# ---- resume never deletes ---------------------------------------------------------------------


def test_resume_with_no_checkpoint_deletes_nothing_and_says_what_is_there(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    for folder in (out / "checkpoints").iterdir():  # the user kept only the final model
        for file in folder.rglob("*"):
            file.unlink() if file.is_file() else None
    before = snapshot(out)
    result = run_cli(capsys, "run", path, "--resume")
    assert_user_error(
        result, "nothing to resume from", str(out), "final/", "metrics.jsonl", "Nothing was changed"
    )
    assert snapshot(out) == before


def test_resume_of_a_folder_that_does_not_exist_creates_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    result = run_cli(capsys, "run", sft_run(tmp_path, out), "--resume")
    assert_user_error(result, "nothing to resume from", "does not exist")
    assert not out.exists()


def test_resume_auto_starts_when_there_is_nothing_and_continues_when_there_is(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out, resume="auto")
    assert run_cli(capsys, "run", path).code == 0  # nothing there: a new run
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4]
    result = run_cli(capsys, "run", path, "trainer.max_steps=6")  # a checkpoint: continue it
    assert result.code == 0, result.err
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4, 5, 6]


def test_resume_auto_never_deletes_an_earlier_run_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    for file in (out / "checkpoints").rglob(STATE_FILE):
        file.unlink()  # no usable checkpoint left, but final/ and metrics.jsonl are there
    before = snapshot(out)
    result = run_cli(capsys, "run", path, "resume=auto")
    assert_user_error(result, "already holds a run", "no usable checkpoint", "overwrite=true")
    assert snapshot(out) == before
    result = run_cli(capsys, "run", path, "resume=auto", "overwrite=true", "trainer.max_steps=2")
    assert result.code == 0, result.err
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2]


# ---- one run per output folder ----------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from align.lock import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_while_the_first_holds_the_folder_and_a_dead_holder_is_taken_over(
    tmp_path, capsys
):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = run_cli(capsys, "run", path)
        assert_user_error(
            result, str(out), "in use by another run", f"pid {holder.pid}", socket.gethostname()
        )
        assert "started 20" in result.err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written by the second run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing anything: its lock is stale and taken over.
    result = run_cli(capsys, "run", path)
    assert result.code == 0, result.err
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    with OutputLock(out):  # free again
        assert_user_error(
            run_cli(capsys, "run", path, "overwrite=true"), "in use by another run", str(os.getpid())
        )
    assert_user_error(run_cli(capsys, "run", path, "trainer.batch_size=4", "--resume", "seed=1"), "seed")
    with OutputLock(out):  # a run that failed released it too
        pass


@pytest.mark.parametrize("output_dir", ["", " ", ".", "./", "..", "../.."])
def test_output_dir_must_be_a_folder_of_its_own(tmp_path, capsys, output_dir):
    path = sft_run(tmp_path, tmp_path / "out", output_dir=output_dir)
    for command in ("validate", "run"):
        assert_user_error(run_cli(capsys, command, path), "output_dir")


def test_output_dir_resolving_to_the_working_directory_is_refused_when_the_run_starts(
    tmp_path, capsys, monkeypatch
):
    work = tmp_path / "work"
    (work / "final").mkdir(parents=True)  # a user's own folder that overwrite=true would delete
    monkeypatch.chdir(work)
    for output_dir in (str(work), "sub/..", str(tmp_path)):
        path = sft_run(tmp_path, tmp_path / "x", output_dir=output_dir, overwrite=True)
        assert_user_error(run_cli(capsys, "run", path), "output_dir", "working directory")
    assert (work / "final").is_dir() and sorted(p.name for p in work.iterdir()) == ["final"]


# ---- divergence --------------------------------------------------------------------------------

GRAD_NAN_PLUGIN = """
from typing import Literal

import torch

import align

CALLS = [0]


class GradNanAfter(align.LossConfig):
    name: Literal["grad_nan_after"] = "grad_nan_after"
    after: int = 2


@align.hookimpl
def register_losses(register):
    @register(GradNanAfter, needs_reference=False)
    def grad_nan_after(cfg: GradNanAfter, b: align.PreferenceBatch) -> align.LossOutput:
        if torch.is_grad_enabled():
            CALLS[0] += 1
        zero = 0.0 * b.chosen_logps.sum()
        if CALLS[0] <= cfg.after:
            return align.LossOutput(zero)
        # A finite loss (sqrt(0) = 0) whose gradient is 0 * inf = nan.
        return align.LossOutput(torch.sqrt(zero - zero.detach()))
"""

CORRUPT_ON_CHECKPOINT = """

@align.hookimpl
def on_checkpoint(run, step, path):
    if step == CORRUPT_STEP:  # a bad disk: the checkpoint is damaged after it was written
        model = sorted((path / "model").glob("*.safetensors"))[0]
        model.write_bytes(model.read_bytes()[:100])

CORRUPT_STEP = 2
"""


def orpo_run(tmp_path: Path, out: Path, extra_loss: dict[str, Any], **trainer: Any) -> str:
    """A reference-free preference run (no reference pass): ORPO plus ``extra_loss``."""
    data = head_jsonl(DATA / "preference_train.jsonl", tmp_path / "pairs.jsonl", 48)
    config = dpo_config(
        out,
        data={"train": data, "eval": None},
        trainer={"max_steps": 6, "batch_size": 4, "save_every": 1, "keep_checkpoints": 10, **trainer},
    )
    config["loss"] = [{"name": "orpo"}, extra_loss]
    return write_yaml(tmp_path / f"{out.name}.yaml", config)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_non_finite_gradients_stop_the_run_before_the_update(tmp_path, capsys, plugin_module, max_grad_norm):
    plugin_module(f"grad_nan_{max_grad_norm is None}", GRAD_NAN_PLUGIN)
    out = tmp_path / "out"
    path = orpo_run(tmp_path, out, {"name": "grad_nan_after", "after": 3}, max_grad_norm=max_grad_norm)
    result = run_cli(capsys, "run", path)
    step_3 = out / "checkpoints" / "step_3"
    assert_user_error(
        result, "gradient norm became nan at step 4", "not applied", str(step_3), "Lower optim.lr"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    assert checkpoint.verify(step_3) is None
    assert all(torch.isfinite(w).all() for w in load_weights(step_3 / "model").values())
    assert not (out / "final").exists()


def test_the_checkpoint_named_as_good_is_verified(tmp_path, capsys, plugin_module):
    plugin_module("grad_nan_and_bad_disk", GRAD_NAN_PLUGIN + CORRUPT_ON_CHECKPOINT.replace("= 2", "= 3"))
    out = tmp_path / "out"
    result = run_cli(capsys, "run", orpo_run(tmp_path, out, {"name": "grad_nan_after", "after": 3}))
    # step_3 was written, then damaged: the message names step_2, the newest that verifies.
    assert_user_error(result, "at step 4", str(out / "checkpoints" / "step_2"))
    assert str(out / "checkpoints" / "step_3") not in result.err
    assert checkpoint.verify(out / "checkpoints" / "step_3") is not None


def test_diverge_with_a_huge_lr_then_resume_with_a_lower_one_uses_the_lower_one(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out, trainer={"max_steps": 2, "save_every": 1})
    assert run_cli(capsys, "run", path).code == 0
    result = run_cli(capsys, "run", path, "--resume", "trainer.max_steps=5", "optim.lr=1e30")
    assert_user_error(
        result, "training stopped", "at step 3", str(out / "checkpoints" / "step_2"), "Lower optim.lr"
    )
    assert "optim.lr 0.001 -> 1e+30" in result.err  # the resume said what changed
    assert not (out / "checkpoints" / "step_3").exists()

    result = run_cli(capsys, "run", path, "--resume", "trainer.max_steps=5", "optim.lr=1e-4")
    assert result.code == 0, result.err
    rows = read_metrics(out, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 1e-4, 1e-4, 1e-4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(out / "checkpoints" / "step_5" / STATE_FILE, weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-4]
    assert state["scheduler"]["base_lrs"] == [1e-4]
    # config.yaml describes the run that produced final/: the new lr, and where it resumed.
    assert read_yaml(out / "config.yaml")["optim"]["lr"] == 1e-4
    assert state["config"]["optim"]["lr"] == 1e-4


def test_a_changed_schedule_applies_from_the_resumed_step(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out, trainer={"max_steps": 4, "lr_scheduler": "constant"})
    assert run_cli(capsys, "run", path).code == 0
    overrides = [
        "trainer.max_steps=8",
        "trainer.lr_scheduler=linear",
        "optim.lr=5e-4",
        "optim.weight_decay=0.1",
    ]
    result = run_cli(capsys, "run", path, "--resume", *overrides)
    assert result.code == 0, result.err
    for key in ("trainer.lr_scheduler 'constant' -> 'linear'", "optim.weight_decay 0.0 -> 0.1"):
        assert key in result.err
    # Linear decay over 8 steps, no warmup: step k uses lr * (8 - (k - 1)) / 8.
    lrs = [r["lr"] for r in read_metrics(out, "train")][4:]
    assert lrs == pytest.approx([5e-4 * (8 - k + 1) / 8 for k in range(5, 9)], rel=1e-12)
    state = torch.load(out / "checkpoints" / "step_8" / STATE_FILE, weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.batch_size=8", "trainer.batch_size 4 -> 8"),
        ("seed=3", "seed 0 -> 3"),
        ("optim.name=sgd", "optim.name 'adamw' -> 'sgd'"),
        ("model.tiny.hidden_size=64", "model.tiny.hidden_size 32 -> 64"),
        ("data.max_length=64", "data.max_length 128 -> 64"),
    ],
)
def test_changes_a_resume_cannot_honour_are_refused_and_nothing_changes(tmp_path, capsys, override, named):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path, "trainer.max_steps=2").code == 0
    before = snapshot(out)
    result = run_cli(capsys, "run", path, "--resume", override)
    assert_user_error(result, "cannot resume", named, "model.path=")
    assert snapshot(out) == before


# ---- checkpoints ------------------------------------------------------------------------------


def test_a_checkpoint_has_a_manifest_of_every_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "run", sft_run(tmp_path, out)).code == 0
    folder = out / "checkpoints" / "step_4"
    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(files) == on_disk and STATE_FILE in files
    assert all(files[name]["size"] == (folder / name).stat().st_size for name in files)
    assert checkpoint.verify(folder) is None
    assert checkpoint.verify_files(out / "final") is None  # final/ is written the same way


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_state_byte", "drop_state"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_resume_is_still_exact(tmp_path, capsys, damage):
    straight = tmp_path / "straight"
    assert run_cli(capsys, "run", sft_run(tmp_path, straight)).code == 0
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    step_4 = out / "checkpoints" / "step_4"
    if damage == "truncate_weights":
        weights = sorted((step_4 / "model").glob("*.safetensors"))[0]
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip_state_byte":
        data = bytearray((step_4 / STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (step_4 / STATE_FILE).write_bytes(bytes(data))
    else:
        (step_4 / STATE_FILE).unlink()
    result = run_cli(capsys, "run", path, "--resume")
    assert result.code == 0, result.err
    assert "step_4 is not usable" in result.err and "step_4.corrupt" in result.err
    assert (out / "checkpoints" / "step_4.corrupt").is_dir()  # set aside, not deleted
    assert checkpoint.verify(out / "checkpoints" / "step_4") is None  # rewritten by the resumed run
    assert_same_weights(load_weights(out / "final"), load_weights(straight / "final"))
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4]


def test_resume_with_only_damaged_checkpoints_is_an_error_naming_them(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    for folder in (out / "checkpoints").iterdir():
        (folder / STATE_FILE).write_bytes(b"")
    result = run_cli(capsys, "run", path, "--resume")
    assert_user_error(result, "nothing to resume from", "step_2: trainer_state.pt is 0 bytes", "step_4:")
    explicit = out / "checkpoints" / "step_2"
    result = run_cli(capsys, "run", path, f"resume={explicit}")
    assert_user_error(result, f"resume: {explicit}", "0 bytes")


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    assert run_cli(capsys, "run", path).code == 0
    newer = snapshot(out / "checkpoints" / "step_4")
    result = run_cli(capsys, "run", path, f"resume={out / 'checkpoints' / 'step_2'}", "optim.lr=5e-4")
    assert result.code == 0, result.err
    assert "moved step_4 aside to step_4.superseded" in result.err
    assert snapshot(out / "checkpoints" / "step_4.superseded") == newer  # kept as it was
    assert [r["lr"] for r in read_metrics(out, "train")] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert checkpoint.verify(out / "checkpoints" / "step_4") is None


def test_a_checkpoint_without_a_manifest_is_trusted_only_if_it_loads(tmp_path, capsys):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out, trainer={"max_steps": 2})
    assert run_cli(capsys, "run", path).code == 0
    step_2 = out / "checkpoints" / "step_2"
    (step_2 / MANIFEST_FILE).unlink()  # as written by an older align
    assert checkpoint.verify(step_2) is None
    (step_2 / STATE_FILE).write_bytes((step_2 / STATE_FILE).read_bytes()[:50])
    assert "does not load" in (checkpoint.verify(step_2) or "")


# ---- a full disk ------------------------------------------------------------------------------


def no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_checkpointing_keeps_the_last_complete_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    path = sft_run(tmp_path, out)
    real_save = torch.save

    def save_until_step_4(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("step") == 4:
            no_space()
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_step_4)
    result = run_cli(capsys, "run", path)
    assert_user_error(
        result,
        "could not write the checkpoint of step 4",
        "No space left on device",
        str(out / "checkpoints" / "step_2"),
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # no step_4.tmp
    assert checkpoint.verify(out / "checkpoints" / "step_2") is None
    assert not (out / "final").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert run_cli(capsys, "run", path, "--resume").code == 0  # free space, resume


def test_a_full_disk_reported_by_a_native_writer_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """safetensors (Rust) and torch.save (C++) report a full disk as their own exception types."""
    import align_hf.backend

    def safetensors_full(self: Any, model: Any, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"partial")
        detail = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        raise RuntimeError(f"Error while serializing: {detail}")

    monkeypatch.setattr(align_hf.backend.HFBackend, "save_pretrained", safetensors_full)
    out = tmp_path / "out"
    result = run_cli(capsys, "run", sft_run(tmp_path, out, trainer={"save_every": 0}))
    assert_user_error(
        result, "could not write the checkpoint of step 4", "StorageFull", "no complete checkpoint"
    )
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def test_a_full_disk_while_logging_metrics_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def write_fails(self: Any, run: Any, step: int, metrics: dict[str, Any]) -> None:
        if step == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(JsonlSink, "on_step_end", align.hookimpl(write_fails))
    out = tmp_path / "out"
    result = run_cli(capsys, "run", sft_run(tmp_path, out))
    assert_user_error(result, "could not write to", "metrics.jsonl", "No space left", "step_2")


def test_a_home_relative_output_dir_is_expanded_not_made_literally(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = sft_run(tmp_path, tmp_path / "home_run", output_dir="~/runs/sft")
    assert run_cli(capsys, "run", path).code == 0
    assert (tmp_path / "home" / "runs" / "sft" / "final").is_dir()
    assert not (tmp_path / "~").exists()
