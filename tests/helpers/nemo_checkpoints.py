"""NeMo checkpoints written from tiny HF models, in the layouts align-nemo reads (no real NeMo
file can be downloaded here): ``.nemo`` tars with ``model_weights.ckpt`` (TP=1 or one per TP
rank) or a ``model_weights/`` distributed checkpoint, and NeMo 2 folders.

The weights go through align_megatron's HF -> Megatron conversion; the distributed checkpoints
are a real megatron-core ``GPTModel``'s ``sharded_state_dict()`` saved by ``dist_checkpointing``
(at TP=2: ``torchrun --nproc_per_node 2 nemo_checkpoints.py FOLDER``).
"""

from __future__ import annotations

import io
import os
import queue
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPES: dict[str, Any] = {
    "vocab_size": 101,  # odd: TP=2 pads it
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}


def tiny_model(kind: str, **changes: Any) -> Any:
    """A seeded tiny decoder: ``llama`` (untied, GQA), ``llama_tied`` or ``qwen2`` (QKV biases)."""
    shapes: dict[str, Any] = {**SHAPES, **changes}
    if kind == "qwen2":
        config: Any = Qwen2Config(
            **shapes, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
    else:
        config = LlamaConfig(
            **shapes,
            tie_word_embeddings=kind == "llama_tied",
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(config).eval()
    with torch.no_grad():  # non-zero norms and biases, so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5)
    return model


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def nemo1_config(model: Any, tp: int = 1) -> dict[str, Any]:
    """A NeMo 1 ``model_config.yaml`` for ``model`` (the keys a megatron_gpt config has)."""
    c = model.config
    config: dict[str, Any] = {
        "mcore_gpt": True,
        "encoder_seq_length": c.max_position_embeddings,
        "max_position_embeddings": "${.encoder_seq_length}",
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_key_value_heads,
        "kv_channels": None,
        "normalization": "rmsnorm",
        "layernorm_epsilon": c.rms_norm_eps,
        "activation": "fast-swiglu",
        "bias": False,
        "position_embedding_type": "rope",
        "rotary_base": rope_theta(c),
        "rotary_percentage": 1.0,
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        "transformer_engine": True,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "make_vocab_size_divisible_by": 1,
        "tokenizer": {"library": "sentencepiece", "type": None, "model": "nemo:a1b2_tokenizer.model"},
    }
    if c.model_type == "qwen2":
        config["add_qkv_bias"] = True
    return config


def nemo2_config(model: Any) -> dict[str, Any]:
    """A NeMo 2 ``context/model.yaml`` (fiddle's YAML dump of ``LlamaModel(config=...)``)."""
    c = model.config
    return {
        "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
        "config": {
            "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig",
            "num_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "ffn_hidden_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_key_value_heads,
            "kv_channels": None,
            "normalization": "RMSNorm",
            "layernorm_epsilon": c.rms_norm_eps,
            "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "gated_linear_unit": True,
            "add_bias_linear": False,
            "position_embedding_type": "rope",
            "rotary_base": rope_theta(c),
            "rotary_percent": 1.0,
            "seq_length": c.max_position_embeddings,
            "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
            "num_moe_experts": None,
            "make_vocab_size_divisible_by": 128,
        },
        "tokenizer": {
            "_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
            "pretrained_model_name": "nemo_tokenizer",
        },
    }


def megatron_shards(model: Any, tp: int) -> list[dict[str, torch.Tensor]]:
    from align_megatron import layout_of, to_megatron

    layout = layout_of(model.config)
    state = model.state_dict()
    return [to_megatron(state, layout, rank, tp) for rank in range(tp)]


def nemo_state_dict(
    shard: dict[str, torch.Tensor], prefix: str = "model.", te_names: bool = True
) -> dict[str, Any]:
    """A ``model_weights.ckpt`` of a megatron shard as NeMo saves it: ``prefix`` on every name,
    the layer norms under TransformerEngine's fused names, and an ``_extra_state`` (a
    ``BytesIO``, as TransformerEngine saves it) beside every linear layer."""
    out: dict[str, Any] = {}
    for name, tensor in shard.items():
        if te_names:
            name = name.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
            name = name.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")
        out[prefix + name] = tensor
        if name.endswith(("linear_qkv.weight", "linear_fc1.weight")):
            out[prefix + name.rsplit(".", 1)[0] + "._extra_state"] = io.BytesIO(b"fp8 meta")
    return out


def write_nemo_tar(archive: Path, files: dict[str, Any], compress: bool = False) -> Path:
    """A ``.nemo`` tar of ``files`` (name -> a state dict to ``torch.save``, a dict to write as
    YAML, bytes, or a folder to add whole), names under ``./`` as NeMo writes them."""
    staging = archive.with_suffix(".staging")
    staging.mkdir(parents=True)
    for name, content in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            path.symlink_to(content.resolve())
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".yaml"):
            path.write_text(yaml.safe_dump(content))
        else:
            torch.save(content, path)
    with tarfile.open(archive, "w:gz" if compress else "w:") as tar:
        for entry in sorted(staging.iterdir()):
            tar.add(entry.resolve() if entry.is_symlink() else entry, arcname=f"./{entry.name}")
    return archive


def write_dist_checkpoint(model: Any, folder: Path, prefix: str, optimizer: bool = False) -> Path:
    """Save ``model`` as a real megatron-core ``GPTModel``'s ``sharded_state_dict()`` with
    ``dist_checkpointing`` (torch_dist) into ``folder``, names under ``prefix``; ``optimizer``
    adds an optimizer entry beside the weights, as NeMo 2 keeps. Runs in a world of one that is
    taken down again when this made it (the reader then starts its own)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    from align_megatron import layout_of, to_megatron
    from align_megatron.parallel import build_gpt, initialize

    layout = layout_of(model.config)
    made_group = not dist.is_initialized()
    par = initialize(1, 1, False)
    try:
        gpt = build_gpt(layout, par, torch.float32, False)
        state = model.state_dict()
        if layout.tied_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        gpt.load_state_dict(to_megatron(state, layout, 0, 1), strict=False)
        sharded = gpt.sharded_state_dict(prefix=prefix)
        if optimizer:
            moment = torch.zeros(layout.vocab_size, layout.hidden_size)
            key = f"optimizer.state.exp_avg.{prefix}embedding.word_embeddings.weight"
            sharded["optimizer_moment"] = ShardedTensor.from_rank_offsets(key, moment)
        folder.mkdir(parents=True)
        with _cpu_writer():
            dist_checkpointing.save(sharded, str(folder))
    finally:
        if made_group:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return folder


@contextmanager
def _cpu_writer() -> Iterator[None]:
    """megatron-core's writer, made to run on a CPU in this process: it synchronizes CUDA
    unconditionally, and collects its (here: in-process) results through a queue it would get
    from a ``spawn`` manager process (which re-imports everything; slow)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    synchronize, results = torch.cuda.synchronize, filesystem_async._results_queue
    torch.cuda.synchronize = lambda *args, **kwargs: None
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        torch.cuda.synchronize = synchronize
        filesystem_async._results_queue = results


def rope_theta(config: Any) -> float:
    theta: Any = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta")
    return float(theta)


def write_tp_dist_checkpoint(folder: Path) -> None:
    """Under ``torchrun --nproc_per_node TP``: ``tiny_model("llama")`` as a megatron-core
    ``GPTModel`` sharded over the world's TP ranks, saved by ``dist_checkpointing`` (each rank
    writes its own shards) under NeMo 1's ``model.`` names."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from align_megatron import layout_of, to_megatron
    from align_megatron.parallel import build_gpt, initialize

    model = tiny_model("llama")
    layout = layout_of(model.config)
    par = initialize(int(os.environ["WORLD_SIZE"]), 1, False)
    gpt = build_gpt(layout, par, torch.float32, False)
    gpt.load_state_dict(to_megatron(model.state_dict(), layout, par.tp_rank, par.tp), strict=False)
    if par.rank == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    with _cpu_writer():
        dist_checkpointing.save(gpt.sharded_state_dict(prefix="model."), str(folder))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    write_tp_dist_checkpoint(Path(sys.argv[1]))
