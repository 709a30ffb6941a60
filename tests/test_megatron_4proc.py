"""The megatron backend on four processes (one torchrun launch, gloo; 2 cores, so oversubscribed):
DPO at TP=2 x PP=2 (DP=1) and at PP=2 x DP=2 (TP=1) follows the TP=1 trajectory on the same
global batch; and resumes that change TP x PP end where the uninterrupted run did, weights and
optimizer state resharded: the TP=2 x PP=2 run's step-2 checkpoint at TP=1 x PP=1 (one process,
in the test's), at TP=1 x PP=2 and at TP=2 x PP=1 (two processes, a second launch); the
PP=2 x DP=2 run's at TP=2 x PP=1 x DP=2 (four processes: a resume may not change the
data-parallel size)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import read_metrics
from helpers.megatron_runs import grad_norms, run_in_process, small_dpo, torchrun, train_losses
from safetensors.torch import load_file
from test_megatron import LOSS_TOLERANCE, assert_resumed_like, resumed_config

pytest.importorskip("megatron.core")

TP2 = {"tensor_model_parallel_size": 2}
PP2 = {"pipeline_model_parallel_size": 2}
TWO_PROCESSES = (("tp2_pp2_at_pp2", PP2), ("tp2_pp2_at_tp2", TP2))


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of: TP=1 (in this process, the reference); one 4-process launch with DPO at
    TP=2 x PP=2 and at PP=2 x DP=2 (checkpoints at step 2) and the PP=2 x DP=2 checkpoint resumed
    at TP=2 x DP=2; then the TP=2 x PP=2 checkpoint resumed at TP=1 x PP=1 in this process, and
    at TP=1 x PP=2 and TP=2 x PP=1 in a 2-process launch."""
    folder = tmp_path_factory.mktemp("megatron_4proc")
    run_in_process(small_dpo(folder, "tp1", {}))
    every_2 = {"save_every": 2}
    runs = [
        small_dpo(folder, "tp2_pp2", {**TP2, **PP2}, trainer=every_2),
        small_dpo(folder, "pp2_dp2", PP2, trainer=every_2),
        resumed_config(folder / "pp2_dp2", folder / "pp2_dp2_at_tp2_dp2", TP2),
    ]
    report = torchrun(folder, tp=0, runs=runs, nproc=4)
    assert report["world_size"] == 4
    run_in_process(resumed_config(folder / "tp2_pp2", folder / "tp2_pp2_in_one", {}))
    # DP=1 on two processes: at TP=1 x PP=2 each stage joins its layers' TP shards, at TP=2 x PP=1
    # each TP rank holds both stages' layers.
    on_two = [resumed_config(folder / "tp2_pp2", folder / name, layout) for name, layout in TWO_PROCESSES]
    assert torchrun(folder, tp=0, runs=on_two, nproc=2)["world_size"] == 2
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2_pp2", "pp2_dp2"])
def test_four_process_layouts_follow_tp1(four_processes: Path, layout: str) -> None:
    """TP=1's losses (to 1e-5) and gradient norms (to 1e-5 relative; measured: losses within
    2.4e-7, norms 3.6e-7 relative), its final weights (to 1e-4; measured 1.9e-6), each step
    logged once; every rank's state is in the checkpoint."""
    reference = four_processes / "tp1"
    losses = train_losses(reference)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05  # it learns
    run = four_processes / layout
    assert train_losses(run) == pytest.approx(losses, abs=LOSS_TOLERANCE)
    assert grad_norms(run) == pytest.approx(grad_norms(reference), rel=1e-5)
    assert [m["step"] for m in read_metrics(run, "train")] == [1, 2, 3, 4]
    ours, theirs = (load_file(f / "final/model.safetensors") for f in (run, reference))
    assert set(ours) == set(theirs)
    largest = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"{layout}: largest final weight difference from TP=1", largest)
    assert largest < 1e-4
    ranks = run / "checkpoints/step_2/ranks"
    assert sorted(p.name for p in ranks.iterdir()) == ["rank_1.pt", "rank_2.pt", "rank_3.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("resumed", "uninterrupted"),
    [
        ("tp2_pp2_in_one", "tp2_pp2"),
        ("tp2_pp2_at_pp2", "tp2_pp2"),
        ("tp2_pp2_at_tp2", "tp2_pp2"),
        ("pp2_dp2_at_tp2_dp2", "pp2_dp2"),
    ],
)
def test_resumes_that_change_tp_x_pp_end_where_the_run_did(
    four_processes: Path, resumed: str, uninterrupted: str
) -> None:
    """Steps 3-4 give the uninterrupted run's losses and its final weights to 1e-6 (measured from
    TP=2 x PP=2: 1.9e-8 at TP=1 x PP=1, 1.0e-8 at TP=1 x PP=2, 1.9e-8 at TP=2 x PP=1; from
    PP=2 x DP=2: 7.5e-9 at TP=2 x DP=2)."""
    assert_resumed_like(four_processes / resumed, four_processes / uninterrupted)
