"""The megatron backend on CPU (gloo): HF <-> Megatron conversion at TP=1 (in-process, a world
of one) and TP=2 (torchrun, 2 processes); DPO at TP=2 and at DP=2 follows the TP=1 trajectory on
the same global batch; a resumed TP=2 run ends bit-exact; only the main rank writes outputs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_user_error,
    read_metrics,
    read_yaml,
    run_cli,
    write_yaml,
)
from helpers.megatron_runs import (
    CHECKS,
    grad_norms,
    length_reward_run,
    run_in_process,
    small_dpo,
    torchrun,
    train_losses,
    variant,
)
from safetensors.torch import load_file

pytest.importorskip("megatron.core")

# Float32 on CPU: sharded matmuls and reductions sum in another order than one process does.
LOGIT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
# A run resumed at another layout (TP, PP) ends within this of the run it resumed: the same
# updates from resharded weights and optimizer state, summed in another order (measured: 7.5e-9
# from TP=2, 1.2e-7 from PP=2, whose pipeline micro-batches sum the gradients in pieces; the TP=2
# checkpoint resumed with a fresh optimizer instead ends 3.4e-3 away).
RESHARDED_RESUME_TOLERANCE = 1e-6


def assert_conversion_exact(report: dict[str, dict[str, float | bool]]) -> None:
    assert set(report) == {"llama", "llama_tied", "qwen2"}
    for name, numbers in report.items():
        assert numbers["round_trip_identical"] is True, name
        for key in ("logits", "logps", "entropy"):
            assert numbers[key] < LOGIT_TOLERANCE, (name, key, numbers[key])


def test_conversion_at_tp1_matches_transformers_and_round_trips() -> None:
    sys.path.insert(0, str(CHECKS.parent))
    from megatron_checks import conversion_report

    assert_conversion_exact(conversion_report(tp=1))


@pytest.mark.parametrize(
    ("sections", "fragments"),
    [
        ({"trainer": {"precision": "bf16_mixed"}}, ("trainer.precision", "bf16_mixed", "megatron")),
        (
            {"backend": {"pipeline_model_parallel_size": 2}},
            ("pipeline_model_parallel_size", "(1 x 2)", "(1)"),
        ),
        ({"backend": {"tensor_model_parallel_size": 2}}, ("tensor_model_parallel_size", "(2 x 1)", "(1)")),
    ],
)
def test_what_megatron_cannot_run_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    """Exit 2 with the key at fault, before anything is written."""
    backend = sections.pop("backend", {})
    config = read_yaml(Path(small_dpo(tmp_path, "run", backend, **sections)))
    result = run_cli(capsys, "run", write_yaml(tmp_path / "bad.yaml", config))
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run" / "final").exists()


def test_nproc_per_node_makes_align_run_start_torchrun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``backend.nproc_per_node: 2`` outside torchrun: ``align run`` runs itself again under
    ``torchrun --standalone`` with the same config, overrides and flags, and exits with its code
    (the launched command is captured here, not run)."""
    import align.cli

    launched: list[list[str]] = []

    class FakeTorchrun:
        """What ``align run`` uses of the ``subprocess.Popen`` it starts torchrun with."""

        def __init__(self, command: list[str], **popen: Any) -> None:
            launched.append(command)

        def wait(self) -> int:
            return 3

        def poll(self) -> int:
            return 3

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(align.cli.subprocess, "Popen", FakeTorchrun)
    config = small_dpo(tmp_path, "run", {"nproc_per_node": 2, "tensor_model_parallel_size": 2})
    result = run_cli(capsys, "run", config, "trainer.max_steps=2", "--resume")
    assert result.code == 3
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert launched == [[*torchrun, "-m", "align.cli", "run", config, "trainer.max_steps=2", "--resume"]]
    assert not (tmp_path / "run").exists()  # the launched processes do the run


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TP=1 DPO run (in-process, a world of one) the other layouts are compared with (a
    checkpoint at step 2, which the second launch resumes at TP=2 and at PP=2)."""
    folder = tmp_path_factory.mktemp("megatron")
    run_in_process(small_dpo(folder, "tp1", {}, trainer={"save_every": 2}))
    return folder / "tp1"


def test_megatron_tp1_dpo_follows_the_hf_backend(tp1_run: Path, tmp_path: Path) -> None:
    """The same run on both backends: the same losses and final weights (to float32
    rounding), and the final model is an HF checkpoint."""
    run_in_process(variant(tp1_run.parent / "tp1.yaml", tmp_path / "hf", backend={"name": "hf"}))
    hf = train_losses(tmp_path / "hf")
    assert train_losses(tp1_run) == pytest.approx(hf, abs=LOSS_TOLERANCE)
    assert len(hf) == 4 and hf[-1] < hf[0] - 0.05  # it learns
    ours = load_file(tp1_run / "final/model.safetensors")
    theirs = load_file(tmp_path / "hf/final/model.safetensors")
    assert set(ours) == set(theirs)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5


@pytest.mark.slow
def test_tp2_and_dp2_follow_tp1_and_tp2_resumes_bit_exact(
    tp1_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One torchrun launch (2 processes, gloo): the conversion at TP=2, DPO at TP=2 (checkpoint
    at step 2), the same run resumed from that checkpoint, and DPO at DP=2 (TP=1). The main rank
    starts each checkpoint late, so rank 1 (which needs no collective to save at DP=2) always
    gets there first: its state must still end up in the checkpoint. Then, in this process (a
    world of one): the TP=2 checkpoint resumes at TP=1 (weights and optimizer state resharded)
    and ends where the TP=2 run did; the DP=2 checkpoint's resume at DP=1 is refused."""
    tp2 = small_dpo(tmp_path, "tp2", {"tensor_model_parallel_size": 2}, trainer={"save_every": 2})
    resumed = small_dpo(
        tmp_path,
        "tp2_resumed",
        {"tensor_model_parallel_size": 2},
        resume=str(tmp_path / "tp2/checkpoints/step_2"),
    )
    dp2 = small_dpo(tmp_path, "dp2", {}, trainer={"save_every": 2})
    report = torchrun(tmp_path, tp=2, runs=[tp2, resumed, dp2], delay_main_checkpoints=0.5)

    assert report["world_size"] == 2
    assert_conversion_exact(report["conversion"])
    reference = train_losses(tp1_run)
    assert len(reference) == 4 and reference[-1] < reference[0] - 0.05
    assert train_losses(tmp_path / "tp2") == pytest.approx(reference, abs=LOSS_TOLERANCE)
    assert train_losses(tmp_path / "dp2") == pytest.approx(reference, abs=LOSS_TOLERANCE)
    # Each step logged once: only the main rank writes metrics.
    assert [m["step"] for m in read_metrics(tmp_path / "tp2", "train")] == [1, 2, 3, 4]

    # The resumed run repeats steps 3-4 exactly, and ends with the same weights, bit for bit.
    assert train_losses(tmp_path / "tp2_resumed") == train_losses(tmp_path / "tp2")[2:]
    first, second = (
        load_file(tmp_path / "tp2/final/model.safetensors"),
        load_file(tmp_path / "tp2_resumed/final/model.safetensors"),
    )
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    # The other rank's optimizer state (its shards) is in the checkpoint.
    assert (tmp_path / "tp2/checkpoints/step_2/ranks/rank_1.pt").is_file()
    assert (tmp_path / "dp2/checkpoints/step_4/ranks/rank_1.pt").is_file()
    tp1_final = load_file(tp1_run / "final/model.safetensors")
    assert max(float((first[k] - tp1_final[k]).abs().max()) for k in first) < 1e-4
    # The weights are megatron-core's distributed checkpoint, and it reshards: read at TP=1.
    last = tmp_path / "tp2/checkpoints/step_4/model"
    assert (last / "metadata.json").is_file() and not list(last.glob("*.safetensors"))
    assert_reshards_to_tp1(tmp_path / "tp2.yaml", last, tmp_path / "tp2/final")

    # The optimizer state is in the distributed checkpoint too; what stays per rank is the same on
    # both ranks (so a rank a checkpoint has no file for may take the main rank's).
    step_2 = tmp_path / "tp2/checkpoints/step_2"
    assert (step_2 / "optimizers/policy/metadata.json").is_file()
    main_state = torch.load(step_2 / "trainer_state.pt", weights_only=True)
    rank_1_state = torch.load(step_2 / "ranks/rank_1.pt", weights_only=True)
    assert main_state["optimizer"] is None and same_values(main_state, rank_1_state)
    run_in_process(resumed_config(tmp_path / "tp2", tmp_path / "tp2_in_one", {}))
    assert_resumed_like(tmp_path / "tp2_in_one", tmp_path / "tp2")
    # A changed data-parallel size is refused (DP=2 -> DP=1), naming both layouts.
    refused = run_cli(capsys, "run", resumed_config(tmp_path / "dp2", tmp_path / "dp2_in_one", {}))
    assert_user_error(refused, "DP 2", "DP 1", "data-parallel size")
    shutil.rmtree(tmp_path / "tp2/checkpoints", ignore_errors=True)


