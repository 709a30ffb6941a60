"""Pipeline micro-batches on the megatron backend (GPipe, ``backend.pipeline_micro_batches``):
DPO at PP=2 with one micro-batch and with three (an uneven split of each call's rows) follows
the PP=1 trajectory, and a run resumed at three micro-batches ends bit-exact. (The default, four
micro-batches at PP=2, is what tests/test_megatron.py's PP=2 run and its resume use.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_user_error, run_cli
from helpers.megatron_runs import grad_norms, run_in_process, small_dpo, torchrun, train_losses
from safetensors.torch import load_file
from test_megatron import LOSS_TOLERANCE

pytest.importorskip("megatron.core")


@pytest.mark.slow
def test_pipeline_micro_batches_follow_pp1_and_resume_bit_exact(tmp_path: Path) -> None:
    """PP=1 in this process; one torchrun launch (2 processes, gloo) runs PP=2 with 1 and with 3
    micro-batches (each call's 16 rows split 6/5/5, a checkpoint at step 2) and the m=3 run
    resumed from that checkpoint. Every PP=2 run gives PP=1's losses and gradient norms; the
    resumed run repeats steps 3-4 and ends with the same weights bit for bit."""
    run_in_process(small_dpo(tmp_path, "pp1", {}))
    pp2 = {"pipeline_model_parallel_size": 2}
    one = small_dpo(tmp_path, "m1", {**pp2, "pipeline_micro_batches": 1})
    three = small_dpo(tmp_path, "m3", {**pp2, "pipeline_micro_batches": 3}, trainer={"save_every": 2})
    resumed = small_dpo(
        tmp_path,
        "m3_resumed",
        {**pp2, "pipeline_micro_batches": 3},
        resume=str(tmp_path / "m3/checkpoints/step_2"),
    )
    torchrun(tmp_path, tp=0, runs=[one, three, resumed])

    expected_losses, expected_norms = train_losses(tmp_path / "pp1"), grad_norms(tmp_path / "pp1")
    assert len(expected_losses) == 4 and expected_losses[-1] < expected_losses[0] - 0.05  # it learns
    for name in ("m1", "m3"):
        assert train_losses(tmp_path / name) == pytest.approx(expected_losses, abs=LOSS_TOLERANCE), name
        assert grad_norms(tmp_path / name) == pytest.approx(expected_norms, rel=1e-5), name
    assert train_losses(tmp_path / "m3_resumed") == train_losses(tmp_path / "m3")[2:]
    first = load_file(tmp_path / "m3/final/model.safetensors")
    second = load_file(tmp_path / "m3_resumed/final/model.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_pipeline_micro_batches_without_stages_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipeline_micro_batches > 1`` at PP=1 would do nothing: a config error naming the key."""
    config = small_dpo(tmp_path, "no_stages", {"pipeline_micro_batches": 2})
    result = run_cli(capsys, "run", config)
    assert_user_error(result, "backend.pipeline_micro_batches", "pipeline_model_parallel_size > 1")
    assert not (tmp_path / "no_stages").exists()
