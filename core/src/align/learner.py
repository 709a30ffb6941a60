"""The learner: everything about a run except the order of its work.

It owns the backend, the models it trains (by role, each with its own optimizer and LR
schedule), backward/accumulation/clipping/step with the divergence checks, evaluation,
checkpoints (with the algorithm's own state inside), lifecycle hooks, the progress bar and the
output folder's lock. It never iterates: the algorithm's ``drive`` does, calling
``train_step`` with the micro-batches of one optimizer step. Offline methods use the default
driver (``Algorithm.drive``); online ones write their phases around the same calls.

Deterministic: the same seed gives the same weights, and a resumed run continues bit-for-bit
(models, optimizers, schedulers, RNG, the algorithm's state).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from transformers import get_scheduler

from align import checkpoint, distributed, resume
from align.algorithm import Algorithm, Context
from align.backends import build_backend, save_merged
from align.batches import LossOutput, TokenBatch, as_number
from align.batching import eval_batches
from align.config import OptimConfig, RunConfig
from align.errors import ConfigError, OutputWriteError, TrainingDiverged
from align.lock import LOCK_FILE, OutputLock
from align.plugins import Plugins
from align.precision import precision_scope
from align.progress import Progress
from align.provenance import write_run_config

POLICY = "policy"
# What a run writes into output_dir besides config.yaml (and a .lock that stays).
EARLIER_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final", "final.tmp", "tensorboard")
# One update multiplying the largest weight (at least 1) by more than this is divergence.
PARAM_JUMP = 1000.0
# Inside a checkpoint: the policy in model/, every other trainable in roles/<role>/.
ROLES_DIR = "roles"
# Inside a checkpoint of a distributed run: each other rank's own trainer state (its optimizer
# holds its shards), as ranks/rank_<r>.pt; rank 0's is the checkpoint's trainer_state.pt.
RANKS_DIR = "ranks"
# Inside a checkpoint: the optimizer states a backend saves in its own format
# (``save_checkpoint_optimizer``: sharded like the weights, so they reshard with them), one folder
# per role; the trainer states then hold None for those optimizers.
OPTIMIZERS_DIR = "optimizers"

notes = Console(stderr=True, highlight=False, soft_wrap=True)


def note(text: str, style: str | None = None) -> None:
    """A line for the user on stderr (paths are not read as rich markup)."""
    notes.print(text, markup=False, style=style)


@dataclass
class RunInfo:
    """What lifecycle hooks see of a run."""

    config: RunConfig
    output_dir: Path
    total_steps: int
    resumed_from: Path | None = None
    stop_reason: str | None = None
    resumed_step: int = 0
    # Lifecycle hooks run on every rank of a distributed run (early stopping must stop them all;
    # they see the ranks' averaged metrics); a hook that writes files should write where this is True.
    is_main: bool = True

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop cleanly after the current step: it saves, writes final/ and
        reports ``reason``. The first request wins."""
        if self.stop_reason is None:
            self.stop_reason = reason


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    stopped_because: str | None = None


