"""What an algorithm is: its models, its loss over a batch, its evaluation metrics, and how it
drives the learner.

Offline methods (SFT, DPO family, KTO, RM) implement only ``loss``: the default ``drive`` walks
the training data in a seeded order and hands the learner one optimizer step of micro-batches
at a time. Online methods override ``drive`` with their own phases (generate, score, train,
refit) over the same learner.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from align.batches import LossOutput, as_number
from align.batching import BatchStream, DataPosition
from align.config import RunConfig
from align.protocols import Backend
from align.registry import Registry

if TYPE_CHECKING:
    from align.learner import Learner


@dataclass
class Context:
    """What the learner hands an algorithm.

    ``policy`` is the model the run trains, checkpoints and saves as ``final/``: the backend's
    ``build_policy()``, or what the algorithm's registration meta ``build_model(backend, cfg)``
    returns instead (a reward model registers one that builds a scorer).
    """

    config: RunConfig
    backend: Backend
    policy: nn.Module
    registry: Registry
    output_dir: Path
    train_data: Any = None
    eval_data: Any = None
    data_format: Any = None


class Algorithm:
    """Base of every algorithm. Offline ones implement ``loss``; ``evaluate`` defaults to
    averaging the loss and its metrics over the eval split (weighted by ``LossOutput.weight``);
    ``drive`` to the offline loop."""

    # What this algorithm writes into output_dir besides the learner's own outputs (checkpoints,
    # metrics, final/...), e.g. SPIN's ``iterations``: a new run refuses a folder holding them
    # unless ``overwrite=true``, which replaces them with the rest of the earlier run.
    run_outputs: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.position = DataPosition()  # the default driver's place in the training data

    # ---- driving the learner -----------------------------------------------------------
    def setup(self, learner: Learner) -> None:
        """Called once before a resume restores state and before ``drive``: add the models this
        algorithm trains besides the policy here (``learner.add_trainable("critic", ...)``) so
        that a resume restores them too."""

    def planned_steps(self) -> int:
        """Policy optimizer steps the run is laid out over (the LR schedule's length) when
        ``trainer.max_steps`` is unset: ``trainer.epochs`` over the training data here."""
        t = self.config.trainer
        per_epoch = math.ceil(len(self.ctx.train_data) / t.batch_size)
        return t.epochs * math.ceil(per_epoch / t.grad_accum)

    def drive(self, learner: Learner) -> None:
        """The offline driver: one optimizer step per ``trainer.grad_accum`` micro-batches of the
        seeded, resumable order, until the learner should stop (last step, or a stop request)."""
        cfg, t = self.config, self.config.trainer
        stream = BatchStream(
            self.ctx.train_data,
            self.ctx.data_format.collate,
            t.batch_size,
            cfg.seed,
            group_by_length=cfg.data.group_by_length,
        )
        batches = stream.iterate(self.position)
        while not learner.should_stop:
            micro = []
            for _ in range(t.grad_accum):
                self.position, batch = next(batches)
                micro.append(batch)
            epoch = self.position.epoch + self.position.batch / stream.per_epoch
            learner.train_step(micro, self.loss, extra_metrics={"epoch": epoch})

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this algorithm exactly (plain numbers, strings,
        lists, dicts and tensors only): here the default driver's data position."""
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = DataPosition(int(state.get("epoch", 0)), int(state.get("batch", 0)))

    def save_files(self, folder: Path) -> None:
        """Called while a checkpoint is written, with its folder (before its manifest, so what
        is written here is verified with it): files of this algorithm's state that are not
        plain ``state_dict`` values, e.g. a remote critic's own checkpoint in ``folder/critic``."""

    def load_files(self, folder: Path) -> None:
        """Called on resume with the checkpoint's folder, before ``load_state_dict``: read back
        what ``save_files`` wrote."""

    def release(self) -> None:
        """Called once when the run ends, after the final model is written, and also when it
        fails or is interrupted: stop what this algorithm holds outside the process's memory
        (servers it started, their clients' threads, engine processes). A client thread left
        running keeps the Python process from exiting. Must not raise for what was never built."""

    def final_files(self, folder: Path) -> None:
        """Called while ``final/`` is written, with its folder, after the model: files that belong
        with the final model besides its weights (ILQL's Q and V heads, which ``align generate``
        steers with)."""

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates."""
        return self.ctx.policy

    def loss(self, batch: Any) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """The loss and its metrics averaged over the whole eval split, without gradients (the
        learner also puts the models in eval mode). Each batch counts by its
        ``LossOutput.weight`` (a token-mean loss's token count: the mean over every token of the
        split), once when it gives none."""
        totals: dict[str, float] = {}
        total_weight = 0.0
        for batch in batches:
            out = self.loss(batch)
            weight = 1.0 if out.weight is None else as_number(out.weight)
            for key, value in {"loss": out.loss, **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + weight * as_number(value)
            total_weight += weight
        return {key: value / (total_weight or 1.0) for key, value in totals.items()}
