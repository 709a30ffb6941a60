"""Rewards as futures (``align.submit_reward``): PPO asks for a rollout's rewards right after
generating it and waits only after its log-prob passes. A deferred reward gives the run a
synchronous one gives, bit for bit, and is awaited only once the actor's log-prob pass began
(proved without timing: the stub answers only after that pass started); a deferred reward's
answer goes through the same checks as a synchronous one's."""

from __future__ import annotations

import math
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_weights, load_weights, read_metrics, run_cli, write_yaml
from test_ppo import critic_weights, ppo_config

import align
import align.cli
from align.rewards import CheckedReward

# A reward plugin: exact match on the arithmetic task's answer. ``asynchronous: true`` scores on a thread
# and returns a future at once; with ``after_logps`` that thread answers only once the test has
# set ``LOGPS_STARTED`` (when the actor's log-prob pass begins), and gives up after 30 s.
LATE_REWARD = """
import threading
from concurrent.futures import Future
from typing import Literal

import torch

import align

LOGPS_STARTED = threading.Event()
GAVE_UP = []


class LateConfig(align.RewardConfig):
    name: Literal["late"] = "late"
    asynchronous: bool = True
    after_logps: bool = False


class Scored:
    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, prompts, completions, rows=None):
        return torch.tensor(
            [float(c.strip() == str(r["answer"])) + 0.1 * len(c) for c, r in zip(completions, rows)]
        )


class Late(Scored):
    def submit(self, prompts, completions, rows=None):
        future = Future()
        LOGPS_STARTED.clear()  # this rollout's log-prob pass has not begun: it comes after

        def answer():
            if self.cfg.after_logps and not LOGPS_STARTED.wait(30):
                GAVE_UP.append(len(prompts))
                future.set_exception(RuntimeError("the rewards were awaited before the log-prob pass"))
                return
            future.set_result(self(prompts, completions, rows))

        threading.Thread(target=answer, daemon=True).start()
        return future


@align.hookimpl
def register_rewards(register):
    @register(LateConfig)
    def late(cfg):
        return Late(cfg) if cfg.asynchronous else Scored(cfg)
"""

TIMING = ("_s", "tokens_per_s", "time", "elapsed")


def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / "late_reward.py").write_text(textwrap.dedent(LATE_REWARD))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "late_reward")
    monkeypatch.setattr(align.cli, "default_plugins", align.load_plugins)
    monkeypatch.delitem(sys.modules, "late_reward", raising=False)
    import late_reward  # type: ignore[import-not-found]

    return late_reward


def test_deferred_rewards_equal_synchronous_ones_and_wait_for_the_logprob_pass(
    warm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from align_ppo.algorithm import PPO

    late_reward = plugin(tmp_path, monkeypatch)
    passes: list[str] = []
    take_logps = PPO.completion_logps

    def completion_logps(self: PPO, model: Any, *args: Any, **kwargs: Any) -> Any:
        passes.append("policy" if model is self.ctx.policy else "reference")
        late_reward.LOGPS_STARTED.set()
        return take_logps(self, model, *args, **kwargs)

    monkeypatch.setattr(PPO, "completion_logps", completion_logps)

    def run(name: str, reward: dict[str, Any]) -> Path:
        late_reward.LOGPS_STARTED.clear()
        out = tmp_path / name
        config = ppo_config(out, warm_model)
        config["reward"] = {"name": "late", **reward}
        result = run_cli(capsys, "run", write_yaml(tmp_path / f"{name}.yaml", config))
        assert result.code == 0, result.err
        return out

    synchronous = run("synchronous", {"asynchronous": False})
    deferred = run("deferred", {"asynchronous": True, "after_logps": True})
    assert late_reward.GAVE_UP == []  # every deferred answer came after a log-prob pass began
    assert passes[:2] == ["policy", "reference"]
    assert_same_weights(load_weights(synchronous / "final"), load_weights(deferred / "final"))
    assert_same_weights(critic_weights(synchronous), critic_weights(deferred))
    sync_rows, late_rows = read_metrics(synchronous, "rollout"), read_metrics(deferred, "rollout")
    assert len(sync_rows) == len(late_rows) == 2
    for sync_row, late_row in zip(sync_rows, late_rows, strict=True):
        untimed = {key for key in sync_row if not key.endswith(TIMING)}
        assert {k: sync_row[k] for k in untimed} == {k: late_row[k] for k in untimed}
        assert sync_row["reward_mean"] > 0  # the stub's scores (0.1 x length at least), not NaN
        # The synchronous reward blocked the actor all its time; the deferred one hid some.
        assert sync_row["reward_hidden_s"] == 0.0
        assert sync_row["reward_blocked_s"] >= sync_row["score_s"]
        assert late_row["score_s"] >= late_row["reward_hidden_s"] > 0.0


def checked(source: Any) -> CheckedReward:
    return CheckedReward(source, "reward 'stub'")


class Answers:
    """An asynchronous reward whose futures hold ``values`` (or raise ``error``)."""

    def __init__(self, values: Any = None, error: Exception | None = None) -> None:
        self.values, self.error = values, error

    def __call__(self, prompts: Any, completions: Any, rows: Any = None) -> Any:
        raise AssertionError("an asynchronous reward is asked through submit")

    def submit(self, prompts: Any, completions: Any, rows: Any = None) -> Future[Any]:
        future: Future[Any] = Future()
        if self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(self.values)
        return future


def test_a_deferred_answer_passes_the_reward_checks() -> None:
    good = align.submit_reward(checked(Answers([1, 2.5])), ["a", "b"], ["x", "y"], None)
    assert torch.equal(good.result(), torch.tensor([1.0, 2.5]))
    with pytest.raises(align.RewardError, match=r"reward 'stub' returned nan for row 1"):
        align.submit_reward(checked(Answers([1.0, math.nan])), ["a", "b"], ["x", "y"], None).result()
    with pytest.raises(align.RewardError, match=r"returned 1 values for 2 rows"):
        align.submit_reward(checked(Answers([1.0])), ["a", "b"], ["x", "y"], None).result()
    with pytest.raises(align.RewardError, match=r"reward 'stub' raised OSError: gone on a batch of 2 rows"):
        align.submit_reward(checked(Answers(error=OSError("gone"))), ["a", "b"], ["x", "y"], None).result()


def test_a_synchronous_reward_is_scored_at_once_into_a_future() -> None:
    calls: list[int] = []

    def reward(prompts: Any, completions: Any, rows: Any = None) -> list[float]:
        calls.append(len(prompts))
        return [float(len(c)) for c in completions]

    future = align.submit_reward(checked(reward), ["a", "b"], ["x", "yy"], None)
    assert calls == [2] and future.done()
    assert torch.equal(future.result(), torch.tensor([1.0, 2.0]))
    failing = align.submit_reward(checked(lambda p, c, r=None: [math.inf, 0.0]), ["a", "b"], ["x", "y"], None)
    with pytest.raises(align.RewardError, match="returned inf for row 0"):
        failing.result()
