"""Building rewards, and the checks every reward's output goes through.

``build_reward(cfg, registry)`` builds the reward a config names (any registered plugin) and
wraps it: whatever the reward returns must be one finite number per (prompt, completion) pair.
A reward that raises, returns NaN or infinity, something that is not a number, or the wrong
number of values stops the run with a ``RewardError`` (a ``UserError``: exit code 2, the last
checkpoint is kept) that names the reward, the row and the start of its prompt.

A reward factory is called with the config; one that also takes a ``registry`` parameter gets
it, so that a composite reward (``sum``) builds its parts with ``build_reward`` too.

Asynchronous rewards: a reward may also have ``submit(prompts, completions, rows) ->
Future[Tensor]`` that returns at once (the ``remote`` reward of align-pytriton sends its requests
and returns). ``submit_reward`` calls it where there is one, and otherwise computes the scores
at once into a finished future; either way the scores pass the same checks, and the caller
waits only when it needs them (PPO scores while it takes its log-probs).

A reward that holds something outside the process (a server it started, a client's threads)
has ``close()``; ``close_reward`` calls it where there is one. Online algorithms close their
rewards when the run ends (``Algorithm.release``), also after an error.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from align.config import RewardConfig
from align.errors import ConfigError, UserError
from align.protocols import RewardSource
from align.registry import Registry

EXCERPT_CHARS = 60


class RewardError(UserError):
    """A reward failed or returned something that is not one finite number per row."""


def message_text(value: Any) -> str:
    """The text of a prompt or completion: a string itself, or the content of the last message
    of a chat conversation (a completion's reply, a prompt's latest turn)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return "" if value is None else str(value)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """The start of a prompt on one line, for error messages."""
    text = " ".join(message_text(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_reward(cfg: RewardConfig, registry: Registry) -> RewardSource:
    """The reward ``cfg`` names, built by its plugin and wrapped with the output checks."""
    entry = registry.get("reward", cfg.name)
    extra = {"registry": registry} if _takes_registry(entry.factory) else {}
    try:
        source: RewardSource = entry.factory(cfg, **extra)
    except UserError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"reward '{cfg.name}' ({entry.package}) could not be built: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(source, CheckedReward):
        return source
    label = getattr(source, "label", None) or f"reward '{cfg.name}'"
    return CheckedReward(source, str(label))


def close_reward(reward: Any) -> None:
    """``reward.close()`` where the reward has one (a server's client and the server it started);
    nothing otherwise. Idempotent as long as the reward's own ``close`` is."""
    close = getattr(reward, "close", None)
    if callable(close):
        close()


def submit_reward(
    reward: RewardSource,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict[str, Any]] | None,
) -> Future[Tensor]:
    """``reward(prompts, completions, rows)`` as a future: sent off by a reward that has
    ``submit`` (see the module docstring), computed now by one that does not. Failures are in
    the future, raised by ``result()``."""
    submit = getattr(reward, "submit", None)
    if callable(submit):
        future: Future[Tensor] = submit(prompts, completions, rows)
        return future
    return _scored_now(reward, prompts, completions, rows)


def _scored_now(
    reward: RewardSource,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict[str, Any]] | None,
) -> Future[Tensor]:
    done: Future[Tensor] = Future()
    try:
        done.set_result(reward(prompts, completions, rows))
    except Exception as exc:
        done.set_exception(exc)
    return done


