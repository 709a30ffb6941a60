"""align-vllm: the ``vllm`` rollout engine (vLLM in the training process, refit in place).

vLLM is imported only when an engine starts: without it the plugin still registers its config
(so configs validate and ``align list`` shows it), and starting it raises an ``EngineError``
that says how to install vLLM.
"""

from align import Register, hookimpl
from align_vllm.engine import VLLMEngine, VLLMEngineConfig, build_vllm_engine, check_head_size, vllm_available
from align_vllm.placement import VLLMPlacement, vllm_placement

__all__ = [
    "VLLMEngine",
    "VLLMEngineConfig",
    "VLLMPlacement",
    "build_vllm_engine",
    "check_head_size",
    "vllm_available",
    "vllm_placement",
]


@hookimpl
def register_rollout_engines(register: Register) -> None:
    register(VLLMEngineConfig)(build_vllm_engine)
