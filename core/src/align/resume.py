"""What a resumed run does with settings that differ from its checkpoint's.

A checkpoint stores the resolved config it was trained with. On resume the current config is
compared with it, key by key:

- settings that only steer the update from here on (``optim.lr``, ``optim.betas``,
  ``optim.weight_decay``, ``optim.eps``, ``trainer.max_grad_norm``, the LR schedule and its
  length, the loss, evaluation and checkpoint cadence...) are applied to the restored optimizer
  and scheduler, and listed in a warning;
- settings that would make the resumed run a different run than the one checkpointed (model,
  backend, algorithm, seed, training data and its batching, optimizer kind) are refused with a
  ConfigError listing them; start a new run from the checkpoint's weights instead
  (``model.path=<checkpoint>/model``; see ``restart_advice``);
- except the backend settings its config's ``resume_may_change(run)`` names: a backend whose
  checkpoints (weights and optimizer state) reshard says which of its keys (a parallel layout)
  a resume may change; none by default. They are applied, and listed in the warning.

So ``config.yaml`` of a resumed run describes what it actually uses, and "lower optim.lr and
resume" after a divergence does lower the learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from align.config import OptimConfig, RunConfig
from align.errors import ConfigError

# Dotted prefixes a resumed run may not change.
REFUSED = (
    "algo",
    "seed",
    "model",
    "backend",
    "data",
    "trainer.batch_size",
    "trainer.grad_accum",
    "optim.name",
)
# Exceptions to REFUSED that change neither the batches nor what is computed on them.
ALLOWED = ("data.eval", "data.padding_free")
# Keys about this invocation, not the training: never reported.
IGNORED = (
    "resume",
    "overwrite",
    "output_dir",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.num_threads",
    "_provenance",
)

Change = tuple[str, Any, Any]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of a config dump; lists are compared as whole values."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


MISSING = "<unset>"


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    before, after = flatten(saved), flatten(current)
    paths = sorted(set(before) | set(after))
    return [
        (path, before.get(path, MISSING), after.get(path, MISSING))
        for path in paths
        if not _under(path, IGNORED) and before.get(path, MISSING) != after.get(path, MISSING)
    ]


def split_changes(changes: list[Change], may_change: Iterable[str] = ()) -> tuple[list[Change], list[Change]]:
    """(applied, refused). ``may_change``: dotted keys allowed besides ``ALLOWED``."""
    allowed = (*ALLOWED, *may_change)
    refused = [c for c in changes if _under(c[0], REFUSED) and not _under(c[0], allowed)]
    return [c for c in changes if c not in refused], refused


def describe(changes: list[Change]) -> str:
    return ", ".join(f"{path} {old!r} -> {new!r}" for path, old, new in changes)


def check_changes(
    saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str, may_change: Iterable[str] = ()
) -> list[Change]:
    """The changes a resume applies; a ConfigError listing those it cannot. ``may_change``:
    dotted keys a resume may change besides ``ALLOWED`` (``backend_may_change``)."""
    if saved is None:
        return []
    applied, refused = split_changes(changed_settings(saved, current), may_change)
    if refused:
        raise ConfigError(
            f"cannot resume from {checkpoint} with changed {describe(refused)}: the resumed run would "
            f"not continue the one checkpointed. Undo these changes, or start a new run in another "
            f"output_dir from the checkpoint's weights ({restart_advice(checkpoint, saved)})."
        )
    return applied


def backend_may_change(saved: dict[str, Any] | None, run: RunConfig) -> tuple[str, ...]:
    """The dotted ``backend.*`` keys a resume of ``run`` may change: those its backend config's
    ``resume_may_change(run)`` names (checkpoints that reshard to another parallel layout), and
    only when the checkpoint was written by the same backend."""
    saved_backend = (saved or {}).get("backend") or {}
    if saved_backend.get("name") != run.backend.name:
        return ()
    return tuple(f"backend.{key}" for key in run.backend.resume_may_change(run))


def restart_advice(checkpoint: str, saved: dict[str, Any]) -> str:
    """The overrides that start a new run from a checkpoint's policy weights.

    ``<checkpoint>/model`` is an HF folder (safetensors) when the backend saves checkpoints with
    ``save_pretrained``: every backend builds a model from it. A backend with its own checkpoint
    format (``save_checkpoint_weights``: megatron's distributed checkpoints) writes something only
    that backend reads as ``model.path``, so the advice names it too."""
    weights = Path(checkpoint) / "model"
    advice = f"model.path={weights}"
    backend = (saved.get("backend") or {}).get("name")
    if backend and not any(weights.glob("*.safetensors")):
        advice += f" backend.name={backend}"
    return advice


def apply_optim_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, optim: OptimConfig
) -> None:
    """Put the configured hyperparameters into a restored optimizer and scheduler.

    Loading their state dicts brings back the checkpoint's lr, betas, weight decay and the
    scheduler's base lr; the schedule's shape (kind, warmup, length) is the freshly built
    scheduler's. With unchanged settings this recomputes the very same lr (bit-exact resume).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = optim.weight_decay
        if "betas" in group:
            group["betas"] = tuple(optim.betas)
        if "eps" in group:
            group["eps"] = optim.eps
        group["initial_lr"] = optim.lr
    scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR: its own state decides
        return
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
