"""Training end to end on the embedded tiny model (CPU, seconds): DPO and SFT measurably learn;
outputs (resolved config, metrics, checkpoints, a transformers-loadable final model) are
written; a run killed with SIGKILL resumes to the very same weights; a NaN loss stops the run
with exit code 2 and keeps the last good checkpoint; gradient accumulation matches a larger
batch."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    ALIGN,
    DATA,
    TINY_MODEL,
    assert_same_weights,
    assert_user_error,
    dpo_config,
    head_jsonl,
    load_weights,
    max_weight_diff,
    random_text,
    read_metrics,
    read_yaml,
    run_cli,
    sft_config,
    subprocess_env,
    write_jsonl,
    write_yaml,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import align.cli
import align.trainer
from align import TinyModelConfig, load_plugins
from align.checkpoint import STATE_FILE
from align_hf import byte_tokenizer, tiny_llama


def pairs(tmp_path: Path, rows: int) -> str:
    """The first ``rows`` shipped preference pairs, as a training file."""
    return head_jsonl(DATA / "preference_train.jsonl", tmp_path / "train.jsonl", rows)


# ---- one DPO run, inspected by several tests -----------------------------------------------


class RecordingTrainer(align.trainer.Learner):
    """The learner, keeping a handle on itself so a test can look at the in-memory policy."""

    last: RecordingTrainer | None = None

    def run(self) -> align.RunResult:
        RecordingTrainer.last = self
        return super().run()


DPO_STEPS = 8


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dpo")
    out = tmp / "out"
    config = dpo_config(
        out,
        trainer={"max_steps": DPO_STEPS, "batch_size": 8, "save_every": 4, "keep_checkpoints": 2},
        optim={"lr": 1e-3},
    )
    path = write_yaml(tmp / "dpo.yaml", config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(align.trainer, "Learner", RecordingTrainer)
        patch.setenv("COLUMNS", "500")
        code = align.cli.main(["run", path])
    assert code == 0
    trainer = RecordingTrainer.last
    assert trainer is not None
    yield {"out": out, "config_path": path, "trainer": trainer}


def test_dpo_measurably_learns(dpo_run):
    evals = read_metrics(dpo_run["out"], "eval")
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, DPO_STEPS)
    # Untrained policy == reference: every implicit reward is 0, ties count half, loss is ln 2.
    assert before["reward_accuracy"] == 0.5
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # After a few steps the held-out pairs are ranked right.
    assert after["reward_accuracy"] >= 0.8
    assert after["reward_margin"] > 0.0
    assert after["loss"] < before["loss"] - 0.1


def test_outputs_resolved_config_with_versions_and_seed(dpo_run, capsys):
    out: Path = dpo_run["out"]
    written = read_yaml(out / "config.yaml")
    assert written["algo"] == "dpo" and written["seed"] == 0
    assert written["output_dir"] == str(out)
    assert written["trainer"]["max_steps"] == DPO_STEPS
    # Resolved: defaults the user did not write are filled in.
    assert written["loss"]["name"] == "dpo" and written["loss"]["beta"] == 0.1
    assert written["loss"]["weight"] == 1.0  # a default the YAML did not set
    assert written["backend"]["name"] == "hf"
    assert written["data"]["format"] == "preference" and written["data"]["overlong"] == "truncate"
    assert written["trainer"]["grad_accum"] == 1 and written["optim"]["name"] == "adamw"
    versions = written["_provenance"]["versions"]
    for package in ("align", "align-dpo", "align-hf", "torch", "transformers"):
        assert versions[package] == version(package)
    # The written config is itself a valid config: a run can be repeated from it.
    result = run_cli(capsys, "validate", str(out / "config.yaml"))
    assert result.code == 0, result.err


def test_outputs_metrics_jsonl_one_object_per_logged_step(dpo_run):
    rows = read_metrics(dpo_run["out"])
    assert all("step" in row and "loss" in row for row in rows)
    assert all(math.isfinite(row["loss"]) for row in rows)
    train = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train] == list(range(1, DPO_STEPS + 1))
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[0]["lr"] == pytest.approx(1e-3)
    assert all(row["tokens"] > 0 for row in train)
    assert {row["split"] for row in rows} == {"train", "eval"}


def test_outputs_checkpoints(dpo_run):
    root: Path = dpo_run["out"] / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_8"]
    for step in (4, 8):
        folder = root / f"step_{step}"
        assert list((folder / "model").glob("*.safetensors"))
        assert (folder / "model" / "config.json").is_file()
        state = torch.load(folder / STATE_FILE, weights_only=True)
        assert state["step"] == step
        assert {"optimizer", "scheduler", "rng", "algorithm", "config"} <= state.keys()
        assert {"epoch", "batch"} <= state["algorithm"].keys()  # the offline driver's data position
    assert_same_weights(load_weights(root / "step_8" / "model"), load_weights(dpo_run["out"] / "final"))
    step_4, step_8 = load_weights(root / "step_4" / "model"), load_weights(root / "step_8" / "model")
    assert max_weight_diff(step_4, step_8) > 0


def test_final_model_loads_with_transformers_and_matches_the_trained_policy(dpo_run):
    final: Path = dpo_run["out"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    text = "Q: How do I fold a bike?\nA: Great question!"
    encoded = tokenizer(text, return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == byte_tokenizer()(text)["input_ids"]
    assert tokenizer.eos_token_id == byte_tokenizer().eos_token_id
    policy = dpo_run["trainer"].context.policy
    policy.eval()
    model.eval()
    with torch.no_grad():
        device = next(policy.parameters()).device  # the backend's (a GPU where there is one)
        expected = policy(**{k: v.to(device) for k, v in encoded.items()}).logits.cpu()
        got = model(**encoded).logits
    assert got.shape == (1, encoded["input_ids"].shape[1], len(tokenizer))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # ...and it is the trained model, not the initial one.
    untrained = tiny_llama(TinyModelConfig(**TINY_MODEL["tiny"]), len(tokenizer), "sdpa")
    with torch.no_grad():
        initial = untrained(**encoded).logits
    assert not torch.allclose(got, initial, atol=1e-3)


# ---- SFT ------------------------------------------------------------------------------------


def test_sft_lowers_held_out_loss(tmp_path, capsys):
    out = tmp_path / "out"
    config = sft_config(out, trainer={"max_steps": 12, "batch_size": 8}, optim={"lr": 3e-3})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "sft.yaml", config))
    assert result.code == 0, result.err
    evals = read_metrics(out, "eval")
    before, after = evals[0]["loss"], evals[-1]["loss"]
    # A random byte-level model starts near ln(vocab size) nats per token.
    assert before == pytest.approx(math.log(len(byte_tokenizer())), abs=0.5)
    assert after < before - 1.0
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(after), rel=1e-3)


# ---- gradient accumulation -------------------------------------------------------------------


def equal_length_sft(path: Path, rows: int = 16) -> str:
    """Every row has the same prompt and completion lengths, so a token mean per micro-batch
    averaged over micro-batches equals the token mean over the whole batch."""
    rng = random.Random(7)
    return write_jsonl(
        path, [{"prompt": random_text(rng, 6), "completion": random_text(rng, 10)} for _ in range(rows)]
    )


def one_step(tmp_path: Path, name: str, data: str, batch_size: int, grad_accum: int, capsys) -> dict:
    out = tmp_path / name
    config = sft_config(
        out,
        data={"train": data, "eval": None},
        trainer={"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "max_grad_norm": None},
        optim={"name": "sgd", "lr": 0.5},
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / f"{name}.yaml", config))
    assert result.code == 0, result.err
    return {"weights": load_weights(out / "final"), "metrics": read_metrics(out, "train")[0]}


def test_grad_accumulation_matches_a_larger_batch(tmp_path, capsys):
    data = equal_length_sft(tmp_path / "equal.jsonl")
    big = one_step(tmp_path, "b8a1", data, 8, 1, capsys)
    accumulated = one_step(tmp_path, "b4a2", data, 4, 2, capsys)
    small = one_step(tmp_path, "b4a1", data, 4, 1, capsys)
    assert big["metrics"]["loss"] == pytest.approx(accumulated["metrics"]["loss"], abs=1e-5)
    assert big["metrics"]["tokens"] == accumulated["metrics"]["tokens"] == 2 * small["metrics"]["tokens"]
    # One SGD step on the same 8 examples: the same update, to float rounding.
    assert_same_weights(big["weights"], accumulated["weights"], atol=1e-6)
    # Control: half the batch gives a visibly different update.
    assert max_weight_diff(big["weights"], small["weights"]) > 1e-3


# ---- divergence -----------------------------------------------------------------------------

NAN_LOSS_PLUGIN = """
from typing import Literal

