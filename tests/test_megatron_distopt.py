"""megatron-core's distributed optimizer on the megatron backend (``backend.distributed_optimizer``,
docs/megatron.md): the same DPO trajectory and weights as the learner's torch.optim at TP=1, DP=2
and TP=2 (gradient norms and clipping included), PPO's local critic (a sequence scorer) follows
torch.optim's too, and runs resumed from their checkpoints (the optimizer state in megatron's own
sharded format) end bit-exact. On CPU through the shim of ``cpu_shims.megatron_optimizer_on_cpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_user_error, read_metrics, run_cli
from helpers.megatron_runs import grad_norms, run_in_process, small_dpo, torchrun, train_losses
from safetensors.torch import load_file

from align import ConfigError, OptimConfig

pytest.importorskip("megatron.core")

# Every test run clips (max_grad_norm 1.0 by default, norms ~2): a wrong norm shows in the weights.
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6  # measured up to 6e-8 (DP and TP sum the gradients in other orders)
# The learner's LR schedule must drive megatron's optimizer: 0, then 1e-3 falling to 0 over the run.
SCHEDULE = {"lr_scheduler": "linear", "warmup_steps": 1}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def largest_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert set(first) == set(second)
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def learning_rates(output_dir: Path) -> list[float]:
    return [m["lr"] for m in read_metrics(output_dir, "train")]


def test_optim_section_maps_to_megatron_optimizer_config() -> None:
    """The learner's AdamW settings become megatron's (decoupled weight decay, the clip at
    trainer.max_grad_norm, 0 for none); bfloat16 weights get fp32 main parameters; SGD is
    refused (megatron's state dict reads Adam's step count)."""
    from align_megatron.distributed_optimizer import optimizer_config

    optim = OptimConfig(lr=3e-4, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    config = optimizer_config(optim, torch.float32, 1.5)
    assert (config.optimizer, config.lr, config.weight_decay) == ("adam", 3e-4, 0.1)
    assert (config.adam_beta1, config.adam_beta2, config.adam_eps) == (0.8, 0.95, 1e-6)
    assert config.decoupled_weight_decay and config.use_distributed_optimizer
    assert (config.clip_grad, config.bf16) == (1.5, False)
    unclipped = optimizer_config(optim, torch.bfloat16, None)
    assert (unclipped.clip_grad, unclipped.bf16, unclipped.params_dtype) == (0.0, True, torch.bfloat16)
    with pytest.raises(ConfigError, match="adamw only, not sgd"):
        optimizer_config(OptimConfig(name="sgd"), torch.float32, 1.0)


def test_auto_is_off_on_cpu_and_lora_and_cpu_bf16_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``auto`` keeps today's torch.optim on a CPU-only machine; ``true`` with LoRA, and with
    bfloat16 weights on CPU, is a config error naming the key, when the backend is built (before
    any training or checkpoint)."""
    from align.cli import load_config
    from align.plugins import default_plugins

    plugins = default_plugins()
    auto = load_config(small_dpo(tmp_path, "auto", {"distributed_optimizer": "auto"}), [], None, plugins)
    assert torch.cuda.is_available() or not auto.backend.uses_distributed_optimizer(auto)  # type: ignore[attr-defined]
    lora = small_dpo(tmp_path, "lora", {"distributed_optimizer": True})
    result = run_cli(capsys, "run", lora, "model.lora.r=4")
    assert_user_error(result, "backend.distributed_optimizer", "model.lora")
    assert not (tmp_path / "lora" / "checkpoints").exists()
    if not torch.cuda.is_available():
        result = run_cli(
            capsys, "run", lora, "trainer.precision=bf16", "output_dir=" + str(tmp_path / "bf16")
        )
        assert_user_error(result, "backend.distributed_optimizer", "bfloat16 weights", "without a GPU")
        assert not (tmp_path / "bf16" / "checkpoints").exists()


