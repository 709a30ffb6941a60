"""The critic server (``critic_infer``, ``critic_train``, ``critic_save``, ``critic_load``) and
the ``remote`` critic that drives it (``align.Critic``).

The server holds the value model (built by the run's backend, as the local critic's), its
optimizer and step count. It is configured by the PPO run config itself: ``align serve critic
examples/ppo.yaml`` serves the critic that ``critic:`` describes, and a run started without
``critic.url`` hands its own config to a child server.

Sequences travel as rows (tokens, prompt length, length) plus the layout flag; the server lays
them out again exactly as the run did (``align.lay_out``), so values match the local critic's
on the same weights. Requests are computed one at a time under one lock, in the order the
client sends them; the client keeps the protocol's order: a ``values`` waits for the trains
before it, a ``train`` for every call before it. Values requests are queued through Triton's
dynamic batcher but each is computed on its own, so a value never depends on which other
request arrived with it (a resumed run is bit-exact).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import get_scheduler

import align
from align_pytriton.client import ServerClient, connect_or_start
from align_pytriton.config import RemoteCriticConfig
from align_pytriton.errors import CriticServerError, ServerError
from align_pytriton.server import Endpoint

ROLE = "critic"
INFER, TRAIN, SAVE, LOAD = "critic_infer", "critic_train", "critic_save", "critic_load"
STATE_FILE = "critic_state.pt"
SEQUENCE_INPUTS = [
    ("tokens", np.int64, (-1,)),
    ("prompt_lengths", np.int64, (1,)),
    ("lengths", np.int64, (1,)),
]


# ---- sequences over the wire ----------------------------------------------------------------
def sequence_rows(batch: align.TokenBatch) -> dict[str, np.ndarray]:
    """Each sequence of ``batch`` as a right-padded row with its prompt length (the tokens before
    its first scored one) and length; its scored tokens must be the rest (a completion)."""
    rows: list[Tensor] = []
    prompts: list[int] = []
    for s in range(batch.num_sequences):
        where = batch.sequence_ids == s
        ids, scored = batch.input_ids[where], batch.loss_mask[where]
        first = int(scored.float().argmax()) if bool(scored.any()) else len(ids)
        if not bool(scored[first:].all()):
            raise ValueError(f"sequence {s}: its scored tokens are not one completion at its end")
        rows.append(ids)
        prompts.append(first)
    width = max((len(r) for r in rows), default=0)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row.numpy()
    lengths = np.array([[len(r)] for r in rows], dtype=np.int64)
    return {
        "tokens": tokens,
        "prompt_lengths": np.array(prompts, dtype=np.int64)[:, None],
        "lengths": lengths,
    }


def scored_width(batch: align.TokenBatch) -> int:
    """The most scored tokens of any sequence (``T`` of the values layout)."""
    owners = batch.sequence_ids[batch.loss_mask]
    return int(torch.bincount(owners, minlength=batch.num_sequences).max()) if owners.numel() else 0


def layout_flag(batch: align.TokenBatch) -> np.ndarray:
    """Whether the run packs sequences (``data.padding_free``): the server lays out the same."""
    return np.array([int(batch.packed)], dtype=np.int64)


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.bytes_)


# ---- the server -------------------------------------------------------------------------------
class CriticModel:
    """The value model, its optimizer and step count, behind one lock."""

    def __init__(self, run: align.RunConfig, plugins: align.Plugins) -> None:
        cfg = run.critic  # type: ignore[attr-defined]
        if not isinstance(cfg, RemoteCriticConfig):
            raise align.ConfigError(
                f"critic.name is '{getattr(cfg, 'name', None)}': `align serve critic` serves a "
                "`critic: {name: remote, ...}` section"
            )
        self.cfg, self.run = cfg, run
        if run.trainer.num_threads:  # as the run computes, so that values match a local critic's
            torch.set_num_threads(run.trainer.num_threads)
        torch.manual_seed(run.seed)
        self.backend = align.build_backend(run, plugins)
        if not isinstance(self.backend, align.TokenScoringBackend):
            raise align.ConfigError(
                f"critic server: backend '{run.backend.name}' cannot read per-token values"
            )
        self.model: nn.Module = self.backend.build_model(ROLE, model_section(cfg, run))
        self.model.requires_grad_(True)
        self.optimizer = build_optimizer(cfg.optim or run.optim, self.model.parameters())
        self.scheduler = build_scheduler(self.optimizer, run)
        self.max_grad_norm = run.trainer.max_grad_norm
        self.precision = run.trainer.precision
        self.pad_id = int(self.backend.tokenizer.pad_token_id)
        self.step = 0
        self.lock = threading.Lock()

    def lay_out(self, request: dict[str, np.ndarray]) -> align.TokenBatch:
        tokens = request["tokens"].tolist()
        pairs = [
            (row[:p], row[p:n])
            for row, p, n in zip(
                tokens, request["prompt_lengths"][:, 0], request["lengths"][:, 0], strict=True
            )
        ]
        return align.lay_out(pairs, self.pad_id, bool(request["packed"].reshape(-1)[0]))

    def values(self, request: dict[str, np.ndarray]) -> np.ndarray:
        batch = self.lay_out(request)
        with self.lock, torch.no_grad(), align.precision_scope(self.precision, self.model):
            self.model.eval()
            values = self.backend.token_scores(self.model, batch).values  # type: ignore[attr-defined]
        return values.float().numpy()

    def train(self, request: dict[str, np.ndarray]) -> dict[str, float]:
        batch = self.lay_out(request)
        returns, old, mask = (torch.from_numpy(request[k].copy()) for k in ("returns", "old_values", "mask"))
        with self.lock:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with align.precision_scope(self.precision, self.model):
                current = self.backend.token_scores(self.model, batch).values  # type: ignore[attr-defined]
            width = current.shape[1]
            loss, stats = value_loss(
                current, old[:, :width], returns[:, :width], mask[:, :width].bool(), self.cfg.value_clip
            )
            if not torch.isfinite(loss):
                raise ValueError(f"the value loss is {float(loss)} at critic step {self.step + 1}")
            loss.backward()
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
            if not torch.isfinite(norm):
                raise ValueError(f"the critic's gradient norm is {float(norm)} at step {self.step + 1}")
            lr = self.scheduler.get_last_lr()[0]  # the step's own, as the learner reports it
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
        return {
            "loss": float(loss),
            "grad_norm": float(norm),
            "lr": float(lr),
            **{k: float(v) for k, v in stats.items()},
        }

    def save(self, folder: Path) -> None:
        with self.lock:
            folder.mkdir(parents=True, exist_ok=True)
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": torch.get_rng_state(),
            }
            torch.save(state, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        path = folder / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint holds no critic server state")
        with self.lock:
            state = torch.load(path, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "scheduler" in state:  # absent from a state saved before the server had a schedule
                self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])


def model_section(cfg: RemoteCriticConfig, run: align.RunConfig) -> align.ModelConfig:
    """The run's model, or the reward model's folder read with the run's tokenizer."""
    if cfg.init == "policy":
        return run.model
    path = cfg.path or getattr(getattr(run, "reward", None), "path", None)
    if not path:
        raise align.ConfigError(
            "critic.init: reward needs critic.path (a saved reward model folder), or a run reward with a "
            "path (reward: {name: model, path: ...})"
        )
    return run.model.model_copy(
        update={"path": str(path), "tokenizer": run.model.tokenizer or run.model.path}
    )


