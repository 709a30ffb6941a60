"""ILQL's heads on the language model's last hidden state: two Q heads (one value per token of
the vocabulary), their Polyak-averaged targets, and a V head; and the logits hook that steers
generation with them.

Each head is the paper's two-layer MLP (``hidden -> 2*hidden -> out``, ReLU). They are saved
as ``ilql_heads.safetensors`` with ``ilql.json`` (sizes and the generation β) in every
checkpoint and in ``final/``, beside the policy's own HF files: ``align generate`` on such a
folder finds them and steers the ``hf`` engine's sampling with them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import align
from align_ilql.objectives import steered_logits

HEADS_FILE = "ilql_heads.safetensors"
META_FILE = "ilql.json"
FORMAT_VERSION = 1


def mlp(hidden_size: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, out_features)
    )


class ILQLHeads(nn.Module):
    """``q`` (trained), ``target_q`` (frozen, moved toward ``q`` by ``polyak``) and ``v``."""

    def __init__(self, hidden_size: int, vocab_size: int, num_q: int = 2) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.q = nn.ModuleList([mlp(hidden_size, vocab_size) for _ in range(num_q)])
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        self.v = mlp(hidden_size, 1)

    def forward(self, hidden: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Every Q head's values ``[..., vocab]``, the targets' minimum ``[..., vocab]`` (no
        gradient) and V ``[...]``, from hidden states ``[..., hidden]`` (computed in float32)."""
        hidden = hidden.float()
        qs = [head(hidden) for head in self.q]
        with torch.no_grad():
            target = torch.stack([head(hidden) for head in self.target_q]).amin(dim=0)
        return qs, target, self.v(hidden).squeeze(-1)

    @torch.no_grad()
    def polyak(self, rate: float) -> None:
        """``Q̄ ← (1 − rate) Q̄ + rate Q``, parameter by parameter."""
        for target, online in zip(self.target_q.parameters(), self.q.parameters(), strict=True):
            target.mul_(1.0 - rate).add_(online.detach(), alpha=rate)

    @torch.no_grad()
    def advantage(self, hidden: Tensor) -> Tensor:
        """``min_i Q̄_i(s, ·) − V(s)`` for each hidden state: what generation adds, times β."""
        hidden = hidden.float()
        target = torch.stack([head(hidden) for head in self.target_q]).amin(dim=0)
        return target - self.v(hidden)

    def save(self, folder: Path, beta: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / HEADS_FILE))
        meta = {
            "format": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_q": len(self.q),
            "beta": beta,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load(self, folder: Path) -> None:
        """Weights written by ``save`` into these heads, in place (a resume)."""
        state = load_file(str(folder / HEADS_FILE))
        self.load_state_dict(state)


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        int(meta["hidden_size"]), int(meta["vocab_size"]), float(meta["beta"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise align.ConfigError(f"{path}: not an ILQL heads description ({exc})") from None
    return meta


def load_heads(folder: Path) -> tuple[ILQLHeads, float]:
    """The heads saved in ``folder`` and the generation β they were saved with."""
    meta = read_meta(folder)
    heads = ILQLHeads(int(meta["hidden_size"]), int(meta["vocab_size"]), int(meta.get("num_q", 2)))
    try:
        heads.load(folder)
    except (OSError, RuntimeError) as exc:
        raise align.ConfigError(f"{folder / HEADS_FILE}: cannot load the ILQL heads ({exc})") from None
    return heads.eval(), float(meta["beta"])


class SteeringHook:
    """An ``align.LogitsHook``: ``hook(hidden, logits)`` returns ``logits + β (Q̄ − V)``,
    computed from the hidden state the LM head read (``[batch, hidden]``) for the logits of the
    next token (``[batch, vocab]``)."""

    def __init__(self, heads: ILQLHeads, beta: float) -> None:
        self.heads, self.beta = heads, beta

    @torch.no_grad()
    def __call__(self, hidden: Tensor, logits: Tensor) -> Tensor:
        if next(self.heads.parameters()).device != hidden.device:
            self.heads = copy.deepcopy(self.heads).to(hidden.device)
        target = torch.stack([head(hidden.float()) for head in self.heads.target_q]).amin(dim=0)
        return steered_logits(logits, target, self.heads.v(hidden.float()), self.beta)


def steering_for(model_path: str | Path) -> SteeringHook | None:
    """The steering hook of a model folder with ILQL heads beside it (an ILQL run's ``final/``;
    a checkpoint's ``model/``, whose heads are in the checkpoint), else None."""
    folder = Path(model_path)
    for candidate in (folder, folder.parent) if folder.name == "model" else (folder,):
        if (candidate / META_FILE).is_file():
            heads, beta = load_heads(candidate)
            return SteeringHook(heads, beta)
    return None
