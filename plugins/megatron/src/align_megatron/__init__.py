"""align-megatron: a megatron-core backend (tensor, pipeline, sequence and data parallelism)
and HF <-> Megatron conversion for Llama-family models. See docs/megatron.md."""

from align import Register, hookimpl
from align_megatron.backend import MegatronBackend, MegatronBackendConfig, MegatronModel, vocab_parallel_logps
from align_megatron.conversion import LlamaLayout, layout_of, megatron_names, to_hf, to_megatron
from align_megatron.cpu_shims import apply_cpu_shims

__all__ = [
    "LlamaLayout",
    "MegatronBackend",
    "MegatronBackendConfig",
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
