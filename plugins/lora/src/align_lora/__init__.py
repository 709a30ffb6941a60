"""align-lora: LoRA adapters (peft) on any algorithm's trained models.

``model.lora: {r, alpha, dropout, target_modules}`` on a model section puts adapters on the
models built from it (the policy, a critic, a reward model being trained) on the ``hf`` backend;
the reference is the same model with its adapters off (no second copy); checkpoints and
``final/`` hold the adapter in PEFT's format; engines are started and refit with merged weights;
``align export --merge`` writes merged full weights.
"""

from __future__ import annotations

from typing import Any

import align
from align_lora.adapters import AdaptersOff, adapters_off, merged_named_weights
from align_lora.backend import LoraBackend
from align_lora.export import add_export_command

__all__ = ["AdaptersOff", "LoraBackend", "adapters_off", "merged_named_weights"]

# Backends LoRA is implemented for (peft wraps transformers models).
SUPPORTED_BACKENDS = ("hf",)


@align.hookimpl
def wrap_backend(backend: Any, config: align.RunConfig) -> Any:
    """Wrap the backend when any model section of the run asks for LoRA."""
    with_lora = [where for where, section in align.model_sections(config) if section.lora is not None]
    if not with_lora:
        return None
    if config.backend.name not in SUPPORTED_BACKENDS or getattr(backend, "applies_lora", False):
        # Another backend's plugin may apply LoRA itself (align-megatron does); if none does,
        # align.build_backend stops the run with a config error.
        return None
    return LoraBackend(backend, config)


@align.hookimpl
def register_commands(add_command: Any) -> None:
    add_export_command(add_command)
