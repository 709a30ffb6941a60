"""The hooks a plugin may implement (pluggy project name ``"align"``).

Registration hooks each receive a ``register`` callable: ``register(ConfigClass, **options)``
returns a decorator for the factory (the simonw/llm pattern), so a plugin never touches
the registry directly; the options a kind accepts are listed in ``registry.REGISTRATION_OPTIONS``.
Lifecycle hooks observe a run and may stop it (``run.request_stop(reason)``); metrics sinks
and early stopping are such plugins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from align.commands import AddCommand
    from align.config import RunConfig
    from align.protocols import Backend
    from align.registry import Register
    from align.rollout import LogitsHook
    from align.trainer import RunInfo

PROJECT = "align"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_algorithms(register: Register) -> None:
    """Register algorithms: ``register(MyRunConfig)(MyAlgorithm)``."""


@hookspec
def register_losses(register: Register) -> None:
    """Register losses: ``register(MyLossConfig, needs_reference=...)(loss_fn)``."""


@hookspec
def register_rollout_engines(register: Register) -> None:
    """Register rollout (generation) engines."""


@hookspec
def register_rewards(register: Register) -> None:
    """Register reward sources."""


@hookspec
def register_advantage_estimators(register: Register) -> None:
    """Register advantage estimators for online methods:
    ``register(MyAdvantageConfig)(estimate)``, where ``estimate(cfg, rewards)`` turns the
    rewards of ``G`` prompts x ``n`` samples (a ``[G, n]`` tensor) into advantages of the same
    shape."""


@hookspec
def register_critics(register: Register) -> None:
    """Register critics (value models of actor-critic methods such as PPO):
    ``register(MyCriticConfig)(factory)``, where ``factory(cfg, ctx, learner)`` returns an
    ``align.Critic`` (see ``align.critic``): a model trained in this process, or a client of a
    critic server."""


@hookspec
def register_data_formats(register: Register) -> None:
    """Register data formats: ``register(MyDataConfig)(MyFormat)``."""


@hookspec
def register_backends(register: Register) -> None:
    """Register model backends: ``register(MyBackendConfig)(MyBackend)``."""


@hookspec
def wrap_backend(backend: Backend, config: RunConfig) -> Backend | None:
    """Wrap the backend a run (or ``align export``) builds, or return None to leave it: a plugin
    may change how every model is built, run and saved (``align-lora`` puts LoRA adapters on the
    models of sections with ``model.lora``). Wrappers chain: each gets the backend the previous
    one returned. A wrapper delegates what it does not change to the backend it wraps."""


@hookspec(firstresult=True)
def generation_logits_hook(model_path: str) -> LogitsHook | None:
    """A logits hook for ``align generate --model model_path`` (see ``align.LogitsHook``), or None:
    a plugin whose runs save something beside the model that steers its sampling (``align-ilql``'s
    Q and V heads in an ILQL ``final/``) returns the hook that applies it. The first answer wins."""


@hookspec
def register_callbacks(register: Register) -> None:
    """Register lifecycle plugins that a run enables in its ``callbacks:`` list, each with its
    own validated config: ``register(MyCallbackConfig)(factory)``, where
    ``factory(cfg, run_config)`` returns an object implementing any lifecycle hooks below. The
    object is registered for that run only."""


@hookspec
def register_commands(add_command: AddCommand) -> None:
    """Add subcommands to the ``align`` CLI (``align serve ...``, ``align annotate ...``):
    ``add_command(name, help, arguments, run)``, where ``arguments(parser)`` adds the command's
    argparse arguments and ``run(args, plugins)`` does the work. A user's mistake raises
    ``align.UserError`` (exit 2, no traceback). A name already taken is an error naming both
    packages."""


@hookspec
def on_train_start(run: RunInfo) -> None:
    """Called once before the first step (also after a resume)."""


@hookspec
def on_step_end(run: RunInfo, step: int, metrics: dict[str, Any]) -> None:
    """Called after every logged optimizer step and every evaluation with its metrics
    (``metrics["split"]`` is ``"train"`` or ``"eval"``)."""


@hookspec
def on_checkpoint(run: RunInfo, step: int, path: Path) -> None:
    """Called after a checkpoint was completely written to ``path``."""


@hookspec
def on_train_end(run: RunInfo, metrics: dict[str, Any]) -> None:
    """Called once after the last step, with the final evaluation metrics."""
