"""Which torch device a backend, engine or reward model runs on.

One spelling everywhere a config names a device: ``auto`` (CUDA when this process sees a GPU,
else the CPU), ``cpu``, ``cuda`` (the current CUDA device) or ``cuda:N``. Naming a GPU that is
not there is a config error, not a silent fall-back to the CPU. Under ``torchrun`` (``LOCAL_RANK``
set), ``auto`` and ``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK`` (modulo the GPUs torch
sees, so ranks share GPUs round-robin when there are more ranks than GPUs), not ``cuda:0`` for
every rank.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from align.errors import ConfigError

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_SPELLING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str, where: str = "device") -> torch.device:
    """The device ``name`` stands for (see the module docstring); ``where`` is the config key
    named in the error."""
    if not _SPELLING.match(name):
        raise ConfigError(f"{where}: {name!r} is not a device; use {DEVICE_CHOICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    rank_gpu = _torchrun_gpu() if name == "cuda" and torch.cuda.is_available() else None
    if rank_gpu is not None:
        return torch.device("cuda", rank_gpu)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {name!r} asks for a GPU but torch sees none; use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{where}: {name!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _torchrun_gpu() -> int | None:
    """This ``torchrun`` rank's GPU: its ``LOCAL_RANK``, round-robin over the GPUs torch sees
    (None outside ``torchrun``)."""
    local_rank = os.environ.get("LOCAL_RANK", "")
    if not local_rank.isdigit():
        return None
    return int(local_rank) % max(1, torch.cuda.device_count())


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights live (the CPU for a module without parameters)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