def build_optimizer(cfg: align.OptimConfig, params: Any) -> torch.optim.Optimizer:
    """The critic's optimizer, made as the learner makes the local critic's (fused AdamW where
    every parameter allows it: the same update, rounded the same way)."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def build_scheduler(optimizer: torch.optim.Optimizer, run: align.RunConfig) -> Any:
    """The LR schedule the local critic gets from the learner: ``trainer.lr_scheduler`` with
    ``trainer.warmup_steps``, over the critic's own steps (``critic_steps``)."""
    t = run.trainer
    return get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=critic_steps(run)
    )


def critic_steps(run: Any) -> int:
    """The critic's planned training steps: one per minibatch of every PPO epoch of every
    iteration, critic warm-up included (the local critic's schedule length, align-ppo's
    ``planned_critic_steps``)."""
    t = run.trainer
    samples = run.prompts_per_iteration * run.sampling.n
    return int(run.iterations * run.epochs * math.ceil(samples / (t.batch_size * t.grad_accum)))


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, the mean over masked tokens of
    ``max((V - R)^2, (old_V + clamp(V - old_V, -c, c) - R)^2) / 2`` (``(V - R)^2 / 2`` without
    ``c``); ``clip_fraction`` is the share of tokens where the clipped term is strictly larger,
    ``explained_variance`` the values' (before the step)."""
    values = values.float()
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, taken = unclipped, torch.zeros_like(mask)
    else:
        clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
        per_token, taken = torch.maximum(unclipped, clipped), clipped > unclipped
    tokens = mask.sum().clamp(min=1)
    loss = 0.5 * torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / tokens
    value_mean = torch.where(mask, values.detach(), torch.zeros_like(values)).sum() / tokens
    stats = {"clip_fraction": (taken & mask).sum() / tokens, "value_mean": value_mean}
    return loss, stats | {"explained_variance": explained_variance(values.detach(), returns, mask)}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens (0 for fewer than two tokens, or
    returns that do not vary): 1 for a perfect critic, 0 for one no better than a constant."""
    r, v = returns[mask].float(), values[mask].float()
    if r.numel() < 2 or float(r.var()) == 0.0:
        return torch.zeros(())
    return 1 - (r - v).var() / r.var()


def critic_endpoints(critic: CriticModel) -> list[Endpoint]:
    """The four models of a critic server; each request is served on its own (see the module)."""

    def each(
        fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> Callable[[list[Any]], list[Any]]:
        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return [fn({name: request[name] for name in request}) for request in requests]

        return infer

    def values(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"values": critic.values(r)}

    def train(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"metrics": text(json.dumps(critic.train(r)))}

    def save(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        critic.save(Path(r["folder"].reshape(-1)[0].decode()))
        return {"step": np.array([critic.step], dtype=np.int64)}

    def load(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        critic.load(Path(r["folder"].reshape(-1)[0].decode()))
        return {"step": np.array([critic.step], dtype=np.int64)}

    flag = [("packed", np.int64, (1,))]
    whole = [
        ("tokens", np.int64, (-1, -1)),
        ("prompt_lengths", np.int64, (-1, 1)),
        ("lengths", np.int64, (-1, 1)),
    ]
    folder = [("folder", np.bytes_, (1,))]
    step = [("step", np.int64, (1,))]
    return [
        Endpoint(
            INFER,
            each(values),
            [*SEQUENCE_INPUTS, ("packed", np.int64, (1,))],
            [("values", np.float32, (-1,))],
        ),
        Endpoint(
            TRAIN,
            each(train),
            [
                *whole,
                *flag,
                *((k, np.float32, (-1, -1)) for k in ("returns", "old_values")),
                ("mask", np.bool_, (-1, -1)),
            ],
            [("metrics", np.bytes_, (1,))],
            batched=False,
        ),
        Endpoint(SAVE, each(save), folder, step, batched=False),
        Endpoint(LOAD, each(load), folder, step, batched=False),
    ]


# ---- the run's side ---------------------------------------------------------------------------
class RemoteCritic:
    """``critic: {name: remote, ...}`` (see the module docstring); the contract is ``align.Critic``'s."""

    def __init__(self, cfg: RemoteCriticConfig, ctx: align.Context, learner: Any) -> None:
        self.cfg = cfg
        serve = None if cfg.url else run_config_data(ctx.config)
        self.label, url, self.child = connect_or_start("critic", cfg, serve, settings_at=("critic", "server"))
        self.clients = {
            m: ServerClient(
                self.label,
                url,
                m,
                cfg,
                self.child,
                batched=m == INFER,
                text_outputs=("metrics",),
                idempotent=m != TRAIN,
            )
            for m in (INFER, TRAIN, SAVE, LOAD)
        }
        self._last_train: Future[Any] | None = None
        self._since_train: list[Future[Any]] = []
        self._order = threading.Lock()

    # ---- align.Critic --------------------------------------------------------------------------
    def values(self, batch: align.TokenBatch) -> Future[Tensor]:
        # every input of a batched model has one row per sequence: the layout flag too
        inputs = {**sequence_rows(batch), "packed": np.full((batch.num_sequences, 1), int(batch.packed))}
        expect: dict[str, tuple[int, ...]] = {"values": (batch.num_sequences, scored_width(batch))}
        with self._order:
            before = [self._last_train] if self._last_train is not None else []
            future = self._after(
                before, INFER, inputs, expect, lambda out: torch.from_numpy(out["values"].copy())
            )
            self._since_train.append(future)
        return future

    def train(self, batch: align.CriticBatch) -> Future[dict[str, float]]:
        inputs = {
            **sequence_rows(batch.tokens),
            "packed": layout_flag(batch.tokens),
            "returns": batch.returns.float().numpy(),
            "old_values": batch.old_values.float().numpy(),
            "mask": batch.mask.bool().numpy(),
        }
        with self._order:
            before = [*self._since_train, *([self._last_train] if self._last_train is not None else [])]
            future = self._after(before, TRAIN, inputs, {"metrics": (1,)}, metrics_of)
            self._last_train, self._since_train = future, []
        return future

    def save(self, folder: Path) -> None:
        self._wait_for_all()
        self._call(SAVE, {"folder": text(str(Path(folder).resolve()))})

    def load(self, folder: Path) -> None:
        self._wait_for_all()
        self._call(LOAD, {"folder": text(str(Path(folder).resolve()))})

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        if self.child is not None:
            self.child.stop()

    # ---- ordering and errors -------------------------------------------------------------------
    def _wait_for_all(self) -> None:
        with self._order:
            pending = [*self._since_train, *([self._last_train] if self._last_train is not None else [])]
        for future in pending:
            future.exception()  # a failure is raised by whoever reads that future

    def _call(self, model: str, inputs: dict[str, np.ndarray]) -> None:
        try:
            self.clients[model].infer(inputs, {"step": (1,)})
        except ServerError as exc:
            raise CriticServerError(f"critic '{self.cfg.name}': {exc}") from exc

    def _after(
        self,
        before: Sequence[Future[Any]],
        model: str,
        inputs: dict[str, np.ndarray],
        expect: dict[str, tuple[int, ...]],
        convert: Callable[[dict[str, np.ndarray]], Any],
    ) -> Future[Any]:
        """A future for ``model``'s answer, sent once every future in ``before`` is done (and
        failed with the first failure among them, unsent)."""
        outer: Future[Any] = Future()
        waiting = [len(before)]
        lock = threading.Lock()

        def send() -> None:
            failed = next((f.exception() for f in before if f.exception() is not None), None)
            if failed is not None:
                outer.set_exception(
                    CriticServerError(f"critic '{self.cfg.name}': an earlier request failed: {failed}")
                )
                return
            try:
                inner = self.clients[model].submit(inputs, expect)
            except ServerError as exc:
                outer.set_exception(CriticServerError(f"critic '{self.cfg.name}': {exc}"))
                return
            inner.add_done_callback(finish)

        def finish(inner: Future[dict[str, np.ndarray]]) -> None:
            exc = inner.exception()
            if exc is not None:
                error = CriticServerError(f"critic '{self.cfg.name}': {exc}")
                error.__cause__ = exc
                outer.set_exception(error)
                return
            try:
                outer.set_result(convert(inner.result()))
            except Exception as bad:
                outer.set_exception(CriticServerError(f"critic '{self.cfg.name}' ({self.label}): {bad}"))

        def one_done(_: Future[Any]) -> None:
            with lock:
                waiting[0] -= 1
                ready = waiting[0] == 0
            if ready:
                send()

        if not before:
            send()
        for f in before:
            f.add_done_callback(one_done)
        return outer


def metrics_of(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    metrics = json.loads(outputs["metrics"].reshape(-1)[0])
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise ValueError(f"train answered metrics {metrics!r:.80}; expected a mapping of numbers")
    return {str(k): float(v) for k, v in metrics.items()}


def run_config_data(run: align.RunConfig) -> dict[str, Any]:
    """The run config as the child server reads it (``align.validate_run_config``)."""
    return run.model_dump(mode="json", by_alias=True, exclude_none=False)
