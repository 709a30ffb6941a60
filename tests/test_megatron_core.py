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
