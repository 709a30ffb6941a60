"""Pieces every online method shares: start a rollout engine from the learner's policy, sample
and score completions, refit the engine after an update, and measure each phase.

An online algorithm (rejection sampling, GRPO, PPO...) drives the learner through
generate -> score -> train -> refit with these, so none of them writes its own loop for it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from align.builtin.prompts import PromptRow, prompt_rows
from align.config import RolloutEngineConfig
from align.errors import UserError
from align.registry import Registry
from align.rollout import EngineError, EngineSpec, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from align.algorithm import Context
    from align.protocols import RewardSource


@dataclass
class Sample:
    """One completion of one prompt, decoded, with the engine's token log-probs and its reward."""

    prompt: PromptRow
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    reward: float = math.nan


@dataclass
class RolloutResult:
    """``samples`` grouped by prompt: ``groups[i]`` holds the ``n`` samples of ``rows[i]``."""

    groups: list[list[Sample]]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> list[Sample]:
        return [s for group in self.groups for s in group]


def build_engine(cfg: RolloutEngineConfig, registry: Registry, spec: EngineSpec) -> RolloutEngine:
    """The configured engine, started on ``spec``. A crash while starting is a user error naming
    the engine (an unsupported model shape, a missing package), never a traceback."""
    entry = registry.get("rollout_engine", cfg.name)
    try:
        engine: RolloutEngine = entry.factory(cfg, spec)
    except UserError:
        raise
    except Exception as exc:
        raise EngineError(
            f"rollout engine '{cfg.name}' ({entry.package}) could not start: {type(exc).__name__}: {exc}"
        ) from exc
    return engine


class Rollouts:
    """An engine plus what turns its token ids into scored samples (the trainer's tokenizer and
    the reward). Owns the engine: ``close()`` frees it."""

    def __init__(
        self,
        engine_cfg: RolloutEngineConfig,
        registry: Registry,
        tokenizer: Any,
        model_dir: Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        reward: RewardSource | None = None,
    ) -> None:
        self.tokenizer, self.reward = tokenizer, reward
        self.version = 0  # how many refits the engine has taken
        spec = EngineSpec(
            model_dir=model_dir,
            dtype=dtype,  # type: ignore[arg-type]
            max_model_len=max_model_len,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
        )
        self.engine = build_engine(engine_cfg, registry, spec)
        self.engine_name = engine_cfg.name

    def generate(self, rows: Sequence[PromptRow], sampling: SamplingConfig) -> RolloutResult:
        """``sampling.n`` completions per row, decoded and (with a reward) scored."""
        started = time.perf_counter()
        with self._engine_errors("generating"):
            outputs = self.engine.generate([r.prompt_ids for r in rows], sampling)
        generated = time.perf_counter() - started
        groups = [
            [
                Sample(row, list(c.token_ids), list(c.logprobs), c.finish_reason, self._decode(c.token_ids))
                for c in completions
            ]
            for row, completions in zip(rows, outputs, strict=True)
        ]
        result = RolloutResult(groups)
        tokens = sum(len(s.completion_ids) for s in result.samples)
        result.metrics.update(
            generate_s=generated,
            generation_tokens_per_s=tokens / max(generated, 1e-9),
            completion_tokens_mean=tokens / max(1, len(result.samples)),
            truncated_fraction=sum(s.finish_reason == "length" for s in result.samples)
            / max(1, len(result.samples)),
        )
        if self.reward is not None:
            self.score(result)
        return result

    def score(self, result: RolloutResult) -> None:
        assert self.reward is not None
        samples = result.samples
        started = time.perf_counter()
        rewards = self.reward(
            [s.prompt.prompt for s in samples], [s.text for s in samples], [s.prompt.row for s in samples]
        )
        for sample, value in zip(samples, torch.as_tensor(rewards).tolist(), strict=True):
            sample.reward = float(value)
        result.metrics["score_s"] = time.perf_counter() - started
        result.metrics["reward_mean"] = sum(s.reward for s in samples) / max(1, len(samples))

    def refit(self, weights: Any) -> float:
        """Swap new weights into the engine in place; returns the seconds it took."""
        started = time.perf_counter()
        with self._engine_errors("taking new weights (refit)"):
            self.engine.refit(weights)
        self.version += 1
        return time.perf_counter() - started

    def close(self) -> None:
        self.engine.close()

    @contextmanager
    def _engine_errors(self, doing: str) -> Iterator[None]:
        """An engine that dies mid-run is named, with what it was doing; the run stops with exit
        code 2 and its last checkpoint is kept."""
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            raise EngineError(
                f"rollout engine '{self.engine_name}' failed while {doing}: {type(exc).__name__}: {exc}. "
                "The last checkpoint is kept; rerun with --resume once the engine works."
            ) from exc

    def _decode(self, token_ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text


def policy_weights(ctx: Context) -> Any:
    """The policy's weights as (HF name, tensor) pairs, what ``refit`` takes."""
    named = getattr(ctx.backend, "named_weights", None)
    if callable(named):
        return named(ctx.policy)
    return ((name, tensor.detach()) for name, tensor in ctx.policy.state_dict().items())


def start_rollouts(
    ctx: Context,
    engine_cfg: RolloutEngineConfig,
    *,
    reward: RewardSource | None = None,
    max_model_len: int = 1024,
) -> Rollouts:
    """Start an engine on the policy's current weights, written once to a temporary HF folder
    the engine loads from (later updates arrive by ``refit``, never through the disk)."""
    cfg = ctx.config
    with tempfile.TemporaryDirectory(prefix="align-engine-") as folder:
        model_dir = Path(folder) / "policy"
        ctx.backend.save_pretrained(ctx.policy, model_dir)
        return Rollouts(
            engine_cfg,
            ctx.registry,
            ctx.backend.tokenizer,
            model_dir,
            dtype=cfg.model.dtype,
            max_model_len=max_model_len,
            seed=cfg.seed,
            reward=reward,
        )


class PromptStream:
    """The training prompts in a seeded order, one shuffle per pass over the data, read from
    ``position`` on: an online method's place in its prompts, which its checkpoints hold so that
    a resumed run takes the prompts the uninterrupted one would have."""

    def __init__(self, data: Any, seed: int, prompt_column: str = "prompt", position: int = 0) -> None:
        self.data, self.seed, self.prompt_column = data, seed, prompt_column
        self.position = position  # prompts taken so far, over all passes
        self._order: list[int] = []
        self._order_pass = -1

    def take(self, count: int) -> list[PromptRow]:
        """The next ``count`` prompts (passing into the next shuffled pass when one runs out)."""
        indices = []
        for position in range(self.position, self.position + count):
            data_pass, index = divmod(position, len(self.data))
            indices.append(self._order_of(data_pass)[index])
        self.position += count
        return prompt_rows([self.data[i] for i in indices], self.prompt_column)

    def _order_of(self, data_pass: int) -> list[int]:
        if self._order_pass != data_pass:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            self._order = torch.randperm(len(self.data), generator=generator).tolist()
            self._order_pass = data_pass
        return self._order
