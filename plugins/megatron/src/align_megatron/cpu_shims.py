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

A third one wraps each distributed-checkpoint save (``cpu_checkpoint_writer``), and a fourth
megatron-core's distributed optimizer (``megatron_optimizer_on_cpu``), see there.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

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


@contextmanager
def megatron_optimizer_on_cpu() -> Iterator[None]:
    """Around each call into megatron-core's distributed optimizer without a GPU (a no-op with
    one). Its code names the device and the tensor types literally, in two ways that would refuse
    a CPU run: it makes its flags and norms with ``torch.tensor(..., device='cuda')`` and
    ``torch.zeros(..., device='cuda')`` (the optimizer's ``__init__``, ``clip_grads``), made on
    the CPU here, and it sorts the parameters into fp32 and 16-bit ones by ``param.type() ==
    'torch.cuda.FloatTensor'`` (``DistributedOptimizer._build_model_and_main_param_groups``,
    ``clip_grad_by_total_norm_fp32``), so ``Tensor.type()`` names a CPU tensor's CUDA type here.
    Nothing else changes: the computation is megatron's, on the CPU, with gloo's collectives
    (reduce-scatter, all-gather). Both are put back afterwards."""
    if not cpu_only():
        yield
        return
    tensor, zeros, type_name = torch.tensor, torch.zeros, torch.Tensor.type

    def on_cpu(make: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def made(*args: Any, **kwargs: Any) -> Tensor:
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return make(*args, **kwargs)

        return made

    def cuda_type_name(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        named = type_name(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":  # a conversion, or a real CUDA tensor
            return named
        return named.replace("torch.", "torch.cuda.", 1)

    torch.tensor, torch.zeros = on_cpu(tensor), on_cpu(zeros)
    torch.Tensor.type = cuda_type_name  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.tensor, torch.zeros = tensor, zeros
        torch.Tensor.type = type_name  # type: ignore[method-assign]
