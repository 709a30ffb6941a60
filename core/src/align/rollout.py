"""Rollout engines: what generates completions for online methods, and takes fresh weights.

An engine works on token ids only (the tokenizer stays with the trainer): it takes prompts as
lists of token ids and sampling settings, and returns, for each prompt, ``n`` completions with
the engine's log-prob of every sampled token and why generation stopped. After each update the
learner streams the policy's weights (HF names) into ``refit``: the engine swaps them in place,
without being rebuilt or reloading anything from disk.

A plugin registers an engine with ``register_rollout_engines``::

    @register(MyEngineConfig)
    def my_engine(cfg: MyEngineConfig, spec: align.EngineSpec) -> align.RolloutEngine: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import Field
from torch import Tensor

from align.config import StrictConfig
from align.errors import UserError

FinishReason = Literal["stop", "length"]
NamedWeights = Iterable[tuple[str, Tensor]]
LogitsHook = Callable[[Tensor, Tensor], Tensor]
"""``hook(hidden, logits) -> logits``: changes the next-token logits before sampling (ILQL adds
``β (Q − V)`` from heads on the hidden state). ``hidden`` ``[batch, hidden_size]`` is the last
hidden state the LM head read for those logits, ``logits`` ``[batch, vocab]`` the raw ones. An
engine registered with ``logits_hook=True`` (``hf``) applies ``EngineSpec.logits_hook`` at every
step, before temperature, top-p and top-k; ``build_engine`` refuses it to any other engine."""


class SamplingConfig(StrictConfig):
    """How an engine samples. ``temperature: 0`` is greedy decoding."""

    n: int = Field(1, gt=0, description="Completions per prompt.")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut.")
    max_tokens: int = Field(64, gt=0, description="New tokens per completion at most.")
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Extra tokens that end a completion (besides EOS)."
    )
    ignore_eos: bool = Field(False, description="Keep generating after EOS (benchmarks).")
    seed: int | None = Field(None, description="Sampling seed; the same seed gives the same samples.")


@dataclass
class Completion:
    """One sampled completion. ``logprobs[i]`` is the engine's log-prob of ``token_ids[i]``
    under the distribution it sampled from (before temperature / top-p / top-k are applied,
    so that it is comparable with the trainer's log-probs). A completion that ended on a stop
    token includes that token."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class EngineSpec:
    """What every engine is built from: a model folder in HF layout (config + safetensors) that
    the learner wrote from the current policy, and the limits it must respect."""

    model_dir: Path
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_model_len: int = 1024
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int = 0
    logits_hook: LogitsHook | None = None
    """Steers sampling (see ``LogitsHook``); None: sample from the model's own logits."""
    extra: dict[str, object] = field(default_factory=dict)
    device: str | None = None
    """The trainer's device (``str(torch.device)``): where an in-process engine puts its model
    unless its own config names one. None: the engine's own default."""


@runtime_checkable
class RolloutEngine(Protocol):
    """The contract every engine passes (tests/test_engines.py runs it on each installed one)."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """For each prompt, ``sampling.n`` completions, in prompt order."""
        ...

    def refit(self, weights: NamedWeights) -> None:
        """Replace the model's weights in place with ``(hf_name, tensor)`` pairs (all of them)."""
        ...

    def sleep(self) -> None:
        """Release what memory it can while the trainer works (no-op where unsupported)."""
        ...

    def wake_up(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""
        ...

    def close(self) -> None:
        """Free everything; the engine is not used again."""
        ...


class EngineError(UserError):
    """An engine could not start (e.g. a model shape it does not support) or died; the message
    names the engine and what to change."""


class EngineUnavailable(EngineError):
    """The engine's package (vLLM, TensorRT-LLM...) is not installed or does not import here;
    the message says how to install it. The engine contract suite skips such an engine."""


def check_prompts(engine: str, prompts: Sequence[Sequence[int]], max_model_len: int) -> None:
    """Every engine's check before generating: each prompt has a token and leaves room for at
    least one new one within ``max_model_len`` (engines differ in what they do otherwise)."""
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise EngineError(f"engine '{engine}': prompt {index} is empty (no token ids)")
        if len(prompt) >= max_model_len:
            raise EngineError(
                f"engine '{engine}': prompt {index} has {len(prompt)} tokens, and the engine's "
                f"max_model_len is {max_model_len} (prompt + completion): shorten the prompts "
                "(data max_prompt_length) or raise the engine's max_model_len"
            )
