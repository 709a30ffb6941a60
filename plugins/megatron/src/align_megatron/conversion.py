"""HF <-> Megatron weights for Llama-family decoders (Llama, Mistral, Qwen2), with TP sharding.

The mapping table (HF name in ``model.layers.{i}`` -> megatron-core ``GPTModel`` name in
``decoder.layers.{i}``, and how the tensor is split over ``tp`` tensor-parallel ranks):

=====================================  ========================================  ==================
HF                                     Megatron                                  TP split
=====================================  ========================================  ==================
model.embed_tokens.weight              embedding.word_embeddings.weight          rows (vocab)
.input_layernorm.weight                .input_layernorm.weight                   replicated
.self_attn.{q,k,v}_proj.weight         .self_attention.linear_qkv.weight         query groups
.self_attn.{q,k,v}_proj.bias (Qwen2)   .self_attention.linear_qkv.bias           query groups
.self_attn.o_proj.weight               .self_attention.linear_proj.weight        columns
.post_attention_layernorm.weight       .pre_mlp_layernorm.weight                 replicated
.mlp.{gate,up}_proj.weight             .mlp.linear_fc1.weight                    rows, per shard
.mlp.down_proj.weight                  .mlp.linear_fc2.weight                    columns
model.norm.weight                      decoder.final_layernorm.weight            replicated
lm_head.weight (untied only)           output_layer.weight                       rows (vocab)
score.weight (sequence scorers)        score.weight                              replicated
=====================================  ========================================  ==================

``linear_qkv`` holds, for each query group (KV head) in turn, that group's query heads then its
key head then its value head; TP ranks own whole groups. ``linear_fc1`` holds on each rank that
rank's slice of the gate projection followed by its slice of the up projection (SwiGLU reads the
two halves of its own shard). The vocabulary is padded with zero rows to a multiple of ``tp``;
the padded rows never take part in a log-prob (the backend masks them) and are dropped on the way
back, so HF -> Megatron -> HF returns identical tensors. With pipeline parallelism, stage ``s`` of
``pp`` holds layers ``s * L/pp`` to ``(s + 1) * L/pp - 1`` under its own numbering from 0
(``stage_of``, ``stage_local_name``), the embedding on the first stage, the final norm and the
output layer on the last.

A sequence scorer (an HF ``LlamaForSequenceClassification``: a reward model, a critic) has no
output layer: its ``score`` head (``[num_labels, hidden]``, no bias) is a whole tensor on every TP
rank, on the last pipeline stage (``LlamaLayout.num_labels`` > 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align import ConfigError

LAYER = "decoder.layers."
HF_LAYER = "model.layers."
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Megatron -> HF names of the whole (unsplit) tensors outside the layers.
REPLICATED_OUTSIDE_LAYERS = {
    "decoder.final_layernorm.weight": "model.norm.weight",
    "score.weight": "score.weight",
}


@dataclass(frozen=True)
class HFWeights:
    """HF weights by name, read whole (``whole(name)``) or in parts: ``part(name, dim, start,
    stop)`` is rows (``dim`` 0) or columns (``dim`` 1) ``start:stop``, so a TP rank can read only
    its shard of a tensor (safetensors' ``get_slice``) instead of the whole of it."""

    whole: Callable[[str], Tensor]
    part: Callable[[str, int, int, int], Tensor] | None = None

    def narrow(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        if self.part is not None:
            return self.part(name, dim, start, stop)
        return self.whole(name).narrow(dim, start, stop - start).clone()

    def shard(self, name: str, dim: int, size: int, rank: int, parts: int) -> Tensor:
        """Part ``rank`` of ``parts`` equal parts of the ``size`` rows/columns (``dim``)."""
        each = size // parts
        return self.narrow(name, dim, rank * each, (rank + 1) * each)


def safetensors_weights(folder: Path, tied_embeddings: bool) -> HFWeights:
    """The HF weights in ``folder``'s ``*.safetensors`` files, read lazily: a whole tensor, or
    only a shard's rows or columns (``get_slice``), when asked for. With tied embeddings a
    missing ``lm_head.weight`` is the embedding table."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"checkpoint {folder} holds no *.safetensors file")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def stored(name: str) -> str:
        if name == "lm_head.weight" and name not in where and tied_embeddings:
            name = "model.embed_tokens.weight"
        if name not in where:
            raise RuntimeError(f"checkpoint {folder} does not match the model: {name} is missing")
        return name

    def whole(name: str) -> Tensor:
        key = stored(name)
        tensor: Tensor = where[key].get_tensor(key)
        return tensor

    def part(name: str, dim: int, start: int, stop: int) -> Tensor:
        key = stored(name)
        piece = where[key].get_slice(key)
        tensor: Tensor = piece[start:stop] if dim == 0 else piece[:, start:stop]
        return tensor

    return HFWeights(whole, part)


@dataclass(frozen=True)
class LlamaLayout:
    """The shape facts of a Llama-family decoder that the conversion and GPTModel need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tied_embeddings: bool
    qkv_bias: bool
    # A sequence scorer's heads (HF's ``score``, in place of the output layer); 0: a causal LM.
    num_labels: int = 0

    @property
    def is_scorer(self) -> bool:
        return self.num_labels > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary rounded up to a multiple of ``tp`` (megatron splits it evenly)."""
        return -(-self.vocab_size // tp) * tp

    def check_pp(self, pp: int) -> None:
        """Pipeline stages hold equal numbers of layers; tied embeddings stay on one stage."""
        if self.num_layers % pp:
            raise ConfigError(
                f"backend.pipeline_model_parallel_size: {pp} does not divide the model's "
                f"num_hidden_layers ({self.num_layers})"
            )
        if pp > 1 and self.tied_embeddings:
            # megatron-core keeps a copy of tied embeddings on the last stage, set up with
            # weight.data.cuda() and kept equal by an all-reduce of both copies' gradients.
            raise ConfigError(
                "backend.pipeline_model_parallel_size: models with tied embeddings "
                "(tie_word_embeddings) run only with pipeline_model_parallel_size 1 yet"
            )

    def check_tp(self, tp: int) -> None:
        """TP must divide the query groups and the MLP width (the vocabulary is padded)."""
        for what, size in (
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.ffn_hidden_size),
        ):
            if size % tp:
                raise ConfigError(
                    f"backend.tensor_model_parallel_size: {tp} does not divide the model's {what} ({size})"
                )


def layout_of(hf_config: Any) -> LlamaLayout:
    """The layout of an HF ``LlamaConfig``/``MistralConfig``/``Qwen2Config``; a ConfigError
    for what the conversion does not cover."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"backend: megatron converts Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"model.path is a '{model_type}' model"
        )
    scaling = getattr(hf_config, "rope_scaling", None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(f"backend: megatron: rope_scaling of type '{rope_type}' is not converted yet")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"backend: megatron: activation '{hf_config.hidden_act}' is not SwiGLU")
    if getattr(hf_config, "mlp_bias", False) or (
        getattr(hf_config, "attention_bias", False) and model_type != "qwen2"
    ):
        raise ConfigError("backend: megatron: biases other than Qwen2's QKV bias are not converted yet")
    heads = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return LlamaLayout(
        num_layers=int(hf_config.num_hidden_layers),
        hidden_size=int(hf_config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        ffn_hidden_size=int(hf_config.intermediate_size),
        vocab_size=int(hf_config.vocab_size),
        norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=float(_rope_theta(hf_config)),
        max_position_embeddings=int(hf_config.max_position_embeddings),
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
    )


def _rope_theta(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


# ---- HF -> Megatron ------------------------------------------------------------------------


def to_megatron(
    hf: Mapping[str, Tensor] | Callable[[str], Tensor], layout: LlamaLayout, tp_rank: int, tp: int
) -> dict[str, Tensor]:
    """The megatron state dict (this TP rank's shards) of the HF weights ``hf`` (a mapping, or
    a function from HF name to tensor, so a checkpoint can be read one tensor at a time)."""
    get = hf.__getitem__ if isinstance(hf, Mapping) else hf
    out: dict[str, Tensor] = {}
    for name in megatron_names(layout):
        out[name] = megatron_shard(name, get, layout, tp_rank, tp)
    return out


def megatron_names(layout: LlamaLayout) -> list[str]:
    """Every megatron parameter name of the layout, in module order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(layout.num_layers):
        p = f"{LAYER}{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_proj.weight"]
        names += [p + "self_attention.linear_qkv.weight"]
        names += [p + "self_attention.linear_qkv.bias"] if layout.qkv_bias else []
        names += [p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if layout.is_scorer:
        names.append("score.weight")
    elif not layout.tied_embeddings:
        names.append("output_layer.weight")
    return names


def stage_of(name: str, layout: LlamaLayout, pp: int) -> int:
    """The pipeline stage that holds megatron's ``name``: the embedding on the first, layers in
    equal consecutive runs, the final norm and the output layer on the last."""
    if name.startswith("embedding."):
        return 0
    if name.startswith(LAYER):
        layer, _ = _split_layer_name(name)
        return layer // (layout.num_layers // pp)
    return pp - 1


def stage_local_name(name: str, layout: LlamaLayout, pp: int) -> str:
    """The name of megatron's (whole-model) ``name`` inside its stage's GPTModel, which numbers
    its own layers from 0."""
    if not name.startswith(LAYER):
        return name
    layer, part = _split_layer_name(name)
    return f"{LAYER}{layer % (layout.num_layers // pp)}.{part}"


def megatron_shard(
    name: str, hf: Callable[[str], Tensor] | HFWeights, layout: LlamaLayout, tp_rank: int, tp: int
) -> Tensor:
    """One megatron tensor (TP rank ``tp_rank``'s shard) from the HF tensors: ``hf`` returns a
    whole tensor by name, or is an ``HFWeights`` that also reads parts (then only the rows or
    columns of this shard are read)."""
    weights = hf if isinstance(hf, HFWeights) else HFWeights(hf)
    get = weights.whole
    if name == "embedding.word_embeddings.weight":
        return _vocab_shard(weights, "model.embed_tokens.weight", layout, tp_rank, tp)
    if name == "output_layer.weight":
        return _vocab_shard(weights, "lm_head.weight", layout, tp_rank, tp)
    if name in REPLICATED_OUTSIDE_LAYERS:
        return get(REPLICATED_OUTSIDE_LAYERS[name]).clone()
    layer, part = _split_layer_name(name)
    prefix = f"{HF_LAYER}{layer}."
    if part == "input_layernorm.weight":
        return get(prefix + "input_layernorm.weight").clone()
    if part == "pre_mlp_layernorm.weight":
        return get(prefix + "post_attention_layernorm.weight").clone()
    if part in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return _qkv_shard(weights, prefix, part.rsplit(".", 1)[1], layout, tp_rank, tp)
    attention, ffn = layout.num_heads * layout.head_dim, layout.ffn_hidden_size
    if part == "self_attention.linear_proj.weight":
        return weights.shard(prefix + "self_attn.o_proj.weight", 1, attention, tp_rank, tp)
    if part == "mlp.linear_fc1.weight":
        gate = weights.shard(prefix + "mlp.gate_proj.weight", 0, ffn, tp_rank, tp)
        up = weights.shard(prefix + "mlp.up_proj.weight", 0, ffn, tp_rank, tp)
        return torch.cat([gate, up], dim=0)
    if part == "mlp.linear_fc2.weight":
        return weights.shard(prefix + "mlp.down_proj.weight", 1, ffn, tp_rank, tp)
    raise KeyError(f"no HF weight maps to megatron's {name}")


def _split_layer_name(name: str) -> tuple[int, str]:
    if not name.startswith(LAYER):
        raise KeyError(f"no HF weight maps to megatron's {name}")
    layer, part = name[len(LAYER) :].split(".", 1)
    return int(layer), part


def _vocab_shard(weights: HFWeights, name: str, layout: LlamaLayout, tp_rank: int, tp: int) -> Tensor:
    """Rows ``tp_rank`` of the table zero-padded to a multiple of ``tp``: the real rows read,
    the padding made here."""
    each = layout.padded_vocab(tp) // tp
    start = tp_rank * each
    stop = min(start + each, layout.vocab_size)
    rows = weights.narrow(name, 0, start, max(stop, start))
    if rows.shape[0] < each:
        rows = torch.cat([rows, rows.new_zeros(each - rows.shape[0], *rows.shape[1:])])
    return rows


def _qkv_shard(weights: HFWeights, hf: str, kind: str, layout: LlamaLayout, tp_rank: int, tp: int) -> Tensor:
    """[q heads of group g, k head g, v head g] for each group g this rank owns (whole groups:
    the rank's rows of q, k and v)."""
    groups, d = layout.num_kv_heads // tp, layout.head_dim
    first = tp_rank * groups
    q_rows = layout.heads_per_group * d
    q, k, v = (
        weights.narrow(f"{hf}self_attn.{x}_proj.{kind}", 0, first * rows, (first + groups) * rows)
        for x, rows in (("q", q_rows), ("k", d), ("v", d))
    )
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(groups, q_rows, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
        dim=1,
    )
    return grouped.reshape(-1, *rest)


# ---- Megatron -> HF ------------------------------------------------------------------------


def to_hf(shards: Sequence[Mapping[str, Tensor]], layout: LlamaLayout) -> dict[str, Tensor]:
    """HF weights from the megatron state dicts of all TP ranks (``shards[r]`` is rank r's)."""
    out: dict[str, Tensor] = {}
    for name in megatron_names(layout):
        out.update(hf_tensors(name, [shard[name] for shard in shards], layout))
    return out


def hf_tensors(name: str, shards: Sequence[Tensor], layout: LlamaLayout) -> Iterator[tuple[str, Tensor]]:
    """The HF tensors that megatron's ``name`` holds, from its shards on every TP rank."""
    tp = len(shards)
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", torch.cat(list(shards))[: layout.vocab_size]
        return
    if name == "output_layer.weight":
        yield "lm_head.weight", torch.cat(list(shards))[: layout.vocab_size]
        return
    if name in REPLICATED_OUTSIDE_LAYERS:
        yield REPLICATED_OUTSIDE_LAYERS[name], shards[0]
        return
    layer, part = _split_layer_name(name)
    hf = f"{HF_LAYER}{layer}."
    if part == "input_layernorm.weight":
        yield hf + "input_layernorm.weight", shards[0]
    elif part == "pre_mlp_layernorm.weight":
        yield hf + "post_attention_layernorm.weight", shards[0]
    elif part in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = part.rsplit(".", 1)[1]
        q, k, v = _split_qkv(torch.cat(list(shards)), layout)
        yield from ((f"{hf}self_attn.{x}_proj.{kind}", t) for x, t in zip("qkv", (q, k, v), strict=True))
    elif part == "self_attention.linear_proj.weight":
        yield hf + "self_attn.o_proj.weight", torch.cat(list(shards), dim=1)
    elif part == "mlp.linear_fc1.weight":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        yield hf + "mlp.gate_proj.weight", torch.cat([gate for gate, _ in halves])
        yield hf + "mlp.up_proj.weight", torch.cat([up for _, up in halves])
    elif part == "mlp.linear_fc2.weight":
        yield hf + "mlp.down_proj.weight", torch.cat(list(shards), dim=1)
    else:
        raise KeyError(f"megatron's {name} has no HF counterpart (tp={tp})")


def _split_qkv(fused: Tensor, layout: LlamaLayout) -> tuple[Tensor, Tensor, Tensor]:
    groups, d, per = layout.num_kv_heads, layout.head_dim, layout.heads_per_group
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
