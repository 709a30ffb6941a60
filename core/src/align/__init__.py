"""align: the public API. A plugin (built-in or third-party) imports only what is here."""

from align.algorithm import Algorithm, Context
from align.batches import (
    LossOutput,
    PairedTokens,
    PreferenceBatch,
    SequenceLogps,
    SFTTokens,
    TokenBatch,
    UnpairedBatch,
)
from align.builtin.data import Encoder, TokenizedFormat
from align.config import (
    BackendConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PluginConfig,
    RewardConfig,
    RolloutEngineConfig,
    RunConfig,
    StrictConfig,
    TinyModelConfig,
    TrainerConfig,
)
from align.datafiles import row_error, text_or_messages
from align.errors import ConfigError, DataError, TrainingDiverged, UserError
from align.hookspecs import hookimpl
from align.layout import lay_out, pack_sequences, pad_sequences, row_lengths
from align.losses import LossFn, combine_losses, pairwise_accuracy, resolve_losses
from align.plugins import Plugins, default_plugins, load_plugins
from align.protocols import Backend, DataFormat, RewardSource, ScoringBackend
from align.registry import Entry, Register, Registry
from align.rollout import Completion, EngineError, EngineSpec, NamedWeights, RolloutEngine, SamplingConfig
from align.trainer import RunInfo, RunResult, train

__version__ = "0.1.0"

__all__ = [
    "SamplingConfig",
    "RolloutEngine",
    "NamedWeights",
    "EngineSpec",
    "EngineError",
    "Completion",
    "Algorithm",
    "Backend",
    "BackendConfig",
    "ConfigError",
    "Context",
    "DataConfig",
    "DataError",
    "DataFormat",
    "Encoder",
    "Entry",
    "LossConfig",
    "LossFn",
    "LossOutput",
    "ModelConfig",
    "OptimConfig",
    "PairedTokens",
    "PluginConfig",
    "Plugins",
    "PreferenceBatch",
    "Register",
    "Registry",
    "RewardConfig",
    "RewardSource",
    "RolloutEngineConfig",
    "RunConfig",
    "RunInfo",
    "RunResult",
    "SFTTokens",
    "ScoringBackend",
    "SequenceLogps",
    "StrictConfig",
    "TinyModelConfig",
    "TokenBatch",
    "TokenizedFormat",
    "TrainerConfig",
    "TrainingDiverged",
    "UnpairedBatch",
    "UserError",
    "combine_losses",
    "default_plugins",
    "hookimpl",
    "lay_out",
    "load_plugins",
    "pack_sequences",
    "pad_sequences",
    "pairwise_accuracy",
    "resolve_losses",
    "row_error",
    "row_lengths",
    "text_or_messages",
    "train",
]