def resumed_config(run: Path, into: Path, backend: dict[str, Any]) -> str:
    """A config resuming ``run``'s step-2 checkpoint on the megatron backend with ``backend``'s
    parallel sizes (none: TP=1, PP=1, one process) into ``into``."""
    return variant(
        run.with_suffix(".yaml"),
        into,
        backend={"name": "megatron", **backend},
        resume=str(run / "checkpoints/step_2"),
    )


def assert_resumed_like(resumed: Path, uninterrupted: Path) -> None:
    """A run resumed from ``uninterrupted``'s step-2 checkpoint at another layout: steps 3-4 give
    its losses and its final weights, to float32 summation order."""
    assert train_losses(resumed) == pytest.approx(train_losses(uninterrupted)[2:], abs=LOSS_TOLERANCE)
    ours, theirs = (load_file(f / "final/model.safetensors") for f in (resumed, uninterrupted))
    assert set(ours) == set(theirs)
    largest = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"{resumed.name}: largest weight difference from {uninterrupted.name}", largest)
    assert largest <= RESHARDED_RESUME_TOLERANCE


def same_values(first: Any, second: Any) -> bool:
    """Equal nested dicts, lists and tuples of tensors and plain values (tensors bit for bit)."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and torch.equal(first, second)
        )
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_values(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(
            same_values(a, b) for a, b in zip(first, second, strict=True)
        )
    return bool(first == second)


def megatron_at_tp1(config: Path) -> Any:
    """The megatron backend of run ``config`` at TP=1 and PP=1, in this process (a world of one)."""
    from align.cli import load_config
    from align.plugins import default_plugins
    from align_megatron import MegatronBackend

    one = ["backend.tensor_model_parallel_size=1", "backend.pipeline_model_parallel_size=1"]
    run = load_config(str(config), one, None, default_plugins())
    return MegatronBackend(run)


def checkpoint_weights(config: Path, folder: Path, role: str = "policy") -> dict[str, torch.Tensor]:
    """HF-named weights of ``role`` in a checkpoint's ``folder``: read as saved (an HF folder),
    or a megatron distributed checkpoint read at TP=1 in this process, whatever TP wrote it."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    backend = megatron_at_tp1(config)
    model = backend.build_model(role)
    backend.load_checkpoint_weights(model, folder)
    return {name: tensor.clone() for name, tensor in backend.named_weights(model)}


