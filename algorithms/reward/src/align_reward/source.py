"""The ``model`` reward source: a saved reward model scores (prompt, completion) pairs.

    reward: {name: model, path: runs/reward/final}

``path`` is a folder in transformers' layout holding a sequence classifier and its tokenizer:
what ``align run --algo reward`` (or ``reward_regression``) writes as ``final/``, or any HF
reward model. Texts are encoded as the data formats encode them (chat template for
conversations), and the score is read at each sequence's last non-pad token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import align


class ModelRewardConfig(align.RewardConfig):
    name: Literal["model"] = "model"
    path: str = Field(..., description="Saved reward model folder (e.g. runs/reward/final) or HF model id.")
    weights: list[float] | None = Field(
        None,
        description="One weight per head: the reward is their weighted sum. Required for a model with "
        "several heads (an attribute model); a one-head model's score is the reward.",
    )
    max_length: int = Field(1024, gt=1, description="Tokens of prompt + completion; longer ones are cut.")
    batch_size: int = Field(16, gt=0)
    device: str = Field(
        "auto",
        description=f"Where the reward model runs ({align.DEVICE_CHOICES}); auto: the GPU when torch "
        "sees one, else the CPU.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"


class ModelReward:
    """Callable reward source: ``reward(prompts, completions) -> Tensor[n]``."""

    def __init__(self, cfg: ModelRewardConfig) -> None:
        self.cfg = cfg
        self.device = align.resolve_device(cfg.device, "reward.device")
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                cfg.path, dtype=getattr(torch, cfg.dtype)
            )
        except (OSError, ValueError) as exc:
            raise align.ConfigError(
                f"reward.path: cannot load a reward model from '{cfg.path}': {exc}"
            ) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval().requires_grad_(False)
        self.num_labels = int(self.model.config.num_labels)
        if cfg.weights is None and self.num_labels != 1:
            raise align.ConfigError(
                f"reward.weights: the model at {cfg.path} has {self.num_labels} heads "
                f"({', '.join(self.labels)}); give one weight per head"
            )
        if cfg.weights is not None and len(cfg.weights) != self.num_labels:
            raise align.ConfigError(
                f"reward.weights: {len(cfg.weights)} weights for a model with {self.num_labels} heads"
            )
        limits = align.DataConfig(format="reward", train=[], max_length=cfg.max_length)
        self.encoder = align.Encoder(self.tokenizer, limits)

    @property
    def labels(self) -> list[str]:
        id2label = self.model.config.id2label or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(self.num_labels)]

    def _fit(self, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
        prompt_ids, completion_ids = self.encoder.encode(prompt, completion)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        if status.startswith("dropped"):  # the prompt alone is too long: keep its end
            prompt_ids = prompt_ids[-(self.cfg.max_length // 2) :]
            completion_ids = completion_ids[: self.cfg.max_length - len(prompt_ids)]
        return prompt_ids, completion_ids

    @torch.no_grad()
    def scores(self, prompts: Sequence[Any], completions: Sequence[Any]) -> Tensor:
        """Every head's score, ``[n, num_labels]``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pad_id = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            pairs = [
                self._fit(p, c)
                for p, c in zip(
                    prompts[start : start + self.cfg.batch_size],
                    completions[start : start + self.cfg.batch_size],
                    strict=True,
                )
            ]
            batch = align.pad_sequences(pairs, pad_id).to(self.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            out.append(logits.float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.num_labels))

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Tensor:
        scores = self.scores(prompts, completions)
        if self.cfg.weights is None:
            return scores[:, 0]
        return scores @ torch.tensor(self.cfg.weights, dtype=scores.dtype)
