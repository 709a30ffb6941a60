"""Sequence scorers on the megatron backend: a reward model (``--algo reward``) trains as on the
hf backend (TP=1, in-process) and as at TP=1 under TP=2, PP=2, DP=2 and TP=2 with sequence
parallelism (one torchrun launch, 2 processes, gloo); its final model is an HF sequence
classifier that transformers loads and that scores as the megatron model does. PPO with its
local critic (a trainable scorer read at every token) follows the hf backend at TP=1, TP=1 at
TP=2, and a TP=2 run resumed from its first checkpoint ends with the same critic, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import read_metrics, read_yaml, write_yaml
from helpers.megatron_runs import (
    grad_norms,
    length_reward_run,
    pairs_config,
    run_in_process,
    torchrun,
    train_losses,
    variant,
)
from safetensors.torch import load_file

import align
from align.loading import validate_run_config

pytest.importorskip("megatron.core")

from test_megatron import LOSS_TOLERANCE, RESHARDED_RESUME_TOLERANCE, checkpoint_weights


def reward_run(folder: Path, name: str, backend: dict[str, Any]) -> str:
    """An 8-step Bradley-Terry run of the two-layer tiny model on 32 shipped pairs (two epochs,
    no eval split; rows up to 127 tokens, odd, so sequence parallelism at TP=2 pads the width),
    as a config file."""
    config = pairs_config(
        folder,
        name,
        backend,
        max_length=127,
        algo="reward",
        loss=None,
        trainer={"max_steps": 8},
        optim={"lr": 3e-3},
    )
    return write_yaml(folder / f"{name}.yaml", config)


@pytest.fixture(scope="module")
def tp1_reward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reward run on the megatron backend at TP=1 (in-process, a world of one)."""
    folder = tmp_path_factory.mktemp("megatron_reward")
    run_in_process(reward_run(folder, "tp1", {"name": "megatron"}))
    return folder / "tp1"


def ppo_run(folder: Path, name: str, backend: dict[str, Any], **sections: Any) -> str:
    """Two PPO iterations (8 prompts x 2 samples, one epoch, a length reward) with the local
    critic, initialised from the policy, on the megatron backend with ``backend``'s parallel
    sizes, as a config file."""
    config = length_reward_run("ppo", folder / name, backend, samples=2, lr=3e-4, epochs=1, **sections)
    return write_yaml(folder / f"{name}.yaml", config)


CRITIC_METRICS = ("critic_loss", "critic_grad_norm", "critic_value_mean", "critic_explained_variance")


def critic_metrics(output_dir: Path) -> list[list[float]]:
    return [[row[key] for key in CRITIC_METRICS] for row in read_metrics(output_dir, "rollout")]


def critic_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The checkpointed critic, HF-named: the hf backend's safetensors, or the megatron
    backend's distributed checkpoint read at TP=1 (the run's config sits beside its folder)."""
    folder = output_dir / f"checkpoints/step_{step}/roles/critic"
    return checkpoint_weights(output_dir.parent / f"{output_dir.name}.yaml", folder, "critic")


@pytest.fixture(scope="module")
def tp1_ppo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PPO with the local critic on the megatron backend at TP=1 (in-process)."""
    folder = tmp_path_factory.mktemp("megatron_ppo")
    run_in_process(ppo_run(folder, "tp1", {}))
    return folder / "tp1"


def scored_batches(tokenizer: Any) -> tuple[align.TokenBatch, align.TokenBatch]:
    """Three sequences of different lengths, right-padded and packed."""
    sequences = [([1, 40, 41], [42, 43, 2]), ([1, 44], [45, 2]), ([1, 46, 47, 48, 49, 50], [51, 2])]
    return align.pad_sequences(sequences, tokenizer.pad_token_id), align.pack_sequences(sequences)


