"""What a resume may change of the backend section: only what the backend's config names in
``resume_may_change(run)`` (the megatron backend's parallel layout, whose checkpoints reshard the
weights and the optimizer state), never on another backend; and an optimizer state written per
rank at another layout is a config error, not a crash at the first step. The resumes themselves
(TP=2 -> TP=1, PP=2 -> PP=1, DP=2 -> DP=1 refused) run in tests/test_megatron.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import dpo_config, write_yaml

from align import ConfigError, RunConfig
from align.resume import backend_may_change, check_changes

pytest.importorskip("megatron.core")

LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel")


def run_config(tmp_path: Path, backend: dict[str, Any], **sections: Any) -> RunConfig:
    from align.cli import load_config
    from align.plugins import default_plugins

    path = write_yaml(tmp_path / "run.yaml", dpo_config(tmp_path / "out", backend=backend, **sections))
    return load_config(path, [], None, default_plugins())


def resume_check(saved: RunConfig, current: RunConfig) -> list[tuple[str, Any, Any]]:
    """What the learner's resume check does: the changes it applies (or its ConfigError)."""
    dumped = saved.model_dump(mode="json")
    may_change = backend_may_change(dumped, current)
    return check_changes(dumped, current.model_dump(mode="json"), "ckpt", may_change)


def test_megatron_may_change_its_parallel_layout_on_resume(tmp_path: Path) -> None:
    tp2 = run_config(tmp_path, {"name": "megatron", "tensor_model_parallel_size": 2, "nproc_per_node": 2})
    pp2 = run_config(
        tmp_path, {"name": "megatron", "pipeline_model_parallel_size": 2, "pipeline_micro_batches": 3}
    )
    one = run_config(tmp_path, {"name": "megatron"})
    assert set(backend_may_change(tp2.model_dump(mode="json"), one)) >= {f"backend.{k}" for k in LAYOUT}
    assert resume_check(tp2, one) == [
        ("backend.nproc_per_node", 2, 1),
        ("backend.tensor_model_parallel_size", 2, 1),
    ]
    assert [change[0] for change in resume_check(pp2, one)] == [
        "backend.pipeline_micro_batches",
        "backend.pipeline_model_parallel_size",
    ]
    # The rest of the run may still not change with it.
    bigger = run_config(tmp_path, {"name": "megatron"}, trainer={"batch_size": 16})
    with pytest.raises(ConfigError, match=re.escape("trainer.batch_size 8 -> 16")) as refused:
        resume_check(tp2, bigger)
    assert "tensor_model_parallel_size" not in str(refused.value)


def test_other_backends_and_lora_keep_the_backend_section(tmp_path: Path) -> None:
    """The hf backend names nothing (a changed nproc_per_node changes its data-parallel ranks);
    a megatron LoRA run keeps its layout (the adapters' optimizer state stays per rank); a
    checkpoint of another backend is refused whatever the keys."""
    with pytest.raises(ConfigError, match=re.escape("backend.nproc_per_node 1 -> 2")):
        resume_check(
            run_config(tmp_path, {"name": "hf"}), run_config(tmp_path, {"name": "hf", "nproc_per_node": 2})
        )
    lora = {"model": {"path": "tiny", "lora": {"r": 4}}}
    saved = run_config(tmp_path, {"name": "megatron", "tensor_model_parallel_size": 2}, **lora)
    assert (
        backend_may_change(saved.model_dump(mode="json"), run_config(tmp_path, {"name": "megatron"}, **lora))
        == ()
    )
    with pytest.raises(ConfigError, match=re.escape("backend.tensor_model_parallel_size 2 -> 1")):
        resume_check(saved, run_config(tmp_path, {"name": "megatron"}, **lora))
    with pytest.raises(ConfigError, match=re.escape("backend.name 'hf' -> 'megatron'")):
        resume_check(run_config(tmp_path, {"name": "hf"}), run_config(tmp_path, {"name": "megatron"}))


def test_an_optimizer_state_of_other_shapes_is_a_config_error() -> None:
    """A per-rank optimizer state written at another TP (a half-size shard) or PP (another
    number of parameters) is refused by name; the state of the same shapes loads."""
    from align.config import OptimConfig
    from align.learner import Trainable, _check_optimizer_fits, make_optimizer

    def trainable(*shapes: tuple[int, ...]) -> Trainable:
        params = [torch.nn.Parameter(torch.ones(shape)) for shape in shapes]
        optim = OptimConfig()
        return Trainable("policy", torch.nn.Linear(1, 1), params, optim, make_optimizer(optim, params))

    saved = trainable((4, 3), (3,))
    for param in saved.params:
        param.grad = torch.ones_like(param)
    saved.optimizer.step()
    state = saved.optimizer.state_dict()
    _check_optimizer_fits(state, trainable((4, 3), (3,)), Path("ckpt"))
    for other in (trainable((2, 3), (3,)), trainable((4, 3))):
        with pytest.raises(ConfigError, match="optimizer state of policy in ckpt does not fit"):
            _check_optimizer_fits(state, other, Path("ckpt"))
