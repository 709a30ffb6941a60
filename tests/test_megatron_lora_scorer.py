"""LoRA on a megatron sequence scorer (a reward model being trained; PPO's critic takes the same
path): adapters on the trunk's parallel linears as on the policy, the score head trained in full;
it follows the hf backend's LoRA scorer from the same starting adapters; checkpoints hold the
adapter and the head (PEFT's SEQ_CLS format) and a resume from one is bit-exact; ``final/`` is
the merged HF sequence classifier, which transformers loads and which scores as the trained
adapter and head do (TP=1, in this process); and at TP=2 and PP=2 (one torchrun launch, slow) it
follows TP=1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import merge, read_metrics, write_yaml
from helpers.megatron_runs import (
    TWO_LAYERS,
    grad_norms,
    length_reward_run,
    pairs_config,
    run_in_process,
    torchrun,
    train_losses,
)
from safetensors.torch import load_file

import align

pytest.importorskip("megatron.core")

LORA = {"r": 4, "alpha": 8}
PAIRS = [([5, 6, 7], [8, 9, 10, 11]), ([40, 41], [42, 43, 44]), ([100, 101, 102, 103], [104])]
REJECTED = [([5, 6, 7], [20, 21]), ([40, 41], [60]), ([100, 101, 102, 103], [70, 71, 72])]


def reward_config(folder: Path, backend: str, lora: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A Bradley-Terry run of the two-layer tiny model with LoRA on 16 shipped pairs, 4 a step,
    two epochs (lr 1e-2: the adapters start at zero), no eval split."""
    return pairs_config(
        folder.parent,
        folder.name,
        {"name": backend},
        pairs=16,
        model=merge(TWO_LAYERS, {"lora": {**LORA, **lora}}),
        algo="reward",
        loss=None,
        optim={"lr": 1e-2},
        **merge({"trainer": {"batch_size": 4, "max_steps": 8}}, sections),
    )


