"""The shared trainer loop every algorithm runs: batches -> algorithm loss -> optimizer ->
lifecycle hooks -> checkpoints. Deterministic: the same seed gives the same weights, and a
resumed run continues bit-for-bit (model, optimizer, scheduler, RNG, data position)."""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import get_scheduler

from align import checkpoint, resume
from align.algorithm import Algorithm, Context
from align.batches import LossOutput, TokenBatch
from align.config import RunConfig
from align.errors import ConfigError, OutputWriteError, TrainingDiverged
from align.layout import row_lengths
from align.lock import LOCK_FILE, OutputLock
from align.plugins import Plugins
from align.progress import Progress
from align.provenance import write_run_config

# What a run writes into output_dir besides config.yaml (and a .lock that stays).
EARLIER_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final", "final.tmp", "tensorboard")
# One update multiplying the largest weight (at least 1) by more than this is divergence.
PARAM_JUMP = 1000.0

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


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    # The fused kernel (one pass over each parameter) is the same update as the default
    # per-tensor loop, which on CPU takes several times longer for a 30M model.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(
        params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=fused
    )


class BatchStream:
    """Micro-batches over epochs in a seeded order per epoch, resumable at any position.

    With ``group_by_length``, each window of ``GROUP_WINDOW`` batches of the seeded order is
    sorted by row length (longest first) before it is cut into batches, and the batches are then
    shuffled (the last, partial batch stays last): batches hold rows of similar length, so far
    less padding. Every row still comes once per epoch, and the order is a pure function of
    (seed, epoch, lengths), so a resumed run continues exactly.
    """

    GROUP_WINDOW = 64

    def __init__(
        self, data: Any, collate: Any, batch_size: int, seed: int, group_by_length: bool = False
    ) -> None:
        self.data, self.collate, self.batch_size, self.seed = data, collate, batch_size, seed
        self.per_epoch = math.ceil(len(data) / batch_size)
        self.lengths = row_lengths(data) if group_by_length else None

    def batches(self, epoch: int) -> list[list[int]]:
        """Row indices of each micro-batch of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order: list[int] = torch.randperm(len(self.data), generator=generator).tolist()
        size = self.batch_size
        if self.lengths is not None:
            lengths, window = self.lengths, size * self.GROUP_WINDOW
            windows = [order[start : start + window] for start in range(0, len(order), window)]
            order = [i for rows in windows for i in sorted(rows, key=lambda i: -lengths[i])]
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if self.lengths is not None:
            full = len(order) // size
            shuffled = torch.randperm(full, generator=generator).tolist()
            batches = [batches[b] for b in shuffled] + batches[full:]
        return batches

    def order(self, epoch: int) -> list[int]:
        return [i for batch in self.batches(epoch) for i in batch]

    def iterate(self, position: DataPosition) -> Iterator[tuple[DataPosition, Any]]:
        epoch, start = position.epoch, position.batch
        while True:
            batches = self.batches(epoch)
            for b in range(start, self.per_epoch):
                yield DataPosition(epoch, b + 1), self.collate([self.data[i] for i in batches[b]])
            epoch, start = epoch + 1, 0


def eval_batches(data: Any, collate: Any, batch_size: int) -> Iterator[Any]:
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(len(data), start + batch_size))])


class Trainer:
    def __init__(self, cfg: RunConfig, plugins: Plugins) -> None:
        self.cfg, self.plugins = cfg, plugins
        self.hook = plugins.manager.hook
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.position = DataPosition()
        self.last_saved_step = -1
        self.largest_param = 0.0
        self.resume_state: dict[str, Any] | None = None
        self.resume_changes: list[resume.Change] = []

    # ---- the output folder -------------------------------------------------------------
    def _prepare_output_dir(self) -> Path | None:
        """Decide where this run starts (the checkpoint to resume, or None) and make the folder
        ready for it. Only ``overwrite=true`` deletes anything, and only our own outputs."""
        source = self._resume_source()
        if source is None or not self._is_ours(source):
            self._claim_for_a_new_run()
        if source is not None:
            self._set_aside_newer_than(source)
            self.resume_state = checkpoint.load_state(source)
            self.resume_changes = resume.check_changes(
                self.resume_state.get("config"), self.cfg.model_dump(mode="json"), str(source)
            )
        return source

    def _resume_source(self) -> Path | None:
        wanted = self.cfg.resume
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
                f"{_describe_folder(self.output_dir)}. "
                f"Nothing was changed. Run without --resume to start a new run (overwrite=true replaces "
                f"earlier outputs), or use resume=auto to resume when possible and start otherwise."
            )
        return None  # resume: auto, nothing to resume: a new run

    def _claim_for_a_new_run(self) -> None:
        """A new run never mixes with an earlier one, nor deletes it unless asked to."""
        earlier = [self.output_dir / name for name in EARLIER_RUN_OUTPUTS]
        earlier = [path for path in earlier if path.exists()]
        if not earlier:
            return
        if not self.cfg.overwrite:
            found = ", ".join(p.name for p in earlier)
            why = "resume=auto found no usable checkpoint there; " if self.cfg.resume == "auto" else ""
            raise ConfigError(
                f"output_dir {self.output_dir} already holds a run ({found}); {why}nothing was changed. "
                f"Continue it with --resume, start over with overwrite=true (deletes its outputs), or "
                f"choose another output_dir=..."
            )
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _set_aside_newer_than(self, source: Path) -> None:
        """Checkpoints newer than the one resumed belong to a future this run rewrites (or are
        unusable): renamed, never deleted, so they neither get picked up nor rotate ours away."""
        if not self._is_ours(source):
            return
        for path in checkpoint.list_checkpoints(self.output_dir):
            if checkpoint.step_of(path) > checkpoint.step_of(source):
                reason = "corrupt" if checkpoint.verify(path) else "superseded"
                moved = checkpoint.move_aside(path, reason)
                note(f"resuming from {source.name}: moved {path.name} aside to {moved.name}")

    def _is_ours(self, checkpoint_path: Path) -> bool:
        """Whether a checkpoint lies in this run's own checkpoints/ folder."""
        return checkpoint_path.resolve().parent == checkpoint.checkpoint_dir(self.output_dir).resolve()

    # ---- setup -------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, registry = self.cfg, self.plugins.registry
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        seed_everything(cfg.seed)
        self.backend = registry.get("backend", cfg.backend.name).factory(cfg)
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
            cfg, self.backend, policy, registry, self.output_dir, self.train_data, self.eval_data
        )
        self.algorithm: Algorithm = registry.get("algorithm", cfg.algo).factory(self.context)
        self.params = [p for p in self.algorithm.trainable().parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params)
        self.stream = BatchStream(
            self.train_data,
            self.data_format.collate,
            cfg.trainer.batch_size,
            cfg.seed,
            group_by_length=cfg.data.group_by_length,
        )
        self.total_steps = cfg.trainer.max_steps or cfg.trainer.epochs * math.ceil(
            self.stream.per_epoch / cfg.trainer.grad_accum
        )
        self.scheduler = get_scheduler(
            cfg.trainer.lr_scheduler,
            self.optimizer,
            num_warmup_steps=cfg.trainer.warmup_steps,
            num_training_steps=self.total_steps,
        )

    def _restore(self, path: Path) -> None:
        state = self.resume_state if self.resume_state is not None else checkpoint.load_state(path)
        self.backend.load_weights(self.context.policy, path / "model")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The configured hyperparameters, not the checkpoint's: see align.resume.
        resume.apply_optim_settings(self.optimizer, self.scheduler, self.cfg.optim)
        checkpoint.restore_rng(state["rng"])
        self.step = self.last_saved_step = int(state["step"])
        self.position = DataPosition(int(state["epoch"]), int(state["batch"]))
        self.resume_state = None
        if "config" not in state:
            note(f"{path} holds no saved config (an older align): the current settings apply")
        elif self.resume_changes:
            note(f"resuming with changed settings: {resume.describe(self.resume_changes)}", style="yellow")

    # ---- pieces of the loop ------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        size = self.cfg.trainer.eval_batch_size or self.cfg.trainer.batch_size
        model = self.algorithm.trainable()
        model.eval()
        metrics = self.algorithm.evaluate(eval_batches(self.eval_data, self.data_format.collate, size))
        model.train()
        self.hook.on_step_end(run=self.info, step=self.step, metrics={"split": "eval", **metrics})
        return metrics

    def save_checkpoint(self) -> Path:
        tmp = checkpoint.begin(self.output_dir, self.step)
        with checkpoint.guarded_write(f"the checkpoint of step {self.step}", tmp, self.output_dir):
            self.backend.save_pretrained(self.context.policy, tmp / "model")
            state = {
                "step": self.step,
                "epoch": self.position.epoch,
                "batch": self.position.batch,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": self.cfg.model_dump(mode="json"),
            }
            path = checkpoint.commit(tmp, state, self.cfg.trainer.keep_checkpoints)
        self.last_saved_step = self.step
        self.hook.on_checkpoint(run=self.info, step=self.step, path=path)
        return path

    def save_final(self) -> Path:
        final = self.output_dir / "final"
        partial = final.with_name("final.tmp")
        with checkpoint.guarded_write("the final model", partial, self.output_dir):
            checkpoint.replace_folder(
                final, lambda folder: self.backend.save_pretrained(self.context.policy, folder)
            )
        return final

    def _optimizer_step(self, batches: Iterator[tuple[DataPosition, Any]]) -> dict[str, float]:
        accum = self.cfg.trainer.grad_accum
        totals: dict[str, float] = {}
        tokens = slots = 0
        for _ in range(accum):
            self.position, batch = next(batches)
            out: LossOutput = self.algorithm.loss(batch)
            if not torch.isfinite(out.loss.detach()).all():
                raise self._diverged(f"the loss became {float(out.loss.detach())}")
            (out.loss / accum).backward()
            tokens += int(getattr(batch, "num_tokens", 0))
            laid_out = getattr(batch, "tokens", None)
            slots += laid_out.input_ids.numel() if isinstance(laid_out, TokenBatch) else 0
            for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accum
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise self._diverged(f"the gradient norm became {grad_norm}", applied=False)
        if self.cfg.trainer.max_grad_norm:
            totals["grad_norm"] = grad_norm
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._check_parameters()
        totals["tokens"] = tokens
        if slots:  # share of the computed token positions that were padding
            totals["pad_fraction"] = 1.0 - tokens / slots
        return totals

    def _clip_gradients(self) -> float:
        """The total gradient norm (clipped to trainer.max_grad_norm when set): the clip computes
        it anyway, so the finiteness check is one number."""
        max_norm = self.cfg.trainer.max_grad_norm
        if max_norm:
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        return float(total_norm([p.grad for p in self.params if p.grad is not None]))

    def _check_parameters(self) -> None:
        """After an update: the weights must be finite and must not have exploded in one step
        (an lr far too high gives huge but finite weights first, NaN losses one step later).
        The largest magnitude, not the 2-norm: it cannot overflow while every weight is finite."""
        largest = float(total_norm(self.params, math.inf))
        if not math.isfinite(largest):
            raise self._diverged(f"the parameters became {largest} in the update", applied=True)
        if largest > PARAM_JUMP * max(self.largest_param, 1.0):
            raise self._diverged(
                f"the largest parameter jumped from {self.largest_param:.4g} to {largest:.4g} in one update",
                applied=True,
            )
        self.largest_param = largest

    def _diverged(self, what: str, applied: bool = False) -> TrainingDiverged:
        last = checkpoint.latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        done = "the update was discarded (not saved)" if applied else "the update was not applied"
        return TrainingDiverged(
            f"training stopped: {what} at step {self.step + 1}; {done}; {kept}. Lower optim.lr, raise "
            f"trainer.warmup_steps or check the data, then rerun with --resume (changed optim.* and "
            f"schedule settings apply to the resumed run)."
        )

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> RunResult:
        _refuse_the_working_directory(self.output_dir)
        if self.cfg.resume is True and not self.output_dir.exists():
            raise ConfigError(
                f"--resume: nothing to resume from: output_dir {self.output_dir} does not exist"
            )
        try:
            with OutputLock(self.output_dir):
                return self._run()
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

    def _run(self) -> RunResult:
        resumed_from = self._prepare_output_dir()
        self._build()
        if resumed_from is not None:
            self._restore(resumed_from)
        write_run_config(self.cfg, self.output_dir, self.plugins.registry)
        self.info = RunInfo(self.cfg, self.output_dir, self.total_steps, resumed_from, resumed_step=self.step)
        self.hook.on_train_start(run=self.info)
        stats = self.data_format.stats()
        result = RunResult(self.output_dir, self.output_dir / "final", self.total_steps)
        result.eval_before = self.evaluate() if resumed_from is None else {}
        self._train(stats)
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        result.eval_after = self.evaluate()
        self.save_final()
        self.hook.on_train_end(run=self.info, metrics=result.eval_after)
        return result

    def _train(self, stats: dict[str, int]) -> None:
        t = self.cfg.trainer
        batches = self.stream.iterate(self.position)
        self.algorithm.trainable().train()
        self.largest_param = float(total_norm(self.params, math.inf))
        with Progress(self.total_steps, self.step, t.progress) as progress:
            if any(stats.values()):
                progress.note("data: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
            while self.step < self.total_steps:
                started = time.perf_counter()
                metrics = self._optimizer_step(batches)
                self.step += 1
                metrics["tokens_per_s"] = metrics["tokens"] / max(1e-9, time.perf_counter() - started)
                metrics["epoch"] = self.position.epoch + self.position.batch / self.stream.per_epoch
                progress.advance(metrics)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.hook.on_step_end(
                        run=self.info, step=self.step, metrics={"split": "train", **metrics}
                    )
                if t.save_every and self.step % t.save_every == 0:
                    self.save_checkpoint()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all ``tensors`` together, in one fused pass where torch has one."""
    if not tensors:
        return torch.zeros(())
    fused = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if fused is not None:
        return fused(tensors, norm_type)
    norms = [torch.linalg.vector_norm(t.detach(), norm_type) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


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
    return (
        f"{held} but no usable checkpoint ({'; '.join(unusable)})"
        if unusable
        else f"{held} but no checkpoint"
    )


def train(cfg: RunConfig, plugins: Plugins | None = None) -> RunResult:
    """Run ``cfg`` to the end with the installed plugins; the library entry point."""
    from align.plugins import callbacks_for, default_plugins, registered_for_run

    plugins = plugins or default_plugins()
    lifecycle = [*_sinks_for(cfg), *callbacks_for(cfg, plugins.registry)]
    with registered_for_run(plugins.manager, lifecycle):
        return Trainer(cfg, plugins).run()


def _sinks_for(cfg: RunConfig) -> list[Any]:
    from align.builtin.sinks import sinks_for

    return sinks_for(cfg)
