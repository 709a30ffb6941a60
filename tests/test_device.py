"""Devices: ``backend.device`` (auto | cpu | cuda | cuda:N) puts every model of a run there, the
hf engine and the ``model`` reward follow the same spelling, checkpoints load on any device and
keep the GPU's RNG. The CPU tests run everywhere; those marked ``cuda`` run only where torch sees
a GPU (they are what the GPU pass in docs/performance.md ran)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    TINY_MODEL,
    dpo_config,
    load_weights,
    max_weight_diff,
    read_metrics,
    run_cli,
    write_yaml,
)

import align
from align import ConfigError, EngineSpec, RunConfig, SamplingConfig, resolve_device
from align.checkpoint import STATE_FILE, restore_rng, rng_state
from align_hf import HFBackend, HFEngine, HFEngineConfig, byte_tokenizer, tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def run_config(**backend: Any) -> RunConfig:
    raw = {"algo": "sft", "model": TINY_MODEL, "data": {"format": "sft", "train": []}, "backend": backend}
    return align.validate_run_config(raw, align.default_plugins().registry)


# ---- spelling ------------------------------------------------------------------------------


def test_auto_is_the_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_under_torchrun_auto_and_cuda_are_the_local_ranks_gpu(monkeypatch):
    """Data-parallel ranks on one node must not all land on cuda:0: torchrun's LOCAL_RANK picks
    the GPU (round-robin when there are more ranks than GPUs); an explicit cuda:N is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda")  # one process: the current device
    for local_rank, gpu in (("0", 0), ("1", 1), ("3", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert resolve_device("auto") == torch.device("cuda", gpu), local_rank
        assert resolve_device("cuda") == torch.device("cuda", gpu), local_rank
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")  # no GPU: every rank on the CPU


def test_a_missing_or_misspelt_device_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"backend.device: 'cuda' asks for a GPU but torch sees none"):
        resolve_device("cuda", "backend.device")
    with pytest.raises(ConfigError, match=r"'gpu' is not a device; use auto \| cpu \| cuda \| cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2': torch sees 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_backend_device_cpu_builds_every_role_on_the_cpu():
    backend = HFBackend(run_config(name="hf", device="cpu"))
    assert backend.device == torch.device("cpu")
    for role in ("policy", "reference", "reward", "critic"):
        model = backend.build_model(role)
        assert {p.device.type for p in model.parameters()} == {"cpu"}, role


def test_the_hf_engine_follows_the_trainer_unless_it_names_its_own(tmp_path):
    folder = tmp_path / "policy"
    tiny_llama(
        align.TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), 260, "eager"
    ).save_pretrained(folder)
    spec = EngineSpec(model_dir=folder, eos_token_id=2, pad_token_id=0, device="cpu")
    assert HFEngine(HFEngineConfig(), spec).device == torch.device("cpu")
    assert (
        HFEngine(HFEngineConfig(device="cpu"), EngineSpec(model_dir=folder, device="cuda:7")).device.type
        == "cpu"
    )


# ---- checkpoints ---------------------------------------------------------------------------


def test_rng_state_holds_the_gpus_only_once_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert set(rng_state()) == {"torch", "python"}  # a CPU run's checkpoints are as before


def test_a_gpu_checkpoints_rng_resumes_the_cpu_rng_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(3)
    random.seed(3)
    state = {**rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    expected = (torch.rand(3), random.random())
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# ---- on a GPU ------------------------------------------------------------------------------


def dpo_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, **extra: Any) -> Path:
    out = tmp_path / f"dpo_{device}"
    config = dpo_config(out, backend={"name": "hf", "device": device}, **extra)
    result = run_cli(capsys, "run", write_yaml(tmp_path / f"{device}.yaml", config))
    assert result.code == 0, result.err
    return out


@cuda
def test_dpo_on_the_gpu_learns_like_on_the_cpu(tmp_path, capsys):
    gpu, cpu = dpo_run(tmp_path, capsys, "cuda"), dpo_run(tmp_path, capsys, "cpu")
    gpu_evals, cpu_evals = read_metrics(gpu, "eval"), read_metrics(cpu, "eval")
    # Policy == reference before training, on any device: every implicit reward is 0.
    assert gpu_evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert gpu_evals[-1]["loss"] < gpu_evals[0]["loss"] - 0.05
    # The same four steps in float32 on either device (no TF32 by default): close, not bitwise.
    assert gpu_evals[-1]["loss"] == pytest.approx(cpu_evals[-1]["loss"], abs=2e-3)
    assert max_weight_diff(load_weights(gpu / "final"), load_weights(cpu / "final")) < 1e-2
    state = torch.load(gpu / "checkpoints" / "step_4" / STATE_FILE, weights_only=True)
    assert "cuda" in state["rng"]
    assert state["optimizer"]["state"][0]["exp_avg"].device.type == "cuda"
    # A GPU checkpoint's trainer state loads without one (what a CPU resume reads).
    assert (
        align.checkpoint.load_state(gpu / "checkpoints" / "step_4")["optimizer"]["state"][0][
            "exp_avg"
        ].device.type
        == "cpu"
    )


@cuda
def test_an_untrained_policy_and_its_live_reference_agree_exactly_on_the_gpu(tmp_path, capsys):
    """The same batch through the same weights gives the same sums on a GPU too (no atomic adds
    in the per-sequence sums), so every implicit reward is exactly 0 before training. A
    precomputed reference scores other batches (length-sorted) than evaluation does: the GPU's
    matmul kernels depend on the batch's shape, so it agrees only to rounding there."""
    out = dpo_run(tmp_path, capsys, "cuda", reference={"mode": "live"}, trainer={"max_steps": 1})
    before = read_metrics(out, "eval")[0]
    assert before["step"] == 0
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.5


@cuda
def test_a_resumed_gpu_run_ends_near_the_uninterrupted_one(tmp_path, capsys):
    whole = dpo_run(tmp_path, capsys, "cuda", trainer={"save_every": 2})
    part = tmp_path / "part"
    config = dpo_config(part, backend={"name": "hf", "device": "cuda"}, trainer={"max_steps": 2})
    assert run_cli(capsys, "run", write_yaml(tmp_path / "part.yaml", config)).code == 0
    config["trainer"]["max_steps"] = 4
    assert run_cli(capsys, "run", write_yaml(tmp_path / "part.yaml", config), "--resume").code == 0
    # Atomic adds (index_add, scatter_add) sum in no fixed order on a GPU: near, not bitwise.
    assert max_weight_diff(load_weights(whole / "final"), load_weights(part / "final")) < 1e-4


@cuda
def test_bf16_mixed_autocasts_on_the_gpu(tmp_path, capsys):
    out = dpo_run(tmp_path, capsys, "cuda", trainer={"precision": "bf16_mixed"})
    evals = read_metrics(out, "eval")
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["loss"] < evals[0]["loss"]
    backend = HFBackend(run_config(name="hf", device="cuda"))
    model = backend.build_model("policy")
    with align.precision_scope("bf16_mixed", model):
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and torch.is_autocast_enabled("cuda")


@cuda
def test_every_role_and_the_engine_on_the_gpu_return_cpu_results(tmp_path):
    backend = HFBackend(run_config(name="hf", device="cuda"))
    tokenizer = byte_tokenizer()
    batch = align.pad_sequences([(tokenizer.encode("1+1="), tokenizer.encode("2"))], tokenizer.pad_token_id)
    policy = backend.build_model("policy")
    assert next(policy.parameters()).device.type == "cuda"
    logps = backend.sequence_logps(policy, batch)
    assert logps.sum.device.type == "cpu" and logps.sum.requires_grad
    logps.sum.sum().backward()  # the gradient flows back to the GPU weights
    assert next(policy.parameters()).grad is not None
    critic = backend.build_model("critic")
    assert backend.token_scores(critic, batch).values.device.type == "cpu"
    assert backend.sequence_scores(backend.build_model("reward"), batch).device.type == "cpu"
    folder = tmp_path / "policy"
    backend.save_pretrained(policy, folder)
    engine = HFEngine(
        HFEngineConfig(), EngineSpec(model_dir=folder, eos_token_id=2, pad_token_id=0, device="cuda")
    )
    assert next(engine.model.parameters()).device.type == "cuda"
    out = engine.generate([tokenizer.encode("1+1=")], SamplingConfig(max_tokens=4, temperature=0.0))
    assert len(out[0][0].token_ids) >= 1