def scorer(config: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    """The run's backend (with LoRA) and its trainable scorer, built in this process."""
    plugins = align.default_plugins()
    backend = align.build_backend(align.validate_run_config(config, plugins.registry), plugins)
    assert isinstance(backend, align.ScoringBackend)
    return backend, backend.build_scorer(1, ["reward"])


def pair_loss(backend: Any, model: torch.nn.Module) -> torch.Tensor:
    """Bradley-Terry on PAIRS (chosen) against REJECTED."""
    from align_reward.algorithm import bradley_terry

    scores = backend.sequence_scores(model, align.pad_sequences(PAIRS + REJECTED, pad_id=0))[:, 0]
    return bradley_terry(scores[: len(PAIRS)], scores[len(PAIRS) :])


def test_only_adapters_and_head_train_and_follow_the_hf_backend(tmp_path: Path) -> None:
    """The megatron scorer trains 16 adapter matrices (A, B on 4 fused layers x 2 layers) plus
    the head, and nothing else. With unfused targets (o_proj, down_proj: the same model on both
    backends), the adapters the megatron scorer starts from copied into the hf backend's PEFT
    scorer, and the same five AdamW steps, both give the same losses."""
    from peft import set_peft_model_state_dict

    _, full = scorer(reward_config(tmp_path / "all", "megatron", {}))
    trainable = {name: p.numel() for name, p in full.named_parameters() if p.requires_grad}
    assert set(trainable) - {"score.weight"} == {
        name for name, _ in full.named_parameters() if name.endswith(("lora.A", "lora.B"))
    }
    assert len(trainable) == 17 and trainable["score.weight"] == 32  # hidden 32, one label
    # r (d_in + d_out) for each fused layer: qkv 32 -> 96, proj 32 -> 32, fc1 32 -> 128, fc2 64 -> 32.
    assert sum(trainable.values()) == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (64 + 32)) + 32

    unfused = {"target_modules": ["o_proj", "down_proj"], "dropout": 0.0}
    megatron, ours = scorer(reward_config(tmp_path / "meg", "megatron", unfused))
    hf, theirs = scorer(reward_config(tmp_path / "hf", "hf", unfused))
    with torch.no_grad():  # non-zero B, so that the copy is checked on every matrix
        for name, param in ours.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    megatron.save_checkpoint_weights(ours, tmp_path / "start")
    start = load_file(tmp_path / "start/adapter_model.safetensors")
    assert "base_model.model.score.weight" in start and len(start) == 2 * 2 * 2 + 1
    set_peft_model_state_dict(theirs, start)  # PEFT's own names: the head lands in modules_to_save
    losses: dict[str, list[float]] = {"megatron": [], "hf": []}
    for key, backend, model in (("megatron", megatron, ours), ("hf", hf, theirs)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 9  # A and B on 2 layers x 2 linears, and the head
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(5):
            loss = pair_loss(backend, model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[key].append(float(loss.detach()))
    assert losses["megatron"] == pytest.approx(losses["hf"], abs=1e-6)
    assert losses["megatron"][-1] < losses["megatron"][0] - 0.05  # it learns


@pytest.fixture(scope="module")
def lora_reward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA reward run on megatron (8 steps, a checkpoint at step 4), then resumed there."""
    folder = tmp_path_factory.mktemp("megatron_lora_reward")
    config = reward_config(folder / "run", "megatron", {}, trainer={"save_every": 4})
    run_in_process(write_yaml(folder / "run.yaml", config))
    resumed = {
        **config,
        "output_dir": str(folder / "resumed"),
        "resume": str(folder / "run/checkpoints/step_4"),
    }
    run_in_process(write_yaml(folder / "resumed.yaml", resumed))
    return folder


def test_checkpoints_hold_adapter_and_head_and_resume_bit_exact(lora_reward: Path) -> None:
    losses = train_losses(lora_reward / "run")
    assert len(losses) == 8 and sum(losses[4:]) < sum(losses[:4]) - 0.4  # epoch 2 < epoch 1
    assert train_losses(lora_reward / "resumed") == losses[4:]  # bit for bit
    folder = lora_reward / "run/checkpoints/step_4/model"
    saved = load_file(folder / "adapter_model.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in saved if k != "base_model.model.score.weight")
    assert saved["base_model.model.score.weight"].shape == (1, 32)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    ends = [
        load_file(lora_reward / name / "final/adapter/adapter_model.safetensors")
        for name in ("run", "resumed")
    ]
    assert set(ends[0]) == set(ends[1]) and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_final_is_a_merged_classifier_scoring_as_the_trained_adapter(lora_reward: Path) -> None:
    """final/ loads with AutoModelForSequenceClassification and gives the scores of the megatron
    LoRA scorer holding the trained adapter and head (final/adapter/), and of PEFT's SEQ_CLS
    model of that adapter on the HF base; the training moved them off the base scorer's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    final = lora_reward / "run/final"
    assert json.loads((final / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    config = reward_config(lora_reward / "check", "megatron", {})
    backend, model = scorer(config)
    batch = align.pad_sequences(PAIRS + REJECTED, pad_id=0)
    with torch.no_grad():
        untrained = backend.sequence_scores(model.eval(), batch)
        backend.load_weights(model, final)
        trained = backend.sequence_scores(model, batch)
        exported = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-5)
    assert float((trained - untrained).abs().max()) > 1e-2

    plain = reward_config(lora_reward / "hf", "hf", {})
    del plain["model"]["lora"]
    _, base = scorer(plain)  # the same tiny scorer, before any training, on the hf backend
    peft = PeftModel.from_pretrained(base, final / "adapter").eval()
    with torch.no_grad():
        adapted = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(adapted, exported, rtol=0, atol=1e-5)


def ppo_config(folder: Path, backend: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """Two PPO iterations with LoRA on the run's model section (the megatron backend with
    ``backend``'s parallel sizes): the policy and the local critic (initialised from it, a fresh
    head) each get adapters."""
    model = merge(TWO_LAYERS, {"lora": LORA})
    return length_reward_run(
        "ppo", folder, backend or {}, samples=2, lr=1e-2, model=model, epochs=1, **sections
    )


@pytest.fixture(scope="module")
def lora_ppo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PPO with LoRA on megatron at TP=1 (a checkpoint every iteration), then resumed from
    iteration 1."""
    folder = tmp_path_factory.mktemp("megatron_lora_ppo")
    config = ppo_config(folder / "run", trainer={"save_every": 1})
    run_in_process(write_yaml(folder / "run.yaml", config))
    resumed = {**config, "output_dir": str(folder / "resumed")}
    resumed["resume"] = str(folder / "run/checkpoints/step_1")
    run_in_process(write_yaml(folder / "resumed.yaml", resumed))
    return folder


def lora_critic(run: Path, step: int) -> dict[str, torch.Tensor]:
    """A PPO run's checkpointed critic: its adapter and head (PEFT's SEQ_CLS names)."""
    return load_file(run / f"checkpoints/step_{step}/roles/critic/adapter_model.safetensors")


def test_ppo_critic_with_lora_checkpoints_adapter_and_head_and_resumes_bit_exact(lora_ppo: Path) -> None:
    """PPO's local critic (``build_model("critic")``) takes the same path as a reward model: its
    checkpoint is its adapter and head (SEQ_CLS), the policy's its adapter alone (CAUSAL_LM); the
    head trains; a run resumed from iteration 1 repeats iteration 2's critic, bit for bit."""
    tmp_path = lora_ppo
    first, second = lora_critic(tmp_path / "run", 1), lora_critic(tmp_path / "run", 2)
    head = "base_model.model.score.weight"
    assert head in first and not torch.equal(first[head], second[head])  # trained in full
    assert all(".lora_A." in k or ".lora_B." in k for k in first if k != head)
    folder = tmp_path / "run/checkpoints/step_1"
    assert json.loads((folder / "roles/critic/adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    policy = load_file(folder / "model/adapter_model.safetensors")
    assert head not in policy and set(policy) == set(first) - {head}
    ours = read_metrics(tmp_path / "run", "rollout")
    again = read_metrics(tmp_path / "resumed", "rollout")
    keys = ("critic_loss", "critic_grad_norm", "critic_value_mean")
    assert [[row[k] for k in keys] for row in again] == [[row[k] for k in keys] for row in ours[1:]]
    final = lora_critic(tmp_path / "resumed", 2)
    assert set(final) == set(second) and all(torch.equal(final[k], second[k]) for k in final)


@pytest.mark.slow
def test_reward_lora_at_tp2_and_pp2_and_ppo_lora_at_tp2_follow_tp1(
    lora_reward: Path, lora_ppo: Path, tmp_path: Path
) -> None:
    """One torchrun launch (2 processes): the LoRA reward run at TP=2 (adapter dropout on: its
    masks do not depend on TP) gives TP=1's losses and final adapter and head; at PP=2 (dropout
    0: each stage draws its own masks) those of a TP=1 run without dropout, the head saved from
    the last stage. PPO with LoRA on the policy and the critic at TP=2 gives TP=1's critic
    metrics (to 1e-5) and policy gradient norms, and its checkpointed critic adapter and head
    (to 1e-4; measured 1.0e-7)."""
    from test_megatron import LOSS_TOLERANCE

    def run(name: str, backend: dict[str, Any], **lora: Any) -> str:
        config = reward_config(tmp_path / name, "megatron", lora)
        config["backend"] = {"name": "megatron", **backend}
        return write_yaml(tmp_path / f"{name}.yaml", config)

    tp2 = run("tp2", {"tensor_model_parallel_size": 2})
    pp2 = run("pp2", {"pipeline_model_parallel_size": 2}, dropout=0.0)
    ppo = ppo_config(tmp_path / "ppo_tp2", {"tensor_model_parallel_size": 2}, trainer={"save_every": 1})
    torchrun(tmp_path, tp=0, runs=[tp2, pp2, write_yaml(tmp_path / "ppo_tp2.yaml", ppo)])
    run_in_process(run("tp1_no_dropout", {}, dropout=0.0))

    adapter = "final/adapter/adapter_model.safetensors"
    for name, reference in (("tp2", lora_reward / "run"), ("pp2", tmp_path / "tp1_no_dropout")):
        assert train_losses(tmp_path / name) == pytest.approx(train_losses(reference), abs=LOSS_TOLERANCE)
        ours, theirs = load_file(tmp_path / name / adapter), load_file(reference / adapter)
        assert set(ours) == set(theirs) and "base_model.model.score.weight" in ours, name
        assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-4, name

    def flat_critic_metrics(run: Path) -> list[float]:
        keys = ("critic_loss", "critic_grad_norm", "critic_value_mean", "critic_explained_variance")
        return [row[k] for row in read_metrics(run, "rollout") for k in keys]

    tp1_ppo, tp2_ppo = lora_ppo / "run", tmp_path / "ppo_tp2"
    assert flat_critic_metrics(tp2_ppo) == pytest.approx(flat_critic_metrics(tp1_ppo), abs=1e-5)
    assert grad_norms(tp2_ppo) == pytest.approx(grad_norms(tp1_ppo), rel=1e-5)
    ours, theirs = lora_critic(tp2_ppo, 2), lora_critic(tp1_ppo, 2)
    largest = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print("PPO critic with LoRA at TP=2: largest difference from TP=1", largest)
    assert set(ours) == set(theirs) and "base_model.model.score.weight" in ours and largest < 1e-4
