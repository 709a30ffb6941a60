"""The process group and megatron-core's model-parallel groups, and GPTModel for a layout.

Under ``torchrun`` the world comes from its environment (RANK, WORLD_SIZE, MASTER_ADDR...); a
plain process is a world of one. CPU runs use gloo, GPU runs NCCL. Data parallelism is what is
left of the world after tensor x pipeline parallelism.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from align import ConfigError
from align_megatron.conversion import LlamaLayout
from align_megatron.cpu_shims import apply_cpu_shims, cpu_only, seed_model_parallel_rng

# The TP RNG tracker's seed: nothing random runs in its regions here (weights come from HF,
# dropout is off), but megatron requires it to be seeded.
MODEL_PARALLEL_SEED = 1234


@dataclass(frozen=True)
class Parallelism:
    """Where this process sits: its global rank, and its TP, PP and DP coordinates."""

    rank: int
    world_size: int
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    dp: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def initialize(tp: int, pp: int, sequence_parallel: bool) -> Parallelism:
    """Join (or start) the process group and lay out the TP/PP/DP groups (once per process;
    again only when the sizes change)."""
    from megatron.core import parallel_state as ps

    apply_cpu_shims()
    _check_sizes(tp, pp, sequence_parallel)
    if not dist.is_initialized():
        _init_process_group()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(
            f"backend: tensor_model_parallel_size x pipeline_model_parallel_size ({tp} x {pp}) must divide "
            f"the number of processes ({world})"
        )
    initialized = ps.model_parallel_is_initialized()
    if initialized and (
        ps.get_tensor_model_parallel_world_size() != tp or ps.get_pipeline_model_parallel_world_size() != pp
    ):
        ps.destroy_model_parallel()
        initialized = False
    if not initialized:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        seed_model_parallel_rng(MODEL_PARALLEL_SEED)
    device = torch.device("cpu") if cpu_only() else torch.device("cuda", torch.cuda.current_device())
    return Parallelism(
        rank=dist.get_rank(),
        world_size=world,
        tp=tp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp=pp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
    )


def _check_sizes(tp: int, pp: int, sequence_parallel: bool) -> None:
    if sequence_parallel and tp == 1:
        raise ConfigError("backend.sequence_parallel: needs tensor_model_parallel_size > 1")


def _init_process_group() -> None:
    backend = "gloo" if cpu_only() else "nccl"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not cpu_only():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        return
    # A plain process: a world of one on a free local port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def transformer_engine_available() -> bool:
    """TransformerEngine's layer spec is used when it is installed and a GPU is there."""
    if cpu_only():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_gpt(layout: LlamaLayout, par: Parallelism, dtype: torch.dtype, sequence_parallel: bool) -> Any:
    """An (uninitialised) megatron-core GPTModel with this layout, sharded for ``par`` (this
    pipeline stage's layers, this TP rank's shards): the local layer spec on CPU,
    TransformerEngine's where it runs."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    layout.check_tp(par.tp)
    layout.check_pp(par.pp)
    config = TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        num_attention_heads=layout.num_heads,
        num_query_groups=layout.num_kv_heads,
        kv_channels=layout.head_dim,
        ffn_hidden_size=layout.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=layout.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=layout.qkv_bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        pipeline_dtype=dtype,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is loaded from the HF model
        # Full float32 softmax in attention, as transformers' eager/sdpa paths compute it.
        attention_softmax_in_fp32=True,
    )
    spec: Any = (
        get_gpt_layer_with_transformer_engine_spec()
        if transformer_engine_available()
        else get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    if sequence_parallel and not transformer_engine_available():
        spec = _sequence_parallel_local_spec(spec, layout.num_layers // par.pp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=layout.padded_vocab(par.tp),
        max_sequence_length=layout.max_position_embeddings,
        parallel_output=True,  # logits stay split over the vocabulary: log-probs never gather it
        share_embeddings_and_output_weights=layout.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=int(layout.rope_theta),
        rotary_percent=1.0,
        pre_process=par.first_stage,  # the embedding
        post_process=par.last_stage,  # the final norm and the output layer
    )
    if layout.is_scorer and par.last_stage:
        # megatron-core has no scorer head: its last stage hands out the final hidden states,
        # and the backend applies the score head where it reads a score (MegatronModel.score).
        model.output_layer = FinalHiddenStates(sequence_parallel)
    return model.to(par.device)


class FinalHiddenStates(torch.nn.Module):
    """Stands in for GPTModel's output layer in a sequence scorer: returns the final (normed)
    hidden states ``[sequence, rows, hidden]`` as they are, whole: with sequence parallelism each
    TP rank holds a part of the sequence, so they are all-gathered. Every TP rank then computes
    the same scores and loss, so the gather's backward keeps each rank's own part of the
    gradient (``tensor_parallel_output_grad=False``), not the sum over ranks."""

    def __init__(self, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.weight = None  # read by GPTModel's setup (no output weight here)

    def forward(self, hidden: Tensor, weight: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built from megatron's norm arguments, for sequence parallelism with the
    local (CPU) layer spec. megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism
    because each TP rank then sees only its part of the sequence, so the weight's gradient is a
    partial sum; ``MegatronBackend.finish_gradients`` sums it over the TP group."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = True  # type: ignore[attr-defined]  # megatron's own mark


def _sequence_parallel_local_spec(layer: Any, num_layers: int) -> Any:
    """The local layer spec with ``SequenceParallelRMSNorm`` for its norms, as a block spec of
    ``num_layers`` layers (this stage's), so the final norm is one too."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    norms = {"input_layernorm": SequenceParallelRMSNorm, "pre_mlp_layernorm": SequenceParallelRMSNorm}
    layer = replace(layer, submodules=replace(layer.submodules, **norms))
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelRMSNorm)


def all_reduce_together(tensors: Sequence[Tensor], group: Any) -> None:
    """Sum each of ``tensors`` over ``group``, in place, through one flat all-reduce (one message
    for all of them instead of one each)."""
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, group=group)
    for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(piece.view_as(tensor))
