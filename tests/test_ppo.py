"""PPO on the arithmetic task: held-out reward rises with the local critic, a killed run resumes
bit-exact (policy and critic), critic warm-up leaves the policy as it was, a critic plugin that
keeps its own state checkpoints it inside the actor's checkpoint and gets it back on resume,
and the backend's per-token values agree with its sequence scores."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    EXAMPLES,
    assert_same_weights,
    assert_user_error,
    load_weights,
    merge,
    read_metrics,
    run_cli,
    write_yaml,
)
from helpers.online import arith_config, kill_during_iteration_3

import align
import align.cli


def ppo_config(output_dir: Path, model: Path, **sections: Any) -> dict[str, Any]:
    config = arith_config(
        "ppo",
        output_dir,
        model,
        iterations=2,
        prompts_per_iteration=8,
        sampling={"n": 2},
        epochs=1,
        trainer={"batch_size": 16},
        optim={"lr": 3e-4},
    )
    return merge(config, sections)


def critic_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The critic in the run's newest checkpoint (the learner's trainable ``critic``)."""
    newest = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    return load_weights(newest / "roles" / "critic")


@pytest.mark.slow
def test_heldout_reward_rises_with_the_local_critic(warm_model, tmp_path, capsys):
    out = tmp_path / "ppo"
    config = ppo_config(
        out,
        warm_model,
        iterations=6,
        prompts_per_iteration=32,
        sampling={"n": 4},
        epochs=2,
        trainer={"batch_size": 64},
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert result.code == 0, result.err
    evals = read_metrics(out, "eval")
    before, after = evals[0]["reward"], evals[-1]["reward"]
    assert after > before + 0.1, (before, after)
    rollouts = read_metrics(out, "rollout")
    assert [row["iteration"] for row in rollouts] == list(range(1, 7))
    # The critic learns: its loss falls from the first iteration's (values start from a fresh head).
    assert rollouts[-1]["critic_loss"] < rollouts[0]["critic_loss"]
    for row in rollouts:
        assert {
            "generate_s",
            "score_s",
            "policy_logps_s",
            "reference_logps_s",
            "critic_values_send_s",
        } <= row.keys()
        assert {"critic_wait_s", "actor_train_s", "critic_train_send_s", "critic_train_wait_s"} <= row.keys()
        assert row["train_s"] >= row["actor_train_s"] + row["critic_train_send_s"]
        assert 0 <= row["train_clip_fraction"] <= 1 and 0 <= row["critic_clip_fraction"] <= 1
    assert len(read_metrics(out, "train")) == 6 * 2 * 2  # 128 samples in steps of 64, two epochs


def test_killed_ppo_run_resumes_to_the_same_policy_and_critic(warm_model, tmp_path, capsys):
    sections = {
        "iterations": 4,
        "kl": {"coef": 0.05, "adaptive": {"target": 0.01, "horizon": 100}},
        "entropy_coef": 0.01,
        "trainer": {"save_every": 2, "batch_size": 8},
    }
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_config = write_yaml(tmp_path / "killed.yaml", ppo_config(killed, warm_model, **sections))
    kill_during_iteration_3(killed_config, killed, tmp_path)
    resumed = run_cli(capsys, "run", killed_config, "--resume")
    assert resumed.code == 0, resumed.err
    result = run_cli(
        capsys, "run", write_yaml(tmp_path / "straight.yaml", ppo_config(straight, warm_model, **sections))
    )
    assert result.code == 0, result.err
    assert_same_weights(load_weights(killed / "final"), load_weights(straight / "final"))
    assert_same_weights(critic_weights(killed), critic_weights(straight))
    straight_rows, killed_rows = read_metrics(straight, "rollout"), read_metrics(killed, "rollout")
    assert [row["iteration"] for row in killed_rows][-2:] == [3, 4]
    # The adaptive coefficient moved, and the resumed run went on from the checkpoint's.
    assert straight_rows[-1]["kl_coef"] != 0.05
    assert killed_rows[-1]["kl_coef"] == straight_rows[-1]["kl_coef"]
    assert killed_rows[-1]["critic_loss"] == straight_rows[-1]["critic_loss"]


def test_critic_warmup_trains_the_critic_and_leaves_the_policy(warm_model, tmp_path, capsys):
    out = tmp_path / "warmup"
    config = ppo_config(out, warm_model, iterations=1, critic_warmup_iterations=1)
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert result.code == 0, result.err
    assert_same_weights(load_weights(out / "final"), load_weights(warm_model))
    assert read_metrics(out, "train") == []  # no policy step
    (rollout,) = read_metrics(out, "rollout")
    assert rollout["critic_warmup"] == 1.0 and rollout["critic_loss"] > 0
    # The critic trained: its body moved away from the policy's initial weights it started from.
    policy = load_weights(warm_model)
    critic = critic_weights(out)
    shared = [name for name in critic if name in policy]
    assert shared and max(float((critic[n] - policy[n]).abs().max()) for n in shared) > 1e-5


def test_every_option_runs_and_logs(warm_model, tmp_path, capsys):
    """k3 KL with the adaptive controller, clip-higher, dual clip, truncated importance sampling,
    entropy bonus, no whitening, the plain value loss, another aggregation, gradient
    accumulation, two epochs: all together, for two iterations."""
    out = tmp_path / "all"
    config = ppo_config(
        out,
        warm_model,
        epochs=2,
        clip_high=0.28,
        dual_clip=3.0,
        importance_correction={"cap": 2.0},
        entropy_coef=0.01,
        whiten_advantages=False,
        aggregation="seq_mean_token_mean",
        kl={"coef": 0.1, "estimator": "k3", "adaptive": {"target": 1.0, "horizon": 50}},
        critic={"name": "local", "value_clip": None, "optim": {"lr": 1e-3}},
        **{"lambda": 1.0, "gamma": 0.99},
        trainer={"batch_size": 4, "grad_accum": 2, "eval_every": 1},
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert result.code == 0, result.err
    rollouts = read_metrics(out, "rollout")
    assert len(rollouts) == 2 and len(read_metrics(out, "eval")) == 3
    # KL below target: the coefficient falls by the largest step, 0.2 x 16 / 50.
    assert rollouts[1]["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 * 16 / 50))
    assert rollouts[0]["critic_clip_fraction"] == 0.0  # value_clip: null
    train = read_metrics(out, "train")
    assert len(train) == 2 * 2 * 2  # 16 samples in steps of 8, two epochs, two iterations
    assert all("entropy" in row and "dual_clip_fraction" in row for row in train)


def test_gradient_accumulation_equals_one_big_batch(warm_model, tmp_path, capsys):
    """The policy loss's denominator is the whole minibatch's, so micro-batches add up to it."""
    finals = []
    for name, trainer in (("big", {"batch_size": 16}), ("accumulated", {"batch_size": 4, "grad_accum": 4})):
        out = tmp_path / name
        config = ppo_config(out, warm_model, iterations=1, trainer=trainer, optim={"name": "sgd", "lr": 0.5})
        result = run_cli(capsys, "run", write_yaml(tmp_path / f"{name}.yaml", config))
        assert result.code == 0, result.err
        finals.append(load_weights(out / "final"))
    assert max(float((finals[0][n] - finals[1][n]).abs().max()) for n in finals[0]) < 1e-6
    warm = load_weights(warm_model)
    assert max(float((finals[0][n] - warm[n]).abs().max()) for n in warm) > 1e-4  # it did train


# A critic plugin that keeps its own state (as a critic server does): zero values, a count of its
# training steps that save() writes into the checkpoint and load() reads back.
COUNTING_CRITIC = """
import json
from concurrent.futures import Future
from typing import Literal

import torch

import align


class CountingConfig(align.CriticConfig):
    name: Literal["counting"] = "counting"


class Counting:
    def __init__(self):
        self.steps = 0
        self.loaded_from = None

    def values(self, batch):
        scored = batch.sequence_ids[:, 1:][batch.loss_mask[:, 1:]]
        counts = torch.bincount(scored, minlength=batch.num_sequences)
        future = Future()
        future.set_result(torch.zeros(batch.num_sequences, int(counts.max())))
        return future

    def train(self, batch):
        assert batch.returns.shape == batch.old_values.shape == batch.mask.shape
        self.steps += 1
        future = Future()
        loss = float(batch.returns[batch.mask].pow(2).mean())
        future.set_result({"loss": loss, "steps": float(self.steps)})
        return future

    def save(self, folder):
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"steps": self.steps}))

    def load(self, folder):
        self.steps = json.loads((folder / "state.json").read_text())["steps"]

    def close(self):
        pass


@align.hookimpl
def register_critics(register):
    @register(CountingConfig)
    def counting(cfg, ctx, learner):
        return Counting()
"""


def test_a_critic_with_its_own_state_is_checkpointed_with_the_actor(
    warm_model, tmp_path, capsys, monkeypatch
):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "counting_critic.py").write_text(textwrap.dedent(COUNTING_CRITIC))
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "counting_critic")
    monkeypatch.setattr(align.cli, "default_plugins", align.load_plugins)
    out = tmp_path / "counting"
    config = ppo_config(out, warm_model, iterations=1, critic={"name": "counting"}, kl={"coef": 0.0})
    path = write_yaml(tmp_path / "run.yaml", config)
    result = run_cli(capsys, "run", path)
    assert result.code == 0, result.err
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    assert json.loads((checkpoint / "critic" / "state.json").read_text()) == {"steps": 1}
    assert "critic/state.json" in json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert not (checkpoint / "roles").exists()  # nothing of it in the learner's trainables
    resumed = run_cli(capsys, "run", path, "iterations=2", "--resume")
    assert resumed.code == 0, resumed.err
    rows = read_metrics(out, "rollout")
    assert rows[-1]["critic_steps"] == 2.0  # counted on from the checkpoint's 1


def test_critic_init_from_a_reward_without_a_path_is_a_user_error(warm_model, tmp_path, capsys):
    config = ppo_config(tmp_path / "out", warm_model, critic={"name": "local", "init": "reward"})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "critic.init: reward needs critic.path")


