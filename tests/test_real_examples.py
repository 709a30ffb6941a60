"""examples/real/: the configs validate, the shipped data is what its scripts write, the format
reward scores by hand-checked rules, and (``real_model``) SmolLM2's chat template turns the rows
into the token layout training expects."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import EXAMPLES, run_cli

REAL = EXAMPLES / "real"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"real_{name}", REAL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["dpo_format.yaml", "grpo_arith.yaml"])
def test_the_real_model_examples_validate(capsys: pytest.CaptureFixture[str], config: str):
    result = run_cli(capsys, "validate", str(REAL / config))
    assert result.code == 0, result.err


@pytest.mark.parametrize("script", ["make_format_data", "make_word_problems"])
def test_the_shipped_data_is_what_its_script_writes(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    module = load_script(script)
    shipped = module.HERE
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    written = sorted(tmp_path.glob("*.jsonl"))
    assert written
    for file in written:
        assert file.read_text() == (shipped / file.name).read_text(), file.name


def test_held_out_rows_never_appear_in_training():
    def prompts(name: str) -> set[str]:
        return {
            json.dumps(json.loads(line)["prompt"]) for line in (REAL / "data" / name).read_text().splitlines()
        }

    assert not prompts("word_problems_eval.jsonl") & prompts("word_problems_train.jsonl")
    assert not prompts("format_prompts_eval.jsonl") & prompts("format_train.jsonl")
    questions = {json.loads(p)[0]["content"].split("?")[0] for p in prompts("format_train.jsonl")}
    held_out = {json.loads(p)[0]["content"].split("?")[0] for p in prompts("format_prompts_eval.jsonl")}
    assert len(held_out) == 22 and not questions & held_out  # unseen questions, not just new wording


def test_word_problem_answers_are_right():
    rows = [
        json.loads(line) for line in (REAL / "data" / "word_problems_eval.jsonl").read_text().splitlines()
    ]
    first = rows[0]["prompt"][0]["content"]
    assert first.startswith("There are 17 cards in a box. Leo puts in 16 more.")
    assert rows[0]["answer"] == "33"
    for row in rows:
        numbers = [
            int(word) for word in row["prompt"][0]["content"].replace(".", " ").split() if word.isdigit()
        ]
        assert int(row["answer"]) in (numbers[0] + numbers[1], numbers[0] - numbers[1])
        assert int(row["answer"]) >= 0


def test_the_format_reward_by_hand():
    reward = load_script("format_reward")
    rows = [{"format": "one_word"}] * 4 + [{"format": "uppercase"}] * 4
    completions = [
        "Paris.",
        "The capital is Paris.",
        " Jupiter ",
        [{"role": "assistant", "content": "Blue"}],  # a conversation: its last message counts
        "THE CAPITAL OF FRANCE IS PARIS.",
        "The capital of France is Paris.",
        "PARIS, 1 CITY",
        "42",  # no letters: not an answer in capitals
    ]
    assert reward.follows_format([""] * 8, completions, rows) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.real_model
def test_the_pairs_go_through_smollm2s_chat_template(smollm2_dir: Path):
    from transformers import AutoTokenizer

    from align import default_plugins

    tokenizer: Any = AutoTokenizer.from_pretrained(smollm2_dir)
    entry = default_plugins().registry.get("data_format", "preference")
    data_cfg = entry.config.model_validate(
        {"format": "preference", "train": str(REAL / "data" / "format_train.jsonl"), "max_length": 128}
    )
    rows = entry.factory(data_cfg, tokenizer).load("train")
    assert len(rows) == 300  # none dropped or cut at max_length 128
    row = rows[0]
    prompt = tokenizer.decode(row["prompt_ids"])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    for ids in (row["chosen_ids"], row["rejected_ids"]):
        assert ids[-1] == tokenizer.eos_token_id == 2
    first = json.loads((REAL / "data" / "format_train.jsonl").read_text().splitlines()[0])
    # Ends at the end-of-turn token: no newline and no second <|im_end|> after it.
    assert tokenizer.decode(row["chosen_ids"]) == first["chosen"][0]["content"] + "<|im_end|>"
