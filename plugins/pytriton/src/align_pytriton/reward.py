"""The reward server's ``reward`` model and the ``remote`` reward that scores through it.

A request carries rows of (prompt, completion, data row), each JSON text (a prompt may be a
chat conversation, a row any mapping), and gets one float32 reward per row. The server's
dynamic batcher merges concurrent requests, so the run sends its rows as several requests at
once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
        try:
            return self._scores(prompts, completions, rows)
        except ServerError as exc:
            raise RewardServerError(str(exc)) from exc

    def _scores(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None
    ) -> Tensor:
        n = len(prompts)
        size = self.cfg.batch_size
        futures = [
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
        parts = [torch.from_numpy(f.result()["reward"][:, 0].copy()) for f in futures]
        return torch.cat(parts) if parts else torch.zeros(0)

    def close(self) -> None:
        """Stop the client, and the server if this run started it; idempotent."""
        self.client.close()
        if self.child is not None:
            self.child.stop()
