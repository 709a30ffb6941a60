"""The ``megatron`` backend: megatron-core GPTModel with tensor, pipeline, sequence and data
parallelism.

Models start as HF models (the run's ``model`` section, built by the core's
``align.build_hf_model``) and are converted to megatron shards (``align_megatron.conversion``);
every output is an HF checkpoint again. Algorithms see the same ``Backend`` methods as on ``hf``:

- Log-probs come from logits split over the vocabulary (``parallel_output``): the log-softmax
  normaliser and the target's logit are all-reduced over the TP group, never the vocabulary.
- Data parallelism lives inside the backend: every rank gets the same global batch (same seed,
  same data order), scores its share of the rows, and the per-sequence results are summed over
  the DP group. Every rank then computes the same loss; the backward of that sum is the
  identity, so each rank's gradients are its rows' share, and ``finish_gradients`` sums them
  over the DP group. The algorithms' code does not change.
- Pipeline stages hold runs of layers; a scoring call runs through them and the last stage's
  log-probs reach every stage (``align_megatron.pipeline``), so again every rank computes the
  same loss, and the learner's backward runs back through the stages.
- Sequence scorers (reward models, PPO's critic) are the same GPTModel trunk whose last stage
  hands out its final hidden states, and a ``score`` head (``nn.Linear(hidden, labels)``, no
  bias, HF's ``LlamaForSequenceClassification.score``) that every TP rank holds whole. Every TP
  rank computes the same scores from the same (whole) hidden states, so the head's gradient is
  already the same on every TP rank and needs no all-reduce; it is counted once in the norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from align import (
    BackendConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SequenceLogps,
    TokenBatch,
    TokenLogps,
    build_hf_model,
    build_hf_scorer,
    hf_model_source,
    last_token_positions,
    load_hf_tokenizer,
    model_sections,
)
from align_megatron.conversion import (
    HFWeights,
    LlamaLayout,
    hf_tensors,
    layout_of,
    megatron_names,
    megatron_shard,
    safetensors_weights,
    stage_local_name,
    stage_of,
)
from align_megatron.cpu_shims import cpu_checkpoint_writer, cpu_only
from align_megatron.distributed_optimizer import MegatronDistributedOptimizer, optimizer_config
from align_megatron.lora import REPLICATED as REPLICATED_ADAPTER
from align_megatron.optimizer_state import layout_of as parallel_layout
from align_megatron.optimizer_state import load_optimizer_state, sharded_optimizer_state
from align_megatron.parallel import (
    Parallelism,
    all_reduce_together,
    build_gpt,
    initialize,
    transformer_engine_available,
)
from align_megatron.pipeline import run_stages

CAUSAL_ROLES = ("policy", "reference")
# Sequence scorers by role (one head each, as the hf backend builds them).
SCORER_ROLES = ("reward", "critic")
FROZEN_ROLES = ("reference", "reward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# How the HF models a megatron model starts from attend: they never run, only their weights are read.
HF_ATTENTION = "eager"
# Logit given to the vocabulary's padding rows (added so TP divides it): exp() of it is 0.
MASKED_LOGIT = -1e30
# TransformerEngine's spec fuses the pre-attention and pre-MLP norms into the next linear layer.
TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# Pipeline micro-batches per stage by default: GPipe's idle share is (PP - 1) / (m + PP - 1).
DEFAULT_MICRO_BATCHES_PER_STAGE = 2


class MegatronBackendConfig(BackendConfig):
    name: Literal["megatron"] = "megatron"
    tensor_model_parallel_size: int = Field(1, ge=1, description="Ranks each layer is split over.")
    pipeline_model_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages (layers split evenly). Data parallel = world / (TP x PP)."
    )
    sequence_parallel: bool = Field(
        False, description="Split the norms' activations over the sequence within the TP group (TP > 1)."
    )
    pipeline_micro_batches: int | None = Field(
        None,
        ge=1,
        description=(
            "Pipeline micro-batches each scoring call's rows are split into at PP > 1, so the "
            "stages overlap (GPipe); uneven splits allowed, fewer when a call has fewer rows. "
            f"Default: {DEFAULT_MICRO_BATCHES_PER_STAGE} x pipeline_model_parallel_size."
        ),
    )
    nproc_per_node: int = Field(
        1, ge=1, description="Processes on this node; > 1: `align run` starts them under torchrun itself."
    )
    distributed_optimizer: bool | Literal["auto"] = Field(
        False,
        description=(
            "megatron-core's distributed optimizer (each data-parallel rank keeps the optimizer "
            "state of its slice of the parameters) instead of torch.optim; auto: on a GPU only. "
            "Not with LoRA."
        ),
    )

    @field_validator("pipeline_micro_batches")
    @classmethod
    def _micro_batches_need_stages(cls, value: int | None, info: ValidationInfo) -> int | None:
        if (value or 1) > 1 and info.data.get("pipeline_model_parallel_size") == 1:
            raise ValueError(
                f"{value} splits the rows between pipeline stages; it needs "
                "pipeline_model_parallel_size > 1 (or leave it unset)"
            )
        return value

    def resume_may_change(self, run: RunConfig) -> tuple[str, ...]:
        """The parallel layout: checkpoints hold the weights and the optimizer state sharded by
        megatron-core's distributed checkpointing, so a resume reads them at another TP/PP (the
        data-parallel size is checked when the optimizer state is loaded). Not with LoRA: the
        adapters' optimizer state stays per rank."""
        if any(section.lora is not None for _, section in model_sections(run)):
            return ()
        return (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "sequence_parallel",
            "pipeline_micro_batches",
            "nproc_per_node",
        )

    def uses_distributed_optimizer(self, run: RunConfig) -> bool:
        """``distributed_optimizer`` resolved: ``auto`` is on with a GPU (and no LoRA), off on
        CPU, where ``true`` runs it through a shim (``cpu_shims.megatron_optimizer_on_cpu``)."""
        lora = any(section.lora is not None for _, section in model_sections(run))
        if self.distributed_optimizer == "auto":
            return not cpu_only() and not lora
        if self.distributed_optimizer and lora:
            raise ConfigError(
                "backend.distributed_optimizer: not with model.lora (the adapters are not in "
                "megatron's sharded state dict, which the distributed optimizer's state follows); "
                "set it to false"
            )
        if self.distributed_optimizer and run.trainer.precision == "bf16" and cpu_only():
            # It trains (fp32 main parameters), but megatron-core 0.16's checkpoint of it fails
            # on CPU (an AssertionError on a slice's shape in sharded_param_state_dp_reshardable).
            raise ConfigError(
                "backend.distributed_optimizer: not with bfloat16 weights (trainer.precision: bf16) "
                "without a GPU: megatron-core's checkpoint of its state fails there; use "
                "trainer.precision: fp32, or distributed_optimizer: false"
            )
        return self.distributed_optimizer

    @property
    def micro_batches(self) -> int:
        """The pipeline micro-batches of a scoring call (1 without pipeline stages)."""
        if self.pipeline_micro_batches is not None:
            return self.pipeline_micro_batches
        stages = self.pipeline_model_parallel_size
        return DEFAULT_MICRO_BATCHES_PER_STAGE * stages if stages > 1 else 1


