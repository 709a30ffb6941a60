"""align-megatron: a megatron-core backend (tensor, pipeline, sequence and data parallelism)
and HF <-> Megatron conversion for Llama-family models. See docs/megatron.md."""

from typing import Any

from align import Register, RunConfig, hookimpl, model_sections
from align_megatron.backend import MegatronBackend, MegatronBackendConfig, MegatronModel, vocab_parallel_logps
from align_megatron.conversion import LlamaLayout, layout_of, megatron_names, to_hf, to_megatron
from align_megatron.cpu_shims import apply_cpu_shims
from align_megatron.lora import MegatronLoraBackend

__all__ = [
    "LlamaLayout",
    "MegatronBackend",
    "MegatronBackendConfig",
    "MegatronLoraBackend",
    "MegatronModel",
    "apply_cpu_shims",
    "layout_of",
    "megatron_names",
    "to_hf",
    "to_megatron",
    "vocab_parallel_logps",
]


@hookimpl
def register_backends(register: Register) -> None:
    register(MegatronBackendConfig)(MegatronBackend)


@hookimpl
def wrap_backend(backend: Any, config: RunConfig) -> Any:
    """LoRA adapters (``model.lora``) on the megatron backend: align_megatron.lora."""
    if not isinstance(backend, MegatronBackend):
        return None
    if not any(section.lora is not None for _, section in model_sections(config)):
        return None
    return MegatronLoraBackend(backend, config)
