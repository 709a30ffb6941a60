"""The reward server's ``reward`` model and the ``remote`` reward that scores through it.

A request carries rows of (prompt, completion, data row), each JSON text (a prompt may be a
chat conversation, a row any mapping), and gets one float32 reward per row. The server's
dynamic batcher merges concurrent requests, so the run sends its rows as several requests at
once. ``submit`` returns at once with a future of all of them (``align.submit_reward``): PPO
sends a rollout's rewards right after generating it and computes its log-probs meanwhile.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from torch import Tensor

import align
from align_pytriton.client import ServerClient, connect_or_start
from align_pytriton.config import RemoteRewardConfig
from align_pytriton.errors import RewardServerError, ServerError
from align_pytriton.server import Endpoint

MODEL = "reward"
INPUTS = ("prompt", "completion", "row")


def reward_endpoint(reward: align.RewardSource) -> Endpoint:
    """The ``reward`` model: JSON texts in, ``reward(prompts, completions, rows)`` out."""
    from pytriton.decorators import batch

    @batch
    def infer(prompt: np.ndarray, completion: np.ndarray, row: np.ndarray) -> dict[str, np.ndarray]:
        prompts, completions, rows = (
            [json.loads(v[0]) for v in column] for column in (prompt, completion, row)
        )
        given_rows = None if all(r is None for r in rows) else [r or {} for r in rows]
        values = reward(prompts, completions, given_rows)
        return {"reward": np.asarray(values, dtype=np.float32).reshape(-1, 1)}

    return Endpoint(
        name=MODEL,
        infer=infer,
        inputs=[(name, np.bytes_, (1,)) for name in INPUTS],
        outputs=[("reward", np.float32, (1,))],
    )


def encode(values: Sequence[Any]) -> np.ndarray:
    """One JSON text per row, as a ``[n, 1]`` bytes array."""
    return np.array([[json.dumps(v).encode()] for v in values], dtype=np.bytes_)


class RemoteReward:
    """``reward: {name: remote, ...}``: rewards computed by a reward server."""

    def __init__(self, cfg: RemoteRewardConfig) -> None:
        self.cfg = cfg
        serve = (
            None
            if cfg.serve is None
            else {"reward": cfg.serve.model_dump(), "server": cfg.server.model_dump()}
        )
        self.label, url, self.child = connect_or_start("reward", cfg, serve)
        self.client = ServerClient(self.label, url, MODEL, cfg, self.child)

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Tensor:
        return self.submit(prompts, completions, rows).result()

    def submit(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Future[Tensor]:
        """Send the rows (``batch_size`` per request) and return at once: the future holds the
        rewards in row order, or a ``RewardServerError``."""
        scores: Future[Tensor] = Future()
        try:
            parts = self._requests(prompts, completions, rows)
        except ServerError as exc:  # not connected (the server did not come up)
            scores.set_exception(_reward_error(exc))
            return scores
        if not parts:
            scores.set_result(torch.zeros(0))
            return scores
        left = [len(parts)]
        lock = threading.Lock()

        def answered(_: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            failed = next((f.exception() for f in parts if f.exception() is not None), None)
            if failed is not None:
                scores.set_exception(_reward_error(failed))
            else:
                scores.set_result(
                    torch.cat([torch.from_numpy(f.result()["reward"][:, 0].copy()) for f in parts])
                )

        for part in parts:
            part.add_done_callback(answered)
        return scores

    def _requests(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None
    ) -> list[Future[dict[str, Any]]]:
        n = len(prompts)
        size = self.cfg.batch_size
        return [
            self.client.submit(
                {
                    "prompt": encode(prompts[i : i + size]),
                    "completion": encode(completions[i : i + size]),
                    "row": encode(
                        rows[i : i + size] if rows is not None else [None] * len(prompts[i : i + size])
                    ),
                },
                expect={"reward": (min(size, n - i), 1)},
            )
            for i in range(0, n, size)
        ]

    def close(self) -> None:
        """Stop the client, and the server if this run started it; idempotent."""
        self.client.close()
        if self.child is not None:
            self.child.stop()


def _reward_error(exc: BaseException) -> BaseException:
    """A server's failure as the ``RewardError`` the reward checks pass on (others as they are)."""
    if isinstance(exc, ServerError) and not isinstance(exc, RewardServerError):
        error = RewardServerError(str(exc))
        error.__cause__ = exc
        return error
    return exc