@dataclass
class Trainable:
    """A model the learner updates, with its own optimizer and schedule."""

    role: str
    module: nn.Module
    params: list[nn.Parameter]
    optim: OptimConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    own_total_steps: int | None = None  # None: the run's total_steps
    step: int = 0
    largest_param: float | None = None  # before the next update; None: measure it first


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(optim: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.weight_decay)
    # The fused kernel (one pass over each parameter) is the same update as the default
    # per-tensor loop, which on CPU takes several times longer for a 30M model.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, fused=fused
    )


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all ``tensors`` together, in one fused pass where torch has one."""
    if not tensors:
        return torch.zeros(())
    fused = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if fused is not None:
        return fused(tensors, norm_type)
    norms = [torch.linalg.vector_norm(t.detach(), norm_type) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


class Learner:
    """See the module docstring. ``align.train(cfg)`` builds one and runs it."""

    def __init__(self, config: RunConfig, plugins: Plugins) -> None:
        self.config, self.plugins = config, plugins
        self.hook = plugins.manager.hook
        self.output_dir = Path(config.output_dir)
        self.trainables: dict[str, Trainable] = {}
        self.info = RunInfo(config, self.output_dir, 0)
        self.progress: Progress | None = None
        self.last_saved_step = -1
        self.unsaved = False  # trained or logged since the last checkpoint
        # Whether train_step evaluates and checkpoints every trainer.eval_every/save_every policy
        # steps. Set in build(): yes for the default (offline) driver; no for an algorithm with its
        # own drive(), which checkpoints at its own boundaries (a checkpoint in the middle of a
        # phase would hold a state it cannot resume from). A driver may set it back to True.
        self.auto_checkpoint = True
        self._total_steps = 0
        self._resume_state: dict[str, Any] | None = None
        self._resume_changes: list[resume.Change] = []
        self._pending_roles: dict[str, tuple[Path, dict[str, Any]]] = {}  # role: (checkpoint, state)
        self._optimizers_saved_by_backend: set[str] = set()  # roles, in the checkpoint being written

    # ---- what a driver reads ------------------------------------------------------------
    @property
    def step(self) -> int:
        """Policy optimizer steps done."""
        policy = self.trainables.get(POLICY)
        return policy.step if policy else 0

    @property
    def total_steps(self) -> int:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        """Lay the run (and every schedule that follows it) out over ``value`` policy steps."""
        self._total_steps = self.info.total_steps = int(value)
        for trainable in self.trainables.values():
            if trainable.own_total_steps is None:
                self._reschedule(trainable)

    @property
    def should_stop(self) -> str | None:
        """Why the driver should stop now: a lifecycle plugin's stop request, or the last step
        reached. None: keep going."""
        if self.info.stop_reason:
            return self.info.stop_reason
        if self.step >= self.total_steps:
            return f"reached the last step ({self.total_steps})"
        return None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's outputs (False on all but one rank of a
        distributed backend)."""
        backend = getattr(self, "backend", None)
        if backend is None or self.data_parallel > 1:  # before build(), or the core's ranks
            return process_rank() == 0
        return bool(getattr(backend, "is_main", True))

    @property
    def data_parallel(self) -> int:
        """Ranks whose gradients the learner averages (``align.distributed``): > 1 for a run of
        several processes on a backend that does not distribute itself, else 1."""
        backend = getattr(self, "backend", None)
        return 1 if backend is None else distributed.actor_ranks(backend)

    # ---- trainables ------------------------------------------------------------------
    def add_trainable(
        self, role: str, module: nn.Module, optim: OptimConfig | None = None, total_steps: int | None = None
    ) -> None:
        """Train ``module`` as ``role`` with its own optimizer (``optim``, default the run's) and
        LR schedule (over ``total_steps`` of its own, default the run's). On resume its weights
        and optimizer state are restored from the checkpoint here."""
        if role in self.trainables:
            raise ValueError(f"a trainable named {role!r} was already added")
        if not role.isidentifier():
            raise ValueError(f"trainable role {role!r} must be an identifier (it names a folder)")
        optim = optim or self.config.optim
        params = [p for p in module.parameters() if p.requires_grad]
        trainable = Trainable(role, module, params, optim, self._make_optimizer(module, params, optim))
        trainable.own_total_steps = total_steps
        trainable.scheduler = self._schedule(trainable)
        self.trainables[role] = trainable
        if role in self._pending_roles:
            self._restore_trainable(trainable, *self._pending_roles.pop(role))

    def _make_optimizer(
        self, module: nn.Module, params: list[nn.Parameter], optim: OptimConfig
    ) -> torch.optim.Optimizer:
        """The backend's optimizer for a model it built, where it has ``build_optimizer(module,
        params, optim)`` and returns one (megatron's distributed optimizer); else (None, or no
        such method) torch.optim's, ``make_optimizer``."""
        build = getattr(self.backend, "build_optimizer", None)
        built = build(module, params, optim) if callable(build) else None
        return built if built is not None else make_optimizer(optim, params)

    def _trainable(self, role: str) -> Trainable:
        if role not in self.trainables:
            raise KeyError(f"no trainable {role!r}; add it with learner.add_trainable first")
        return self.trainables[role]

    def _schedule(self, trainable: Trainable) -> Any:
        t = self.config.trainer
        return get_scheduler(
            t.lr_scheduler,
            trainable.optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=trainable.own_total_steps or self._total_steps,
        )

    def _reschedule(self, trainable: Trainable) -> None:
        """A fresh schedule of the new length, at the step the old one had reached."""
        reached = trainable.scheduler.last_epoch
        trainable.scheduler = self._schedule(trainable)
        trainable.scheduler.last_epoch = reached
        resume.apply_optim_settings(trainable.optimizer, trainable.scheduler, trainable.optim)

    def named_weights(self, role: str = POLICY) -> Iterator[tuple[str, Tensor]]:
        """The weights of ``role`` under their HF names (what a rollout engine's refit takes)."""
        module = self._trainable(role).module
        named = getattr(self.backend, "named_weights", None)
        if callable(named):
            yield from named(module)
            return
        for name, tensor in module.state_dict().items():
            yield name, tensor.detach()

    def export_model(self, role: str | Path = POLICY, path: str | Path | None = None) -> Path:
        """Write ``role`` as a full HF folder at ``path`` (for an engine to start from; adapters
        merged in); ``export_model(path)`` exports the policy."""
        if path is None:
            role, path = POLICY, role
        folder = Path(path)
        save_merged(self.backend, self._trainable(str(role)).module, folder)
        return folder

    def forward_precision(self, role: str = POLICY) -> AbstractContextManager[object]:
        """The context ``role``'s forward passes run in under ``trainer.precision`` (bfloat16
        autocast for bf16_mixed). ``train_step`` and ``evaluate`` enter it themselves; a driver
        enters it around any other forward pass of the model (scoring it outside a step)."""
        return precision_scope(self.config.trainer.precision, self._trainable(role).module)

    # ---- one optimizer step -----------------------------------------------------------
    def train_step(
        self,
        micro_batches: Iterable[Any],
        loss_fn: Callable[[Any], LossOutput],
        role: str = POLICY,
        extra_metrics: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """One optimizer step of ``role`` over ``micro_batches`` (gradients accumulated, each loss
        divided by their count), with the divergence checks. For the policy: progress, metrics
        every ``trainer.log_every``, and (with ``auto_checkpoint``) evaluation and checkpoints
        every ``trainer.eval_every``/``save_every``."""
        trainable = self._trainable(role)
        batches = list(micro_batches)
        if not batches:
            raise ValueError("train_step needs at least one micro-batch")
        started = time.perf_counter()
        trainable.optimizer.zero_grad(set_to_none=True)
        metrics, counts = self._accumulate(trainable, batches, loss_fn)
        grad_norm = self._clip_gradients(trainable)
        if not math.isfinite(grad_norm):
            raise self._diverged(trainable, f"the gradient norm became {grad_norm}")
        if self.config.trainer.max_grad_norm:
            metrics["grad_norm"] = grad_norm
        metrics["lr"] = trainable.scheduler.get_last_lr()[0]
        if trainable.largest_param is None:  # first step since the weights were set
            trainable.largest_param = float(total_norm(trainable.params, math.inf))
        trainable.optimizer.step()
        trainable.scheduler.step()
        trainable.optimizer.zero_grad(set_to_none=True)
        self._check_parameters(trainable)
        trainable.step += 1
        self.unsaved = True
        metrics["tokens_per_s"] = metrics["tokens"] / max(1e-9, time.perf_counter() - started)
        metrics.update(extra_metrics or {})
        if self.data_parallel > 1:  # each rank trained on its share: one step's numbers
            metrics = distributed.reduce_metrics(metrics, counts)
        if role == POLICY:
            self._after_policy_step(metrics)
        return metrics

    def _accumulate(
        self, trainable: Trainable, batches: list[Any], loss_fn: Callable[[Any], LossOutput]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Backward passes over the micro-batches; their mean metrics, and what each metric is a
        mean over on this rank (``distributed.reduce_metrics``' weights, for data-parallel ranks):
        the losses' ``weight`` summed (else the tokens), the token positions for
        ``pad_fraction``. Names ending in ``loss`` have none: a step split between ranks
        normalises its loss over the whole step (``OnlineAlgorithm.step_share``), so their plain
        mean over the ranks is the step's."""
        totals: dict[str, float] = {}
        tokens = slots = 0
        weighed: list[float] = []
        for batch in batches:
            with self.forward_precision(trainable.role):
                out = loss_fn(batch)
            if not torch.isfinite(out.loss.detach()).all():
                raise self._diverged(trainable, f"the loss became {float(out.loss.detach())}")
            (out.loss / len(batches)).backward()
            tokens += int(getattr(batch, "num_tokens", 0))
            laid_out = getattr(batch, "tokens", None)
            slots += laid_out.input_ids.numel() if isinstance(laid_out, TokenBatch) else 0
            for key, value in {"loss": out.loss, **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + as_number(value) / len(batches)
            if out.weight is not None:
                weighed.append(as_number(out.weight))
        count = sum(weighed) if len(weighed) == len(batches) else float(tokens)
        counts = {key: count for key in totals if not key.endswith("loss")}
        totals["tokens"] = tokens
        if slots:  # share of the computed token positions that were padding
            totals["pad_fraction"] = 1.0 - tokens / slots
            counts["pad_fraction"] = float(slots)
        return totals, counts

    def _clip_gradients(self, trainable: Trainable) -> float:
        """The total gradient norm (clipped to trainer.max_grad_norm when set): the clip computes
        it anyway, so the finiteness check is one number."""
        max_norm = self.config.trainer.max_grad_norm
        finish = getattr(self.backend, "finish_gradients", None)
        if callable(finish):  # a distributed backend syncs its ranks' gradients and norms them all
            return float(finish(trainable.module, trainable.params, max_norm))
        if self.data_parallel > 1:
            distributed.average_gradients(trainable.params)
        if max_norm:
            return float(torch.nn.utils.clip_grad_norm_(trainable.params, max_norm))
        return float(total_norm([p.grad for p in trainable.params if p.grad is not None]))

    def _check_parameters(self, trainable: Trainable) -> None:
        """After an update: the weights must be finite and must not have exploded in one step
        (an lr far too high gives huge but finite weights first, NaN losses one step later).
        The largest magnitude, not the 2-norm: it cannot overflow while every weight is finite."""
        largest = float(total_norm(trainable.params, math.inf))
        if not math.isfinite(largest):
            raise self._diverged(trainable, f"the parameters became {largest} in the update", applied=True)
        before = trainable.largest_param or 0.0
        if largest > PARAM_JUMP * max(before, 1.0):
            what = f"the largest parameter jumped from {before:.4g} to {largest:.4g} in one update"
            raise self._diverged(trainable, what, applied=True)
        trainable.largest_param = largest

    def _diverged(self, trainable: Trainable, what: str, applied: bool = False) -> TrainingDiverged:
        last = checkpoint.latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        done = "the update was discarded (not saved)" if applied else "the update was not applied"
        where = (
            f"step {trainable.step + 1}"
            if trainable.role == POLICY
            else f"{trainable.role} step {trainable.step + 1}"
        )
        return TrainingDiverged(
            f"training stopped: {what} at {where}; {done}; {kept}. Lower optim.lr, raise "
            f"trainer.warmup_steps or check the data, then rerun with --resume (changed optim.* and "
            f"schedule settings apply to the resumed run)."
        )

    def _after_policy_step(self, metrics: dict[str, float]) -> None:
        t, step = self.config.trainer, self.step
        if self.progress is not None:
            self.progress.advance(metrics)
        if step % t.log_every == 0 or step == self.total_steps:
            self.hook.on_step_end(run=self.info, step=step, metrics={"split": "train", **metrics})
        if not self.auto_checkpoint:
            return
        if t.save_every and step % t.save_every == 0:
            self.save_checkpoint()
        if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
            self.evaluate()

    # ---- evaluation, logging, checkpoints -----------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The algorithm's evaluation over the eval split in order (nothing without one), with
        the models in eval mode and without gradients, reported to the lifecycle hooks as
        ``split: eval``."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        t = self.config.trainer
        size = t.eval_batch_size or t.batch_size
        for trainable in self.trainables.values():
            trainable.module.eval()
        batches = eval_batches(self.eval_data, self.data_format.collate, size)
        try:
            # An algorithm's own evaluate need not remember either.
            with torch.no_grad(), self.forward_precision():
                metrics = self.algorithm.evaluate(batches)
        finally:
            for trainable in self.trainables.values():
                trainable.module.train()
        self.hook.on_step_end(run=self.info, step=self.step, metrics={"split": "eval", **metrics})
        return metrics

    def log(self, metrics: dict[str, Any], split: str = "train") -> None:
        """Report metrics of the current step that are not an optimizer step's (an online
        method's generation throughput, refit time, reward...). With data-parallel ranks every
        rank calls it; the ranks' values are averaged."""
        self.unsaved = True
        if self.data_parallel > 1:
            metrics = distributed.reduce_metrics(metrics)
        self.hook.on_step_end(run=self.info, step=self.step, metrics={"split": split, **metrics})

    def save_checkpoint(self) -> Path:
        """A verified checkpoint of every trainable, the algorithm's state and the RNG."""
        if not self.is_main:
            return self._save_rank_state()
        tmp = checkpoint.begin(self.output_dir, self.step)
        # The other ranks write into tmp only once begin() has cleared and made it: without the
        # barrier, a rank that needs no collective to save (TP=1) got there first, and begin's
        # clearing deleted its file, or its folder under it (a crash of 1 in 3 CI runs).
        barrier()
        with checkpoint.guarded_write(f"the checkpoint of step {self.step}", tmp, self.output_dir):
            self._save_models(tmp)
            self.algorithm.save_files(tmp)
            if self.data_parallel > 1:
                self._write_rank_states(tmp)
            barrier()  # the other ranks' states are in tmp before the manifest lists them
            path = checkpoint.commit(tmp, self._state(), self.config.trainer.keep_checkpoints)
        self.last_saved_step = self.step
        self.unsaved = False
        self.hook.on_checkpoint(run=self.info, step=self.step, path=path)
        return path

    def _save_rank_state(self) -> Path:
        """A distributed run's other ranks: take part in the main rank's (collective) save of the
        model, then add this rank's own trainer state to the checkpoint it is writing. Other
        trainables are saved by the main rank alone."""
        tmp = checkpoint.checkpoint_dir(self.output_dir) / f"step_{self.step}.tmp"
        barrier()  # the main rank has made tmp (see save_checkpoint)
        if self.data_parallel > 1:  # the same weights on every rank: the main rank writes it all
            distributed.gather_to_main(self._state())
        else:
            self._save_models(tmp)  # the same collective saves as the main rank's
            (tmp / RANKS_DIR).mkdir(parents=True, exist_ok=True)
            torch.save(self._state(), tmp / RANKS_DIR / f"rank_{process_rank()}.pt")
        barrier()
        self.last_saved_step = self.step
        self.unsaved = False
        return tmp.with_suffix("")

    def _save_models(self, tmp: Path) -> None:
        """Every trainable's weights and the optimizer states the backend saves, into ``tmp``.
        Every rank calls it (the backend's saves are collective); a trainable the backend does
        not hold (a plain module) is written by the main rank alone."""
        self._optimizers_saved_by_backend = set()
        self._save_checkpoint_weights(self.context.policy, tmp / "model")
        self._save_optimizer(self.trainables[POLICY], tmp)
        for role, trainable in self._other_trainables():
            collective = saved_by_backend(trainable.module)
            if collective or self.is_main:
                self._save_module(trainable.module, tmp / ROLES_DIR / role)
            if collective:
                self._save_optimizer(trainable, tmp)

    def _write_rank_states(self, tmp: Path) -> None:
        """The core's data-parallel ranks send their trainer states (RNG, optimizer) to the main
        rank, which writes them as ranks/rank_<r>.pt: no rank but the main one writes."""
        states = distributed.gather_to_main(self._state()) or []
        (tmp / RANKS_DIR).mkdir(parents=True, exist_ok=True)
        for rank, state in enumerate(states[1:], start=1):
            torch.save(state, tmp / RANKS_DIR / f"rank_{rank}.pt")

    def _state(self) -> dict[str, Any]:
        policy = self.trainables[POLICY]
        return {
            "step": self.step,
            "optimizer": self._optimizer_state(policy),
            "scheduler": policy.scheduler.state_dict(),
            "trainables": {
                role: {
                    "optimizer": self._optimizer_state(t),
                    "scheduler": t.scheduler.state_dict(),
                    "step": t.step,
                }
                for role, t in self._other_trainables()
            },
            "algorithm": self.algorithm.state_dict(),
            "rng": checkpoint.rng_state(),
            "config": self.config.model_dump(mode="json"),
        }

    def _optimizer_state(self, trainable: Trainable) -> dict[str, Any] | None:
        """What a trainer state holds of ``trainable``'s optimizer: its state dict, or None when
        the backend saved it in the checkpoint (``_save_optimizer``)."""
        if trainable.role in self._optimizers_saved_by_backend:
            return None
        return trainable.optimizer.state_dict()

    def _save_optimizer(self, trainable: Trainable, checkpoint_dir: Path) -> None:
        """Every rank, after ``trainable``'s weights: its optimizer state in the backend's own
        format, in ``optimizers/<role>/``, where the backend has ``save_checkpoint_optimizer(model,
        optimizer, folder) -> bool`` (collective, like its weights' save; e.g. sharded like
        megatron's parameters, so a resume at another parallel layout reads it back) and takes
        this model (False: not saved, the state stays in each rank's trainer state). Not with the
        core's data-parallel ranks, where only the main rank saves."""
        save = getattr(self.backend, "save_checkpoint_optimizer", None)
        if not callable(save) or self.data_parallel > 1:
            return
        if save(trainable.module, trainable.optimizer, checkpoint_dir / OPTIMIZERS_DIR / trainable.role):
            self._optimizers_saved_by_backend.add(trainable.role)

    def _other_trainables(self) -> list[tuple[str, Trainable]]:
        return [(role, t) for role, t in self.trainables.items() if role != POLICY]

    def _save_checkpoint_weights(self, module: nn.Module, folder: Path) -> None:
        """A checkpoint's copy of a model the backend saves: its ``save_checkpoint_weights`` where
        it has one (its own format, e.g. megatron-core's distributed checkpoint), else
        ``save_pretrained``. ``_load_checkpoint_weights`` reads it back."""
        save = getattr(self.backend, "save_checkpoint_weights", None)
        (save or self.backend.save_pretrained)(module, folder)

    def _load_checkpoint_weights(self, module: nn.Module, folder: Path) -> None:
        load = getattr(self.backend, "load_checkpoint_weights", None)
        (load or self.backend.load_weights)(module, folder)

    def _save_module(self, module: nn.Module, folder: Path) -> None:
        if saved_by_backend(module):
            self._save_checkpoint_weights(module, folder)
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_model(module, str(folder / "model.safetensors"))

    def _load_module(self, module: nn.Module, folder: Path) -> None:
        if saved_by_backend(module):
            self._load_checkpoint_weights(module, folder)
            return
        load_model(module, str(folder / "model.safetensors"))

    def save_final(self) -> Path:
        final = self.output_dir / "final"
        partial = final.with_name("final.tmp")

        def write(folder: Path) -> None:
            self.backend.save_pretrained(self.context.policy, folder)
            if self.is_main:
                self.algorithm.final_files(folder)

        if not self.is_main:  # a distributed backend's save is collective; the main rank writes
            if self.data_parallel == 1:
                write(partial)
            return final
        with checkpoint.guarded_write("the final model", partial, self.output_dir):
            checkpoint.replace_folder(final, write)
        return final

    # ---- the output folder -------------------------------------------------------------
    def _prepare_output_dir(self) -> Path | None:
        """Decide where this run starts (the checkpoint to resume, or None) and make the folder
        ready for it. Only ``overwrite=true`` deletes anything, and only our own outputs."""
        source = self._resume_source()
        if source is None or not self._is_ours(source):
            self._claim_for_a_new_run()
        if source is not None:
            self._resume_state = checkpoint.load_state(source)
            saved_config = self._resume_state.get("config")
            self._resume_changes = resume.check_changes(
                saved_config,
                self.config.model_dump(mode="json"),
                str(source),
                resume.backend_may_change(saved_config, self.config),
            )
            self._set_aside_newer_than(source, int(self._resume_state["step"]))
        return source

    def _resume_source(self) -> Path | None:
        wanted = self.config.resume
        if wanted is False:
            return None
        if isinstance(wanted, Path):
            problem = checkpoint.verify(wanted)
            if problem:
                raise ConfigError(
                    f"resume: {wanted} is not a checkpoint folder, or not a usable one: {problem}"
                )
            return wanted
        found, skipped = checkpoint.newest_verified(self.output_dir)
        for path, problem in skipped:
            note(f"checkpoint {path} is not usable ({problem}); looking at an older one")
        if found is not None:
            return found
        if wanted is True:
            raise ConfigError(
                f"--resume: nothing to resume from in {self.output_dir}: "
                f"{_describe_folder(self.output_dir)}. Nothing was changed. Run without --resume to "
                f"start a new run (overwrite=true replaces earlier outputs), or use resume=auto to "
                f"resume when possible and start otherwise."
            )
        return None  # resume: auto, nothing to resume: a new run

    def _claim_for_a_new_run(self) -> None:
        """A new run never mixes with an earlier one, nor deletes it unless asked to."""
        algorithm = self.plugins.registry.get("algorithm", self.config.algo).factory
        names = (*EARLIER_RUN_OUTPUTS, *getattr(algorithm, "run_outputs", ()))
        earlier = [path for path in (self.output_dir / name for name in names) if path.exists()]
        if not earlier:
            return
        if not self.config.overwrite:
            found = ", ".join(p.name for p in earlier)
            why = "resume=auto found no usable checkpoint there; " if self.config.resume == "auto" else ""
            raise ConfigError(
                f"output_dir {self.output_dir} already holds a run ({found}); {why}nothing was changed. "
                f"Continue it with --resume, start over with overwrite=true (deletes its outputs), or "
                f"choose another output_dir=..."
            )
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _set_aside_newer_than(self, source: Path, step: int) -> None:
        """Checkpoints newer than the one resumed belong to a future this run rewrites (or are
        unusable): renamed, never deleted, so they neither get picked up nor rotate ours away."""
        if not self._is_ours(source):
            return
        for path in checkpoint.list_checkpoints(self.output_dir):
            if checkpoint.step_of(path) > step:
                reason = "corrupt" if checkpoint.verify(path) else "superseded"
                moved = checkpoint.move_aside(path, reason)
                note(f"resuming from {source.name}: moved {path.name} aside to {moved.name}")

    def _is_ours(self, checkpoint_path: Path) -> bool:
        """Whether a checkpoint lies in this run's own checkpoints/ folder."""
        return checkpoint_path.resolve().parent == checkpoint.checkpoint_dir(self.output_dir).resolve()

    # ---- setup and resume -------------------------------------------------------------
    def build(self) -> None:
        """Backend, data, policy, the algorithm, and the policy's optimizer and schedule."""
        cfg, registry = self.config, self.plugins.registry
        # Before any parallel CPU work if possible: the flag is per thread, and the threads of
        # torch's pool inherit it only when they are started after it is set.
        torch.set_flush_denormal(cfg.trainer.flush_denormals)
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        seed_everything(cfg.seed)
        self.backend = build_backend(cfg, self.plugins)
        distributed.start_process_group()  # for a backend that did not start one itself
        self.data_format = registry.get("data_format", cfg.data.format).factory(
            cfg.data, self.backend.tokenizer
        )
        self.train_data = self.data_format.load("train")
        self.eval_data = self.data_format.load("eval")
        if len(self.train_data) == 0:
            raise ConfigError(f"data.train: no usable rows in {cfg.data.train}")
        # The model trained and saved: the policy, unless the algorithm was registered with its
        # own `build_model(backend, cfg)` (a reward model's scorer, for one).
        build_model = registry.get("algorithm", cfg.algo).meta.get("build_model")
        policy = build_model(self.backend, cfg) if build_model else self.backend.build_policy()
        self.context = Context(
            cfg,
            self.backend,
            policy,
            registry,
            self.output_dir,
            self.train_data,
            self.eval_data,
            data_format=self.data_format,
        )
        self.algorithm: Algorithm = registry.get("algorithm", cfg.algo).factory(self.context)
        self.auto_checkpoint = type(self.algorithm).drive is Algorithm.drive
        self._total_steps = self.info.total_steps = cfg.trainer.max_steps or self.algorithm.planned_steps()
        self.add_trainable(POLICY, self.algorithm.trainable())

    def _restore(self, path: Path) -> None:
        state = self._resume_state if self._resume_state is not None else self._load_state(path)
        self._resume_state = None
        policy = self.trainables[POLICY]
        self._load_checkpoint_weights(self.context.policy, path / "model")
        policy.largest_param = None
        self._restore_optim(policy, state["optimizer"], state["scheduler"], path)
        policy.step = self.last_saved_step = int(state["step"])
        for role, saved in state.get("trainables", {}).items():
            self._pending_roles[role] = (path, saved)
        for role in [r for r in self._pending_roles if r in self.trainables]:
            self._restore_trainable(self.trainables[role], *self._pending_roles.pop(role))
        # Checkpoints from before the learner kept the data position at the top level.
        legacy = {key: state[key] for key in ("epoch", "batch") if key in state}
        self.algorithm.load_files(path)
        self.algorithm.load_state_dict(state.get("algorithm", legacy))
        checkpoint.restore_rng(state["rng"])
        if "config" not in state:
            note(f"{path} holds no saved config (an older align): the current settings apply")
        elif self._resume_changes:
            note(f"resuming with changed settings: {resume.describe(self._resume_changes)}", style="yellow")

    def _load_state(self, path: Path) -> dict[str, Any]:
        """The trainer state this process resumes from: the checkpoint's, or on a distributed
        run's other ranks their own (written next to it)."""
        if self.is_main:
            return checkpoint.load_state(path)
        own = path / RANKS_DIR / f"rank_{process_rank()}.pt"
        if not own.is_file() and (path / OPTIMIZERS_DIR).is_dir():
            # Written at another parallel layout: the backend reshards the weights and optimizer
            # states, and a backend that saves those promises the rest of a rank's state (RNG,
            # schedules, the algorithm's) is the same on every rank: the main rank's.
            return checkpoint.load_state(path)
        if not own.is_file():
            raise ConfigError(
                f"resume: {path} holds no state for rank {process_rank()} ({own.name}): it was written "
                f"by a run with fewer processes; resume with the same number of processes"
            )
        state: dict[str, Any] = torch.load(own, weights_only=True)
        return state

    def _restore_trainable(self, trainable: Trainable, path: Path, saved: dict[str, Any]) -> None:
        self._load_module(trainable.module, path / ROLES_DIR / trainable.role)
        self._restore_optim(trainable, saved["optimizer"], saved["scheduler"], path)
        trainable.step = int(saved["step"])
        trainable.largest_param = None

    def _restore_optim(
        self, trainable: Trainable, optimizer: dict[str, Any] | None, scheduler: dict[str, Any], path: Path
    ) -> None:
        """``optimizer`` None: the backend saved it in checkpoint ``path`` (``_save_optimizer``)."""
        if optimizer is None:
            load = getattr(self.backend, "load_checkpoint_optimizer", None)  # the pair of its save
            if not callable(load):
                raise ConfigError(f"resume: {path}/{OPTIMIZERS_DIR} was written by another backend")
            load(trainable.module, trainable.optimizer, path / OPTIMIZERS_DIR / trainable.role)
        else:
            _check_optimizer_fits(optimizer, trainable, path)
            trainable.optimizer.load_state_dict(optimizer)
        trainable.scheduler.load_state_dict(scheduler)
        # The configured hyperparameters, not the checkpoint's: see align.resume.
        resume.apply_optim_settings(trainable.optimizer, trainable.scheduler, trainable.optim)

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> RunResult:
        _refuse_the_working_directory(self.output_dir)
        if self.config.resume is True and not self.output_dir.exists():
            raise ConfigError(
                f"--resume: nothing to resume from: output_dir {self.output_dir} does not exist"
            )
        try:
            # One process of a distributed run owns the folder: the others only read checkpoints.
            with OutputLock(self.output_dir) if self.is_main else nullcontext():
                try:
                    return self._run()
                finally:
                    self._release_algorithm()
        except OSError as exc:
            if exc.errno not in checkpoint.DISK_ERRNOS:
                raise
            last = checkpoint.latest_checkpoint(self.output_dir)
            kept = f"the last complete checkpoint is {last}" if last else "no complete checkpoint exists yet"
            where = exc.filename or self.output_dir
            raise OutputWriteError(
                f"could not write to {where}: {checkpoint.describe_write_failure(exc, Path(where))}; "
                f"{kept}. Free space (or fix the folder) and rerun with --resume."
            ) from exc

    def _release_algorithm(self) -> None:
        """The algorithm's servers and clients stop with the run, however it ends; a failure to
        stop them is reported after the run's own error, not instead of it."""
        algorithm = getattr(self, "algorithm", None)
        if algorithm is not None:
            algorithm.release()

    def _run(self) -> RunResult:
        resumed_from = self._prepare_output_dir() if self.is_main else None
        self.build()
        if not self.is_main:
            # The main rank prepared the folder before the backend formed the process group;
            # the barrier makes sure of it. Resume from the checkpoint it chose.
            barrier()
            resumed_from = self._resume_source()
        elif dist.is_available() and dist.is_initialized():
            barrier()
        self.algorithm.setup(self)
        if resumed_from is not None:
            self._restore(resumed_from)
        if self.is_main:
            write_run_config(self.config, self.output_dir, self.plugins.registry)
        self.info.resumed_from, self.info.resumed_step = resumed_from, self.step
        self.info.is_main = self.is_main
        self.hook.on_train_start(run=self.info)
        result = RunResult(self.output_dir, self.output_dir / "final", self.total_steps)
        result.eval_before = self.evaluate() if resumed_from is None else {}
        self._drive()
        stopped = self.info.stop_reason
        if self.unsaved or self.last_saved_step < 0:
            self.save_checkpoint()
        result.eval_after = self.evaluate()
        self.save_final()
        if stopped:
            note(f"stopped at step {self.step} of {self.total_steps}: {stopped}")
        result.steps, result.stopped_because = self.step, stopped
        self.hook.on_train_end(run=self.info, metrics=result.eval_after)
        return result

    def _drive(self) -> None:
        stats = self.data_format.stats()
        for trainable in self.trainables.values():
            trainable.module.train()
        shown = self.config.trainer.progress if self.is_main else False
        with Progress(self.total_steps, self.step, shown) as progress:
            # A distributed run's other ranks print no progress: the main rank's says it all.
            self.progress = progress if self.is_main else None
            if any(stats.values()) and self.is_main:
                progress.note("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
            try:
                self.algorithm.drive(self)
            finally:
                self.progress = None


def process_rank() -> int:
    """This process's rank in a distributed run (the process group's, else torchrun's RANK);
    0 for a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    """Wait for every rank of a distributed run (nothing for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _refuse_the_working_directory(output_dir: Path) -> None:
    """output_dir must be a folder of its own: overwrite=true deletes checkpoints/, final/...
    there, which in the working directory (or above it) may be the user's own folders."""
    here, target = Path.cwd().resolve(), output_dir.resolve()
    if target == here or target in here.parents:
        raise ConfigError(
            f"output_dir {str(output_dir)!r} is the working directory or a folder above it ({target}): "
            f"a run needs a folder of its own, e.g. output_dir=runs/my-run"
        )


def _describe_folder(folder: Path) -> str:
    if not folder.exists():
        return "the folder does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return "the folder is empty"
    unusable = [f"{path.name}: {checkpoint.verify(path)}" for path in checkpoint.list_checkpoints(folder)]
    held = f"it holds {', '.join(entries)}"
    if unusable:
        return f"{held} but no usable checkpoint ({'; '.join(unusable)})"
    return f"{held} but no checkpoint"


def _check_optimizer_fits(state: dict[str, Any], trainable: Trainable, path: Path) -> None:
    """A ConfigError unless a saved optimizer state dict holds state of this process's parameters'
    shapes (torch.optim would take another layout's shards, and fail at the first step)."""
    groups = trainable.optimizer.param_groups
    params = [p for group in groups for p in group["params"]]
    counts = [len(group["params"]) for group in state.get("param_groups", [])]
    fits = counts == [len(group["params"]) for group in groups] and all(
        not isinstance(value, Tensor) or value.dim() == 0 or value.shape == params[int(index)].shape
        for index, entry in state.get("state", {}).items()
        for value in entry.values()
    )
    if not fits:
        raise ConfigError(
            f"resume: the optimizer state of {trainable.role} in {path} does not fit this process's "
            f"parameters: it was written at another parallel layout (TP, PP or number of processes) by "
            f"a backend that keeps it per rank. Resume with the layout it was written with."
        )


def saved_by_backend(module: nn.Module) -> bool:
    """Whether the backend saves and loads ``module`` (``save_pretrained``/``load_weights``): an
    HF model (it has ``save_pretrained``), or a model a backend marks ``saved_by_backend = True``
    (a model-parallel backend's, whose save every rank takes part in). Other modules (heads) are
    written as one state dict by the main rank."""
    return callable(getattr(module, "save_pretrained", None)) or bool(
        getattr(module, "saved_by_backend", False)
    )
