"""What megatron-core needs to run on a CPU-only machine (gloo), applied only without a GPU.

megatron-core 0.16 assumes CUDA in two places that a CPU run reaches:

1. ``torch.cuda.current_device()`` is called to choose a device for new tensors (the rotary
   embedding's frequencies, the global memory buffer). Without CUDA it raises; returning
   ``"cpu"`` puts those tensors where everything else is.
2. The tensor-parallel RNG tracker saves and restores CUDA RNG states around every region that
   must draw differently per TP rank (dropout, initialisation). The "inference" tracker that
   ``model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)`` installs forks nothing,
   so no CUDA RNG is touched. Nothing random happens inside those regions here: initial weights
   come from the HF model through the conversion, and dropout is off.

Both are applied once per process, and never when CUDA is available (the real code paths run).

A third one wraps each distributed-checkpoint save (``cpu_checkpoint_writer``), see there.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_applied = False


def cpu_only() -> bool:
    """Whether megatron-core runs without a GPU in this process."""
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Patch ``torch.cuda.current_device`` for a CPU run; True when the shims are in place."""
    global _applied
    if not cpu_only():
        return False
    if not _applied:
        torch.cuda.current_device = _current_device_cpu  # type: ignore[assignment]
        _applied = True
    return True


def _current_device_cpu() -> str:
    return "cpu"


def seed_model_parallel_rng(seed: int) -> None:
    """Seed megatron's tensor-parallel RNG tracker: the real (CUDA) tracker on a GPU, the
    inference tracker (no CUDA RNG state) on CPU."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=cpu_only())


@contextmanager
def cpu_checkpoint_writer() -> Iterator[None]:
    """Around ``dist_checkpointing.save`` without a GPU (a no-op with one): megatron-core's
    torch_dist writer calls ``torch.cuda.synchronize()`` unconditionally (it raises without
    CUDA: made a no-op here), and collects its writers' results through a queue it gets from a
    ``spawn`` manager process, which re-imports everything (seconds per save; the writes are
    in-process here, so a plain ``queue.Queue`` does). Both are put back afterwards."""
    if not cpu_only():
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    synchronize, results = torch.cuda.synchronize, filesystem_async._results_queue
    torch.cuda.synchronize = lambda *args, **kwargs: None
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        torch.cuda.synchronize = synchronize
        filesystem_async._results_queue = results
