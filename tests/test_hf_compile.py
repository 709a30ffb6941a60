"""``backend.compile``: the policy's decoder layers compiled in place (torch.compile, dynamic
shapes) train exactly as the eager ones, keep their parameter names, and save weights a plain
transformers model loads; combinations it cannot serve are refused before anything runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_user_error, dpo_config, load_weights, read_metrics, run_cli, write_yaml
from transformers import AutoModelForCausalLM

import align
from align import TinyModelConfig, tiny_llama
from align.loading import validate_run_config
from align_hf.backend import compile_decoder_layers

NO_COMPILER = not any(shutil.which(name) for name in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(
    NO_COMPILER, reason="inductor needs a C++ compiler on the CPU; none found"
)


def test_compiling_layers_in_place_keeps_parameter_names() -> None:
    model = tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), 300, "sdpa"
    )
    names = list(model.state_dict())
    compile_decoder_layers(model)
    assert list(model.state_dict()) == names
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers)


def dpo_run(out: Path, compiled: bool) -> list[dict[str, Any]]:
    config = dpo_config(
        out,
        backend={"name": "hf", "compile": compiled},
        data={"padding_free": True, "eval": None},
        trainer={"max_steps": 3},
    )
    plugins = align.default_plugins()
    align.train(validate_run_config(config, plugins.registry), plugins)
    return read_metrics(out, "train")


@pytest.mark.slow
@needs_compiler
def test_compiled_dpo_matches_eager_and_saves_plain_hf_weights(tmp_path: Path) -> None:
    """Packed rows (one length per batch: the dynamic shapes) through compiled layers: the same
    losses over 3 steps, and the final weights load into a plain ``AutoModelForCausalLM``."""
    eager = dpo_run(tmp_path / "eager", compiled=False)
    compiled = dpo_run(tmp_path / "compiled", compiled=True)
    assert len(eager) == len(compiled) == 3
    for want, got in zip(eager, compiled, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert len({round(row["loss"], 6) for row in eager}) > 1  # the steps saw different batches
    final = tmp_path / "compiled" / "final"
    saved = load_weights(final)
    assert not any("_orig_mod" in name for name in saved)
    plain = AutoModelForCausalLM.from_pretrained(final)
    eager_weights = load_weights(tmp_path / "eager" / "final")
    for name, tensor in plain.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
            assert torch.allclose(tensor, eager_weights[name], atol=1e-5), name


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("backend.num_layers_unfrozen=1", "backend.num_layers_unfrozen"),
        ("model.lora.r=4", "model.lora"),
    ],
)
def test_combinations_it_cannot_serve_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str
) -> None:
    config = write_yaml(
        tmp_path / "run.yaml", dpo_config(tmp_path / "out", backend={"name": "hf", "compile": True})
    )
    assert_user_error(run_cli(capsys, "run", config, override), "backend.compile", fragment)
