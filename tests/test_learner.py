"""The learner/driver split: an algorithm that drives the learner itself (an online-style toy
registered in the test) trains on batches it makes, checkpoints its own state with the
learner's, and resumes bit-exact after an interruption; a second trainable has its own
optimizer and learning rate; a stop request ends a run cleanly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DATA,
    assert_same_weights,
    head_jsonl,
    load_weights,
    read_metrics,
    run_cli,
    sft_config,
    write_yaml,
)
from safetensors.torch import load_file

import align.cli
from align import load_plugins
from align.checkpoint import STATE_FILE
from align.loading import validate_run_config

TOY_ONLINE = '''
from typing import Literal

import torch
from torch import nn

import align


class ToyConfig(align.RunConfig):
    algo: Literal["toy_online"] = "toy_online"
    rounds: int = 6
    save_rounds: int = 2
    interrupt_in_round: int = 0  # 0: never
    critic_lr: float = 0.05


class ToyOnline(align.Algorithm):
    """Each round: "generate" random sequences (global RNG), train the policy on them (SFT
    loss), train a linear critic to predict their mean token, log, and sometimes checkpoint."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.round = 0
        self.history = []

    def setup(self, learner):
        self.critic = nn.Linear(4, 1)
        nn.init.zeros_(self.critic.weight)
        nn.init.zeros_(self.critic.bias)
        optim = align.OptimConfig(name="sgd", lr=self.config.critic_lr)
        learner.add_trainable("critic", self.critic, optim=optim)

    def planned_steps(self):
        return self.config.rounds

    def drive(self, learner):
        while self.round < self.config.rounds and not learner.should_stop:
            sequences = torch.randint(3, 200, (4, 10))
            batch = align.SFTTokens(
                tokens=align.pad_sequences([(s[:3].tolist(), s[3:].tolist()) for s in sequences], 0),
                example_ids=torch.arange(4),
            )
            learner.train_step([batch], self.loss)
            features = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 4)
            critic = learner.train_step([features], self.critic_loss, role="critic")
            self.round += 1
            self.history.append(float(sequences.float().mean()))
            metrics = {"round": self.round, "critic_lr": critic["lr"], "critic_loss": critic["loss"]}
            learner.log(metrics, "rollout")
            if self.round % self.config.save_rounds == 0:
                learner.save_checkpoint()
            if self.round == self.config.interrupt_in_round:
                raise KeyboardInterrupt

    def loss(self, batch):
        logps = self.ctx.backend.sequence_logps(self.ctx.policy, batch.tokens)
        return align.LossOutput(-logps.sum.sum() / logps.count.sum())

    def critic_loss(self, features):
        return align.LossOutput(((self.critic(features).squeeze(-1) - 1.0) ** 2).mean())

    def state_dict(self):
        return {"round": self.round, "history": list(self.history)}

    def load_state_dict(self, state):
        self.round = int(state["round"])
        self.history = [float(x) for x in state["history"]]


@align.hookimpl
def register_algorithms(register):
    register(ToyConfig, batch=align.SFTTokens, data_format="sft")(ToyOnline)
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    name = f"toy_online_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(TOY_ONLINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", name)
    monkeypatch.setattr(align.cli, "default_plugins", load_plugins)
    yield name
    sys.modules.pop(name, None)


def toy_config(tmp_path: Path, out: Path, **top: Any) -> dict[str, Any]:
    config = sft_config(
        out,
        data={"train": head_jsonl(DATA / "sft_train.jsonl", tmp_path / "train.jsonl", 8), "eval": None},
        # save_every is the offline driver's cadence: a driver of its own checkpoints itself.
        trainer={"keep_checkpoints": 10, "save_every": 1, "eval_every": 1},
        optim={"lr": 1e-3},
    )
    config["algo"] = "toy_online"
    config["trainer"].pop("max_steps")
    config["trainer"]["max_grad_norm"] = None  # no clipping: the critic's steps are checked by hand
    return {**config, **top}


def critic_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "roles" / "critic" / "model.safetensors")


def test_an_online_driver_resumes_bit_exact_after_an_interruption(tmp_path, capsys, toy_plugin):
    straight = tmp_path / "straight"
    result = run_cli(capsys, "run", write_yaml(tmp_path / "straight.yaml", toy_config(tmp_path, straight)))
    assert result.code == 0, result.err

    out = tmp_path / "interrupted"
    path = write_yaml(tmp_path / "interrupted.yaml", toy_config(tmp_path, out, interrupt_in_round=5))
    assert run_cli(capsys, "run", path).code == 130  # interrupted in round 5, after its steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not (out / "final").exists()
    result = run_cli(capsys, "run", path, "--resume", "interrupt_in_round=0")
    assert result.code == 0, result.err

    assert_same_weights(load_weights(out / "final"), load_weights(straight / "final"))
    last = out / "checkpoints" / "step_6", straight / "checkpoints" / "step_6"
    assert_same_weights(critic_weights(last[0]), critic_weights(last[1]))
    states = [torch.load(folder / STATE_FILE, weights_only=True) for folder in last]
    assert states[0]["algorithm"] == states[1]["algorithm"]
    assert states[0]["algorithm"]["round"] == 6 and len(states[0]["algorithm"]["history"]) == 6
    assert states[0]["trainables"]["critic"]["step"] == 6
    rows = [read_metrics(folder, "rollout") for folder in (out, straight)]
    assert [r["round"] for r in rows[0]] == [1, 2, 3, 4, 5, 6]  # round 5's first try was dropped
    assert [r["critic_loss"] for r in rows[0]] == [r["critic_loss"] for r in rows[1]]
    train = [read_metrics(folder, "train") for folder in (out, straight)]
    assert [r["loss"] for r in train[0]] == [r["loss"] for r in train[1]]


