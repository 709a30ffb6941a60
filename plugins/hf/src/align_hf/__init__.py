"""align-hf: the transformers backend (the default) and the ``hf`` rollout engine (transformers
``generate``). The models it runs come from the core (``align.build_hf_model``: the embedded tiny
model, HF folders, GGUF files, shortcuts); ``tiny_llama``, ``byte_tokenizer`` and
``last_token_positions`` are re-exported from there for existing imports."""

from transformers.utils import logging as hf_logging

from align import Register, byte_tokenizer, hookimpl, last_token_positions, tiny_llama
from align_hf.backend import HFBackend, HFBackendConfig, sequence_logps
from align_hf.engine import HFEngine, HFEngineConfig, build_hf_engine
from align_hf.hydra import HydraBackend, build_hf_backend

hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training log

__all__ = [
    "HFBackend",
    "HFBackendConfig",
    "HFEngine",
    "HFEngineConfig",
    "HydraBackend",
    "byte_tokenizer",
    "last_token_positions",
    "sequence_logps",
    "tiny_llama",
]


@hookimpl
def register_backends(register: Register) -> None:
    register(HFBackendConfig)(build_hf_backend)


@hookimpl
def register_rollout_engines(register: Register) -> None:
    # logits_hook: it applies EngineSpec.logits_hook (steered sampling: ILQL's heads)
    register(HFEngineConfig, logits_hook=True)(build_hf_engine)
