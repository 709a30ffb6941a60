"""The ``local`` critic: a value model trained in the actor's process.

The model is the backend's ``critic`` role: a one-head sequence classifier whose head is read
at every token (``align.TokenScoringBackend.token_scores``), initialised from the run's model
(a fresh value head) or from a reward model (its head becomes the value head). It trains
through the learner as trainable ``critic``, with its own optimizer, so the actor's checkpoints
hold its weights, optimizer and schedule, and a resumed run continues it bit-exact; ``save``
and ``load`` therefore have nothing to write. Calls run synchronously: each future is done
when returned.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import align
from align_ppo.config import LocalCriticConfig
from align_ppo.objectives import value_loss

ROLE = "critic"
T = TypeVar("T")


def _done(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


def _failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def critic_model_section(cfg: LocalCriticConfig, run: align.RunConfig) -> align.ModelConfig:
    """The model section the critic is built from: the run's model, or the reward model's
    folder (with the run's tokenizer: the critic reads the policy's tokens)."""
    model: align.ModelConfig = run.model
    if cfg.init == "policy":
        return model
    path = cfg.path or getattr(getattr(run, "reward", None), "path", None)
    if not path:
        raise align.ConfigError(
            "critic.init: reward needs critic.path (a saved reward model folder), or a run reward "
            "with a path (reward: {name: model, path: ...})"
        )
    return model.model_copy(update={"path": str(path), "tokenizer": model.tokenizer or model.path})


def planned_critic_steps(run: Any) -> int | None:
    """The critic's own LR schedule length: one step per minibatch of every iteration, warm-up
    included (it trains more steps than the policy). None (the run's) for a run config without
    PPO's keys."""
    try:
        t = run.trainer
        samples = run.prompts_per_iteration * run.sampling.n
        return int(run.iterations * run.epochs * math.ceil(samples / (t.batch_size * t.grad_accum)))
    except AttributeError:
        return None


class LocalCritic:
    """See the module docstring; the contract is ``align.Critic``'s."""

    def __init__(self, cfg: LocalCriticConfig, ctx: align.Context, learner: Any) -> None:
        backend = ctx.backend
        if not isinstance(backend, align.TokenScoringBackend):
            raise align.ConfigError(
                f"critic 'local' needs a backend that reads a value at every token "
                f"(align.TokenScoringBackend); backend '{ctx.config.backend.name}' does not"
            )
        self.cfg, self.backend, self.learner = cfg, backend, learner
        self.model: nn.Module = backend.build_model(ROLE, critic_model_section(cfg, ctx.config))
        learner.add_trainable(ROLE, self.model, optim=cfg.optim, total_steps=planned_critic_steps(ctx.config))

    def values(self, batch: align.TokenBatch) -> Future[Tensor]:
        try:
            with torch.no_grad(), align.eval_mode(self.model), self.learner.forward_precision(ROLE):
                scores = self.backend.token_scores(self.model, batch)
            return _done(scores.values.detach().float())
        except Exception as exc:
            return _failed(self._error("computing values", exc))

    def train(self, batch: align.CriticBatch) -> Future[dict[str, float]]:
        try:
            metrics = self.learner.train_step([batch], self._loss, role=ROLE)
        except align.UserError as exc:  # a diverged critic: the learner's message names it
            return _failed(exc)
        except Exception as exc:
            return _failed(self._error("training", exc))
        keep = ("loss", "clip_fraction", "grad_norm", "explained_variance", "value_mean", "lr")
        return _done({key: float(metrics[key]) for key in keep if key in metrics})

    def _loss(self, batch: align.CriticBatch) -> align.LossOutput:
        current = self.backend.token_scores(self.model, batch.tokens).values
        width = current.shape[1]
        loss, stats = value_loss(
            current,
            batch.old_values[:, :width],
            batch.returns[:, :width],
            batch.mask[:, :width],
            self.cfg.value_clip,
        )
        return align.LossOutput(loss, {key: value.detach() for key, value in stats.items()})

    def save(self, folder: Path) -> None:
        """Nothing: the learner's checkpoint holds trainable ``critic`` (``roles/critic``)."""

    def load(self, folder: Path) -> None:
        """Nothing: the learner restores trainable ``critic`` itself."""

    def close(self) -> None:
        """Nothing to release: the model goes with the learner."""

    def _error(self, doing: str, exc: Exception) -> align.CriticError:
        error = align.CriticError(f"critic 'local' failed while {doing}: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
