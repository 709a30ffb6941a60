"""Rewards: the verifiable ones against hand-computed numbers, ``function`` and ``sum``, and the
checks ``align.build_reward`` puts around every reward (errors name the reward and the row)."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import ValidationError

import align
from align.loading import validate_run_config
from align_rewards import (
    ExactMatchConfig,
    FunctionRewardConfig,
    LengthConfig,
    RegexConfig,
    RewardTerm,
    SumRewardConfig,
    final_answer,
)


@pytest.fixture(scope="module")
def registry() -> align.Registry:
    return align.load_plugins().registry


def score(
    registry: align.Registry, cfg: align.RewardConfig, completions: list[Any], rows: Any = None
) -> list[float]:
    prompts = [f"prompt {i}" for i in range(len(completions))]
    result = align.build_reward(cfg, registry)(prompts, completions, rows)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
    return [round(v, 6) for v in result.tolist()]


_module_ids = itertools.count()


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Writes a module of reward functions where imports find it; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"user_rewards_{next(_module_ids)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# ---- exact_match ------------------------------------------------------------------------


def test_final_answer_is_the_last_number_or_the_text_after_the_marker() -> None:
    assert final_answer("16+9=25") == "25"
    assert final_answer("5-3 is 2, not -3") == "-3"
    assert final_answer("about 1,000 apples.") == "1,000"
    assert final_answer("no digits") is None
    assert final_answer("step 1\n#### 72\nbye", "####") == "72"
    assert final_answer("Answer: Paris. answer: Lyon", "answer:") == "Lyon"
    assert final_answer("12 but no marker", "####") is None
    assert final_answer("ends with the marker ####", "####") is None


def test_exact_match_scores_one_for_the_right_final_answer(registry: align.Registry) -> None:
    completions = ["16+9=25", "it is 24", "nothing", "25.0", "1,000", "x = 25 or 26"]
    rows = [
        {"answer": "25"},
        {"answer": "25"},
        {"answer": "3"},
        {"answer": 25},
        {"answer": "1000"},
        {"answer": 25},
    ]
    # the last number counts: "26" in the last completion is wrong
    assert score(registry, ExactMatchConfig(), completions, rows) == [1, 0, 0, 1, 1, 0]


def test_exact_match_with_a_marker_normalises_case_spaces_and_a_full_stop(registry: align.Registry) -> None:
    cfg = ExactMatchConfig(marker="answer:", answer_key="city")
    completions = ["The answer:  Paris.", "answer: PARIS", "answer: Lyon", "Paris", "answer: paris is big"]
    rows = [{"city": "Paris"}] * 5
    assert score(registry, cfg, completions, rows) == [1, 1, 0, 0, 0]
    strict = ExactMatchConfig(marker="answer:", answer_key="city", case_sensitive=True)
    assert score(registry, strict, completions[:2], rows[:2]) == [1, 0]


def test_exact_match_accepts_any_of_a_list_of_answers_and_reads_chat_messages(
    registry: align.Registry,
) -> None:
    reply = [{"role": "assistant", "content": "I think 7"}]
    assert score(
        registry, ExactMatchConfig(), [reply, "8"], [{"answer": ["6", "7"]}, {"answer": ["6", "7"]}]
    ) == [1, 0]


def test_exact_match_graded_gives_partial_credit(registry: align.Registry) -> None:
    rows = [{"answer": "25"}] * 4
    completions = ["24", "22", "25", "none"]
    # numeric: 1 / (1 + |answer - reference|)
    assert score(registry, ExactMatchConfig(graded="numeric"), completions, rows) == [0.5, 0.25, 1, 0]
    # chars: same characters at the same positions over the longer length: 24 vs 25 -> 1/2, 22 -> 1/2
    assert score(registry, ExactMatchConfig(graded="chars"), completions, rows) == [0.5, 0.5, 1, 0]
    words = ExactMatchConfig(graded="chars", marker=":")
    assert score(registry, words, [": abcd", ": abxd", ": ab"], [{"answer": "abcd"}] * 3) == [1, 0.75, 0.5]


def test_exact_match_names_the_row_without_an_answer(registry: align.Registry) -> None:
    reward = align.build_reward(ExactMatchConfig(answer_key="solution"), registry)
    with pytest.raises(align.RewardError) as caught:
        reward(["What is 2+2?", "What is 3+3?"], ["4", "6"], [{"solution": "4"}, {"answer": "6"}])
    message = str(caught.value)
    assert "reward 'exact_match'" in message and "row 1" in message and "What is 3+3?" in message
    assert "no 'solution' field (its fields: answer)" in message


# ---- regex and length -------------------------------------------------------------------


def test_regex_all_any_fraction_and_fullmatch(registry: align.Registry) -> None:
    completions = ["<think>a</think> 42", "just 42", "<think>b</think>"]
    patterns = [r"<think>.*</think>", r"\d+$"]
    assert score(registry, RegexConfig(pattern=patterns), completions) == [1, 0, 0]
    assert score(registry, RegexConfig(pattern=patterns, score="any"), completions) == [1, 1, 1]
    assert score(registry, RegexConfig(pattern=patterns, score="fraction"), completions) == [1, 0.5, 0.5]
    assert score(registry, RegexConfig(pattern=r"\d+", fullmatch=True), ["42", " 42\n", "a42"]) == [1, 1, 0]
    assert score(registry, RegexConfig(pattern="yes", ignore_case=True), ["YES", "no"]) == [1, 0]


def test_a_bad_regex_is_a_config_error_naming_the_pattern() -> None:
    with pytest.raises(ValidationError, match=r"pattern '\(' is not a valid regular expression"):
        RegexConfig(pattern="(")


def test_length_target_and_band(registry: align.Registry) -> None:
    completions = ["abcde", "", "a" * 20, "a" * 10, "a" * 13]
    # -|len - 10| / 10
    assert score(registry, LengthConfig(target=10), completions) == [-0.5, -1, -1, 0, -0.3]
    assert score(registry, LengthConfig(band=(2, 10)), completions) == [1, 0, 0, 1, 0]
    assert score(registry, LengthConfig(target=2, unit="words"), ["one two", "one", "a b c d"]) == [
        0,
        -0.5,
        -1,
    ]
    assert score(registry, LengthConfig(target=4, unit="bytes"), ["éé", "é"]) == [0, -0.5]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({}, "exactly one of target"),
        ({"target": 3, "band": (1, 2)}, "exactly one of target"),
        ({"band": (5, 2)}, "low <= high"),
        ({"target": 3, "unit": "tokens"}, "needs tokenizer"),
    ],
)
def test_length_options_are_checked(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        LengthConfig(**options)


# ---- function ---------------------------------------------------------------------------


def test_the_shipped_functions_work_through_function_with_the_same_numbers(registry: align.Registry) -> None:
    rows = [{"answer": "25"}] * 3
    completions = ["24", "25", "x"]
    via_function = FunctionRewardConfig(path="align_rewards:exact_match", kwargs={"graded": "numeric"})
    assert score(registry, via_function, completions, rows) == [0.5, 1, 0]
    assert score(registry, ExactMatchConfig(graded="numeric"), completions, rows) == [0.5, 1, 0]
    length = FunctionRewardConfig(path="align_rewards.verifiable:length", kwargs={"target": 4})
    assert score(registry, length, ["ab", "abcd"]) == [-0.5, 0]


def test_a_user_function_gets_the_batch_and_its_kwargs(registry: align.Registry, user_module: Any) -> None:
    module = user_module(
        """
        import torch
        CALLS = []
        def brevity(prompts, completions, rows, limit=10):
            CALLS.append((list(prompts), list(completions), list(rows)))
            return torch.tensor([min(1.0, limit / max(1, len(c))) for c in completions])
        """
    )
    cfg = FunctionRewardConfig(path=f"{module}:brevity", kwargs={"limit": 4})
    reward = align.build_reward(cfg, registry)
    assert reward(["p1", "p2"], ["ab", "abcdefgh"], [{"id": 1}, {"id": 2}]).tolist() == [1.0, 0.5]
    assert reward(["p"], ["abcde"]).tolist() == pytest.approx([0.8])  # no rows: empty dicts
    calls = sys.modules[module].CALLS
    assert calls[0] == (["p1", "p2"], ["ab", "abcdefgh"], [{"id": 1}, {"id": 2}])
    assert calls[1][2] == [{}]


def test_a_function_in_the_working_directory_imports(
    registry: align.Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd_rewards.py").write_text(
        "def one(prompts, completions, rows):\n    return [1] * len(prompts)\n"
    )
    assert score(registry, FunctionRewardConfig(path="cwd_rewards:one"), ["a", "b"]) == [1, 1]


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("no_colon_here", ["'no_colon_here'", "expected 'package.module:function'"]),
        ("surely_missing_pkg.mod:fn", ["cannot import module 'surely_missing_pkg.mod'", "No module named"]),
        ("align_rewards:exact_macth", ["has no attribute 'exact_macth'", "did you mean 'exact_match'"]),
        ("align_rewards:__doc__", ["names a str, not a function"]),
    ],
)
def test_a_bad_path_is_a_config_error_naming_it(
    registry: align.Registry, path: str, fragments: list[str]
) -> None:
    with pytest.raises(align.ConfigError) as caught:
        align.build_reward(FunctionRewardConfig(path=path), registry)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_a_module_that_raises_on_import_and_wrong_kwargs_are_config_errors(
    registry: align.Registry, user_module: Any
) -> None:
    broken = user_module("raise RuntimeError('needs an API key')\n")
    with pytest.raises(
        align.ConfigError, match=rf"importing module '{broken}' raised RuntimeError: needs an API key"
    ):
        align.build_reward(FunctionRewardConfig(path=f"{broken}:fn"), registry)
    module = user_module("def two_args(prompts, completions):\n    return []\n")
    with pytest.raises(align.ConfigError, match=r"cannot be called as fn\(prompts, completions, rows\)"):
        align.build_reward(FunctionRewardConfig(path=f"{module}:two_args"), registry)
    with pytest.raises(align.ConfigError, match=r"fn\(prompts, completions, rows, colour=...\).*colour"):
        align.build_reward(
            FunctionRewardConfig(path="align_rewards:exact_match", kwargs={"colour": 1}), registry
        )


# ---- what build_reward checks -----------------------------------------------------------

BAD_FUNCTIONS = """
import math
import torch