import torch

import align

TRAINING_CALLS = [0]


class NanAfter(align.LossConfig):
    name: Literal["nan_after"] = "nan_after"
    after: int = 3


@align.hookimpl
def register_losses(register):
    @register(NanAfter, needs_reference=False)
    def nan_after(cfg: NanAfter, b: align.PreferenceBatch) -> align.LossOutput:
        if torch.is_grad_enabled():  # a training step, not an evaluation
            TRAINING_CALLS[0] += 1
        scale = float("nan") if TRAINING_CALLS[0] > cfg.after else 0.0
        return align.LossOutput(scale * b.chosen_logps.sum())
"""


def test_nan_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    module = "nan_loss_plugin_for_tests"
    (tmp_path / f"{module}.py").write_text(NAN_LOSS_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", module)
    monkeypatch.setattr(align.cli, "default_plugins", load_plugins)
    out = tmp_path / "out"
    config = dpo_config(
        out,
        data={"train": pairs(tmp_path, 48), "eval": None},
        trainer={"max_steps": 6, "batch_size": 4, "save_every": 1, "keep_checkpoints": 2},
    )
    config["loss"] = [{"name": "dpo"}, {"name": "nan_after", "after": 3}]
    path = write_yaml(tmp_path / "nan.yaml", config)
    result = run_cli(capsys, "run", path)
    assert_user_error(result, "loss became nan at step 4", str(out / "checkpoints" / "step_3"))
    assert "Traceback" not in result.err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    assert not (out / "final").exists()
    state = torch.load(out / "checkpoints" / "step_3" / STATE_FILE, weights_only=True)
    assert state["step"] == 3
    weights = load_weights(out / "checkpoints" / "step_3" / "model")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [row["step"] for row in read_metrics(out, "train")] == [1, 2, 3]
    # The kept checkpoint is good: the run continues from it once the bad loss term is gone.
    result = run_cli(capsys, "run", path, "--resume", "loss=[{name: dpo}]")
    assert result.code == 0, result.err
    assert [row["step"] for row in read_metrics(out, "train")] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(row["loss"]) for row in read_metrics(out))
    sys.modules.pop(module, None)


def test_huge_learning_rate_diverges_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "out"
    config = dpo_config(
        out,
        data={"train": pairs(tmp_path, 32), "eval": None},
        trainer={"max_steps": 5, "batch_size": 4, "save_every": 1},
        optim={"lr": 1e30},
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "lr.yaml", config))
    # The first update moves every weight by about the lr: caught before any checkpoint holds it.
    fragments = (
        "training stopped: the largest parameter jumped",
        "at step 1",
        "no checkpoint",
        "Lower optim.lr",
    )
    assert_user_error(result, *fragments)
    assert not (out / "final").exists()
    assert not list((out / "checkpoints").glob("step_*"))


# ---- resume after SIGKILL ---------------------------------------------------------------------

# Steps 1-2 take a moment each; step 3 then "hangs" in its hook (logged, not yet checkpointed)
# until the test kills the process: a deterministic point between two checkpoints.
SLOW_HOOK = """
import time