def test_reward_on_megatron_follows_the_hf_backend_and_exports_a_classifier(
    tp1_reward: Path, tmp_path: Path
) -> None:
    """The same run on both backends: the same losses (to 1e-5) and final weights, and it
    learns. The final model is an HF sequence classifier: transformers loads it, and the megatron
    backend's reward model built from it (the trained weights, converted back) gives
    transformers' scores, padded or packed."""
    from transformers import AutoModelForSequenceClassification

    from align.plugins import default_plugins

    config = read_yaml(tp1_reward.parent / "tp1.yaml")
    run_in_process(variant(tp1_reward.parent / "tp1.yaml", tmp_path / "hf", backend={"name": "hf"}))
    hf = train_losses(tmp_path / "hf")
    assert train_losses(tp1_reward) == pytest.approx(hf, abs=LOSS_TOLERANCE)
    assert len(hf) == 8 and hf[-1] < hf[0] - 0.3  # it learns
    ours = load_file(tp1_reward / "final/model.safetensors")
    theirs = load_file(tmp_path / "hf/final/model.safetensors")
    assert set(ours) == set(theirs) and "score.weight" in ours and "lm_head.weight" not in ours
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    exported = json.loads((tp1_reward / "final/config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"]
    assert exported["id2label"] == {"0": "reward"}

    loaded = AutoModelForSequenceClassification.from_pretrained(tp1_reward / "final").eval()
    run = validate_run_config(
        {**config, "model": {"path": str(tp1_reward / "final")}}, default_plugins().registry
    )
    from align_megatron import MegatronBackend

    backend = MegatronBackend(run)
    reward = backend.build_model("reward")
    assert not any(p.requires_grad for p in reward.parameters())  # the reward role is frozen
    padded, packed = scored_batches(backend.tokenizer)
    with torch.no_grad():
        scores = backend.sequence_scores(reward, padded)
        expected = loaded(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(backend.sequence_scores(reward, packed), scores, rtol=0, atol=1e-5)


def test_ppo_local_critic_on_megatron_follows_the_hf_backend(tp1_ppo: Path, tmp_path: Path) -> None:
    """The critic's loss, gradient norm, values and explained variance, the policy's losses, and
    the critic's checkpointed weights (an HF sequence classifier) match the hf backend's."""
    run_in_process(variant(tp1_ppo.parent / "tp1.yaml", tmp_path / "hf", backend={"name": "hf"}))
    ours, theirs = critic_metrics(tp1_ppo), critic_metrics(tmp_path / "hf")
    assert len(ours) == 2
    assert [v for row in ours for v in row] == pytest.approx([v for row in theirs for v in row], abs=1e-5)
    assert grad_norms(tp1_ppo) == pytest.approx(grad_norms(tmp_path / "hf"), abs=1e-5)
    assert train_losses(tp1_ppo) == pytest.approx(train_losses(tmp_path / "hf"), abs=1e-5)
    critic, hf_critic = critic_weights(tp1_ppo, 2), critic_weights(tmp_path / "hf", 2)
    assert set(critic) == set(hf_critic) and "score.weight" in critic
    assert max(float((critic[k] - hf_critic[k]).abs().max()) for k in critic) < 1e-5
    exported = json.loads((tp1_ppo / "checkpoints/step_2/roles/critic/config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"]


@pytest.mark.slow
def test_reward_and_ppo_critic_at_tp2_pp2_dp2_and_sequence_parallel_follow_tp1(
    tp1_reward: Path, tp1_ppo: Path, tmp_path: Path
) -> None:
    """One torchrun launch (2 processes): the reward run at TP=2, TP=2 with sequence
    parallelism, PP=2 and DP=2 gives TP=1's losses and gradient norms (the score head, whole on
    every TP rank, counted once; its gradient is not summed over TP) and final weights. PPO at
    TP=2 gives TP=1's critic metrics; resumed from its iteration-1 checkpoint (every rank saved
    and restores its critic shards through the backend), it repeats iteration 2 and checkpoints
    the same critic, bit for bit; resumed from it at TP=1 in this process, it repeats iteration 2's
    critic metrics (to 1e-5) and ends with TP=2's critic (to 1e-6; measured 3.7e-9)."""
    layouts = {
        "tp2": {"tensor_model_parallel_size": 2},
        "sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        "pp2": {"pipeline_model_parallel_size": 2},
        "dp2": {},
    }
    runs = [reward_run(tmp_path, name, {"name": "megatron", **backend}) for name, backend in layouts.items()]
    tp2 = {"tensor_model_parallel_size": 2}
    runs.append(ppo_run(tmp_path, "ppo_tp2", tp2, trainer={"save_every": 1}))
    resume = str(tmp_path / "ppo_tp2/checkpoints/step_1")
    runs.append(ppo_run(tmp_path, "ppo_resumed", tp2, resume=resume))
    report = torchrun(tmp_path, tp=0, runs=runs)
    assert report["world_size"] == 2
    reference, reference_norms = train_losses(tp1_reward), grad_norms(tp1_reward)
    tp1_final = load_file(tp1_reward / "final/model.safetensors")
    for name in layouts:
        assert train_losses(tmp_path / name) == pytest.approx(reference, abs=LOSS_TOLERANCE), name
        assert grad_norms(tmp_path / name) == pytest.approx(reference_norms, rel=1e-5), name
        final = load_file(tmp_path / name / "final/model.safetensors")
        assert set(final) == set(tp1_final), name
        assert max(float((final[k] - tp1_final[k]).abs().max()) for k in final) < 1e-4, name
    ppo = critic_metrics(tmp_path / "ppo_tp2")
    flat = [v for row in ppo for v in row]
    assert flat == pytest.approx([v for row in critic_metrics(tp1_ppo) for v in row], abs=1e-5)
    assert critic_metrics(tmp_path / "ppo_resumed") == ppo[1:]
    first, second = critic_weights(tmp_path / "ppo_tp2", 2), critic_weights(tmp_path / "ppo_resumed", 2)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "ppo_tp2/checkpoints/step_1/ranks/rank_1.pt").is_file()

    # The same checkpoint resumed at TP=1 (in this process): the critic's weights and optimizer
    # state reshard like the policy's, so iteration 2 and the critic it ends with are TP=2's.
    backend = {"name": "megatron"}
    run_in_process(
        variant(tmp_path / "ppo_tp2.yaml", tmp_path / "ppo_at_tp1", backend=backend, resume=resume)
    )
    repeated = critic_metrics(tmp_path / "ppo_at_tp1")
    assert [v for row in repeated for v in row] == pytest.approx(ppo[1], abs=1e-5)
    resharded = critic_weights(tmp_path / "ppo_at_tp1", 2)
    largest = max(float((resharded[k] - first[k]).abs().max()) for k in first)
    print("critic resumed at TP=1: largest weight difference from TP=2", largest)
    assert set(resharded) == set(first) and largest <= RESHARDED_RESUME_TOLERANCE
