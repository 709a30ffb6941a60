"""The ``function`` reward: any Python callable scores a batch.

    reward: {name: function, path: my_rewards:brevity, kwargs: {limit: 200}}

The callable is imported when the reward is built (before any training), and called with the
whole batch: ``fn(prompts, completions, rows, **kwargs)`` returning one number per pair (a
list, tuple, array or 1-D tensor). ``rows`` are the prompts' data rows (empty dicts when the
caller has none), where a verifiable reward finds its reference answer.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

import align

RewardFn = Callable[..., Any]


class FunctionRewardConfig(align.RewardConfig):
    name: Literal["function"] = "function"
    path: str = Field(
        ...,
        description="The callable as 'package.module:function' (modules in the working directory are "
        "found too); called as fn(prompts, completions, rows, **kwargs).",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of every call.")


class BoundReward:
    """A batch function with fixed keyword arguments, as a reward source. ``label`` names it in
    the errors ``align.build_reward``'s checks raise."""

    def __init__(self, fn: RewardFn, kwargs: dict[str, Any], label: str) -> None:
        self.fn, self.kwargs, self.label = fn, dict(kwargs), label

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None
    ) -> Any:
        """What the function returns: ``align.build_reward`` checks it and makes it a tensor."""
        batch_rows = list(rows) if rows is not None else [{} for _ in prompts]
        return self.fn(list(prompts), list(completions), batch_rows, **self.kwargs)


def function_reward(cfg: FunctionRewardConfig) -> BoundReward:
    fn = import_callable(cfg.path)
    check_arguments(fn, cfg.path, cfg.kwargs)
    return BoundReward(fn, cfg.kwargs, f"reward function '{cfg.path}'")


def import_callable(path: str) -> RewardFn:
    """``package.module:attribute[.attribute]`` -> the callable; a ``ConfigError`` saying why not."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise align.ConfigError(
            f"reward.path '{path}': expected 'package.module:function' (a module, a colon, a name)"
        )
    module = _import_module(module_name, path)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise align.ConfigError(
                f"reward.path '{path}': module '{module_name}' has no attribute '{attribute}'{hint}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise align.ConfigError(
            f"reward.path '{path}' names a {type(target).__name__}, not a function or callable"
        )
    fn: RewardFn = target
    return fn


def _import_module(name: str, path: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top_level = name.partition(".")[0]
        if exc.name == top_level and os.getcwd() not in sys.path:
            # `align` runs as a console script, whose sys.path lacks the working directory: a
            # rewards module next to the YAML would not import. Look there too, as `python -m` does.
            sys.path.append(os.getcwd())
            return _import_module(name, path)
        raise align.ConfigError(
            f"reward.path '{path}': cannot import module '{name}': {exc}. Is it installed, or in the "
            "working directory?"
        ) from None
    except Exception as exc:  # the module itself raised while importing
        raise align.ConfigError(
            f"reward.path '{path}': importing module '{name}' raised {type(exc).__name__}: {exc}"
        ) from None


def check_arguments(fn: RewardFn, path: str, kwargs: dict[str, Any]) -> None:
    """The function must accept (prompts, completions, rows, **kwargs): checked before training."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to check (some builtins)
        return
    try:
        signature.bind([], [], [], **kwargs)
    except TypeError as exc:
        raise align.ConfigError(
            f"reward '{path}' cannot be called as fn(prompts, completions, rows"
            f"{''.join(f', {k}=...' for k in kwargs)}): {exc}"
        ) from None
