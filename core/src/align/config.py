"""Config base classes. Every config is a strict pydantic model: unknown keys are errors.

A plugin subclasses one of the bases and narrows its discriminator (``name``, or
``format`` for data, ``algo`` for algorithms) to a ``Literal``. The full run config of an
algorithm is assembled at load time from every installed plugin (see ``registry``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginConfig(StrictConfig):
    """A registered thing's config, discriminated by ``name``."""

    name: str


class LossConfig(PluginConfig):
    """Base of loss configs. ``weight`` scales the loss inside a weighted sum of losses."""

    weight: float = 1.0


class BackendConfig(PluginConfig):
    """Base of model-backend configs."""


class RewardConfig(PluginConfig):
    """Base of reward-source configs."""


class RolloutEngineConfig(PluginConfig):
    """Base of rollout-engine configs."""


class CallbackConfig(PluginConfig):
    """Base of lifecycle-plugin (callback) configs: one entry of a run's ``callbacks:`` list."""


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


class TinyModelConfig(StrictConfig):
    """Size knobs of the embedded default model (``model.path: tiny``): a small Llama."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(176, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    init_seed: int = Field(0, description="Seed of the random initial weights.")


class ModelConfig(StrictConfig):
    """The policy model: ``tiny`` (embedded default, built in code) or an HF path/directory."""

    path: str = "tiny"
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to model.path.")
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny: TinyModelConfig = TinyModelConfig()


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


class OptimConfig(StrictConfig):
    """Optimizer (torch.optim)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class RunConfig(StrictConfig):
    """Keys every run has. An algorithm's config subclasses this and narrows ``algo``.

    Every field typed with a plugin-kind base (``backend``, ``data``, ``callbacks`` here; an
    algorithm's ``loss``, ``reward``, ``rollout``...) is widened at load time to the union of
    the installed plugins of that kind (``align.loading.run_config_class``).
    """

    algo: str
    output_dir: Path = Path("runs/latest")
    seed: int = 0
    resume: bool | Literal["auto"] | Path = Field(
        False, description="true/'auto': continue from the newest checkpoint in output_dir."
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