def assert_reshards_to_tp1(config: Path, checkpoint: Path, final: Path) -> None:
    """In this process (a world of one, TP=1, PP=1): the policy read from a TP=2 (or PP=2) run's
    distributed checkpoint holds the same weights, bit for bit, as the policy read from that run's final HF
    export (written after the same step), and gives the same logits (to 1e-6)."""
    from align_megatron import MegatronModel

    backend = megatron_at_tp1(config)
    resharded, exported = backend.build_policy(), backend.build_policy()
    assert isinstance(resharded, MegatronModel) and isinstance(exported, MegatronModel)
    backend.load_checkpoint_weights(resharded, checkpoint)
    # An HF folder (what checkpoints held before) is read as one.
    backend.load_checkpoint_weights(exported, final)
    ours, theirs = dict(backend.named_weights(resharded)), dict(backend.named_weights(exported))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.manual_seed(0)
    ids = torch.randint(0, resharded.layout.vocab_size, (2, 12))
    positions = torch.arange(12).expand_as(ids)
    masked = ~torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        logits = resharded.eval()(ids, positions, masked)
        expected = exported.eval()(ids, positions, masked)
    assert float((logits - expected).abs().max()) <= 1e-6


@pytest.fixture(scope="module")
def second_launch(tmp_path_factory: pytest.TempPathFactory, tp1_run: Path) -> tuple[Path, dict[str, Any]]:
    """One more torchrun launch (2 processes, gloo; one launch, as process start-up dominates):
    DPO at PP=2 (one layer per stage, a checkpoint at step 2), the same run resumed from that
    checkpoint, DPO at TP=2 with sequence parallelism, GRPO's actor at TP=2 with each engine
    refit checked, and the TP=1 run's step-2 checkpoint resumed at TP=2 and at PP=2. The folder
    and rank 0's report."""
    folder = tmp_path_factory.mktemp("megatron_pp_sp_grpo")
    pp2 = small_dpo(folder, "pp2", {"pipeline_model_parallel_size": 2}, trainer={"save_every": 2})
    resumed = small_dpo(
        folder,
        "pp2_resumed",
        {"pipeline_model_parallel_size": 2},
        resume=str(folder / "pp2/checkpoints/step_2"),
    )
    sequence_parallel = small_dpo(folder, "sp", {"tensor_model_parallel_size": 2, "sequence_parallel": True})
    grpo = length_reward_run(
        "grpo", folder / "grpo_tp2", {"tensor_model_parallel_size": 2}, samples=4, lr=1e-3
    )
    grown = [
        resumed_config(tp1_run, folder / name, backend)
        for name, backend in (
            ("tp1_at_tp2", {"tensor_model_parallel_size": 2}),
            ("tp1_at_pp2", {"pipeline_model_parallel_size": 2}),
        )
    ]
    runs = [pp2, resumed, sequence_parallel, write_yaml(folder / "grpo_tp2.yaml", grpo), *grown]
    return folder, torchrun(folder, tp=0, runs=runs, check_refits=True)