import align


@align.hookimpl
def on_step_end(run, step, metrics):
    if metrics.get("split") == "train":
        time.sleep(0.2 if step < 3 else 120)
"""

RESUME_STEPS = 10


def resume_config(tmp_path: Path, out: Path) -> str:
    config = dpo_config(
        out,
        data={"train": pairs(tmp_path, 36), "eval": None},
        # 36 pairs / 4 per batch = 9 batches an epoch: the run crosses an epoch boundary, so
        # the data position and the per-epoch shuffle are part of what must resume exactly.
        trainer={
            "max_steps": RESUME_STEPS,
            "batch_size": 4,
            "save_every": 2,
            "keep_checkpoints": 10,
            "lr_scheduler": "linear",
            "warmup_steps": 3,
        },
        optim={"lr": 2e-3, "weight_decay": 0.01},
    )
    return write_yaml(tmp_path / f"{out.name}.yaml", config)


def test_resume_after_sigkill_gives_the_same_weights(tmp_path, capsys):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "slow_steps_for_tests.py").write_text(textwrap.dedent(SLOW_HOOK))
    killed = tmp_path / "killed"
    config = resume_config(tmp_path, killed)
    env = subprocess_env([plugin_dir], ALIGN_PLUGIN_MODULES="slow_steps_for_tests")
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([*ALIGN, "run", config], env=env, stdout=log, stderr=subprocess.STDOUT)
    checkpoint_2 = killed / "checkpoints" / "step_2" / STATE_FILE

    def logged_steps() -> list[int]:
        """Train steps in the killed run's metrics.jsonl (complete lines only: it is being written)."""
        path = killed / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        return [row["step"] for row in rows if row["split"] == "train"]

    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoint_2.exists() and 3 in logged_steps():
                break
            time.sleep(0.05)
        assert checkpoint_2.exists() and 3 in logged_steps(), (tmp_path / "killed.log").read_text()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run was killed before it finished"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2"]
    assert logged_steps() == [1, 2, 3]  # step 3 ran, but after the last checkpoint

    resumed = run_cli(capsys, "run", config, "--resume")
    assert resumed.code == 0, resumed.err

    straight = tmp_path / "straight"
    result = run_cli(capsys, "run", resume_config(tmp_path, straight))
    assert result.code == 0, result.err

    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    # The metrics of the resumed run read as one run: every step once, the same losses.
    killed_rows = read_metrics(killed, "train")
    straight_rows = read_metrics(straight, "train")
    assert [row["step"] for row in killed_rows] == list(range(1, RESUME_STEPS + 1))
    for a, b in zip(killed_rows, straight_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9), a["step"]
    # The resumed run's optimizer state matches too.
    s1 = torch.load(killed / "checkpoints" / f"step_{RESUME_STEPS}" / STATE_FILE, weights_only=True)
    s2 = torch.load(straight / "checkpoints" / f"step_{RESUME_STEPS}" / STATE_FILE, weights_only=True)
    position = [(s["algorithm"]["epoch"], s["algorithm"]["batch"]) for s in (s1, s2)]
    assert position[0] == position[1] == (1, 1)
    for key, value in s1["optimizer"]["state"].items():
        assert torch.allclose(value["exp_avg"], s2["optimizer"]["state"][key]["exp_avg"], atol=1e-7)


