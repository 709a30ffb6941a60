"""The ``hf`` backend: transformers models, safetensors checkpoints in HF layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import Tensor, nn

from align import BackendConfig, RunConfig, SequenceLogps, TokenBatch
from align_hf.models import load_causal_lm, load_scorer, load_tokenizer


class HFBackendConfig(BackendConfig):
    name: Literal["hf"] = "hf"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")


class HFBackend:
    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.cfg: HFBackendConfig = run.backend  # type: ignore[assignment]
        self.tokenizer = load_tokenizer(run.model)

    def _fresh(self) -> nn.Module:
        model = load_causal_lm(self.run.model, len(self.tokenizer), self.cfg.attn_implementation)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def build_policy(self) -> nn.Module:
        model = self._fresh()
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def build_reference(self) -> nn.Module:
        # Built afresh from model.path (never copied from the policy, which may hold a
        # resumed checkpoint's weights).
        model = self._fresh()
        model.eval()
        model.requires_grad_(False)
        return model

    def sequence_logps(self, model: nn.Module, batch: TokenBatch) -> SequenceLogps:
        return sequence_logps(model, batch)

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """A sequence classifier (``AutoModelForSequenceClassification``) for reward models."""
        model = load_scorer(
            self.run.model, len(self.tokenizer), num_labels, self.cfg.attn_implementation, label_names
        )
        model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        return model

    def sequence_scores(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        return sequence_scores(model, batch)

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
        self.tokenizer.save_pretrained(path)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state |= load_file(file)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
        return None
    return decoder, head


def sequence_logps(model: nn.Module, batch: TokenBatch) -> SequenceLogps:
    """Log-probs summed per sequence over ``loss_mask``. Logits are computed only at the
    positions that are scored (completion tokens): the LM head never runs on prompts or pads."""
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed else batch.attention_mask,
        "position_ids": batch.position_ids,
        # No KV cache: with one, transformers skips detecting packed sequences from position_ids
        # and packed sequences would attend to each other.
        "use_cache": False,
    }
    scored = batch.loss_mask[:, 1:]
    targets = batch.input_ids[:, 1:][scored]
    owners = batch.sequence_ids[:, 1:][scored]
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1][scored]
        logits = head(hidden)
    else:
        logits = model(**inputs).logits[:, :-1][scored]
    logits = logits.float()
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owners, token_logps)
    counts = torch.zeros(batch.num_sequences, dtype=torch.long, device=owners.device).index_add(0, owners, torch.ones_like(owners))
    return SequenceLogps(sums, counts)


def last_token_positions(batch: TokenBatch, pad_token_id: int | None) -> Tensor:
    """Flat index (into ``rows * width``) of each sequence's last token that is not the pad
    token: where transformers' sequence classifiers read their score, padded or packed."""
    ids = batch.input_ids.reshape(-1)
    owners = batch.sequence_ids.reshape(-1)
    keep = owners >= 0
    if pad_token_id is not None:
        keep &= ids != pad_token_id
    flat = torch.arange(ids.numel(), device=ids.device)
    last = torch.full((batch.num_sequences,), -1, dtype=torch.long, device=ids.device)
    last = last.scatter_reduce(0, owners[keep], flat[keep], reduce="amax")
    if bool((last < 0).any()):
        raise ValueError("a sequence has no token other than padding to read its score from")
    return last


def sequence_scores(model: nn.Module, batch: TokenBatch) -> Tensor:
    """``[num_sequences, num_labels]`` scores of a sequence classifier: the score head applied to
    the hidden state of each sequence's last non-pad token (the head runs on those rows only)."""
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": None if batch.packed else batch.attention_mask,
        "position_ids": batch.position_ids,
        # No KV cache: with one, transformers skips detecting packed sequences from position_ids
        # and packed sequences would attend to each other.
        "use_cache": False,
    }
    pad_id = getattr(model.config, "pad_token_id", None)
    head = getattr(model, "score", None)
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(head, nn.Module) and isinstance(decoder, nn.Module):
        hidden = decoder(**inputs).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])[last_token_positions(batch, pad_id)]
        return head(rows).float()  # type: ignore[no-any-return]
    if batch.packed:
        raise ValueError(
            f"{type(model).__name__} has no `score` head to read packed sequences with; set "
            "data.padding_free: false"
        )
    return model(**inputs).logits.float()  # type: ignore[no-any-return]