@pytest.fixture(scope="module")
def tp1_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In this process (a world of one): DPO with torch.optim, the same with the distributed
    optimizer (a checkpoint at step 2), and that run resumed from its step-2 checkpoint."""
    folder = tmp_path_factory.mktemp("distopt")
    on = {"distributed_optimizer": True}
    run_in_process(small_dpo(folder, "torch_optim", {}, trainer=SCHEDULE))
    run_in_process(small_dpo(folder, "tp1", on, trainer={**SCHEDULE, "save_every": 2}))
    step_2 = str(folder / "tp1/checkpoints/step_2")
    run_in_process(small_dpo(folder, "tp1_resumed", on, trainer=SCHEDULE, resume=step_2))
    return folder


def test_tp1_follows_torch_optim_and_resumes_bit_exact(tp1_runs: Path) -> None:
    expected = train_losses(tp1_runs / "torch_optim")
    assert len(expected) == 4 and expected[-1] < expected[0] - 0.05  # it learns
    assert learning_rates(tp1_runs / "tp1") == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert train_losses(tp1_runs / "tp1") == pytest.approx(expected, abs=LOSS_TOLERANCE)
    assert grad_norms(tp1_runs / "tp1") == pytest.approx(grad_norms(tp1_runs / "torch_optim"), rel=1e-5)
    torch_optim = final_weights(tp1_runs / "torch_optim")
    assert largest_difference(final_weights(tp1_runs / "tp1"), torch_optim) < WEIGHT_TOLERANCE
    # The optimizer state is megatron's distributed checkpoint, not the trainer state's.
    assert (tp1_runs / "tp1/checkpoints/step_2/optimizers/policy/metadata.json").is_file()
    assert train_losses(tp1_runs / "tp1_resumed") == train_losses(tp1_runs / "tp1")[2:]
    assert largest_difference(final_weights(tp1_runs / "tp1_resumed"), final_weights(tp1_runs / "tp1")) == 0.0


@pytest.mark.slow
def test_dp2_tp2_and_pp2_follow_torch_optim_and_dp2_resumes_bit_exact(tp1_runs: Path, tmp_path: Path) -> None:
    """One torchrun launch (2 processes, gloo): DP=2 (each rank updates and keeps the Adam
    moments of half of the parameters, a checkpoint at step 2), that run resumed from step 2,
    TP=2 and PP=2 (4 pipeline micro-batches), all with the distributed optimizer, against
    torch.optim in one process."""
    on = {"distributed_optimizer": True}
    dp2 = small_dpo(tmp_path, "dp2", on, trainer={**SCHEDULE, "save_every": 2})
    step_2 = str(tmp_path / "dp2/checkpoints/step_2")
    resumed = small_dpo(tmp_path, "dp2_resumed", on, trainer=SCHEDULE, resume=step_2)
    tp2 = small_dpo(tmp_path, "tp2", {**on, "tensor_model_parallel_size": 2}, trainer=SCHEDULE)
    pp2 = small_dpo(tmp_path, "pp2", {**on, "pipeline_model_parallel_size": 2}, trainer=SCHEDULE)
    torchrun(tmp_path, tp=0, runs=[dp2, resumed, tp2, pp2])

    expected = train_losses(tp1_runs / "torch_optim")
    torch_optim = final_weights(tp1_runs / "torch_optim")
    for name in ("dp2", "tp2", "pp2"):
        assert train_losses(tmp_path / name) == pytest.approx(expected, abs=LOSS_TOLERANCE), name
        assert grad_norms(tmp_path / name) == pytest.approx(grad_norms(tp1_runs / "torch_optim"), rel=1e-5)
        assert largest_difference(final_weights(tmp_path / name), torch_optim) < WEIGHT_TOLERANCE, name
    # Each DP rank wrote its own slice of the optimizer state.
    written = sorted(p.name for p in (tmp_path / "dp2/checkpoints/step_2/optimizers/policy").glob("*.distcp"))
    assert {name.split("_")[2] for name in written} == {"0", "1"}, written
    assert train_losses(tmp_path / "dp2_resumed") == train_losses(tmp_path / "dp2")[2:]
    assert largest_difference(final_weights(tmp_path / "dp2_resumed"), final_weights(tmp_path / "dp2")) == 0.0


def test_ppo_critic_follows_torch_optim_and_resumes_bit_exact(tmp_path: Path) -> None:
    """PPO with the local critic (a sequence scorer: its score head is in megatron's DDP too),
    policy and critic both on the distributed optimizer, in this process: the critic's metrics
    and the policy's gradient norms follow torch.optim's, and the run resumed from its
    iteration-1 checkpoint (two optimizer states, policy/ and critic/) ends with the same
    critic and policy, bit for bit."""
    from test_megatron_scorer import critic_metrics, critic_weights, ppo_run

    on = {"distributed_optimizer": True}
    run_in_process(ppo_run(tmp_path, "torch_optim", {}))
    run_in_process(ppo_run(tmp_path, "ppo", on, trainer={"save_every": 1}))
    run_in_process(ppo_run(tmp_path, "resumed", on, resume=str(tmp_path / "ppo/checkpoints/step_1")))

    expected = critic_metrics(tmp_path / "torch_optim")
    for got, want in zip(critic_metrics(tmp_path / "ppo"), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert grad_norms(tmp_path / "ppo") == pytest.approx(grad_norms(tmp_path / "torch_optim"), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "ppo/checkpoints/step_1/optimizers").iterdir()) == [
        "critic",
        "policy",
    ]
    assert critic_metrics(tmp_path / "resumed") == critic_metrics(tmp_path / "ppo")[1:]
    first, second = critic_weights(tmp_path / "ppo", 2), critic_weights(tmp_path / "resumed", 2)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert largest_difference(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "ppo")) == 0.0
