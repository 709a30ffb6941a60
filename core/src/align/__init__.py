"""align: the public API. A plugin (built-in or third-party) imports only what is here."""

from align import objectives
from align.algorithm import Algorithm, Context
from align.backends import build_backend, model_sections, save_merged
from align.batches import (
    LossOutput,
    PairedTokens,
    PreferenceBatch,
    SequenceLogps,
    SFTTokens,
    TokenBatch,
    TokenLogps,
    UnpairedBatch,
)
from align.builtin.data import Encoder, PreferenceColumns, SFTColumns, TokenizedFormat
from align.builtin.prompts import PromptBatch, PromptData, PromptRow, prompt_rows
from align.config import (
    AdvantageConfig,
    BackendConfig,
    CallbackConfig,
    DataConfig,
    LoraConfig,
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
    WritableDir,
)
from align.critic import Critic, CriticBatch, CriticConfig, CriticError, build_critic
from align.datafiles import row_error, text_or_messages
from align.devices import DEVICE_CHOICES, module_device, resolve_device
from align.errors import ConfigError, DataError, OutputWriteError, TrainingDiverged, UserError
from align.hookspecs import hookimpl
from align.layout import lay_out, pack_sequences, pad_sequences, row_lengths
from align.learner import Learner, RunInfo, RunResult
from align.loading import read_yaml, validate_run_config
from align.lock import OutputDirLocked
from align.losses import LossFn, combine_losses, loss_function, pairwise_accuracy, resolve_losses
from align.online import (
    OnlineAlgorithm,
    OnlineConfig,
    PromptStream,
    RolloutResult,
    Rollouts,
    Sample,
    build_engine,
    policy_weights,
    start_rollouts,
)
from align.plugins import Plugins, default_plugins, load_plugins
from align.precision import precision_scope
from align.protocols import (
    Backend,
    DataFormat,
    HiddenStatesBackend,
    RewardSource,
    ScoringBackend,
    TokenScoringBackend,
)
from align.registry import Entry, Register, Registry
from align.rewards import RewardError, build_reward, message_text
from align.rollout import (
    Completion,
    EngineError,
    EngineSpec,
    EngineUnavailable,
    LogitsHook,
    NamedWeights,
    RolloutEngine,
    SamplingConfig,
    check_prompts,
)
from align.trainer import train

__version__ = "0.1.0"

__all__ = [
    "DEVICE_CHOICES",
    "AdvantageConfig",
    "Algorithm",
    "Backend",
    "BackendConfig",
    "CallbackConfig",
    "Completion",
    "ConfigError",
    "Context",
    "Critic",
    "CriticBatch",
    "CriticConfig",
    "CriticError",
    "DataConfig",
    "DataError",
    "DataFormat",
    "Encoder",
    "EngineError",
    "EngineSpec",
    "EngineUnavailable",
    "Entry",
    "HiddenStatesBackend",
    "Learner",
    "LogitsHook",
    "LoraConfig",
    "LossConfig",
    "LossFn",
    "LossOutput",
    "ModelConfig",
    "NamedWeights",
    "OnlineAlgorithm",
    "OnlineConfig",
    "OptimConfig",
    "OutputDirLocked",
    "OutputWriteError",
    "PairedTokens",
    "PluginConfig",
    "Plugins",
    "PreferenceBatch",
    "PreferenceColumns",
    "PromptBatch",
    "PromptData",
    "PromptRow",
    "PromptStream",
    "Register",
    "Registry",
    "RewardConfig",
    "RewardError",
    "RewardSource",
    "RolloutEngine",
    "RolloutEngineConfig",
    "RolloutResult",
    "Rollouts",
    "RunConfig",
    "RunInfo",
    "RunResult",
    "SFTColumns",
    "SFTTokens",
    "Sample",
    "SamplingConfig",
    "ScoringBackend",
    "SequenceLogps",
    "StrictConfig",
    "TinyModelConfig",
    "TokenBatch",
    "TokenLogps",
    "TokenScoringBackend",
    "TokenizedFormat",
    "TrainerConfig",
    "TrainingDiverged",
    "UnpairedBatch",
    "UserError",
    "WritableDir",
    "build_backend",
    "build_critic",
    "build_engine",
    "build_reward",
    "check_prompts",
    "combine_losses",
    "default_plugins",
    "hookimpl",
    "lay_out",
    "load_plugins",
    "loss_function",
    "message_text",
    "model_sections",
    "module_device",
    "objectives",
    "pack_sequences",
    "pad_sequences",
    "pairwise_accuracy",
    "policy_weights",
    "precision_scope",
    "prompt_rows",
    "read_yaml",
    "resolve_device",
    "resolve_losses",
    "row_error",
    "row_lengths",
    "save_merged",
    "start_rollouts",
    "text_or_messages",
    "train",
    "validate_run_config",
]
