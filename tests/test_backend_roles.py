"""The hf backend builds models by role, each from its own model section, and streams a model's
weights (HF names, as the saved safetensors hold them) for an engine refit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_MODEL, load_weights
from torch import nn
from transformers import LlamaForCausalLM

import align
from align.hf_models import tiny_llama_config
from align.loading import validate_run_config
from align_hf import HFBackend


@pytest.fixture(scope="module")
def registry() -> align.Registry:
    return align.load_plugins().registry


def backend_for(registry: align.Registry, **model: Any) -> HFBackend:
    run = validate_run_config(
        {"algo": "sft", "data": {"train": "x.jsonl"}, "model": {**TINY_MODEL, **model}}, registry
    )
    return HFBackend(run)


def tiny(init_seed: int) -> dict[str, Any]:
    return {**TINY_MODEL, "tiny": {**TINY_MODEL["tiny"], "init_seed": init_seed}}


def trainable(model: nn.Module) -> bool:
    return all(p.requires_grad for p in model.parameters())


def frozen(model: nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


def batch() -> align.TokenBatch:
    return align.pad_sequences([([1, 40, 41], [42, 43, 2]), ([1, 44], [45, 2])], 0)


def logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        b = batch().to(next(model.parameters()).device)  # the backend's device (a GPU where there is one)
        out: torch.Tensor = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return out.cpu()


def test_roles_build_causal_lms_and_one_head_scorers(registry: align.Registry) -> None:
    backend = backend_for(registry)
    assert isinstance(backend, align.Backend) and backend.is_main
    policy, reference = backend.build_model("policy"), backend.build_model("reference")
    reward, critic = backend.build_model("reward"), backend.build_model("critic")
    assert type(policy).__name__ == type(reference).__name__ == "LlamaForCausalLM"
    assert type(reward).__name__ == type(critic).__name__ == "LlamaForSequenceClassification"
    assert policy.training and trainable(policy) and trainable(critic)
    assert frozen(reference) and frozen(reward)
    assert reward.config.id2label == {0: "reward"} and critic.config.id2label == {0: "value"}  # type: ignore[union-attr]
    assert reward.config.pad_token_id == backend.tokenizer.pad_token_id  # type: ignore[union-attr]
    torch.testing.assert_close(logits(policy), logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(
        logits(backend.build_policy()), logits(backend.build_reference()), rtol=0, atol=0
    )
    with pytest.raises(
        ValueError, match="unknown model role 'actor'; roles: policy, reference, reward, critic"
    ):
        backend.build_model("actor")


def test_a_policy_and_a_reward_model_from_different_paths(registry: align.Registry, tmp_path: Path) -> None:
    # A reward model and a policy saved from differently seeded tiny models.
    reward_maker = backend_for(registry, **tiny(1))
    saved_reward = reward_maker.build_model("critic")
    reward_maker.save_pretrained(saved_reward, tmp_path / "rm")
    policy_maker = backend_for(registry, **tiny(2))
    saved_policy = policy_maker.build_model("policy")
    policy_maker.save_pretrained(saved_policy, tmp_path / "policy")

    backend = backend_for(registry, path=str(tmp_path / "policy"))
    policy = backend.build_model("policy")
    reward = backend.build_model("reward", align.ModelConfig(path=str(tmp_path / "rm")))
    assert type(reward).__name__ == "LlamaForSequenceClassification" and frozen(reward)
    assert dict(backend.named_weights(policy)).keys() == load_weights(tmp_path / "policy").keys()
    for name, tensor in backend.named_weights(reward):
        torch.testing.assert_close(tensor.cpu(), load_weights(tmp_path / "rm")[name], rtol=0, atol=0)
    for name, tensor in backend.named_weights(policy):
        torch.testing.assert_close(tensor.cpu(), load_weights(tmp_path / "policy")[name], rtol=0, atol=0)
    torch.testing.assert_close(logits(reward), logits(saved_reward), rtol=0, atol=0)
    torch.testing.assert_close(logits(policy), logits(saved_policy), rtol=0, atol=0)
    assert backend.tokenizer_for(align.ModelConfig(path=str(tmp_path / "rm"))) is not backend.tokenizer


def tied_tiny_llama(backend: HFBackend, seed: int) -> LlamaForCausalLM:
    config = tiny_llama_config(backend.run.model.tiny, len(backend.tokenizer), "sdpa")
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["policy", "tied", "critic"])
def test_named_weights_are_the_saved_safetensors(registry: align.Registry, tmp_path: Path, kind: str) -> None:
    backend = backend_for(registry)
    model: Any = tied_tiny_llama(backend, 0) if kind == "tied" else backend.build_model(kind)
    with torch.no_grad():  # weights that differ from any fresh model's
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    named = list(backend.named_weights(model))
    backend.save_pretrained(model, tmp_path / kind)
    saved = load_weights(tmp_path / kind)
    assert [name for name, _ in named] and {name for name, _ in named} == saved.keys()
    assert len(named) == len(saved)  # each name once
    for name, tensor in named:
        assert not tensor.requires_grad
        torch.testing.assert_close(tensor.cpu(), saved[name], rtol=0, atol=0)
    if kind == "tied":
        assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    # No copies: the stream hands out the model's own storage.
    params = {p.data_ptr() for p in model.parameters()}
    assert all(tensor.data_ptr() in params for name, tensor in named if "rotary" not in name)

    # Loaded into a fresh, differently initialised model, they give identical outputs.
    fresh: Any = (
        tied_tiny_llama(backend, 7) if kind == "tied" else backend_for(registry, **tiny(7)).build_model(kind)
    )
    assert not torch.equal(logits(fresh), logits(model))
    missing, unexpected = fresh.load_state_dict(dict(named), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
