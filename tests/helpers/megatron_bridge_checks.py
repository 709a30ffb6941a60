"""Our HF <-> Megatron conversion (``align_megatron.conversion``) against Megatron-Bridge's.

Written against Megatron-Bridge 0.6 (``AutoBridge.from_hf_pretrained``, ``to_megatron_provider``,
``provide_distributed_model``, ``export_hf_weights``; the same calls exist, deprecated in favour of
``get_model``, in 0.7). Bridge builds megatron-core's TransformerEngine layer spec, which fuses each
layer's two norms into the next linear layer, so its parameter names differ from the local spec's
that the conversion table uses; ``te_name`` and ``local_name_of`` map between the two.

The comparison functions (``shard_mismatches``, ``hf_mismatches``) and the name mapping need
neither Bridge nor a GPU; ``bridge_report`` does (CUDA, TransformerEngine), and runs in every
process of a ``torchrun`` world of TP ranks:

``torchrun --nproc_per_node TP tests/helpers/megatron_bridge_checks.py SPEC.json`` writes rank 0's
report (for each tiny model: the mismatches of each direction, per rank) to ``SPEC["report"]``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# 256 rows: a multiple of what Bridge pads the vocabulary to (the largest power of two up to 128
# that divides it, times TP), so at TP <= 2 both sides hold the same rows on each rank (ours pads
# to a multiple of TP only: with another vocabulary the shards' padding rows would differ).
SHAPES: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: 2 query heads per group, TP=2 gives each rank one group
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
# The tiny models: Llama untied and tied, Qwen2 (QKV biases).
KINDS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama_tied": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False, "rope_theta": 1e6},
}
WRAPPER_PREFIX = "module."  # what DDP and Float16Module add in front of a parameter's name


def write_tiny_hf(folder: Path, kind: str) -> Path:
    """The tiny HF model ``kind`` (seeded random float32 weights; Qwen2's QKV biases non-zero,
    so a wrong bias layout shows) saved as safetensors with the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import align

    settings = dict(KINDS[kind])
    config = AutoConfig.for_model(settings.pop("model_type"), **SHAPES, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                param.normal_()  # norms start at 1: a swapped pair of norms would not show
    model.save_pretrained(folder, safe_serialization=True)
    align.byte_tokenizer().save_pretrained(folder)
    return folder


# ---- names: the local spec's (ours) and TransformerEngine's (Bridge's) ----------------------


def te_name(name: str) -> str:
    """The TransformerEngine spec's name of the local spec's (whole-model) parameter ``name``:
    the norms before attention and before the MLP live in ``linear_qkv`` and ``linear_fc1``."""
    from align_megatron.backend import TE_NAMES

    parts = name.split(".", 3)  # decoder, layers, i, the layer's own name
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in TE_NAMES:
        return ".".join([*parts[:3], TE_NAMES[parts[3]]])
    return name


def local_name_of(name: str) -> str:
    """The local spec's name of a parameter named by either spec (``te_name``'s inverse), without
    the ``module.`` prefixes of a wrapped model."""
    from align_megatron.backend import TE_NAMES

    while name.startswith(WRAPPER_PREFIX):
        name = name[len(WRAPPER_PREFIX) :]
    parts = name.split(".", 3)
    local = {fused: own for own, fused in TE_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in local:
        return ".".join([*parts[:3], local[parts[3]]])
    return name


def parameters_by_local_name(model: torch.nn.Module) -> dict[str, Tensor]:
    """A megatron model's parameters (either spec, wrapped or not) under the local spec's names;
    zero-size placeholders left out."""
    named: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if param.numel() == 0:
            continue
        local = local_name_of(name)
        if local in named:
            raise AssertionError(f"two parameters map to {local}")
        named[local] = param
    return named


# ---- comparisons ---------------------------------------------------------------------------


def _differences(ours: Mapping[str, Tensor], theirs: Mapping[str, Tensor], who: str) -> list[str]:
    found = [f"{name}: only ours" for name in sorted(set(ours) - set(theirs))]
    found += [f"{name}: only {who}'s" for name in sorted(set(theirs) - set(ours))]
    for name in sorted(set(ours) & set(theirs)):
        mine, other = ours[name].detach().cpu(), theirs[name].detach().cpu()
        if mine.shape != other.shape or mine.dtype != other.dtype:
            found.append(
                f"{name}: ours {tuple(mine.shape)} {mine.dtype}, {who}'s {tuple(other.shape)} {other.dtype}"
            )
        elif not torch.equal(mine, other):
            found.append(f"{name}: values differ by up to {float((mine - other).abs().max()):.3g}")
    return found


def shard_mismatches(ours: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> list[str]:
    """How one TP rank's megatron tensors from our conversion differ from Bridge's (both under
    the local spec's names): names on one side only, shapes, dtypes, values (bit for bit)."""
    return _differences(ours, theirs, "Bridge")


def hf_mismatches(ours: Mapping[str, Tensor], theirs: Iterable[tuple[str, Tensor]], tied: bool) -> list[str]:
    """How Bridge's HF export ``theirs`` differs from ours. With tied embeddings Bridge may also
    write ``lm_head.weight``; it must then be the embedding table (ours writes it once)."""
    exported = dict(theirs)
    found: list[str] = []
    if tied and "lm_head.weight" in exported and "lm_head.weight" not in ours:
        alias = exported.pop("lm_head.weight")
        table = ours.get("model.embed_tokens.weight")
        if table is None or not torch.equal(alias.detach().cpu(), table.detach().cpu()):
            found.append("lm_head.weight: Bridge's tied output weight is not the embedding table")
    return found + _differences(ours, exported, "Bridge")


# ---- Bridge (CUDA, TransformerEngine) ------------------------------------------------------


def bridge_report(folder: Path, tp: int) -> dict[str, Any]:
    """This rank's comparison of the HF model in ``folder`` converted by us and by Bridge at TP
    ``tp`` (this process's world: ``tp`` ranks): the mismatches HF -> Megatron (this rank's
    shards) and Megatron -> HF (Bridge's export of the model holding our shards, against
    ``to_hf`` of every rank's shards), and how many tensors each side compared."""
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from align_megatron.conversion import (
        layout_of,
        megatron_names,
        megatron_shard,
        safetensors_weights,
        to_hf,
    )

    bridge = AutoBridge.from_hf_pretrained(str(folder), torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = 1
    provider.params_dtype = torch.float32
    provider.pipeline_dtype = torch.float32
    provider.bf16 = provider.fp16 = False
    provider.finalize()
    if not ps.model_parallel_is_initialized():
        provider.initialize_model_parallel(seed=0)
    models = provider.provide_distributed_model(wrap_with_ddp=False)
    theirs = parameters_by_local_name(models[0])
    fused_norms = any("layer_norm_weight" in name for name, _ in models[0].named_parameters())

    layout = layout_of(AutoConfig.from_pretrained(folder))
    hf = safetensors_weights(folder, layout.tied_embeddings)  # what the backend reads
    rank = ps.get_tensor_model_parallel_rank()
    names = megatron_names(layout)
    every_rank = [{name: megatron_shard(name, hf, layout, r, tp) for name in names} for r in range(tp)]
    report: dict[str, Any] = {
        "to_megatron": shard_mismatches(every_rank[rank], theirs),
        "to_megatron_compared": len(set(theirs) & set(names)),
        "spec": "transformer_engine" if fused_norms else "local",
    }
    with torch.no_grad():  # the model now holds our conversion's shards, whatever Bridge loaded
        for name in set(theirs) & set(names):
            theirs[name].copy_(every_rank[rank][name].to(theirs[name].device))
    exported = [
        (name, t.cpu()) for name, t in bridge.export_hf_weights(models, cpu=True, show_progress=False)
    ]
    ours = to_hf(every_rank, layout)
    report["to_hf"] = hf_mismatches(ours, exported, layout.tied_embeddings)
    report["to_hf_compared"] = len(exported)
    return report


def main(spec_path: str) -> None:
    """Every kind in ``SPEC["kinds"]`` (folders written by the test) at ``SPEC["tp"]``; rank 0
    writes ``{"version": Bridge's, "world_size", kind: [each rank's report]}``."""
    import megatron.bridge
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {}
    for kind, folder in spec["kinds"].items():
        mine = bridge_report(Path(folder), int(spec["tp"]))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        result[kind] = gathered
    result["version"] = megatron.bridge.__version__
    result["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