def test_critic_init_from_a_reward_model_keeps_its_head(tmp_path):
    """A saved reward model's score head becomes the value head; init: policy gets a fresh one
    on the policy's body."""
    from types import SimpleNamespace

    from align_hf.backend import HFBackend, HFBackendConfig
    from align_ppo.config import LocalCriticConfig
    from align_ppo.critic import critic_model_section

    run: Any = SimpleNamespace(backend=HFBackendConfig(), model=align.ModelConfig(), reward=None)
    backend = HFBackend(run)
    reward_model: Any = backend.build_model("reward")
    torch.nn.init.normal_(reward_model.score.weight)
    reward_dir = tmp_path / "rm"
    backend.save_pretrained(reward_model, reward_dir)
    section = critic_model_section(LocalCriticConfig(init="reward", path=str(reward_dir)), run)
    assert section.path == str(reward_dir) and section.tokenizer == "tiny"  # the policy's tokens
    critic: Any = backend.build_model("critic", section)
    assert torch.equal(critic.score.weight, reward_model.score.weight)
    assert critic.config.id2label == {0: "value"}
    fresh: Any = backend.build_model("critic", critic_model_section(LocalCriticConfig(), run))
    assert not torch.equal(fresh.score.weight, reward_model.score.weight)
    run.reward = SimpleNamespace(path=str(reward_dir))  # reward: {name: model, path: ...}
    assert critic_model_section(LocalCriticConfig(init="reward"), run).path == str(reward_dir)