class MegatronModel(nn.Module):
    """A megatron-core GPTModel with what the conversion needs to write it back as HF."""

    # The learner saves and loads it through the backend (a collective, TP-gathered HF save on
    # every rank), also as a trainable other than the policy (PPO's critic).
    saved_by_backend = True

    def __init__(
        self,
        gpt: nn.Module,
        layout: LlamaLayout,
        hf_config: Any,
        uses_te: bool,
        stages: int = 1,
        stage: int = 0,
        score: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.gpt = gpt
        self.layout = layout
        self.hf_config = hf_config
        self.uses_te = uses_te
        self.stages = stages  # pipeline stages, and which one this process holds
        self.stage = stage
        # A sequence scorer's head (on the last stage only); the gpt then returns hidden states.
        self.score = score

    def held_names(self) -> list[str]:
        """The (whole-model) megatron names of the weights this pipeline stage holds."""
        return [n for n in megatron_names(self.layout) if stage_of(n, self.layout, self.stages) == self.stage]

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[rows, width, vocab / TP]``: this rank's slice of the (padded) vocabulary; for
        a sequence scorer, the final hidden states ``[rows, width, hidden]`` (before ``score``)."""
        logits: Tensor = self.gpt(input_ids, position_ids, attention_mask)
        return logits

    def parameter(self, name: str) -> Tensor:
        """The parameter holding this rank's shard of the conversion's (whole-model) ``name``."""
        if name == "score.weight" and self.score is not None:
            return self.score.weight
        params = dict(self.gpt.named_parameters())
        return params[self.local_name(name)]

    def norms(self) -> set[int]:
        """ids of the norms' weights (whole on every TP rank), and of LoRA adapter matrices
        marked whole (``align_megatron.lora``: they too compute on a part of the sequence with
        sequence parallelism). Decided from the names: megatron marks shards only when it
        initialises them itself."""
        return {
            id(p)
            for name, p in self.gpt.named_parameters()
            if "layernorm" in name or "layer_norm" in name or getattr(p, REPLICATED_ADAPTER, False)
        }

    def replicated(self) -> set[int]:
        """ids of the parameters every TP rank holds whole (the norms, a score head); the rest
        are shards."""
        head = {id(p) for p in self.score.parameters()} if self.score is not None else set()
        return self.norms() | head

    def local_name(self, name: str) -> str:
        """The module's name for the conversion's (local-spec, whole-model) parameter name: the
        stage's own layer number, and TransformerEngine's fused norm names where it runs."""
        name = stage_local_name(name, self.layout, self.stages)
        parts = name.split(".", 3)  # decoder, layers, i, the layer's own name
        if not self.uses_te or len(parts) < 4 or parts[3] not in TE_NAMES:
            return name
        return ".".join([*parts[:3], TE_NAMES[parts[3]]])


class MegatronBackend:
    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.cfg: MegatronBackendConfig = run.backend  # type: ignore[assignment]
        if run.trainer.precision == "bf16_mixed" and cpu_only():
            # Megatron's linear layers replay their backward outside autocast in the weights'
            # dtype: on CPU the autocast (bfloat16) activations' gradients then meet float32
            # weights and the matmul fails.
            raise ConfigError(
                "trainer.precision: bf16_mixed does not run on backend megatron without a GPU; use "
                "fp32, or bf16 (bfloat16 weights)"
            )
        self.distributed_optimizer = self.cfg.uses_distributed_optimizer(run)
        # The distributed optimizers this backend built, by id of their model.
        self._distributed: dict[int, MegatronDistributedOptimizer] = {}
        self.par: Parallelism = initialize(
            self.cfg.tensor_model_parallel_size,
            self.cfg.pipeline_model_parallel_size,
            self.cfg.sequence_parallel,
        )
        # HF models are the starting point (and the tokenizer), built by the core on the CPU:
        # they are only read once, into the megatron model on its own device.
        self.tokenizer = load_hf_tokenizer(run.model)
        self._tokenizers: dict[str, Any] = {_tokenizer_source(run.model): self.tokenizer}
        self.is_main = self.par.is_main

    # ---- building ------------------------------------------------------------------------
    def build_model(self, role: str, model: ModelConfig | None = None) -> nn.Module:
        """Causal LMs for ``policy``/``reference``, one-head sequence scorers for
        ``reward``/``critic`` (the hf backend's models, converted); ``reference`` and ``reward``
        are frozen and in eval mode."""
        if role not in (*CAUSAL_ROLES, *SCORER_ROLES):
            raise ConfigError(
                f"backend: megatron: unknown model role '{role}'; roles: "
                f"{', '.join((*CAUSAL_ROLES, *SCORER_ROLES))}"
            )
        cfg = model or self.run.model
        folder = _safetensors_folder(hf_model_source(cfg)) if role in CAUSAL_ROLES else None
        if is_distributed_checkpoint(cfg.path):
            built = self._from_checkpoint(Path(cfg.path), DTYPES[cfg.dtype], 1 if role in SCORER_ROLES else 0)
        elif folder is not None and not _is_scorer(hf_config := _hf_config(folder)):
            built = self._from_safetensors(folder, hf_config, cfg)
        else:
            hf_model = build_hf_model(role, cfg, self.tokenizer_for(cfg), HF_ATTENTION)
            built = self._converted(hf_model, DTYPES[cfg.dtype])
        if role in FROZEN_ROLES:
            built.eval()
            built.requires_grad_(False)
        return built

    def build_scorer(self, num_labels: int, label_names: Sequence[str] | None = None) -> nn.Module:
        """``align.ScoringBackend``: a trainable sequence scorer with ``num_labels`` heads (the hf
        backend's ``LlamaForSequenceClassification`` for the run's model, converted)."""
        cfg = self.run.model
        if is_distributed_checkpoint(cfg.path):
            return self._from_checkpoint(Path(cfg.path), DTYPES[cfg.dtype], num_labels)
        hf_model = build_hf_scorer(cfg, self.tokenizer, num_labels, label_names, HF_ATTENTION)
        return self._converted(hf_model, DTYPES[cfg.dtype])

    def _from_safetensors(self, folder: Path, hf_config: Any, cfg: ModelConfig) -> MegatronModel:
        """The causal LM in an HF folder of safetensors files, each rank reading only the rows or
        columns of its own shards (``get_slice``): no rank builds the whole HF model. Holds the
        same weights, bit for bit, as converting the HF model ``build_hf_model`` loads."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        # What the HF model the other path converts would carry: its class, the tokenizer's pad.
        hf_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf_config.model_type]]
        hf_config.pad_token_id = self.tokenizer_for(cfg).pad_token_id
        hf_config.dtype = DTYPES[cfg.dtype]
        layout = layout_of(hf_config)
        built = self._empty_model(layout, hf_config, DTYPES[cfg.dtype])
        self._load(built, safetensors_weights(folder, layout.tied_embeddings))
        return built

    def tokenizer_for(self, model: ModelConfig | None = None) -> Any:
        """The tokenizer of a model section (the run's own tokenizer when they share one)."""
        cfg = model or self.run.model
        source = _tokenizer_source(cfg)
        if source not in self._tokenizers:
            self._tokenizers[source] = load_hf_tokenizer(cfg)
        return self._tokenizers[source]

    def _from_checkpoint(self, path: Path, dtype: torch.dtype, num_labels: int) -> MegatronModel:
        """The model a distributed checkpoint (``save_checkpoint_weights``: a run's
        ``checkpoints/step_N/model``) holds, read at this run's TP/PP: a causal LM
        (``num_labels`` 0) or a sequence scorer with ``num_labels`` heads, as the HF config
        saved beside the shards says it is."""
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(path)
        layout = layout_of(hf_config)
        saved_labels = hf_config.num_labels if _is_scorer(hf_config) else 0
        if saved_labels != num_labels:
            held = f"a {saved_labels}-label sequence scorer" if saved_labels else "a causal LM"
            wanted = f"a {num_labels}-label sequence scorer" if num_labels else "a causal LM"
            raise ConfigError(f"model.path: {path} holds {held}; this role needs {wanted}")
        if num_labels:
            layout = replace(layout, tied_embeddings=False, num_labels=num_labels)
        built = self._empty_model(layout, hf_config, dtype)
        self.load_checkpoint_weights(built, path)
        return built

    def _converted(self, hf_model: Any, dtype: torch.dtype) -> MegatronModel:
        """A megatron model holding ``hf_model``'s weights (a causal LM, or a sequence
        classifier: its ``score`` head kept, no output layer)."""
        layout = layout_of(hf_model.config)
        hf_state = hf_model.state_dict()
        head = getattr(hf_model, "score", None)
        if isinstance(head, nn.Linear):
            if head.bias is not None:
                raise ConfigError("backend: megatron: a score head with a bias is not converted")
            layout = replace(layout, tied_embeddings=False, num_labels=head.out_features)
        elif layout.tied_embeddings:
            hf_state.setdefault("lm_head.weight", hf_state["model.embed_tokens.weight"])
        # What transformers writes on save, so the export loads with the Auto classes.
        hf_model.config.architectures = [type(hf_model).__name__]
        built = self._empty_model(layout, hf_model.config, dtype)
        self._load(built, hf_state.__getitem__)
        return built

    def build_policy(self) -> nn.Module:
        return self.build_model("policy")

    def build_reference(self) -> nn.Module:
        return self.build_model("reference")

    def _empty_model(self, layout: LlamaLayout, hf_config: Any, dtype: torch.dtype) -> MegatronModel:
        gpt = build_gpt(layout, self.par, dtype, self.cfg.sequence_parallel)
        uses_te = transformer_engine_available()
        score = None
        if layout.is_scorer and self.par.last_stage:
            score = nn.Linear(
                layout.hidden_size, layout.num_labels, bias=False, dtype=dtype, device=self.par.device
            )
        return MegatronModel(gpt, layout, hf_config, uses_te, self.par.pp, self.par.pp_rank, score)

    def _load(self, model: MegatronModel, hf: Callable[[str], Tensor] | HFWeights) -> None:
        """Set this rank's shards from the HF weights ``hf`` (whole tensors by name, or an
        ``HFWeights`` that reads only each shard's part)."""
        with torch.no_grad():
            for name in model.held_names():
                shard = megatron_shard(name, hf, model.layout, self.par.tp_rank, self.par.tp)
                target = model.parameter(name)
                if target.shape != shard.shape:
                    raise RuntimeError(
                        f"{name}: converted shard {tuple(shard.shape)} != {tuple(target.shape)}"
                    )
                target.copy_(shard)

    # ---- weights out -----------------------------------------------------------------------
    def named_weights(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        """HF-named full tensors, one megatron tensor at a time: gathered over the TP group on
        the stage that holds it, then broadcast from that stage over the pipeline group (every
        rank takes part in each step and gets the whole tensor)."""
        from megatron.core import parallel_state as ps

        meg = _megatron(model)
        group = ps.get_tensor_model_parallel_group()
        for name in megatron_names(meg.layout):
            shards: list[Tensor] = []
            if stage_of(name, meg.layout, self.par.pp) == self.par.pp_rank:
                local = meg.parameter(name).detach().contiguous()
                shards = [torch.empty_like(local) for _ in range(self.par.tp)]
                if self.par.tp > 1:
                    dist.all_gather(shards, local, group=group)
                else:
                    shards = [local]
            if self.par.pp > 1:
                dtype = next(meg.gpt.parameters()).dtype
                shards = _from_stage(shards, stage_of(name, meg.layout, self.par.pp), self.par, dtype)
            yield from hf_tensors(name, [s.cpu() for s in shards], meg.layout)

    def save_pretrained(self, model: nn.Module, path: Path) -> None:
        """An HF checkpoint (safetensors, config, tokenizer) of the whole model, written by the
        main rank only (checkpoints and final/ are shared folders); every rank must call it (the
        gathers are collective)."""
        self._write_hf(model, path, every_rank=False)

    def save_merged(self, model: nn.Module, path: Path) -> None:
        """The same HF folder, written by every rank to its own ``path``: what a rollout engine
        starts from (each rank runs its own engine, from a folder of its own)."""
        self._write_hf(model, path, every_rank=True)

    def _write_hf(self, model: nn.Module, path: Path, every_rank: bool) -> None:
        meg = _megatron(model)
        state = {name: tensor.contiguous() for name, tensor in self.named_weights(model)}
        if not (self.is_main or every_rank):
            return
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        meg.hf_config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load an HF checkpoint written by ``save_pretrained`` into this rank's shards (each
        rank reads only its shards' rows or columns of the safetensors files)."""
        meg = _megatron(model)
        self._load(meg, safetensors_weights(path, meg.layout.tied_embeddings))

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        """A checkpoint's weights as megatron-core's distributed checkpoint (torch_dist) in
        ``path``: every rank writes its own shards (replicas once), with metadata placing each
        shard in the whole tensor, so ``load_checkpoint_weights`` reads it at another TP or PP;
        beside it, the model's HF ``config.json``. Every rank must call it (it is collective)."""
        from megatron.core import dist_checkpointing

        meg = _megatron(model)
        path.mkdir(parents=True, exist_ok=True)
        with cpu_checkpoint_writer():
            dist_checkpointing.save(_sharded_state(meg), str(path))
        if self.is_main:
            # What model the shards are of (the HF config the export would have) and its
            # tokenizer: the folder is then a ``model.path`` this backend builds from.
            meg.hf_config.save_pretrained(path)
            self.tokenizer.save_pretrained(path)

    def load_checkpoint_weights(self, model: nn.Module, path: Path) -> None:
        """Load weights ``save_checkpoint_weights`` wrote, at any TP/PP (each rank reads the part
        of every tensor it holds), or an HF checkpoint (what older checkpoints hold)."""
        from megatron.core import dist_checkpointing

        meg = _megatron(model)
        if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
            self.load_weights(model, path)
            return
        loaded = dist_checkpointing.load(_sharded_state(meg), str(path))
        with torch.no_grad():
            if meg.score is not None:
                meg.score.weight.copy_(loaded.pop("score.weight"))
            meg.gpt.load_state_dict(loaded, strict=True)

    def save_checkpoint_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path
    ) -> bool:
        """The optimizer state of ``model``'s parameters (each rank's for its shards) as a
        distributed checkpoint in ``path``, sharded like the parameters
        (``align_megatron.optimizer_state``), so ``load_checkpoint_optimizer`` reads it at another
        TP or PP; the distributed optimizer's through megatron's own ``sharded_state_dict``.
        Collective. False (nothing written) for a model that is not one of this backend's, or an
        optimizer of parameters it does not hold."""
        from megatron.core import dist_checkpointing

        if not isinstance(model, MegatronModel):
            return False
        if isinstance(optimizer, MegatronDistributedOptimizer):
            optimizer.save(_sharded_state(model), parallel_layout(self.par), path)
            return True
        state = sharded_optimizer_state(optimizer, _sharded_state(model), self.par)
        if state is None:
            return False
        path.mkdir(parents=True, exist_ok=True)
        with cpu_checkpoint_writer():
            dist_checkpointing.save(state, str(path))
        return True

    def load_checkpoint_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path
    ) -> None:
        """Load what ``save_checkpoint_optimizer`` wrote, at this run's TP/PP (a changed
        data-parallel size is a config error); the distributed optimizer's at its own layout."""
        if isinstance(optimizer, MegatronDistributedOptimizer):
            optimizer.load(_sharded_state(_megatron(model)), parallel_layout(self.par), path)
            return
        load_optimizer_state(optimizer, _sharded_state(_megatron(model)), self.par, path)

    # ---- the optimizer ---------------------------------------------------------------------
    def build_optimizer(
        self, module: nn.Module, params: Sequence[nn.Parameter], optim: OptimConfig
    ) -> torch.optim.Optimizer | None:
        """With ``distributed_optimizer``: megatron-core's distributed optimizer for a model this
        backend built (``align_megatron.distributed_optimizer``); None (the learner's
        torch.optim) otherwise."""
        if not self.distributed_optimizer or not isinstance(module, MegatronModel):
            return None
        from megatron.core import parallel_state as ps

        sequence_parallel = self.cfg.sequence_parallel and self.par.tp > 1
        norms = module.norms() if sequence_parallel else set()
        replicated = module.replicated()
        for param in params:
            # megatron marks its shards only where it initialises them itself (not here: the
            # weights come from HF); its gradient norm counts an unmarked parameter on TP rank 0
            # only, as a copy held whole by every TP rank.
            if id(param) not in replicated and not hasattr(param, "tensor_model_parallel"):
                param.tensor_model_parallel = self.par.tp > 1  # type: ignore[attr-defined]
        dtype = params[0].dtype if params else torch.float32
        optimizer = MegatronDistributedOptimizer(
            module,
            optimizer_config(optim, dtype, self.run.trainer.max_grad_norm),
            module.gpt.config,
            [p for p in params if id(p) in norms],
            ps.get_tensor_model_parallel_group(),
        )
        self._distributed[id(module)] = optimizer
        return optimizer

    # ---- gradients ------------------------------------------------------------------------
    def finish_gradients(
        self, module: nn.Module, params: Sequence[nn.Parameter], max_norm: float | None
    ) -> float:
        """Sum the gradients over the DP group, then return the global gradient norm (over every
        TP shard, replicated weights counted once), clipping to ``max_norm`` when set: the
        learner calls this between the backward passes and the optimizer step. With the
        distributed optimizer, megatron's DDP and optimizer do it (each rank its slice)."""
        from megatron.core import parallel_state as ps

        distributed = self._distributed.get(id(module))
        if distributed is not None:
            return distributed.finish(max_norm)
        meg = _megatron(module)
        replicated = meg.replicated()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.par.dp > 1 and grads:
            grads = _sum_gradients(params, grads, ps.get_data_parallel_group())
        if self.cfg.sequence_parallel and self.par.tp > 1:
            # Each TP rank ran the norms on its part of the sequence: a replicated weight's
            # gradient is the sum of the ranks' parts.
            # (Not a score head: it read the all-gathered, whole sequence.)
            norm_ids = meg.norms()
            norms = [i for i, p in enumerate(params) if id(p) in norm_ids]
            if norms:
                group = ps.get_tensor_model_parallel_group()
                summed = _sum_gradients([params[i] for i in norms], [grads[i] for i in norms], group)
                for i, grad in zip(norms, summed, strict=True):
                    grads[i] = grad
        # A replicated weight's gradient is the same on every TP rank: counted on rank 0 only.
        owned = [
            g for p, g in zip(params, grads, strict=True) if id(p) not in replicated or self.par.tp_rank == 0
        ]
        squares = torch.zeros((), dtype=torch.float64, device=self.par.device)
        for grad in owned:
            squares += grad.detach().double().pow(2).sum()
        if self.par.tp > 1:
            dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
        if self.par.pp > 1:  # each stage holds its own layers
            dist.all_reduce(squares, group=ps.get_pipeline_model_parallel_group())
        norm = float(squares.sqrt())
        if max_norm and grads:
            coef = min(1.0, max_norm / (norm + 1e-6))
            for grad in grads:
                grad.mul_(coef)
        return norm

    # ---- scoring --------------------------------------------------------------------------
    def sequence_logps(self, model: nn.Module, batch: TokenBatch) -> SequenceLogps:
        values, owners, _ = self._scored(model, batch, with_entropy=False)
        sums = values.new_zeros(batch.num_sequences).index_add(0, owners, values)
        counts = torch.bincount(
            batch.sequence_ids[:, 1:][batch.loss_mask[:, 1:]], minlength=batch.num_sequences
        )
        # Summed over ranks on the GPU (NCCL), then back where the batch came from, as the hf
        # backend returns them: losses meet cached reference sums and rewards there.
        return SequenceLogps(_sum_over_data_parallel(sums, self.par).to(counts.device), counts)

    def token_logps(self, model: nn.Module, batch: TokenBatch, *, with_entropy: bool = False) -> TokenLogps:
        values, owners, entropy = self._scored(model, batch, with_entropy)
        return self._per_token(batch, values, owners, entropy)

    def sequence_scores(self, model: nn.Module, batch: TokenBatch) -> Tensor:
        """``align.ScoringBackend``: ``[num_sequences, num_labels]`` float32 scores, the score
        head read at each sequence's last token that is not the pad token (where transformers'
        sequence classifiers read it), padded or packed."""
        meg = _scorer(model)
        return self._outside_inference_mode(lambda: self._sequence_scores(meg, batch))

    def token_scores(self, model: nn.Module, batch: TokenBatch) -> TokenLogps:
        """``align.TokenScoringBackend`` (a critic's values): head 0 read at the position before
        each token under ``loss_mask``, in ``token_logps``'s layout."""
        meg = _scorer(model)
        return self._outside_inference_mode(lambda: self._token_scores(meg, batch))

    def _per_token(
        self, batch: TokenBatch, values: Tensor, owners: Tensor, entropy: Tensor | None
    ) -> TokenLogps:
        """This DP rank's flat per-token ``values`` (and entropies) of the scored tokens, laid
        out as ``[num_sequences, longest]``, left-aligned, and summed over the DP group."""
        scored = batch.loss_mask[:, 1:]
        owners_all = batch.sequence_ids[:, 1:][scored]
        counts = torch.bincount(owners_all, minlength=batch.num_sequences)
        width = int(counts.max()) if counts.numel() else 0
        mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
        positions_all = _positions_in_sequence(owners_all, batch.num_sequences)
        rows_all = torch.arange(scored.shape[0], device=scored.device)[:, None].expand_as(scored)[scored]
        mine = torch.isin(rows_all, self._my_rows(batch)[0])
        positions = positions_all[mine].to(owners.device)

        def laid_out(flat: Tensor) -> Tensor:
            grid = flat.new_zeros(batch.num_sequences, width).index_put((owners, positions), flat)
            return _sum_over_data_parallel(grid, self.par).to(mask.device)

        return TokenLogps(laid_out(values), mask, laid_out(entropy) if entropy is not None else None)

    def _my_rows(self, batch: TokenBatch) -> tuple[Tensor, float]:
        """This DP rank's rows of the global batch (and 0.0 for a rank with none: it runs row 0
        with zero weight, so its graph and collectives match the others')."""
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        mine = rows[self.par.dp_rank :: self.par.dp]
        return (mine, 1.0) if mine.numel() else (rows[:1], 0.0)

    def _outside_inference_mode(self, compute: Callable[[], Any]) -> Any:
        """``compute()``, never in inference mode: megatron-core reuses one global buffer
        (sequence parallelism's all-gathers) that, made in inference mode (a cached reference
        pass), could not be written by a later training step."""
        if not torch.is_inference_mode_enabled():
            return compute()
        with torch.inference_mode(False), torch.no_grad():
            return compute()

    def _scored(
        self, model: nn.Module, batch: TokenBatch, with_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Log-probs (and entropies) of this DP rank's scored tokens, flat in row-major order,
        with the sequence each belongs to."""
        result: tuple[Tensor, Tensor, Tensor | None] = self._outside_inference_mode(
            lambda: self._score(model, batch, with_entropy)
        )
        return result

    def _score(
        self, model: nn.Module, batch: TokenBatch, with_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        meg = _megatron(model)
        rows, weight = self._my_rows(batch)
        ids = batch.input_ids[rows].to(self.par.device)
        width = ids.shape[1]
        scored = batch.loss_mask[rows][:, 1:].to(self.par.device)
        targets = ids[:, 1:][scored]
        owners = batch.sequence_ids[rows].to(self.par.device)[:, 1:][scored]
        count = targets.numel()

        def from_logits(logits: Tensor) -> Tensor:
            logps, entropy = vocab_parallel_logps(
                logits[:, : width - 1][scored], targets, meg.layout.vocab_size, self.par.tp_rank, with_entropy
            )
            return logps if entropy is None else torch.cat([logps, entropy])

        result = self._forward(
            meg, self._model_inputs(batch, rows), from_logits, count * (2 if with_entropy else 1)
        )
        logps, entropy = (result[:count], result[count:]) if with_entropy else (result, None)
        if weight != 1.0:
            logps = logps * weight
            entropy = entropy * weight if entropy is not None else None
        return logps, owners, entropy

    def _sequence_scores(self, meg: MegatronModel, batch: TokenBatch) -> Tensor:
        rows, weight = self._my_rows(batch)
        width = batch.input_ids.shape[1]
        last = last_token_positions(batch, getattr(meg.hf_config, "pad_token_id", None))
        # Where each sequence's last token sits among this rank's rows (-1: another rank's).
        local_row = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=rows.device)
        local_row[rows] = torch.arange(rows.numel(), device=rows.device)
        at_row = local_row[last // width]
        here = (at_row >= 0).nonzero().squeeze(-1)
        at_row, at_col = at_row[here].to(self.par.device), (last[here] % width).to(self.par.device)
        labels = meg.layout.num_labels

        def read(hidden: Tensor) -> Tensor:
            assert meg.score is not None  # the last stage holds the head
            return meg.score(hidden[at_row, at_col]).float()

        scores = self._forward(meg, self._model_inputs(batch, rows), read, here.numel() * labels)
        scores = scores.reshape(-1, labels) * weight if weight != 1.0 else scores.reshape(-1, labels)
        full = scores.new_zeros(batch.num_sequences, labels).index_put((here.to(self.par.device),), scores)
        return _sum_over_data_parallel(full, self.par).to(batch.input_ids.device)

    def _token_scores(self, meg: MegatronModel, batch: TokenBatch) -> TokenLogps:
        rows, weight = self._my_rows(batch)
        width = batch.input_ids.shape[1]
        scored = batch.loss_mask[rows][:, 1:].to(self.par.device)
        owners = batch.sequence_ids[rows].to(self.par.device)[:, 1:][scored]

        def read(hidden: Tensor) -> Tensor:
            assert meg.score is not None  # the last stage holds the head
            return meg.score(hidden[:, : width - 1][scored])[:, 0].float()

        values = self._forward(meg, self._model_inputs(batch, rows), read, owners.numel()).reshape(-1)
        return self._per_token(batch, values * weight if weight != 1.0 else values, owners, None)

    def _model_inputs(self, batch: TokenBatch, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The GPTModel's inputs for ``rows`` of the batch: token ids, positions and the
        attention mask, the width padded to a multiple of TP with sequence parallelism (which
        splits it evenly over the TP ranks)."""
        ids = batch.input_ids[rows].to(self.par.device)
        seq = batch.sequence_ids[rows].to(self.par.device)
        positions = (
            batch.position_ids[rows].to(self.par.device)
            if batch.position_ids is not None
            else torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        )
        extra = (-ids.shape[1]) % self.par.tp if self.cfg.sequence_parallel else 0
        if extra:
            ids, positions = (F.pad(t, (0, extra)) for t in (ids, positions))
            seq = F.pad(seq, (0, extra), value=-1)  # a sequence of its own, never scored
        return ids, positions, _attention_mask(seq)

    def _forward(
        self,
        meg: MegatronModel,
        inputs: tuple[Tensor, Tensor, Tensor],
        read: Callable[[Tensor], Tensor],
        numel: int,
    ) -> Tensor:
        """``read`` of the model's output (the logits, or a scorer's hidden states) on
        ``inputs``; with pipeline stages, run through them (see ``align_megatron.pipeline``),
        and every stage gets the last stage's ``numel`` values (flat)."""
        if self.par.pp == 1:
            return read(meg(*inputs))
        rows, width = inputs[0].shape
        # Megatron's hidden states between stages: [sequence (split over TP with sequence
        # parallelism), rows, hidden].
        length = width // self.par.tp if self.cfg.sequence_parallel else width
        hidden_shape = (length, rows, meg.layout.hidden_size)
        return run_stages(meg.gpt, inputs, hidden_shape, read, numel, self.cfg.micro_batches)


def _sum_gradients(params: Sequence[nn.Parameter], grads: Sequence[Tensor], group: Any) -> list[Tensor]:
    """The gradients summed over ``group`` in one flat all-reduce, set as the parameters'
    ``.grad``."""
    all_reduce_together(grads, group)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    return list(grads)


def _from_stage(shards: list[Tensor], stage: int, par: Parallelism, dtype: torch.dtype) -> list[Tensor]:
    """The TP shards of one tensor, which pipeline stage ``stage`` holds, on every stage: their
    shapes go first, then each shard (broadcasts over the pipeline group from that stage's
    rank, on the process group's device: NCCL sends no CPU tensors)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    source = dist.get_global_rank(group, stage)
    # Every megatron weight is 1-D or 2-D; -1 marks a missing dimension.
    shapes = torch.full((par.tp, 2), -1, dtype=torch.int64)
    for i, shard in enumerate(shards):
        shapes[i, : shard.dim()] = torch.tensor(shard.shape)
    shapes = shapes.to(par.device)
    dist.broadcast(shapes, src=source, group=group)
    received = []
    for i, dims in enumerate(shapes.tolist()):
        shape = [d for d in dims if d >= 0]
        shard = shards[i] if shards else torch.empty(shape, dtype=dtype, device=par.device)
        dist.broadcast(shard, src=source, group=group)
        received.append(shard)
    return received


def _sharded_state(meg: MegatronModel) -> dict[str, Any]:
    """The model's sharded state dict for ``dist_checkpointing``: megatron-core's own for the
    GPTModel (global layer numbers, TP offsets, replicas marked), and a score head held whole by
    every TP rank."""
    from megatron.core.utils import make_sharded_tensor_for_checkpoint

    gpt: Any = meg.gpt  # a GPTModel (typed as a Module)
    if meg.score is None:
        state: dict[str, Any] = gpt.sharded_state_dict()
        return state
    # A scorer's last stage has no output layer (it hands out hidden states), which megatron's
    # GPTModel would look up when it is the last stage (``post_process``): not while this runs.
    post_process, gpt.post_process = gpt.post_process, False
    try:
        state = gpt.sharded_state_dict()
    finally:
        gpt.post_process = post_process
    state["score.weight"] = make_sharded_tensor_for_checkpoint(meg.score.weight, "score.weight")
    return state


def _tokenizer_source(cfg: ModelConfig) -> str:
    return cfg.tokenizer or cfg.path


def is_distributed_checkpoint(path: str) -> bool:
    """Whether ``path`` (a ``model.path``) is a folder holding a megatron-core distributed
    checkpoint (its ``metadata.json``), not an HF checkpoint."""
    from megatron.core import dist_checkpointing

    folder = Path(path)
    return (folder / "metadata.json").is_file() and bool(
        dist_checkpointing.check_is_distributed_checkpoint(str(folder))
    )


def _safetensors_folder(source: str) -> Path | None:
    """``source`` (a resolved ``model.path``) when it is a local folder of safetensors files."""
    folder = Path(source)
    return folder if folder.is_dir() and any(folder.glob("*.safetensors")) else None


def _hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _is_scorer(hf_config: Any) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in hf_config.architectures or [])


def _megatron(model: nn.Module) -> MegatronModel:
    if not isinstance(model, MegatronModel):
        raise TypeError(f"the megatron backend runs models it built, not {type(model).__name__}")
    return model


def _scorer(model: nn.Module) -> MegatronModel:
    meg = _megatron(model)
    if not meg.layout.is_scorer:
        raise TypeError("a causal LM has no score head: build a scorer (build_scorer, role reward or critic)")
    return meg


def _attention_mask(sequence_ids: Tensor) -> Tensor:
    """``[rows, 1, width, width]``, True where attention is masked: a token sees the earlier
    tokens of its own sequence (padding sees itself, so no row is all masked)."""
    width = sequence_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = (causal & same) | torch.eye(width, dtype=torch.bool, device=sequence_ids.device)
    return ~allowed[:, None]


def vocab_parallel_logps(
    logits: Tensor, targets: Tensor, vocab_size: int, tp_rank: int, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each row's target (and the entropy) from ``[tokens, vocab / TP]`` logits that
    hold this rank's vocabulary slice: the max, the normaliser and the target's logit are
    reduced over the TP group; no rank ever holds all of the vocabulary. Float32."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    part = logits.shape[-1]
    start = tp_rank * part
    ids = torch.arange(start, start + part, device=logits.device)
    logits = torch.where(ids < vocab_size, logits, torch.full_like(logits, MASKED_LOGIT))
    peak = logits.detach().max(dim=-1).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = logits - peak[:, None]
    exp = shifted.exp()
    normaliser = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    local_target = targets - start
    here = (local_target >= 0) & (local_target < part)
    picked = shifted.gather(-1, local_target.clamp(0, part - 1)[:, None]).squeeze(-1)
    target_logit = reduce_from_tensor_model_parallel_region(
        torch.where(here, picked, torch.zeros_like(picked))
    )
    log_z = normaliser.log()
    logps = target_logit - log_z
    if not with_entropy:
        return logps, None
    expected = reduce_from_tensor_model_parallel_region((exp * shifted).sum(-1)) / normaliser
    return logps, log_z - expected


class _SumOverDataParallel(torch.autograd.Function):
    """Forward: the sum over the DP group. Backward: the identity, because every rank computes
    the same loss from the sum, so each rank's share gets exactly the loss's gradient."""

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:
        from megatron.core import parallel_state as ps

        total = local.clone()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _sum_over_data_parallel(local: Tensor, par: Parallelism) -> Tensor:
    if par.dp == 1:
        return local
    total: Tensor = _SumOverDataParallel.apply(local)
    return total


def _positions_in_sequence(owners: Tensor, num_sequences: int) -> Tensor:
    """Each scored token's index within its sequence (a sequence's tokens are contiguous in the
    batch's row-major order)."""
    order = torch.arange(owners.numel(), device=owners.device)
    first = torch.full((num_sequences,), owners.numel(), dtype=order.dtype, device=owners.device)
    first = first.scatter_reduce(0, owners, order, reduce="amin")
    return order - first[owners]