def test_two_trainables_have_their_own_optimizers_and_learning_rates(tmp_path, capsys, toy_plugin):
    out = tmp_path / "out"
    result = run_cli(capsys, "run", write_yaml(tmp_path / "toy.yaml", toy_config(tmp_path, out, rounds=2)))
    assert result.code == 0, result.err
    rollout, train = read_metrics(out, "rollout"), read_metrics(out, "train")
    assert [r["critic_lr"] for r in rollout] == [0.05, 0.05]
    assert [r["lr"] for r in train] == [1e-3, 1e-3]
    state = torch.load(out / "checkpoints" / "step_2" / STATE_FILE, weights_only=True)
    critic_group = state["trainables"]["critic"]["optimizer"]["param_groups"][0]
    policy_group = state["optimizer"]["param_groups"][0]
    assert critic_group["lr"] == 0.05 and "momentum" in critic_group  # SGD
    assert policy_group["lr"] == 1e-3 and "betas" in policy_group  # AdamW
    # The critic by hand: w, b start at 0; loss = mean((w.x + b - 1)^2) with x = (1, 2, 3, 4).
    # Step 1: grad w = 2 * (0 - 1) * x = -2x, grad b = -2 -> w = 0.1 x, b = 0.1.
    # Step 2: residual = 0.1 * (1 + 4 + 9 + 16) + 0.1 - 1 = 2.1 -> grad w = 4.2 x, grad b = 4.2
    #         -> w = 0.1 x - 0.05 * 4.2 x = -0.11 x, b = 0.1 - 0.21 = -0.11.
    weights = critic_weights(out / "checkpoints" / "step_2")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(weights["weight"], -0.11 * x, atol=1e-6)
    assert torch.allclose(weights["bias"], torch.tensor([-0.11]), atol=1e-6)
    assert [r["critic_loss"] for r in rollout] == pytest.approx([1.0, 2.1**2], rel=1e-6)


STOP_AT_STEP_3 = """
import align


@align.hookimpl
def on_step_end(run, step, metrics):
    if metrics["split"] == "train" and step == 3:
        run.request_stop("enough at step 3")
"""


def test_a_stop_request_saves_writes_final_and_says_why(tmp_path, monkeypatch):
    (tmp_path / "stop_at_3.py").write_text(STOP_AT_STEP_3)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "stop_at_3")
    try:
        plugins = load_plugins()
        out = tmp_path / "out"
        config = sft_config(out, data={"eval": None}, trainer={"max_steps": 10, "batch_size": 4})
        result = align.train(validate_run_config(config, plugins.registry), plugins)
    finally:
        sys.modules.pop("stop_at_3", None)
    assert result.stopped_because == "enough at step 3" and result.steps == 3
    assert (out / "checkpoints" / "step_3").is_dir() and (out / "final" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3]


DENORMALS_AFTER_A_RUN = """
import sys, torch
import align
from align import load_plugins
from align.loading import validate_run_config
import json
plugins = load_plugins()
align.train(validate_run_config(json.loads(sys.argv[1]), plugins.registry), plugins)
torch.set_num_threads(2)
products = torch.full((256, 256), 1e-32) @ (torch.randn(256, 256) * 1e-9)  # all below 1e-38
print(products.abs().max().item())
"""


@pytest.mark.parametrize("flush", [True, False])
def test_a_run_computes_denormal_floats_as_zero_on_every_cpu_thread(tmp_path: Path, flush: bool) -> None:
    """trainer.flush_denormals: a saturated loss's denormal gradients made CPU steps 3-15x slower.
    The flag is per thread: a fresh run sets it before torch starts its thread pool, so the
    pool's threads (which compute the matmul here) flush as well."""
    import json
    import subprocess

    config = sft_config(
        tmp_path / "out", data={"eval": None}, trainer={"max_steps": 1, "flush_denormals": flush}
    )
    done = subprocess.run(
        [sys.executable, "-c", DENORMALS_AFTER_A_RUN, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    largest = float(done.stdout.strip().splitlines()[-1])
    assert (largest == 0.0) if flush else (0.0 < largest < 1.17e-38)  # float32 normal min
