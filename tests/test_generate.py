"""``align generate``: completions (and rewards) for a file of prompts, as JSONL, with the same
engines and rewards as online training; user mistakes are exit-2 errors that lose nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_user_error, run_cli, write_jsonl

PROMPTS = [
    {"prompt": "1+2=", "answer": "3"},
    {"prompt": "4+4=", "answer": "8"},
    {"prompt": "9+0=", "answer": "9"},
]
TINY = ["model.tiny.hidden_size=32", "model.tiny.num_heads=1", "model.tiny.num_layers=1"]


def generate(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str, out: str = "out.jsonl"):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    return run_cli(capsys, "generate", "--prompts", prompts, "--out", str(tmp_path / out), *TINY, *extra)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_n_scored_completions_per_prompt(tmp_path, capsys):
    result = generate(capsys, tmp_path, "--reward", "exact_match", "n=2", "max_tokens=3", "temperature=1.0")
    assert result.code == 0, result.err
    rows = read(tmp_path / "out.jsonl")
    assert len(rows) == 2 * len(PROMPTS)
    assert [(r["prompt"], r["sample_index"]) for r in rows] == [
        (p["prompt"], i) for p in PROMPTS for i in range(2)
    ]
    for row, source in zip(rows, [p for p in PROMPTS for _ in range(2)], strict=True):
        assert row["answer"] == source["answer"]  # the prompt row's other columns come along
        assert 1 <= row["completion_tokens"] <= 3
        assert row["finish_reason"] in ("stop", "length")
        assert row["finish_reason"] == "stop" or row["completion_tokens"] == 3
        assert row["reward"] == float(row["completion"].strip() == row["answer"])


def test_the_same_seed_gives_the_same_samples(tmp_path, capsys):
    for name, seed in (("a.jsonl", 1), ("b.jsonl", 1), ("c.jsonl", 2)):
        assert generate(capsys, tmp_path, "n=4", "max_tokens=6", f"seed={seed}", out=name).code == 0
    a, b, c = (read(tmp_path / name) for name in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b
    assert [r["completion"] for r in a] != [r["completion"] for r in c]


def test_an_existing_output_is_kept(tmp_path, capsys):
    (tmp_path / "out.jsonl").write_text("mine\n")
    assert_user_error(generate(capsys, tmp_path), "exists", "overwrite=true")
    assert (tmp_path / "out.jsonl").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--engine", "nosuch"], ["rollout engine 'nosuch'", "hf"]),
        (["--reward", "nosuch"], ["reward 'nosuch'"]),
        (["--reward", "function", "reward.path=no_such_module:fn"], ["no_such_module"]),
        (["n=0"], ["sampling.n"]),
        (["temperature=hot"], ["sampling.temperature"]),
        (["max_length=2"], ["max_length=2"]),
    ],
)
def test_mistakes_are_user_errors(tmp_path, capsys, extra, fragments):
    result = generate(capsys, tmp_path, *extra)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "out.jsonl").exists()
