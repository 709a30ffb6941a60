"""Config base classes. Every config is a strict pydantic model: unknown keys are errors.

A plugin subclasses one of the bases and narrows its discriminator (``name``, or
``format`` for data, ``algo`` for algorithms) to a ``Literal``. The full run config of an
algorithm is assembled at load time from every installed plugin (see ``registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are rejected, values are validated on assignment.

    A run config loaded by the CLI is validated strictly (``align.loading``): ``true`` is not 1,
    ``"3"`` is not 3 and ``2.0`` is not an integer; an integer may stand for a float.
    Infinite and NaN floats are rejected.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@dataclass(frozen=True)
class PathRule:
    """What a path-typed config field must point at. Checked by ``align.loading.check_paths``
    before any model loads (``align run`` and ``align validate``), not during validation, so
    that a config can be validated away from its files."""

    kind: Literal["writable_dir"]


WritableDir = Annotated[Path, AfterValidator(Path.expanduser), PathRule("writable_dir")]
"""A folder align writes into: a writable folder, or one that can be created (not a file, not
below a file, not on a read-only path). ``~`` is expanded when the config is read, as a shell
would, so ``output_dir: ~/runs/x`` never creates a folder named ``~``."""


class PluginConfig(StrictConfig):
    """A registered thing's config, discriminated by ``name``."""

    name: str


class LossConfig(PluginConfig):
    """Base of loss configs. ``weight`` scales the loss inside a weighted sum of losses."""

    weight: float = Field(1.0, ge=0, description="Scale of this loss in a weighted sum (0 switches it off).")


class BackendConfig(PluginConfig):
    """Base of model-backend configs."""

    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Processes on this node; > 1: `align run` starts them under torchrun itself. A "
        "backend without its own parallelism (hf) runs them as data-parallel ranks (align.distributed).",
    )

    def resume_may_change(self, run: RunConfig) -> tuple[str, ...]:
        """Keys of this section a resumed ``run`` may change (``align.resume``): those its
        checkpoints reshard to, weights and optimizer state (a parallel layout). None by default:
        a changed backend section is refused."""
        return ()


class RewardConfig(PluginConfig):
    """Base of reward-source configs."""


class RolloutEngineConfig(PluginConfig):
    """Base of rollout-engine configs."""


class CallbackConfig(PluginConfig):
    """Base of lifecycle-plugin (callback) configs: one entry of a run's ``callbacks:`` list."""


class AdvantageConfig(PluginConfig):
    """Base of advantage-estimator configs (online methods: rewards of each prompt's group of
    samples -> advantages)."""


class DataConfig(StrictConfig):
    """Base of data-format configs, discriminated by ``format``.

    ``train``/``eval`` are JSONL/JSON/Parquet/Arrow files, a saved dataset directory, or a
    hub dataset name (when a network exists). Several files may be given as a list.
    """

    format: str
    train: str | list[str]
    eval: str | list[str] | None = None
    max_length: int = Field(512, gt=0, description="Maximum tokens of prompt + completion.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Rows longer than max_length: 'truncate' the completion or 'drop' the row.",
    )
    max_prompt_length: int | None = Field(
        None, gt=0, description="Prompts longer than this keep their last tokens."
    )
    padding_free: bool = Field(
        False, description="Pack a batch's sequences into one row: no compute on pad tokens."
    )
    group_by_length: bool = Field(
        False,
        description="Batch rows of similar length (sorted within windows of 64 batches of the seeded "
        "order, then batches shuffled): far less padding, same math per batch.",
    )

    @model_validator(mode="after")
    def _prompt_leaves_room(self) -> DataConfig:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be less than data.max_length "
                f"({self.max_length}): a prompt cut to it must leave room for a completion"
            )
        return self