def _takes_registry(factory: Callable[..., Any]) -> bool:
    try:
        return "registry" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class CheckedReward:
    """A reward whose every result is checked: one finite float per row, or a ``RewardError``."""

    def __init__(self, source: RewardSource, label: str) -> None:
        self.source = source
        self.label = label

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Tensor:
        if len(prompts) != len(completions) or (rows is not None and len(rows) != len(prompts)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(completions)} completions and "
                f"{'no' if rows is None else len(rows)} rows: one of each per pair is needed"
            )
        try:
            raw = self.source(prompts, completions, rows)
        except RewardError:  # a checked part of this reward (a term of a sum) already named the row
            raise
        except Exception as exc:
            raise self._failure(exc, prompts, completions, rows) from exc
        return self._values(raw, prompts)

    def close(self) -> None:
        close_reward(self.source)

    def submit(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Future[Tensor]:
        """The checked scores as a future (``submit_reward``): the source's own ``submit`` where
        it has one, else computed now."""
        if not callable(getattr(self.source, "submit", None)):
            return _scored_now(self, prompts, completions, rows)
        checked: Future[Tensor] = Future()
        try:
            sent = submit_reward(self.source, prompts, completions, rows)
        except Exception as exc:
            sent = Future()
            sent.set_exception(exc)

        def check(done: Future[Any]) -> None:
            exc = done.exception()
            if exc is not None and not isinstance(exc, RewardError):
                # not retried row by row here: this runs on the source's own callback thread
                error = RewardError(
                    f"{self.label} raised {type(exc).__name__}: {exc} on a batch of {len(prompts)} rows"
                )
                error.__cause__ = exc
                exc = error
            if exc is not None:
                checked.set_exception(exc)
                return
            try:
                checked.set_result(self._values(done.result(), prompts))
            except RewardError as bad:
                checked.set_exception(bad)

        sent.add_done_callback(check)
        return checked

    def _failure(
        self,
        exc: Exception,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rows: Sequence[dict[str, Any]] | None,
    ) -> RewardError:
        """Name the first row that fails on its own (the batch's error when none does)."""
        row, error = (0, exc) if len(prompts) == 1 else self._failing_row(prompts, completions, rows)
        where = (
            f"on row {row} (prompt: {excerpt(prompts[row])!r})"
            if row is not None
            else f"on a batch of {len(prompts)} rows (no row fails alone)"
        )
        return RewardError(f"{self.label} raised {type(error or exc).__name__}: {error or exc} {where}")

    def _failing_row(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None
    ) -> tuple[int | None, Exception | None]:
        for i in range(len(prompts)):
            try:
                self.source([prompts[i]], [completions[i]], None if rows is None else [rows[i]])
            except Exception as exc:
                return i, exc
        return None, None

    def _values(self, raw: Any, prompts: Sequence[Any]) -> Tensor:
        values = self._as_floats(raw, prompts)
        if len(values) != len(prompts):
            raise RewardError(
                f"{self.label} returned {len(values)} values for {len(prompts)} rows: it must return "
                "one number per (prompt, completion) pair"
            )
        for row, value in enumerate(values):
            if not math.isfinite(value):
                raise RewardError(
                    f"{self.label} returned {value} for row {row} (prompt: {excerpt(prompts[row])!r}); "
                    "rewards must be finite numbers"
                )
        return torch.tensor(values, dtype=torch.float32)

    def _as_floats(self, raw: Any, prompts: Sequence[Any]) -> list[float]:
        if isinstance(raw, Tensor):
            if raw.dim() != 1 or raw.is_complex():
                raise RewardError(
                    f"{self.label} returned a tensor of shape {tuple(raw.shape)} and dtype {raw.dtype}; "
                    f"expected a 1-D real tensor of {len(prompts)} values"
                )
            return [float(v) for v in raw.detach().cpu().double().tolist()]
        if hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):  # numpy arrays
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)):
            raise RewardError(
                f"{self.label} returned {type(raw).__name__} {raw!r:.60}; expected a list or 1-D tensor "
                f"of {len(prompts)} numbers"
            )
        floats = []
        for row, value in enumerate(raw):
            number = _number(value)
            if number is None:
                where = f" for row {row} (prompt: {excerpt(prompts[row])!r})" if row < len(prompts) else ""
                raise RewardError(
                    f"{self.label} returned {type(value).__name__} {value!r:.60}{where}; rewards must be "
                    "numbers"
                )
            floats.append(number)
        return floats


def _number(value: Any) -> float | None:
    """A real number (bool, int, float, numpy scalar, one-element tensor) as a float, else None."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    return None
