"""Plain transformers models and tokenizers for a ``model`` section: what a backend starts from.

``model.path`` is ``tiny`` (a small Llama with seeded random weights and a byte tokenizer, built
in code), an HF folder or hub id, a ``.gguf`` file or a shortcut such as ``smollm2-135m``
(``align.gguf``: dequantized once and cached as an HF folder). ``build_hf_model`` gives a causal
LM for the ``policy``/``reference`` roles and a one-head sequence classifier for ``reward`` (label
``reward``)/``critic`` (``value``), ``build_hf_scorer`` one with any number of heads, in
``model.dtype``, on the CPU, trainable; placing, freezing and running them is the backend's job.
The ``hf`` backend runs these models as they are; ``megatron`` converts them to its own shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from align.batches import TokenBatch
from align.byte_tokenizer import byte_tokenizer
from align.config import ModelConfig, TinyModelConfig
from align.errors import ConfigError
from align.gguf import resolve_model, resolve_tokenizer

if TYPE_CHECKING:  # transformers' model classes load on first use: `import align` stays quick
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedModel

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The one head of a scorer built for a role, by role.
SCORER_LABELS = {"reward": "reward", "critic": "value"}
CAUSAL_ROLES = ("policy", "reference")
MODEL_ROLES = (*CAUSAL_ROLES, *SCORER_LABELS)


def hf_model_source(model: ModelConfig) -> str:
    """What a model section's weights are read from: ``tiny`` (built in code), the cached
    safetensors folder of a ``.gguf`` file or a shortcut, or ``model.path`` itself (an HF folder
    or hub id): what ``build_hf_model`` hands to transformers' ``from_pretrained``."""
    return TINY if model.path == TINY else resolve_model(model)


def build_hf_model(
    role: str, model: ModelConfig, tokenizer: Any, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """The transformers model ``role`` starts from (see the module docstring), sized for
    ``tokenizer`` and with its pad token: a ``PreTrainedModel`` on the CPU."""
    if role in CAUSAL_ROLES:
        built: Any = load_causal_lm(model, len(tokenizer), attn_implementation)
    elif role in SCORER_LABELS:
        built = load_scorer(model, len(tokenizer), 1, attn_implementation, [SCORER_LABELS[role]])
    else:
        raise ValueError(f"unknown model role '{role}'; roles: {', '.join(MODEL_ROLES)}")
    built.config.pad_token_id = tokenizer.pad_token_id
    return built


def build_hf_scorer(
    model: ModelConfig,
    tokenizer: Any,
    num_labels: int,
    label_names: Sequence[str] | None = None,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` heads (reward models), with the tokenizer's pad
    token: a ``PreTrainedModel`` on the CPU."""
    built: Any = load_scorer(model, len(tokenizer), num_labels, attn_implementation, label_names)
    built.config.pad_token_id = tokenizer.pad_token_id
    return built


def tiny_llama(knobs: TinyModelConfig, vocab_size: int, attn_implementation: str) -> LlamaForCausalLM:
    """A small Llama with seeded random weights; the same knobs always give the same model."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(knobs, vocab_size, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(knobs.init_seed)
        return LlamaForCausalLM(config)


def tiny_llama_scorer(
    knobs: TinyModelConfig, vocab_size: int, num_labels: int, attn_implementation: str
) -> LlamaForSequenceClassification:
    """The tiny Llama with ``num_labels`` scalar heads on its last non-pad token (a reward model)."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama_config(knobs, vocab_size, attn_implementation)
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(knobs.init_seed)
        return LlamaForSequenceClassification(config)


def tiny_llama_config(knobs: TinyModelConfig, vocab_size: int, attn_implementation: str) -> LlamaConfig:
    """The tiny Llama's ``LlamaConfig``."""
    from transformers import LlamaConfig

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


def is_missing_folder(source: str) -> bool:
    """``source`` is meant as a local folder (absolute, ``./``, ``../``, ``~``, or more than one
    ``/``, which no hub id has) and does not exist: transformers would otherwise report it as a
    malformed hub repository id."""
    local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    return local and not Path(source).expanduser().exists()


def load_hf_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a model section (``model.tokenizer``, else ``model.path``); one without
    a pad token pads with its end-of-sequence token."""
    from transformers import AutoTokenizer

    source = resolve_tokenizer(cfg)
    if source == TINY:
        return byte_tokenizer()
    if is_missing_folder(source):
        where = f"relative paths are from {Path.cwd()}"
        raise ConfigError(f"model.tokenizer: no such folder '{source}' ({where})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from '{source}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, vocab_size: int, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

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
    from transformers import AutoModelForSequenceClassification

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
