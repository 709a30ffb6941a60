"""Building causal LMs (and sequence scorers, for reward models) with transformers: the
embedded tiny Llama or any HF checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from align import ConfigError, ModelConfig, TinyModelConfig
from align_hf.gguf import resolve_model, resolve_tokenizer
from align_hf.tokenizer import byte_tokenizer

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_llama(knobs: TinyModelConfig, vocab_size: int, attn_implementation: str) -> LlamaForCausalLM:
    """A small Llama with seeded random weights; the same knobs always give the same model."""
    config = tiny_llama_config(knobs, vocab_size, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(knobs.init_seed)
        return LlamaForCausalLM(config)


def tiny_llama_scorer(
    knobs: TinyModelConfig, vocab_size: int, num_labels: int, attn_implementation: str
) -> LlamaForSequenceClassification:
    """The tiny Llama with ``num_labels`` scalar heads on its last non-pad token (a reward model)."""
    config = tiny_llama_config(knobs, vocab_size, attn_implementation)
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(knobs.init_seed)
        return LlamaForSequenceClassification(config)


def tiny_llama_config(knobs: TinyModelConfig, vocab_size: int, attn_implementation: str) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=knobs.hidden_size,
        intermediate_size=knobs.intermediate_size,
        num_hidden_layers=knobs.num_layers,
        num_attention_heads=knobs.num_heads,
        num_key_value_heads=knobs.num_heads,
        max_position_embeddings=knobs.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return config


def load_tokenizer(cfg: ModelConfig) -> Any:
    source = resolve_tokenizer(cfg)
    if source == TINY:
        return byte_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from '{source}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, vocab_size: int, attn_implementation: str) -> torch.nn.Module:
    if cfg.path == TINY:
        model: torch.nn.Module = tiny_llama(cfg.tiny, vocab_size, attn_implementation)
    else:
        source = resolve_model(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=DTYPES[cfg.dtype], attn_implementation=attn_implementation
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path: cannot load a causal LM from '{source}': {exc}") from None
    return model.to(DTYPES[cfg.dtype])


def load_scorer(
    cfg: ModelConfig,
    vocab_size: int,
    num_labels: int,
    attn_implementation: str,
    label_names: Sequence[str] | None = None,
) -> torch.nn.Module:
    """A sequence classifier with ``num_labels`` heads: the tiny Llama's, or an HF checkpoint's
    (a causal LM gets a freshly initialised score head; a saved reward model keeps its own)."""
    labels = list(label_names) if label_names else [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for {num_labels} labels")
    if cfg.path == TINY:
        model: torch.nn.Module = tiny_llama_scorer(cfg.tiny, vocab_size, num_labels, attn_implementation)
    else:
        source = resolve_model(cfg)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=num_labels,
                dtype=DTYPES[cfg.dtype],
                attn_implementation=attn_implementation,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"model.path: cannot load a {num_labels}-label sequence classifier from '{source}': {exc}"
            ) from None
    config: Any = model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    return model.to(DTYPES[cfg.dtype])