@pytest.mark.slow
def test_pp2_follows_tp1_and_resumes_bit_exact(tp1_run: Path, second_launch: tuple[Path, Any]) -> None:
    """DPO at PP=2 follows the TP=1 trajectory on the same global batch (losses and gradient
    norms); the run resumed from its step-2 checkpoint repeats steps 3-4 and ends with the same
    weights, bit for bit; the final model is the whole model (both stages' layers)."""
    folder, _ = second_launch
    assert train_losses(folder / "pp2") == pytest.approx(train_losses(tp1_run), abs=LOSS_TOLERANCE)
    assert grad_norms(folder / "pp2") == pytest.approx(grad_norms(tp1_run), rel=1e-5)
    assert [m["step"] for m in read_metrics(folder / "pp2", "train")] == [1, 2, 3, 4]
    assert train_losses(folder / "pp2_resumed") == train_losses(folder / "pp2")[2:]
    first, second = (
        load_file(folder / "pp2/final/model.safetensors"),
        load_file(folder / "pp2_resumed/final/model.safetensors"),
    )
    tp1_final = load_file(tp1_run / "final/model.safetensors")
    assert set(first) == set(tp1_final)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert max(float((first[k] - tp1_final[k]).abs().max()) for k in first) < 1e-4
    # The last stage's optimizer state (its layers) is in the checkpoint.
    assert (folder / "pp2/checkpoints/step_2/ranks/rank_1.pt").is_file()
    # The stages' distributed checkpoint reads back as one model (PP=1).
    assert_reshards_to_tp1(folder / "pp2.yaml", folder / "pp2/checkpoints/step_4/model", folder / "pp2/final")
    # And resumes as one (weights and optimizer state): PP=2 -> PP=1.
    run_in_process(resumed_config(folder / "pp2", folder / "pp2_in_one", {}))
    assert_resumed_like(folder / "pp2_in_one", folder / "pp2")