# ---- the sigmoid DPO loss, by hand ------------------------------------------------------------


def test_sigmoid_dpo_loss_equals_a_hand_computation():
    """Three pairs with fixed log-probs, beta 0.1. The DPO logit is
    z = (pi_w - ref_w) - (pi_l - ref_l) and the loss mean(log(1 + exp(-beta z))):
      pair 1: (-10 + 11) - (-12 + 11.5) =  1.5 -> log1p(exp(-0.15)) = 0.6209570477895321
      pair 2: (-20 + 18) - (-15 + 16)   = -3.0 -> log1p(exp(+0.30)) = 0.8543552444685272
      pair 3: (-7 + 7)   - (-9 + 9)     =  0.0 -> log(2)             = 0.6931471805599453
    """
    expected_terms = [0.6209570477895321, 0.8543552444685272, 0.6931471805599453]
    expected = sum(expected_terms) / 3  # 0.7228198242726682
    assert expected == pytest.approx(0.7228198242726682, abs=1e-15)
    # The same numbers, independently, in plain Python.
    for z, term in zip((1.5, -3.0, 0.0), expected_terms, strict=True):
        assert math.log1p(math.exp(-0.1 * z)) == pytest.approx(term, abs=1e-15)

    policy_chosen = torch.tensor([-10.0, -20.0, -7.0], dtype=torch.float64, requires_grad=True)
    batch = align.PreferenceBatch(
        chosen_logps=policy_chosen,
        rejected_logps=torch.tensor([-12.0, -15.0, -9.0], dtype=torch.float64),
        chosen_lengths=torch.tensor([5, 5, 5]),
        rejected_lengths=torch.tensor([5, 5, 5]),
        ref_chosen_logps=torch.tensor([-11.0, -18.0, -7.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-11.5, -16.0, -9.0], dtype=torch.float64),
    )
    entry = load_plugins().registry.get("loss", "dpo")
    assert entry.meta["needs_reference"] is True
    out = entry.factory(entry.config(beta=0.1), batch)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    # d loss / d pi_w = -(beta / n) * sigmoid(-beta z) = -(0.1 / 3) / (1 + exp(beta z))
    out.loss.backward()
    hand_grad = [-(0.1 / 3) / (1 + math.exp(0.1 * z)) for z in (1.5, -3.0, 0.0)]
    assert policy_chosen.grad.tolist() == pytest.approx(hand_grad, abs=1e-12)
    # beta scales the logit: beta 0.2 on pair 1 alone is log1p(exp(-0.3)) = 0.5543552444685271.
    pair_one = align.PreferenceBatch(
        chosen_logps=torch.tensor([-10.0], dtype=torch.float64),
        rejected_logps=torch.tensor([-12.0], dtype=torch.float64),
        chosen_lengths=torch.tensor([5]),
        rejected_lengths=torch.tensor([5]),
        ref_chosen_logps=torch.tensor([-11.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-11.5], dtype=torch.float64),
    )
    loss = entry.factory(entry.config(beta=0.2), pair_one).loss.item()
    assert loss == pytest.approx(0.5543552444685271, abs=1e-12)