def test_token_scores_are_the_sequence_scores_of_each_prefix(tmp_path):
    """values[s, j] is read where sequence s's j-th completion token was chosen: the score of the
    prompt plus the completion before it; padded and packed layouts agree."""
    from align.hf_models import tiny_llama_scorer
    from align_hf.backend import sequence_scores, token_scores

    model = tiny_llama_scorer(align.TinyModelConfig(), 300, 1, "eager").eval()
    torch.nn.init.normal_(model.score.weight)
    sequences = [([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14, 15, 16])]

    with torch.no_grad():
        padded = token_scores(model, align.pad_sequences(sequences, 0))
        packed = token_scores(model, align.pack_sequences(sequences))
        assert padded.mask.tolist() == [[True, True, True, False], [True, True, True, True]]
        assert torch.allclose(padded.values, packed.values, atol=1e-5)
        for s, (prompt, completion) in enumerate(sequences):
            for j in range(len(completion)):
                state = prompt + completion[:j]  # the scorer reads a sequence at its last token
                expected = sequence_scores(model, align.pad_sequences([(state[:-1], state[-1:])], 0))[0, 0]
                assert float(padded.values[s, j]) == pytest.approx(float(expected), abs=1e-5)
        assert padded.values[0, 3] == 0.0


@pytest.mark.slow
def test_rlhf_example_sft_reward_model_ppo(warm_model, tmp_path, capsys):
    """examples/rlhf/ with a small budget: the warm-up SFT model (the session fixture: what
    examples/rlhf/sft.yaml makes) -> its samples labelled by the checker -> a reward model ->
    PPO against it with the critic from the reward model. The reward model's held-out score of
    the policy's greedy answers rises, and so does their exact-match accuracy."""
    import runpy

    quiet = ["trainer.num_threads=1", "trainer.progress=false", "trainer.tensorboard=false"]
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    prompts = EXAMPLES / "data" / "arith_prompts_train.jsonl"
    result = run_cli(
        capsys,
        "generate",
        "--model",
        str(warm_model),
        "--prompts",
        str(prompts),
        "--out",
        str(samples),
        "n=8",
        "temperature=1.0",
        "max_tokens=4",
    )
    assert result.code == 0, result.err
    make_pairs = runpy.run_path(str(EXAMPLES / "rlhf" / "make_pairs.py"))["main"]
    assert make_pairs([str(samples), str(pairs)]) == 0
    reward_dir = tmp_path / "reward"
    result = run_cli(
        capsys,
        "run",
        str(EXAMPLES / "rlhf" / "reward.yaml"),
        f"model.path={warm_model}",
        f"data.train=[{EXAMPLES / 'rlhf' / 'arith_preferences_train.jsonl'},{pairs}]",
        f"output_dir={reward_dir}",
        *quiet,
    )
    assert result.code == 0, result.err
    assert read_metrics(reward_dir, "eval")[-1]["accuracy"] > 0.7  # prefers right sums on held-out pairs
    ppo_dir = tmp_path / "ppo"
    result = run_cli(
        capsys,
        "run",
        str(EXAMPLES / "rlhf" / "ppo.yaml"),
        f"model.path={warm_model}",
        f"reward.path={reward_dir / 'final'}",
        f"output_dir={ppo_dir}",
        *quiet,
    )
    assert result.code == 0, result.err
    evals = read_metrics(ppo_dir, "eval")
    assert evals[-1]["reward"] > evals[0]["reward"] + 0.05, evals
    assert evals[-1]["accuracy"] > evals[0]["accuracy"], evals
