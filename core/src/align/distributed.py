"""Data-parallel actors: several processes (``backend.nproc_per_node``, under ``torchrun``) each
with a full copy of the models and its own rollout engine, for backends that do not
distribute themselves (``hf``; Megatron has its own data parallelism and is left alone).

- The core starts the process group (gloo) after the backend is built, when the run has more
  than one process and no backend started one.
- Generation is shared through ``WorkQueue``: items (chunks of prompts) are claimed one at a
  time from an atomic counter in a ``TCPStore`` hosted by rank 0, so a faster rank claims more;
  every item is done exactly once, and the results are gathered on every rank in item order.
- Each optimizer step is split between the ranks (``share_of``); the learner averages the
  gradients (``average_gradients``) and combines the metrics (``reduce_metrics``: ratios
  weighted by each rank's count).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
R = TypeVar("R")
# Metrics that add up over ranks (the rest are averaged).
SUMMED_METRICS = ("tokens", "tokens_per_s")
STORE_TIMEOUT = timedelta(minutes=30)


def world_size() -> int:
    """Processes in the run's process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this run (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group() -> None:
    """Join the run's other processes (gloo, from torchrun's environment) unless the backend
    already did or the run is one process."""
    if launched_processes() > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=STORE_TIMEOUT)


def actor_ranks(backend: Any) -> int:
    """Ranks that share an online method's work: the process group's size when the core runs the
    data parallelism (the backend has no ``finish_gradients`` of its own), else 1."""
    if callable(getattr(backend, "finish_gradients", None)):
        return 1
    return world_size()


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Every rank's gradients replaced by their mean over the ranks, in one flat all-reduce.
    The parameters with a gradient are the same on every rank (the same model and loss)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    grads = [p.grad for p in with_grad if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for param, grad in zip(with_grad, grads, strict=True):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(grad).to(grad.dtype)
        offset += count


def gather(value: T) -> list[T]:
    """``value`` of every rank, in rank order (picklable objects over the process group)."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def gather_to_main(value: T) -> list[T] | None:
    """``value`` of every rank in rank order on rank 0; None on the others."""
    if world_size() == 1:
        return [value]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def reduce_metrics(metrics: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
    """The ranks' metrics as one, over the ranks that report each: ``SUMMED_METRICS`` added;
    names ending in ``_max``/``_min`` the largest/smallest; a metric in ``weights`` (this rank's
    count of what it is a mean over: tokens, samples) the ranks' mean weighted by those counts,
    which is the mean over all of them when the ranks' shares differ in size; any other the plain
    mean over the ranks (for values every rank has the same, and for those already normalised
    over the whole step, such as a loss split with ``share_of``)."""
    weights = weights or {}
    mine = {key: (float(value), weights.get(key)) for key, value in metrics.items()}
    reported: dict[str, list[tuple[float, float | None]]] = {}
    for ranks_metrics in gather(mine):
        for key, value_and_weight in ranks_metrics.items():
            reported.setdefault(key, []).append(value_and_weight)
    return {key: _combine(key, pairs) for key, pairs in reported.items()}


def _combine(key: str, pairs: list[tuple[float, float | None]]) -> float:
    values = [value for value, _ in pairs]
    if key in SUMMED_METRICS:
        return sum(values)
    if key.endswith("_max"):
        return max(values)
    if key.endswith("_min"):
        return min(values)
    counts = [weight for _, weight in pairs]
    if all(count is not None for count in counts):
        total = sum(count for count in counts if count is not None)
        if total > 0:
            return sum(value * (count or 0.0) for value, count in pairs) / total
    return sum(values) / len(values)


def share_of(items: Sequence[T], ranks: int | None = None) -> tuple[list[T], int]:
    """This rank's contiguous share of one optimizer step's ``items`` and how many parts the step
    was split into. Fewer items than ranks: every rank takes them all (1 part), so no rank is
    left without work while the others wait for its gradients."""
    ranks = world_size() if ranks is None else ranks
    if ranks == 1 or len(items) < ranks:
        return list(items), 1
    base, extra = divmod(len(items), ranks)
    me = rank()
    start = me * base + min(me, extra)
    return list(items[start : start + base + (me < extra)]), ranks


@dataclass
class Assignment:
    """Which rank did each item of one ``WorkQueue.run`` (index: item)."""

    ranks: list[int] = field(default_factory=list)

    def counts(self, world: int) -> list[int]:
        return [self.ranks.count(r) for r in range(world)]


class WorkQueue:
    """Items handed out one at a time to whichever rank asks first (see the module docstring).
    Every rank must call ``run`` the same number of times, in the same order."""

    def __init__(self) -> None:
        self.calls = 0
        self._store: dist.TCPStore | None = None
        self.last = Assignment()

    def run(self, count: int, work: Callable[[int], R], ranks: int | None = None) -> list[R]:
        """``work(i)`` for ``i`` in ``range(count)``, each on exactly one of ``ranks`` (default:
        the process group's size; 1: all here); every rank gets all results in item order.
        ``self.last`` says which rank did which."""
        self.calls += 1
        if (world_size() if ranks is None else ranks) == 1:
            self.last = Assignment([0] * count)
            return [work(index) for index in range(count)]
        store, key = self._counter(), f"align/work/{self.calls}"
        done: dict[int, R] = {}
        while (index := store.add(key, 1) - 1) < count:
            done[index] = work(index)
        results: list[Any] = [None] * count
        owners = [-1] * count
        for owner, theirs in enumerate(gather(done)):
            for index, result in theirs.items():
                results[index], owners[index] = result, owner
        self.last = Assignment(owners)
        return results

    def _counter(self) -> dist.TCPStore:
        """The shared counter: a store on rank 0 (a free port, told to the others)."""
        if self._store is None:
            host = os.environ.get("MASTER_ADDR", "127.0.0.1")
            if rank() == 0:
                self._store = dist.TCPStore(
                    host, 0, world_size(), True, timeout=STORE_TIMEOUT, wait_for_workers=False
                )
            port = [self._store.port if self._store is not None else 0]
            dist.broadcast_object_list(port, src=0)
            if self._store is None:
                self._store = dist.TCPStore(host, int(port[0]), world_size(), False, timeout=STORE_TIMEOUT)
        return self._store
