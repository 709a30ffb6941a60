"""The ``trtllm`` engine's config, and whether TensorRT-LLM can be used in this environment.

Nothing here imports TensorRT-LLM: the config is registered (and validated by ``align
validate``) everywhere; only building the engine needs the package and a GPU.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Literal

from pydantic import Field

import align

INSTALL = "pip install 'align-trtllm[engine]' --extra-index-url https://pypi.nvidia.com"

NOT_INSTALLED = (
    "rollout engine 'trtllm' needs TensorRT-LLM, which is not installed. It runs only on NVIDIA "
    f"GPUs (Linux, CUDA) and installs from NVIDIA's package index: {INSTALL}. PyPI itself holds "
    "only a placeholder sdist that downloads from that index, so it cannot be installed where that "
    "index is unreachable. Use rollout.name: vllm or hf instead."
)


class TRTLLMEngineConfig(align.RolloutEngineConfig):
    """TensorRT-LLM's Python LLM API (PyTorch backend), refit in place through its RLHF worker
    extension. Not run in this project's CI: see docs/engines.md."""

    name: Literal["trtllm"] = "trtllm"
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs the engine shards the model over.")
    kv_cache_fraction: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Fraction of the free GPU memory the KV cache takes (the trainer shares the GPU).",
    )
    max_batch_size: int = Field(256, gt=0, description="Sequences the engine schedules at once.")
    max_num_tokens: int | None = Field(None, gt=0, description="Tokens per engine step; null: its default.")
    refit_bucket_mb: int = Field(
        512,
        gt=0,
        description="Weights sent per update_weights call: TensorRT-LLM loads them partially, so "
        "the peak extra GPU memory of a refit is one bucket.",
    )
    sleep: bool = Field(True, description="Release the KV cache while the trainer works (sleep/wake_up).")
    llm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments of tensorrt_llm.LLM (they override the ones align sets).",
    )


def load_tensorrt_llm() -> ModuleType:
    """The ``tensorrt_llm`` module, or an ``EngineUnavailable`` saying why it cannot be used here."""
    try:
        module = importlib.import_module("tensorrt_llm")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "tensorrt_llm":
            raise align.EngineUnavailable(NOT_INSTALLED) from None
        raise align.EngineUnavailable(
            f"rollout engine 'trtllm': TensorRT-LLM is installed but does not import (missing "
            f"module '{exc.name}'); reinstall it with {INSTALL}"
        ) from None
    except Exception as exc:  # a broken CUDA / MPI / TensorRT installation
        raise align.EngineUnavailable(
            f"rollout engine 'trtllm': TensorRT-LLM is installed but failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return module


def unavailable_reason() -> str | None:
    """Why the ``trtllm`` engine cannot start here (None when it might): for tests to skip with."""
    try:
        load_tensorrt_llm()
    except align.EngineUnavailable as exc:
        return str(exc)
    if not gpu_available():
        return "rollout engine 'trtllm' needs an NVIDIA GPU, and torch sees none"
    return None


def gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
