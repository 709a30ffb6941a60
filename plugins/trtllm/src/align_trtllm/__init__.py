"""align-trtllm: the ``trtllm`` rollout engine on TensorRT-LLM, refit in place.

Import-guarded: the config is registered wherever align is installed (``align list``, ``align
validate`` and the schemas know it); building the engine needs TensorRT-LLM and an NVIDIA GPU
and otherwise raises an ``align.EngineUnavailable`` that says why (the engine contract
suite skips it). Not run in this project's CI.
"""

import align
from align_trtllm.config import NOT_INSTALLED, TRTLLMEngineConfig, load_tensorrt_llm, unavailable_reason
from align_trtllm.engine import TRTLLMEngine, build_trtllm_engine

__all__ = [
    "NOT_INSTALLED",
    "TRTLLMEngine",
    "TRTLLMEngineConfig",
    "build_trtllm_engine",
    "load_tensorrt_llm",
    "unavailable_reason",
]


@align.hookimpl
def register_rollout_engines(register: align.Register) -> None:
    register(TRTLLMEngineConfig)(build_trtllm_engine)
