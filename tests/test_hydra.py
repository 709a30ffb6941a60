"""Hydra heads (``backend.num_layers_unfrozen``): only the policy's top blocks train; the
reference is the policy's own frozen trunk plus a frozen copy of the initial top, and PPO's
critic a head on the same trunk. The reference scores exactly as the initial policy did, before
and after training; the trunk never changes; DPO learns and resumes bit-exact; GRPO's KL and
PPO's branched critic work; the output is an ordinary HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    TINY_MODEL,
    assert_same_weights,
    dpo_config,
    load_weights,
    merge,
    read_metrics,
)
from helpers.online import arith_config
from helpers.resume import assert_resumes_bit_exact, train
from transformers import AutoModelForCausalLM

import align

THREE_LAYERS = merge(TINY_MODEL, {"tiny": {"num_layers": 3}})
HYDRA = {"name": "hf", "num_layers_unfrozen": 1}
PAIRS = [([5, 6, 7], [8, 9, 10, 11]), ([40, 41], [42, 43, 44]), ([100, 101, 102, 103], [104])]


def hydra_backend(tmp_path: Path, **backend: Any) -> Any:
    plugins = align.default_plugins()
    config = dpo_config(tmp_path / "run", model=THREE_LAYERS, backend={**HYDRA, **backend})
    return align.build_backend(align.validate_run_config(config, plugins.registry), plugins)


def trunk_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The embeddings and the two lower blocks (of three): what never trains."""
    return {
        name: tensor.detach().clone()
        for name, tensor in policy.state_dict().items()
        if name.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1."))
    }


