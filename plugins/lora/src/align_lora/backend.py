"""The LoRA backend: the run's backend with adapters on every trained model whose section has
``model.lora``, and the policy with its adapters off as the reference.

It wraps the configured backend (``hf``) and changes only what LoRA changes: building (wrap a
trained model with peft), running (a peft model runs as its base model, whose layers hold the
adapters; the reference as the policy with adapters off), saving and loading (the adapter alone,
in PEFT's format), and the weights an engine takes (merged). Everything else is the wrapped
backend's, unchanged: a method this class does not define is looked up there, and one that runs
a model gets the model it can run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn

import align
from align_lora.adapters import AdaptersOff, adapters_off, merged_in_place, merged_named_weights, wrap

ADAPTER_FILE = "adapter_model.safetensors"
# Roles whose model trains (a LoRA section wraps them) and peft's task type for each.
TRAINED_ROLES = {"policy": "CAUSAL_LM", "critic": "SEQ_CLS"}


class LoraBackend:
    """See the module docstring. ``inner`` is the backend it wraps."""

    applies_lora = True

    def __init__(self, inner: Any, run: align.RunConfig) -> None:
        self.inner, self.run = inner, run
        self.tokenizer = inner.tokenizer
        self.is_main = getattr(inner, "is_main", True)
        # The LoRA policies built so far, by the model section they came from: a reference built
        # from the same section is that policy with its adapters off.
        self._policies: list[tuple[align.ModelConfig, PeftModel]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if callable(attribute):
            return _running_models(attribute)
        return attribute

    # ---- building -----------------------------------------------------------------------
    def build_model(self, role: str, model: align.ModelConfig | None = None) -> nn.Module:
        """The wrapped backend's model; with ``lora`` on its section, a trained role (policy,
        critic) gets adapters, and a ``reference`` of a LoRA policy's section is that policy with
        its adapters off (no second copy). Frozen roles are never wrapped (nothing trains)."""
        section = model or self.run.model
        if role == "reference":
            for source, policy in reversed(self._policies):
                if source == section:
                    return AdaptersOff(policy)
            return self.inner.build_model(role, model)
        built = self.inner.build_model(role, model)
        if section.lora is None or role not in TRAINED_ROLES:
            return built
        wrapped = wrap(built, section.lora, TRAINED_ROLES[role])
        if getattr(built, "is_gradient_checkpointing", False):
            # The frozen embeddings give the checkpointed blocks inputs without grad.
            wrapped.enable_input_require_grads()
        if role == "policy":
            self._policies.append((section, wrapped))
        return wrapped

    def build_policy(self) -> nn.Module:
        return self.build_model("policy")

    def build_reference(self) -> nn.Module:
        return self.build_model("reference")

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """The wrapped backend's trainable scorer (a reward model to train), with adapters when
        the run's model section has ``lora`` (the score head trains in full)."""
        built = self.inner.build_scorer(num_labels, label_names)
        lora = self.run.model.lora
        return built if lora is None else wrap(built, lora, "SEQ_CLS")

    @contextmanager
    def reference_view(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The policy as its own reference for the length of a block (adapters off, eval mode),
        for algorithms that ask (the DPO family's precompute and live scoring)."""
        if not isinstance(policy, PeftModel):
            raise TypeError(f"reference_view needs a LoRA policy, got {type(policy).__name__}")
        with adapters_off(policy) as base:
            yield base

    # ---- running ------------------------------------------------------------------------
    def sequence_logps(self, model: nn.Module, batch: align.TokenBatch) -> align.SequenceLogps:
        with runnable(model) as runs:
            result: align.SequenceLogps = self.inner.sequence_logps(runs, batch)
        return result

    def token_logps(
        self, model: nn.Module, batch: align.TokenBatch, *, with_entropy: bool = False
    ) -> align.TokenLogps:
        with runnable(model) as runs:
            result: align.TokenLogps = self.inner.token_logps(runs, batch, with_entropy=with_entropy)
        return result

    def sequence_scores(self, model: nn.Module, batch: align.TokenBatch) -> Tensor:
        with runnable(model) as runs:
            result: Tensor = self.inner.sequence_scores(runs, batch)
        return result

    # ---- weights ------------------------------------------------------------------------
    def named_weights(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """HF-named weights with the adapters merged in (what an engine's refit takes)."""
        if isinstance(model, PeftModel):
            return merged_named_weights(self.inner, model)
        weights: Iterator[tuple[str, Tensor]] = self.inner.named_weights(_plain(model))
        return weights

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        """A LoRA model: its adapter in PEFT's format (``adapter_config.json`` +
        ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` on the base
        model) and the tokenizer. Any other model: the wrapped backend's full save."""
        if not isinstance(model, PeftModel):
            self.inner.save_pretrained(_plain(model), path)
            return
        model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def save_merged(self, model: nn.Module, path: Path) -> None:
        """Full weights with the adapters merged, as the wrapped backend saves a model (an HF
        folder that ``from_pretrained`` and the engines load)."""
        if not isinstance(model, PeftModel):
            self.inner.save_pretrained(_plain(model), path)
            return
        with merged_in_place(model) as merged:
            self.inner.save_pretrained(merged, path)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load what ``save_pretrained`` wrote: the adapter of a LoRA model (every adapter weight
        must be there, and nothing else), the full weights of any other."""
        if not isinstance(model, PeftModel):
            self.inner.load_weights(_plain(model), path)
            return
        file = path / ADAPTER_FILE
        if not file.is_file():
            raise RuntimeError(f"checkpoint {path} has no {ADAPTER_FILE}: it was not saved by a LoRA run")
        saved = load_file(file)
        expected = set(get_peft_model_state_dict(model))
        if set(saved) != expected:
            raise RuntimeError(
                f"adapter {file} does not match the model's LoRA settings: missing "
                f"{sorted(expected - set(saved))}, unexpected {sorted(set(saved) - expected)}"
            )
        set_peft_model_state_dict(model, saved)


@contextmanager
def runnable(model: nn.Module) -> Iterator[nn.Module]:
    """The module a wrapped backend can run for ``model``: a peft model's base model (its layers
    hold the adapters, and backends reach into a model's decoder and head), the policy with
    adapters off for a reference view, anything else as it is."""
    if isinstance(model, AdaptersOff):
        with adapters_off(model.policy) as base:
            yield base
        return
    yield _plain(model)


def _plain(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _running_models(method: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapped backend's method whose first argument may be a model (``token_scores``, a
    method added later): given a LoRA model or reference view, it gets the module to run."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not args or not isinstance(args[0], nn.Module):
            return method(*args, **kwargs)
        with runnable(args[0]) as runs:
            return method(runs, *args[1:], **kwargs)

    return call
