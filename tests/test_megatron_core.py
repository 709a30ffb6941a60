"""align-megatron on the core: a refused resume's advice (``model.path=<checkpoint>/model``) works
for the hf and the megatron backend when followed literally."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DATA,
    assert_user_error,
    head_jsonl,
    load_weights,
    run_cli,
    sft_config,
    write_yaml,
)


def _sft(tmp_path: Path, backend: str) -> str:
    """A 2-step SFT run of the tiny model (checkpoint at step 2) on the given backend."""
    data = head_jsonl(DATA / "sft_train.jsonl", tmp_path / "sft_train.jsonl", 16)
    config = sft_config(
        tmp_path / "out",
        backend={"name": backend},
        data={"train": data, "eval": None, "max_length": 64},
        trainer={"max_steps": 2, "batch_size": 4, "save_every": 2},
    )
    return write_yaml(tmp_path / "sft.yaml", config)


def _policy_weights(config: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    """HF-named weights of the policy the run ``config`` with ``overrides`` starts from."""
    from align import build_backend
    from align.cli import load_config
    from align.plugins import default_plugins

    plugins = default_plugins()
    backend: Any = build_backend(load_config(config, overrides, None, plugins), plugins)
    return {name: tensor.detach().clone() for name, tensor in backend.named_weights(backend.build_policy())}


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_a_refused_resume_advises_a_model_path_that_starts_from_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    if backend == "megatron":
        pytest.importorskip("megatron.core")
    config = _sft(tmp_path, backend)
    assert run_cli(capsys, "run", config).code == 0
    refused = run_cli(capsys, "run", config, "--resume", "trainer.batch_size=8")
    assert_user_error(refused, "cannot resume", "trainer.batch_size 4 -> 8", "model.path=")
    found = re.search(
        r"from the checkpoint's weights \((model\.path=[^)]*)\)", refused.err.replace("\n", " ")
    )
    assert found, refused.err
    advice = found.group(1).split()
    checkpoint = tmp_path / "out/checkpoints/step_2/model"
    if backend == "megatron":  # a distributed checkpoint: only the megatron backend reads it
        assert advice == [f"model.path={checkpoint}", "backend.name=megatron"]
    else:  # an HF folder: every backend reads it
        assert advice == [f"model.path={checkpoint}"]

    # Followed literally (a new run in another output_dir, with the change): it runs...
    new = [*advice, f"output_dir={tmp_path / 'new'}", "trainer.batch_size=8", "trainer.max_steps=1"]
    started = run_cli(capsys, "run", config, *new)
    assert started.code == 0, started.err
    # ... from the checkpoint's weights (step 2 was the last: the final export holds them).
    final = load_weights(tmp_path / "out/final")
    starting = _policy_weights(config, new)
    assert set(starting) == set(final)
    assert all(torch.equal(starting[name], final[name]) for name in final)


# ---- building from safetensors slices ---------------------------------------------------------


def _saved_hf_model(folder: Path, model_type: str) -> Path:
    """A small Llama or Qwen2 (GQA: 4 heads in 2 groups; an odd vocabulary, so TP=2 pads it;
    Qwen2's QKV biases non-zero) saved as safetensors, with the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import align

    config = AutoConfig.for_model(
        model_type,
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model.save_pretrained(folder, safe_serialization=True)
    align.byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_shards_read_from_safetensors_slices_equal_the_whole_tensor_path(
    tmp_path: Path, model_type: str
) -> None:
    """Every TP rank's shard of every tensor, at TP=1 and TP=2, read as slices of the files equals
    (bit for bit) the shard cut from the whole tensor; a rank reads its shards' elements only."""
    pytest.importorskip("megatron.core")
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from align_megatron.conversion import (
        HFWeights,
        layout_of,
        megatron_names,
        megatron_shard,
        safetensors_weights,
    )

    folder = _saved_hf_model(tmp_path / "hf", model_type)
    layout = layout_of(AutoConfig.from_pretrained(folder))
    whole = load_file(folder / "model.safetensors")
    sliced = safetensors_weights(folder, layout.tied_embeddings)
    for tp in (1, 2):
        for rank in range(tp):
            read: list[int] = []

            def counted(tensor: torch.Tensor, read: list[int] = read) -> torch.Tensor:
                read.append(tensor.numel())
                return tensor

            reader = HFWeights(
                lambda name: counted(sliced.whole(name)),
                lambda name, dim, start, stop: counted(sliced.narrow(name, dim, start, stop)),
            )
            held = 0
            for name in megatron_names(layout):
                shard = megatron_shard(name, reader, layout, rank, tp)
                assert torch.equal(shard, megatron_shard(name, whole.__getitem__, layout, rank, tp)), name
                held += shard.numel()
            # The zero rows padding the vocabulary (embedding and output layer) are not read.
            padding = max(0, (rank + 1) * layout.padded_vocab(tp) // tp - layout.vocab_size)
            assert sum(read) == held - 2 * padding * layout.hidden_size
            if tp == 2:
                assert sum(read) < 0.6 * sum(t.numel() for t in whole.values())


def test_a_megatron_model_built_from_slices_equals_the_converted_hf_model(tmp_path: Path) -> None:
    """In this process (TP=1): ``build_model`` of an HF safetensors folder (slices, no HF model)
    gives the weights and HF config that converting the HF model gives."""
    pytest.importorskip("megatron.core")
    from align import build_hf_model
    from align.cli import load_config
    from align.plugins import default_plugins
    from align_megatron import MegatronBackend

    folder = _saved_hf_model(tmp_path / "hf", "llama")
    config = sft_config(tmp_path / "out", model={"path": str(folder)}, backend={"name": "megatron"})
    run = load_config(write_yaml(tmp_path / "run.yaml", config), [], None, default_plugins())
    backend = MegatronBackend(run)
    sliced = backend.build_model("policy")
    converted = backend._converted(
        build_hf_model("policy", run.model, backend.tokenizer, "eager"), torch.float32
    )
    ours, theirs = dict(backend.named_weights(sliced)), dict(backend.named_weights(converted))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sliced.hf_config.to_dict() == converted.hf_config.to_dict()