def logps(backend: Any, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        values: torch.Tensor = backend.token_logps(model, align.pad_sequences(PAIRS, pad_id=0)).values
    return values


def test_reference_scores_as_the_initial_policy_on_the_policys_own_trunk(tmp_path: Path) -> None:
    backend = hydra_backend(tmp_path)
    policy = backend.build_policy()
    reference = backend.build_reference()
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trained == {
        n for n, _ in policy.named_parameters() if n.startswith(("model.layers.2.", "model.norm."))
    } | {"lm_head.weight"}
    # The reference owns only its copy of the top block, norm and head: no trunk tensor.
    own = sum(p.numel() for p in reference.parameters())
    top = sum(p.numel() for n, p in policy.named_parameters() if n in trained)
    assert own == top
    # ... and it runs on the policy's trunk modules themselves (the same tensors, no copy).
    ran: list[str] = []
    hooks = [
        policy.model.embed_tokens.register_forward_hook(lambda *_: ran.append("embed")),
        policy.model.layers[0].register_forward_hook(lambda *_: ran.append("block 0")),
        policy.model.layers[2].register_forward_hook(lambda *_: ran.append("policy's top block")),
    ]
    policy.train()
    initial = logps(backend, policy)
    ran.clear()
    assert torch.equal(logps(backend, reference), initial)
    assert ran == ["embed", "block 0"]  # the policy's own top block did not run for the reference
    for hook in hooks:
        hook.remove()
    assert policy.training and policy.model.layers[2].training  # modes put back after scoring

    trunk = trunk_state(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss = -backend.sequence_logps(policy, align.pad_sequences(PAIRS, pad_id=0)).sum.sum()
        loss.backward()
        optimizer.step()
    assert not torch.equal(logps(backend, policy), initial)  # the policy learned
    assert torch.equal(logps(backend, reference), initial)  # the reference did not move
    assert_same_weights(trunk_state(policy), trunk)  # nor did the trunk
    # A reference built after updates (a resumed run) still gets the initial top weights.
    assert torch.equal(logps(backend, backend.build_reference()), initial)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    """The top blocks (policy and critic branch) get their gradients with checkpointing too,
    although their input (the frozen trunk's output) does not require grad."""
    batch = align.pad_sequences(PAIRS, pad_id=0)
    grads = []
    for checkpointing in (False, True):
        backend = hydra_backend(
            tmp_path / str(checkpointing), num_layers_unfrozen=2, gradient_checkpointing=checkpointing
        )
        policy = backend.build_policy().train()
        torch.manual_seed(0)  # the critic's fresh value head
        critic = backend.build_model("critic").train()
        (-backend.sequence_logps(policy, batch).sum.sum()).backward()
        backend.token_scores(critic, batch).values.sum().backward()
        trained = [*policy.named_parameters(), *critic.named_parameters()]
        grads.append({name: p.grad for name, p in trained if p.requires_grad})
    assert len(grads[0]) == len(grads[1]) and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6)


def test_a_reward_model_being_trained_freezes_the_same_trunk(tmp_path: Path) -> None:
    """``--algo reward``'s scorer: the top block, final norm and score head train."""
    scorer = hydra_backend(tmp_path).build_scorer(1)
    trained = [name for name, p in scorer.named_parameters() if p.requires_grad]
    assert {"model.norm.weight", "score.weight"} <= set(trained)
    assert all(name.startswith(("model.layers.2.", "model.norm.", "score.")) for name in trained)
    assert any(name.startswith("model.layers.2.") for name in trained)


def test_more_layers_than_the_model_has_and_lora_together_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(align.ConfigError, match=r"num_layers_unfrozen \(4\) is more than the 3"):
        hydra_backend(tmp_path, num_layers_unfrozen=4).build_policy()
    plugins = align.default_plugins()
    config = dpo_config(tmp_path / "run", model=merge(THREE_LAYERS, {"lora": {"r": 4}}), backend=HYDRA)
    with pytest.raises(align.ConfigError, match=r"model\.lora are two ways"):
        align.build_backend(align.validate_run_config(config, plugins.registry), plugins)


def hydra_dpo(out: Path, **sections: Any) -> dict[str, Any]:
    return dpo_config(
        out,
        **merge(
            {
                "model": THREE_LAYERS,
                "backend": HYDRA,
                "reference": {"mode": "live"},
                "trainer": {"max_steps": 8, "batch_size": 8},
                "optim": {"lr": 3e-3},
            },
            sections,
        ),
    )


def test_dpo_with_a_live_hydra_reference_learns_and_saves_full_weights(tmp_path: Path) -> None:
    result = train(hydra_dpo(tmp_path / "run"))
    before, after = result.eval_before, result.eval_after
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # reference == policy
    assert after["reward_margin"] > 0.05
    assert after["reward_accuracy"] > 0.7
    # final/ is an ordinary HF checkpoint with every weight; only the top moved.
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    initial = hydra_backend(tmp_path / "fresh").build_policy()
    assert_same_weights(trunk_state(loaded), trunk_state(initial))
    saved, start = load_weights(result.final_dir), initial.state_dict()
    assert set(saved) == set(start)
    moved = {name for name in saved if not torch.equal(saved[name], start[name])}
    assert moved and all(name.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for name in moved)


def test_dpo_precomputes_its_reference_with_the_hydra_head(tmp_path: Path) -> None:
    """The default mode scores the reference once before training (then frees it): at step 0 the
    policy's held-out log-probs equal the cached ones exactly."""
    result = train(hydra_dpo(tmp_path / "run", reference={"mode": "precompute"}, trainer={"max_steps": 1}))
    assert result.eval_before["reward_margin"] == 0.0 and result.eval_before["reward_chosen"] == 0.0
    assert result.eval_after["reward_chosen"] != 0.0


def test_dpo_with_hydra_resumes_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resumed run rebuilds its reference after the policy's checkpoint was loaded: the
    reference's top must still be the initial one (built afresh), or the losses would differ."""

    def config(name: str) -> dict[str, Any]:
        return hydra_dpo(tmp_path / name, trainer={"max_steps": 4, "save_every": 2})

    assert_resumes_bit_exact(config, tmp_path, monkeypatch, stop_at=2, steps=4)


def test_grpo_kl_to_a_hydra_reference(warm_model: Path, tmp_path: Path) -> None:
    """GRPO's KL reference is the hydra reference: exactly 0 in the first iteration (nothing
    trained yet), > 0 after an update; the engine refit with the full weights agrees with the
    trainer."""
    out = tmp_path / "grpo"
    config = arith_config("grpo", out, warm_model)
    config = merge(
        config,
        dict(
            backend=HYDRA,
            iterations=2,
            prompts_per_iteration=8,
            kl={"coef": 0.05},
            trainer={"batch_size": 16},
            optim={"lr": 2e-2},
        ),
    )
    train(config)
    first, second = read_metrics(out, "rollout")
    assert first["kl"] == 0.0
    assert second["kl"] > 1e-4
    assert second["logprob_mismatch"] == pytest.approx(1.0, abs=1e-3)


def test_ppo_with_a_critic_branching_from_the_trunk(warm_model: Path, tmp_path: Path) -> None:
    """PPO's local critic is the trunk plus its own top block, norm and value head: its checkpoint
    holds only those, they train, and the policy's trunk is still the warm model's."""
    out = tmp_path / "ppo"
    config = arith_config(
        "ppo",
        out,
        warm_model,
        backend=HYDRA,
        iterations=2,
        prompts_per_iteration=8,
        sampling={"n": 2},
        epochs=1,
        kl={"coef": 0.05},
        trainer={"batch_size": 16, "save_every": 1},
        optim={"lr": 3e-4},
    )
    train(config)
    rollouts = read_metrics(out, "rollout")
    assert rollouts[0]["kl"] == 0.0 and all(row["critic_loss"] > 0 for row in rollouts)
    first, newest = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    critic = load_weights(newest / "roles" / "critic")
    assert critic["score.weight"].shape[0] == 1
    # The value head trained between the two iterations' checkpoints.
    earlier = load_weights(first / "roles" / "critic")["score.weight"]
    assert float((critic["score.weight"] - earlier).abs().max()) > 1e-6
    branch = {name.removeprefix("model.branch."): t for name, t in critic.items() if name != "score.weight"}
    assert all(name.startswith(("blocks.0.", "norm.")) for name in branch)  # no trunk tensor
    initial = load_weights(warm_model)
    top = {
        f"blocks.0.{n.removeprefix('model.layers.1.')}": t for n, t in initial.items() if ".layers.1." in n
    }
    top["norm.weight"] = initial["model.norm.weight"]
    assert set(branch) == set(top)
    # The critic's branch started as the policy's top and trained away from it.
    assert max(float((branch[n] - top[n]).abs().max()) for n in branch) > 1e-5
    final = load_weights(out / "final")
    trunk = [n for n in initial if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert_same_weights({n: final[n] for n in trunk}, {n: initial[n] for n in trunk})
