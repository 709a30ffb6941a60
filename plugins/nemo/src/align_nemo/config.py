"""A NeMo model config (NeMo 1 ``model_config.yaml``, NeMo 2 ``context/model.yaml``) as the
shape of a Llama-family decoder (align_megatron's ``LlamaLayout``) and an HF config.

NeMo 1 and NeMo 2 name most fields alike (megatron-core's ``TransformerConfig`` names); where they
differ both are read (``rotary_percentage``/``rotary_percent``, ``bias``/``add_bias_linear``,
``activation``/``activation_func``, ``max_position_embeddings``/``seq_length``). The vocabulary
size is not in the config (NeMo pads the tokenizer's to a multiple of
``make_vocab_size_divisible_by`` x TP when it builds the model): it is the embedding's rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from align_megatron import LlamaLayout
from align_nemo.errors import NemoFormatError

SWIGLU_ACTIVATIONS = ("swiglu", "fast-swiglu")
# NeMo 2 Llama 3.1/3.2 configs carry their RoPE scaling as these fields (applied in code).
ROPE_SCALING_FIELDS = ("scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len")


def llama_layout(cfg: Mapping[str, Any], vocab_size: int, where: str) -> LlamaLayout:
    """The layout of the decoder ``cfg`` describes; a NemoFormatError naming ``where`` (the
    config file) and the key for anything the conversion does not cover."""
    _check_supported(cfg, where)
    heads = _int(cfg, where, "num_attention_heads")
    hidden = _int(cfg, where, "hidden_size")
    head_dim = _first(cfg, ("kv_channels",), None) or hidden // heads
    return LlamaLayout(
        num_layers=_int(cfg, where, "num_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(_first(cfg, ("num_query_groups",), None) or heads),
        head_dim=int(head_dim),
        ffn_hidden_size=_int(cfg, where, "ffn_hidden_size"),
        vocab_size=vocab_size,
        norm_eps=float(_first(cfg, ("layernorm_epsilon", "norm_epsilon"), 1e-5)),
        rope_theta=float(_first(cfg, ("rotary_base",), 10000.0)),
        max_position_embeddings=int(
            _first(cfg, ("max_position_embeddings", "seq_length", "encoder_seq_length"), 4096)
        ),
        tied_embeddings=bool(_first(cfg, ("share_embeddings_and_output_weights",), False)),
        qkv_bias=bool(_first(cfg, ("add_qkv_bias", "qkv_bias"), False)),
    )


def hf_config(layout: LlamaLayout, dtype: str) -> Any:
    """The transformers config of ``layout``: Qwen2's when the QKV projections have biases
    (the only Llama-family layout with them), Llama's otherwise."""
    from transformers import LlamaConfig, Qwen2Config

    shared: dict[str, Any] = {
        "vocab_size": layout.vocab_size,
        "hidden_size": layout.hidden_size,
        "intermediate_size": layout.ffn_hidden_size,
        "num_hidden_layers": layout.num_layers,
        "num_attention_heads": layout.num_heads,
        "num_key_value_heads": layout.num_kv_heads,
        "max_position_embeddings": layout.max_position_embeddings,
        "rms_norm_eps": layout.norm_eps,
        "rope_theta": layout.rope_theta,
        "tie_word_embeddings": layout.tied_embeddings,
        "hidden_act": "silu",
    }
    if layout.qkv_bias:
        config: Any = Qwen2Config(**shared)
    else:
        config = LlamaConfig(**shared, head_dim=layout.head_dim, attention_bias=False, mlp_bias=False)
    config.dtype = dtype
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def _check_supported(cfg: Mapping[str, Any], where: str) -> None:
    """Refuse, naming the key, what is not a Llama-family decoder the conversion covers."""
    if cfg.get("mcore_gpt") is False:
        raise NemoFormatError(
            f"{where}: mcore_gpt is false: a legacy NeMo GPT (language_model.* weights); only "
            "megatron-core GPT checkpoints (mcore_gpt: true, NeMo >= 1.22, NeMo 2) are read"
        )
    checks: list[tuple[str, Any, bool]] = [
        ("num_moe_experts", cfg.get("num_moe_experts"), (cfg.get("num_moe_experts") or 1) <= 1),
        ("normalization", _first(cfg, ("normalization",), "rmsnorm"), _is_rmsnorm(cfg)),
        ("activation", _activation(cfg), _activation(cfg) in SWIGLU_ACTIVATIONS),
        (
            "position_embedding_type",
            cfg.get("position_embedding_type", "rope"),
            cfg.get("position_embedding_type", "rope") == "rope",
        ),
        (
            "rotary_percentage",
            _first(cfg, ("rotary_percentage", "rotary_percent"), 1.0),
            float(_first(cfg, ("rotary_percentage", "rotary_percent"), 1.0)) == 1.0,
        ),
        (
            "bias",
            _first(cfg, ("bias", "add_bias_linear"), False),
            not _first(cfg, ("bias", "add_bias_linear"), False),
        ),
        (
            "seq_len_interpolation_factor",
            cfg.get("seq_len_interpolation_factor"),
            cfg.get("seq_len_interpolation_factor") in (None, 1, 1.0),
        ),
    ]
    checks += [(name, cfg[name], False) for name in ROPE_SCALING_FIELDS if cfg.get(name) is not None]
    if cfg.get("scale_positional_embedding"):
        checks.append(("scale_positional_embedding", True, False))
    for key, value, fine in checks:
        if not fine:
            raise NemoFormatError(
                f"{where}: {key}: {value} is not converted: only Llama-family decoders (RMSNorm, "
                "SwiGLU, full RoPE without scaling, no linear biases but an optional QKV bias, no MoE) are"
            )


def _is_rmsnorm(cfg: Mapping[str, Any]) -> bool:
    return str(_first(cfg, ("normalization",), "rmsnorm")).lower() == "rmsnorm"


def _activation(cfg: Mapping[str, Any]) -> str:
    """``swiglu`` for NeMo 1's activation names and for NeMo 2's gated SiLU."""
    if "activation" in cfg:
        return str(cfg["activation"])
    function = cfg.get("activation_func")
    target = function.get("_target_", "") if isinstance(function, Mapping) else str(function or "")
    gated = bool(cfg.get("gated_linear_unit", False))
    if target.endswith(".silu") and gated:
        return "swiglu"
    return f"{target or 'unknown'} (gated_linear_unit: {gated})"


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    for key in keys:
        value = _value(cfg, key)
        if value is not None:
            return value
    return default


def _value(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg[key]``, following an OmegaConf reference to a sibling key (NeMo 1 configs write
    ``max_position_embeddings: ${.encoder_seq_length}``)."""
    value = cfg.get(key)
    for _ in range(4):  # a short chain of references at most
        found = re.fullmatch(r"\$\{\.?(\w+)\}", value) if isinstance(value, str) else None
        if not found:
            break
        value = cfg.get(found.group(1))
    return value


def _int(cfg: Mapping[str, Any], where: str, key: str) -> int:
    value = _value(cfg, key)
    if not isinstance(value, int) or value <= 0:
        raise NemoFormatError(f"{where}: {key} is missing or not a positive integer (got {value!r})")
    return value