class TinyModelConfig(StrictConfig):
    """Size knobs of the embedded default model (``model.path: tiny``): a small Llama."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    # 2 heads: a head size of 32, the smallest every rollout engine accepts (vLLM rejects 16).
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(176, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    init_seed: int = Field(0, ge=0, description="Seed of the random initial weights.")

    @model_validator(mode="after")
    def _sizes_fit(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.num_heads ({self.num_heads}) must divide model.tiny.hidden_size "
                f"({self.hidden_size})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"model.tiny.hidden_size / num_heads ({self.hidden_size // self.num_heads}) must be even "
                "(rotary position embeddings rotate pairs of dimensions)"
            )
        return self


class LoraConfig(StrictConfig):
    """LoRA adapters on a model section (``model.lora``): the model's own weights are frozen and
    only the low-rank adapters (and ``modules_to_save``) train; the reference policy is the same
    model with its adapters off. Applied by the ``align-lora`` plugin (peft) on the ``hf``
    backend and by ``align-megatron`` itself on the ``megatron`` backend, which adapts whole
    fused layers (q/k/v together, gate/up together) and refuses a regular expression,
    ``modules_to_save`` and TransformerEngine's layer spec (docs/lora.md). A trained sequence
    scorer (a reward model, PPO's critic) gets adapters on its trunk and trains its head in full,
    on both. Any other backend refuses ``model.lora``."""

    r: int = Field(16, gt=0, description="Rank of each adapter (peft's r).")
    alpha: int = Field(32, gt=0, description="Scale: an adapter's update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules given adapters: 'all-linear' (every linear layer but the output head), "
        "a list of module names (q_proj, v_proj...), or a regular expression over full names (hf "
        "only; megatron takes whole fused layers: q_proj, k_proj and v_proj together, gate_proj and "
        "up_proj together).",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head); "
        "a scorer's head is always trained. hf backend only.",
    )


class ModelConfig(StrictConfig):
    """The policy model: ``tiny`` (embedded default, built in code), an HF path/directory, a
    ``.gguf`` file (dequantized once and cached as safetensors) or a named shortcut such as
    ``smollm2-135m`` (see the backend's docs for the shortcuts it knows)."""

    path: str = Field(
        "tiny",
        description="tiny, an HF hub id or folder, a .gguf file, or a shortcut (smollm2-135m).",
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside the folder (or hub repo) model.path, as transformers' gguf_file; "
        "the same as giving model.path=<folder>/<file>.gguf.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to model.path.")
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny: TinyModelConfig = TinyModelConfig()
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters instead of the weights: on the hf backend (needs the align-lora "
        "plugin) and the megatron backend (whole fused layers; no regular expression or "
        "modules_to_save there).",
    )

    @model_validator(mode="after")
    def _gguf_file_needs_a_folder(self) -> ModelConfig:
        if self.gguf_file is not None and (self.path == "tiny" or self.path.endswith(".gguf")):
            raise ValueError(
                f"model.gguf_file ({self.gguf_file}) names a file inside the folder model.path, "
                f"but model.path is '{self.path}'"
            )
        return self


class TrainerConfig(StrictConfig):
    """The shared trainer loop."""

    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; when unset, run `epochs` epochs.")
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="Examples (pairs, for preference data) per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only before and after training.")
    eval_batch_size: int | None = Field(None, gt=0)
    save_every: int = Field(0, ge=0, description="0: checkpoint only at the end.")
    keep_checkpoints: int = Field(2, gt=0)
    tensorboard: bool | Literal["auto"] = "auto"
    progress: bool | Literal["auto"] = "auto"
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads on CPU.")
    flush_denormals: bool = Field(
        True,
        description="On CPU, compute with float32 values below the normal range (~1e-38) as zero "
        "(torch.set_flush_denormal). A saturated loss's tiny gradients otherwise made steps 3-15x "
        "slower. No effect on GPUs.",
    )
    precision: Literal["fp32", "bf16_mixed", "bf16"] = Field(
        "fp32",
        description="fp32: everything in float32. bf16_mixed: forward passes under bfloat16 autocast, "
        "float32 weights and optimizer state (the usual mixed precision). bf16: the weights "
        "themselves in bfloat16 (what model.dtype: bfloat16 also says). Log-probs and losses are "
        "float32 in every mode.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainerConfig:
        # With `epochs` the run's length is known only once the data is loaded.
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"trainer.warmup_steps ({self.warmup_steps}) is longer than the run "
                f"(trainer.max_steps={self.max_steps}): the learning rate would never reach optim.lr"
            )
        return self


class OptimConfig(StrictConfig):
    """Optimizer (torch.optim)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's decay rates, each in [0, 1).")
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"each of optim.betas must be in [0, 1), got {list(value)}")
        return value


class RunConfig(StrictConfig):
    """Keys every run has. An algorithm's config subclasses this and narrows ``algo``.

    Every field typed with a plugin-kind base (``backend``, ``data``, ``callbacks`` here; an
    algorithm's ``loss``, ``reward``, ``rollout``...) is widened at load time to the union of
    the installed plugins of that kind (``align.loading.run_config_class``).
    """

    algo: str
    output_dir: WritableDir = Path("runs/latest")
    seed: int = Field(0, ge=0)
    resume: bool | Literal["auto"] | Path = Field(
        False,
        description="true (--resume): continue from the newest usable checkpoint in output_dir, an "
        "error if there is none; 'auto': resume when possible, else start a new run (an earlier "
        "run's outputs still need overwrite=true); or the path of a checkpoint folder.",
    )
    overwrite: bool = Field(
        False, description="Start over in an output_dir that holds an earlier run (deletes its outputs)."
    )
    model: ModelConfig = ModelConfig()
    backend: BackendConfig
    data: DataConfig
    trainer: TrainerConfig = TrainerConfig()
    optim: OptimConfig = OptimConfig()
    callbacks: list[CallbackConfig] = Field(
        default_factory=list,
        description="Lifecycle plugins this run enables, each with its own config, e.g. "
        "[{name: early_stopping, metric: loss, patience: 3}].",
    )

    @model_validator(mode="after")
    def _one_precision(self) -> RunConfig:
        """``trainer.precision`` says how a run computes; ``model.dtype`` is the weights' storage
        dtype that follows from it (pure bf16 stores bfloat16 weights, the others float32). Either
        may be given alone; both given must agree."""
        weights = weights_dtype(self.trainer.precision)
        if weights == self.model.dtype:
            return self
        said_precision = "precision" in self.trainer.model_fields_set
        said_dtype = "dtype" in self.model.model_fields_set
        if said_precision and said_dtype:
            raise ValueError(
                f"trainer.precision={self.trainer.precision} keeps {weights} weights but model.dtype is "
                f"{self.model.dtype}: say it once, with trainer.precision (fp32, bf16_mixed, or bf16 "
                f"for bfloat16 weights), and drop model.dtype"
            )
        if said_precision or self.trainer.precision != "fp32":
            self.model = self.model.model_copy(update={"dtype": weights})
        else:  # model.dtype: bfloat16 alone: pure bf16
            self.trainer = self.trainer.model_copy(update={"precision": "bf16"})
        return self

    @field_validator("output_dir", mode="before")
    @classmethod
    def _a_folder_of_its_own(cls, value: object) -> object:
        """A run writes checkpoints/, final/, metrics.jsonl into output_dir (and overwrite=true
        deletes them): never into the working directory or above it. An absolute path that is
        the working directory is refused when the run starts (``align.trainer``)."""
        text = str(value).strip() if isinstance(value, (str, Path)) else None
        if text == "":
            raise ValueError("is empty: name a folder for this run's outputs, e.g. runs/my-run")
        if text is not None and not Path(text).is_absolute() and set(Path(text).parts) <= {".", ".."}:
            raise ValueError(
                f"{text!r} is the working directory or a folder above it: a run needs a folder of its "
                f"own, e.g. runs/my-run"
            )
        return value


def weights_dtype(precision: str) -> Literal["float32", "bfloat16"]:
    """The dtype a trainer precision stores the weights in (``model.dtype``)."""
    return "bfloat16" if precision == "bf16" else "float32"