def raises_on_third(prompts, completions, rows):
    return [row["missing"] if completion == "c" else 1.0 for completion, row in zip(completions, rows)]

def nan_on_second(prompts, completions, rows):
    return [0.0, math.nan, 1.0][: len(prompts)]

def inf_tensor(prompts, completions, rows):
    return torch.tensor([0.0, 1.0, float("-inf")])

def word(prompts, completions, rows):
    return [1.0, "high", 0.0]

def none_value(prompts, completions, rows):
    return [None] * len(prompts)

def too_few(prompts, completions, rows):
    return [1.0] * (len(prompts) - 1)

def matrix(prompts, completions, rows):
    return torch.zeros(len(prompts), 2)

def scalar(prompts, completions, rows):
    return 1.0

def batch_only(prompts, completions, rows):
    if len(prompts) > 1:
        raise MemoryError("batch too big")
    return [0.0]

def fine_numbers(prompts, completions, rows):
    import numpy as np
    return np.array([True, 2, 0.5])
"""


@pytest.mark.parametrize(
    ("function", "fragments"),
    [
        ("raises_on_third", ["raised KeyError: 'missing'", "row 2", "prompt: 'Third prompt, long"]),
        ("nan_on_second", ["returned nan for row 1", "'Second prompt'", "finite"]),
        ("inf_tensor", ["returned -inf for row 2"]),
        ("word", ["returned str 'high' for row 1", "must be numbers"]),
        ("none_value", ["returned NoneType None for row 0", "'First prompt'"]),
        ("too_few", ["returned 2 values for 3 rows"]),
        ("matrix", ["tensor of shape (3, 2)", "1-D"]),
        ("scalar", ["returned float 1.0", "list or 1-D tensor of 3 numbers"]),
        ("batch_only", ["raised MemoryError: batch too big", "on a batch of 3 rows"]),
    ],
)
def test_a_bad_reward_is_a_user_error_naming_the_function_and_row(
    registry: align.Registry, user_module: Any, function: str, fragments: list[str]
) -> None:
    module = user_module(BAD_FUNCTIONS)
    reward = align.build_reward(FunctionRewardConfig(path=f"{module}:{function}"), registry)
    prompts = ["First prompt", "Second prompt", "Third prompt, long enough to be cut " + "x" * 80]
    with pytest.raises(align.RewardError) as caught:
        reward(prompts, ["a", "b", "c"], [{}, {}, {}])
    message = str(caught.value)
    assert isinstance(caught.value, align.UserError)
    assert f"reward function '{module}:{function}'" in message
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < 400


def test_numpy_and_bool_results_are_numbers(registry: align.Registry, user_module: Any) -> None:
    module = user_module(BAD_FUNCTIONS)
    assert score(registry, FunctionRewardConfig(path=f"{module}:fine_numbers"), ["a", "b", "c"]) == [
        1,
        2,
        0.5,
    ]


# ---- sum --------------------------------------------------------------------------------


def test_sum_adds_weighted_terms(registry: align.Registry) -> None:
    cfg = SumRewardConfig(
        terms=[
            RewardTerm(reward=ExactMatchConfig(), weight=2.0),
            RewardTerm(reward=LengthConfig(target=4), weight=0.5),
            RewardTerm(reward=FunctionRewardConfig(path="align_rewards:regex", kwargs={"pattern": "^1"})),
        ]
    )
    rows = [{"answer": "12"}, {"answer": "12"}]
    # "= 12": 2*1 + 0.5*(-|4-4|/4) + 0 ; "1": 2*0 + 0.5*(-|1-4|/4) + 1
    assert score(registry, cfg, ["= 12", "1"], rows) == [2.0, pytest.approx(1 - 0.375)]


def test_a_failing_term_of_a_sum_is_named(registry: align.Registry, user_module: Any) -> None:
    module = user_module(BAD_FUNCTIONS)
    cfg = SumRewardConfig(
        terms=[
            RewardTerm(reward=ExactMatchConfig()),
            RewardTerm(reward=FunctionRewardConfig(path=f"{module}:word")),
        ]
    )
    reward = align.build_reward(cfg, registry)
    with pytest.raises(
        align.RewardError, match=rf"reward function '{module}:word' returned str 'high' for row 1"
    ):
        reward(["a", "b", "c"], ["1", "2", "3"], [{"answer": 1}] * 3)


def test_sum_needs_terms_and_unknown_rewards_are_named(registry: align.Registry) -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        SumRewardConfig(terms=[])
    with pytest.raises(align.ConfigError, match=r"unknown reward 'nope'\. Installed: .*exact_match"):
        align.build_reward(align.RewardConfig(name="nope"), registry)


def test_build_reward_wraps_any_plugin_and_math_is_float32(registry: align.Registry) -> None:
    reward = align.build_reward(ExactMatchConfig(), registry)
    assert isinstance(reward, align.RewardSource)
    assert math.isclose(float(reward(["p"], ["3"], [{"answer": 3}])[0]), 1.0)


# ---- rewards in a run config ------------------------------------------------------------


class RewardProbeConfig(align.RunConfig):
    algo: Literal["reward_probe"] = "reward_probe"
    reward: align.RewardConfig


def probe(reward: Any) -> align.RunConfig:
    registry = align.load_plugins().registry
    registry.add(align.Entry("algorithm", "reward_probe", RewardProbeConfig, object, "tests", "0", {}))
    data = {"algo": "reward_probe", "data": {"format": "sft", "train": "x.jsonl"}, "reward": reward}
    return validate_run_config(data, registry)


def test_a_sum_in_a_run_config_validates_every_term_by_its_own_class(registry: align.Registry) -> None:
    cfg: Any = probe(
        {
            "name": "sum",
            "terms": [
                {"reward": {"name": "exact_match", "marker": "####"}, "weight": 2},
                {"reward": {"name": "function", "path": "align_rewards:length", "kwargs": {"band": [1, 3]}}},
            ],
        }
    )
    assert (
        isinstance(cfg.reward.terms[0].reward, ExactMatchConfig)
        and cfg.reward.terms[0].reward.marker == "####"
    )
    reward = align.build_reward(cfg.reward, registry)
    # "#### 7": 2 * 1 + 0 (6 chars: outside the band); "#### 8" -> 0; "7": no marker -> 0, + 1 (in band)
    assert reward(["a", "b", "c"], ["#### 7", "#### 8", "7"], [{"answer": 7}] * 3).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("reward", "fragments"),
    [
        (
            {"name": "sum", "terms": [{"reward": {"name": "exact_match", "answer_kye": "a"}}]},
            ["reward.terms.0.reward.answer_kye", "did you mean 'answer_key'"],
        ),
        ({"name": "sum", "terms": [{"reward": {"name": "nope"}}]}, ["'nope'", "exact_match"]),
        ({"name": "regex", "pattern": "("}, ["reward.pattern", "not a valid regular expression"]),
        ({"name": "length"}, ["reward", "exactly one of target"]),
    ],
)
def test_bad_reward_configs_name_the_key(reward: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(align.ConfigError) as caught:
        probe(reward)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