def test_implicit_reward_accuracy_counts_ties_half():
    from align_dpo import reward_metrics

    batch = align.PreferenceBatch(
        chosen_logps=torch.tensor([-10.0, -20.0, -7.0]),
        rejected_logps=torch.tensor([-12.0, -15.0, -9.0]),
        chosen_lengths=torch.tensor([5, 5, 5]),
        rejected_lengths=torch.tensor([5, 5, 5]),
        ref_chosen_logps=torch.tensor([-11.0, -18.0, -7.0]),
        ref_rejected_logps=torch.tensor([-11.5, -16.0, -9.0]),
    )
    metrics = reward_metrics(batch, beta=0.1)
    assert metrics["reward_accuracy"].item() == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics["reward_margin"].item() == pytest.approx(0.1 * (1.5 - 3.0 + 0.0) / 3, abs=1e-6)


# ---- layouts and output folders ---------------------------------------------------------------


def test_padding_free_training_matches_padded_training(tmp_path, capsys):
    runs = {}
    for padding_free in (False, True):
        out = tmp_path / f"packed_{padding_free}"
        config = dpo_config(
            out,
            data={"train": pairs(tmp_path, 24), "eval": None, "padding_free": padding_free},
            trainer={"max_steps": 3, "batch_size": 8},
        )
        result = run_cli(capsys, "run", write_yaml(tmp_path / f"{out.name}.yaml", config))
        assert result.code == 0, result.err
        runs[padding_free] = (read_metrics(out, "train"), load_weights(out / "final"))
    (padded_rows, padded), (packed_rows, packed) = runs[False], runs[True]
    for a, b in zip(padded_rows, packed_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tokens"] == b["tokens"]  # the same real tokens, without the pads
    assert max_weight_diff(padded, packed) < 1e-5  # the steps themselves move weights by ~3e-3


def test_an_output_dir_holding_a_run_is_not_overwritten_by_accident(tmp_path, capsys):
    out = tmp_path / "out"
    config = sft_config(out, data={"eval": None}, trainer={"max_steps": 1, "batch_size": 4})
    path = write_yaml(tmp_path / "sft.yaml", config)
    assert run_cli(capsys, "run", path).code == 0
    metrics = (out / "metrics.jsonl").read_text()
    weights = load_weights(out / "final")

    result = run_cli(capsys, "run", path, "optim.lr=0.5")
    assert_user_error(result, str(out), "--resume", "overwrite=true")
    assert (out / "metrics.jsonl").read_text() == metrics
    assert_same_weights(load_weights(out / "final"), weights)

    result = run_cli(capsys, "run", path, "overwrite=true", "trainer.max_steps=2")
    assert result.code == 0, result.err
    assert [row["step"] for row in read_metrics(out, "train")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    config = sft_config(tmp_path / "out", resume=str(tmp_path))
    result = run_cli(capsys, "run", write_yaml(tmp_path / "sft.yaml", config))
    assert_user_error(result, "resume:", "not a checkpoint folder")