@pytest.mark.slow
def test_a_tp1_checkpoint_resumes_at_tp2_and_at_pp2(tp1_run: Path, second_launch: tuple[Path, Any]) -> None:
    """Growing layouts (in the second launch): the TP=1 run's step-2 checkpoint resumed at TP=2
    (the vocabulary padded from 101 to 102 rows, weights and optimizer state) and at PP=2 ends
    where the TP=1 run did (measured: 7.5e-9 and 1.5e-8)."""
    folder, _ = second_launch
    for name in ("tp1_at_tp2", "tp1_at_pp2"):
        assert_resumed_like(folder / name, tp1_run)


@pytest.mark.slow
def test_sequence_parallel_follows_tp1(tp1_run: Path, second_launch: tuple[Path, Any]) -> None:
    """DPO at TP=2 with sequence parallelism: TP=1's losses and gradient norms (the norms'
    weight gradients, partial on each rank, are summed over TP)."""
    folder, _ = second_launch
    assert train_losses(folder / "sp") == pytest.approx(train_losses(tp1_run), abs=LOSS_TOLERANCE)
    assert grad_norms(folder / "sp") == pytest.approx(grad_norms(tp1_run), rel=1e-5)


@pytest.mark.slow
def test_grpo_at_tp2_refits_the_engine_with_the_policy(second_launch: tuple[Path, Any]) -> None:
    """GRPO's actor at TP=2 (2 iterations, hf engine, a length reward): after every refit, the
    engine (an HF model, one per rank) computes the megatron policy's logits (TP-gathered) on
    fixed tokens, so the gather and the conversion to HF names and layouts are right; and the
    refit changed its weights (the policy trained)."""
    folder, report = second_launch
    refits = report["refits"]
    assert len(refits) == 2  # after each iteration's training
    for refit in refits:
        assert refit["logits"] < LOGIT_TOLERANCE
        assert refit["changed"] > 1e-4
    assert [row["iteration"] for row in read_metrics(folder / "grpo_tp2", "rollout")] == [1, 2]


def test_pipeline_stages_split_the_layers_and_refuse_what_they_cannot_hold() -> None:
    """Stage s of PP holds layers s*L/PP .. (s+1)*L/PP - 1, numbered from 0 on the stage, the
    embedding on the first stage and the final norm and output layer on the last; a layer count
    PP does not divide and tied embeddings at PP > 1 are config errors naming the model's key."""
    from transformers import LlamaConfig

    from align import ConfigError
    from align_megatron import layout_of, megatron_names
    from align_megatron.conversion import stage_local_name, stage_of

    shapes: dict[str, Any] = {
        "vocab_size": 101,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
    }
    layout = layout_of(LlamaConfig(**shapes, num_hidden_layers=4, tie_word_embeddings=False))
    stages = {name: stage_of(name, layout, 2) for name in megatron_names(layout)}
    assert stages["embedding.word_embeddings.weight"] == 0
    assert stages["decoder.layers.1.mlp.linear_fc1.weight"] == 0
    assert stages["decoder.layers.2.mlp.linear_fc1.weight"] == 1
    assert stages["decoder.final_layernorm.weight"] == stages["output_layer.weight"] == 1
    assert stage_local_name("decoder.layers.3.input_layernorm.weight", layout, 2) == (
        "decoder.layers.1.input_layernorm.weight"
    )
    assert stage_local_name("decoder.layers.3.input_layernorm.weight", layout, 1) == (
        "decoder.layers.3.input_layernorm.weight"
    )
    layout.check_pp(4)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        layout.check_pp(3)
    tied = layout_of(LlamaConfig(**shapes, num_hidden_layers=4, tie_word_embeddings=True))
    tied.check_pp(1)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        tied.check_pp(2)
