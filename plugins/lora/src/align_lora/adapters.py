"""What LoRA does to a built model: wrap it with peft, switch its adapters off (the reference),
and read or write its merged weights without ever changing the trained ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

import align

ADAPTER = "default"  # peft's name for a model's only adapter


def wrap(model: nn.Module, lora: align.LoraConfig, task_type: str) -> PeftModel:
    """``model`` with LoRA adapters (peft): its own weights frozen, the adapters trainable.
    ``task_type`` is peft's (``CAUSAL_LM``, or ``SEQ_CLS`` for a scorer, whose head peft trains
    in full and saves with the adapter)."""
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type=task_type,
    )
    wrapped: PeftModel = get_peft_model(model, config)
    return wrapped


@contextmanager
def adapters_off(policy: PeftModel) -> Iterator[nn.Module]:
    """The policy's base model with every adapter switched off and in eval mode (as a frozen
    reference is): exactly the model the adapters were put on, sharing its weights. Each module's
    train/eval mode is restored afterwards, so this may run inside a training step."""
    with align.eval_mode(policy), policy.disable_adapter():
        yield policy.get_base_model()


class AdaptersOff(nn.Module):
    """The reference a LoRA run builds instead of a second copy: the policy with its adapters
    off. It holds no parameters of its own (the policy is kept outside the module tree, so that
    nothing counts or moves its weights twice); the backend runs it through ``adapters_off``."""

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        self._shared = (policy,)
        self.eval()

    @property
    def policy(self) -> PeftModel:
        return self._shared[0]

    @property
    def config(self) -> Any:
        return self.policy.get_base_model().config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_off(self.policy) as base:
            return base(*args, **kwargs)

    def train(self, mode: bool = True) -> AdaptersOff:
        return super().train(False)  # frozen: always scored as in eval mode


@contextmanager
def plain_modules(model: PeftModel) -> Iterator[tuple[nn.Module, dict[str, nn.Module]]]:
    """The base model with each adapter layer swapped, for the length of the block, for what a
    model without adapters has there: a LoRA layer's base layer, a ``modules_to_save`` wrapper's
    trained copy. Its state dict then has the architecture's own (HF) names. Yields the base
    model and the swapped-out adapter layers by module name; everything is put back after."""
    base = model.get_base_model()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    layers: dict[str, nn.Module] = {}
    try:
        for name, module in list(base.named_modules()):
            if isinstance(module, LoraLayer):
                replacement = module.get_base_layer()
            elif isinstance(module, ModulesToSaveWrapper):
                replacement = module.modules_to_save[ADAPTER]
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, replacement)
            swapped.append((parent, child, module))
            layers[name] = module
        yield base, layers
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


def lora_delta(layer: LoraLayer) -> Tensor:
    """``scale * B @ A`` of the layer's adapter, in the base weight's layout."""
    delta: Tensor = layer.get_delta_weight(ADAPTER)  # type: ignore[attr-defined]  # on each layer kind
    return delta


def merged_named_weights(backend: Any, model: PeftModel) -> Iterator[tuple[str, Tensor]]:
    """The weights with the adapters merged in, under the names (and deduplication) of the
    wrapped backend's ``named_weights``: a weight without an adapter is the model's own tensor,
    one with an adapter a new ``W + scale * B @ A`` made when it is reached (one at a time)."""
    with torch.no_grad(), plain_modules(model) as (base, layers):
        pairs = list(backend.named_weights(base))
    adapted = {f"{name}.weight": layer for name, layer in layers.items() if isinstance(layer, LoraLayer)}
    merged = 0
    for name, tensor in pairs:
        layer = adapted.get(name)
        if layer is not None:
            with torch.no_grad():
                tensor = tensor + lora_delta(layer).to(tensor.dtype)
            merged += 1
        yield name, tensor
    if merged != len(adapted):
        missing = sorted(set(adapted) - {name for name, _ in pairs})
        raise RuntimeError(
            f"merged {merged} of {len(adapted)} adapted weights; not named by the backend: {missing}"
        )


@contextmanager
def merged_in_place(model: PeftModel) -> Iterator[nn.Module]:
    """The base model (HF names, see ``plain_modules``) holding merged weights for the length of
    the block: each adapted layer's weight is a new ``W + scale * B @ A`` parameter, and the
    original parameter object is put back afterwards (no arithmetic on the trained weights, so
    nothing changes by a rounding)."""
    with torch.no_grad(), plain_modules(model) as (base, layers):
        originals: list[tuple[nn.Module, nn.Parameter]] = []
        try:
            for layer in layers.values():
                if not isinstance(layer, LoraLayer):
                    continue
                target: Any = layer.get_base_layer()
                weight: nn.Parameter = target.weight
                merged = weight + lora_delta(layer).to(weight.dtype)
                originals.append((target, weight))
                target.weight = nn.Parameter(merged, requires_grad=False)
            yield base
        finally:
            for target, weight in originals:
                target.weight = weight
