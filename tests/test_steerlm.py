"""SteerLM: the attribute string and templates, the ``steerlm`` data format (NeMo-Aligner's JSONL
and plain rows, bad input named by file and row), ``align annotate`` with a trained attribute
model, conditioned SFT on the tiny verbosity task that steers completion length in the direction
asked, and a resumed run ending with the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    DATA,
    EXAMPLES,
    QUIET_TRAINER,
    TINY_MODEL,
    assert_same_weights,
    assert_user_error,
    load_weights,
    read_yaml,
    run_cli,
    write_jsonl,
    write_yaml,
)

import align
import align.cli
from align_hf import byte_tokenizer
from align_steerlm import (
    Conditioning,
    Conversation,
    SteerLMData,
    SteerLMFormat,
    Turn,
    attribute_values,
    clip_round,
    format_label,
    parse_label,
    render,
)

HELPSTEER = Conditioning()
VERBOSITY = {"attributes": ["verbosity"], "min_value": 0, "max_value": 4}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the attribute string and the templates ------------------------------------------------


def test_labels_parse_check_and_render_in_the_configured_order() -> None:
    label = "verbosity:1,helpfulness:4,correctness:3,coherence:4,complexity:2,quality:9"
    values = attribute_values(label, HELPSTEER)  # quality is not configured: left out
    assert (
        format_label(values, HELPSTEER) == "helpfulness:4,correctness:3,coherence:4,complexity:2,verbosity:1"
    )
    assert parse_label(" a : 1 ,b:2.0") == {"a": 1, "b": 2.0}
    assert attribute_values({"verbosity": 2.0}, Conditioning(**VERBOSITY)) == {"verbosity": 2}
    for bad, message in (
        ({"helpfulness": 4}, "no value for attribute 'correctness'"),
        ("helpfulness:4,correctness", "is not name:value"),
        ("verbosity:high", "not a number"),
    ):
        with pytest.raises(ValueError, match=message):
            attribute_values(bad, HELPSTEER)
    for value, message in (
        (5, "is 5, outside 0..4"),
        (2.5, "must be an integer"),
        (True, "must be an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            attribute_values({"verbosity": value}, Conditioning(**VERBOSITY))
    # predictions become values: clipped to the range, rounded half up
    assert [clip_round(x, HELPSTEER) for x in (-0.7, 0.49, 0.5, 2.5, 3.51, 9.0)] == [0, 0, 1, 3, 4, 4]


def test_nemo_and_chat_templates() -> None:
    conversation = Conversation(
        "Be brief.", [Turn("user", "Hi"), Turn("assistant", "Hello!", "verbosity:0"), Turn("user", "Why?")]
    )
    cfg = Conditioning(**VERBOSITY)
    assert render(conversation, "verbosity:3", cfg) == (
        "<extra_id_0>System\nBe brief.\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\n<extra_id_2>verbosity:0\nHello!\n"
        "<extra_id_1>User\nWhy?\n"
        "<extra_id_1>Assistant\n<extra_id_2>verbosity:3\n"
    )
    chat = Conditioning(**VERBOSITY, template="chat")
    assert render(conversation, "verbosity:3", chat) == [
        {"role": "system", "content": "Be brief.\n\nattributes: verbosity:3"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ]
    assert render(Conversation("", [Turn("user", "Hi")]), "verbosity:1", chat)[0] == {
        "role": "system",
        "content": "attributes: verbosity:1",
    }


# ---- the steerlm data format ----------------------------------------------------------------


def nemo_row(label: str | None, answer: str = "Sure, here it is.") -> dict[str, Any]:
    return {
        "system": "S",
        "mask": "User",
        "type": "VALUE_TO_TEXT",
        "conversations": [
            {"from": "User", "value": "Q1", "label": None},
            {"from": "Assistant", "value": "A1", "label": "verbosity:2,helpfulness:3"},
            {"from": "User", "value": "Q2", "label": None},
            {"from": "Assistant", "value": answer, "label": label},
        ],
    }


def load_format(tmp_path: Path, rows: list[dict[str, Any]], **settings: Any) -> tuple[SteerLMFormat, Any]:
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    fmt = SteerLMFormat(SteerLMData(train=path, **{**VERBOSITY, **settings}), byte_tokenizer())
    return fmt, fmt.load("train")


def test_steerlm_format_reads_nemo_rows_and_plain_rows(tmp_path: Path) -> None:
    rows = [
        nemo_row("helpfulness:3,verbosity:4"),
        {"prompt": "Q", "completion": "A", "attributes": {"verbosity": 1}},
        {"prompt": "Q", "completion": "A", "verbosity": 2},  # HelpSteer's layout
        {
            "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "attributes": {"verbosity": 3},
        },
    ]
    fmt, data = load_format(tmp_path, rows)
    tok = byte_tokenizer()
    prompts = [tok.decode(row["prompt_ids"], skip_special_tokens=True) for row in data]
    assert prompts[0] == (
        "<extra_id_0>System\nS\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n<extra_id_2>verbosity:2\nA1\n"
        "<extra_id_1>User\nQ2\n<extra_id_1>Assistant\n<extra_id_2>verbosity:4\n"
    )
    for i, level in ((1, 1), (2, 2), (3, 3)):
        header = "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n"
        assert prompts[i] == f"{header}<extra_id_2>verbosity:{level}\n"
    # answer-only loss: the completion is the answer and EOS, nothing of the prompt
    assert data[0]["completion_ids"] == tok("Sure, here it is.", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    batch = fmt.collate([data[i] for i in range(4)])
    assert int(batch.tokens.loss_mask.sum()) == sum(len(data[i]["completion_ids"]) for i in range(4))
    # an attributes column may hold label strings too (one kind of value per file)
    _, labelled = load_format(tmp_path, [{"prompt": "Q", "completion": "A", "attributes": "verbosity:0,x:1"}])
    assert tok.decode(labelled[0]["prompt_ids"]).endswith("<extra_id_2>verbosity:0\n")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (nemo_row(None), r"rows\.jsonl, row 2: the answer's label: no attribute values"),
        (nemo_row("verbosity:7"), r"row 2: the answer's label: attribute 'verbosity' is 7, outside 0\.\.4"),
        (
            nemo_row("verbosity=4"),
            r"row 2: the answer's label: label 'verbosity=4': 'verbosity=4' is not name:value",
        ),
        (
            {"prompt": "Q", "completion": "A", "attributes": {"helpfulness": 4}},
            r"row 2: no value for attribute 'verbosity'",
        ),
        ({"prompt": "Q", "completion": "A"}, r"row 2: no value for attribute 'verbosity'"),
        ({"prompt": "Q", "completion": "", "verbosity": 1}, r"row 2: the completion is empty"),
    ],
)
def test_bad_rows_are_errors_naming_file_and_row(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    good = {"prompt": "Q", "completion": "A", "verbosity": 1}
    with pytest.raises(align.DataError, match=message):
        load_format(tmp_path, [good, row])


def test_rows_missing_a_value_can_be_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "completion": "A", "verbosity": 1},
        nemo_row(None),
        {"prompt": "Q", "completion": "B"},
    ]
    fmt, data = load_format(tmp_path, rows, on_missing="skip")
    assert len(data) == 1 and fmt.stats() == {"train_skipped_unlabelled": 2}
    with pytest.raises(align.DataError, match="outside"):  # only missing values are skipped
        load_format(tmp_path, [*rows, {"prompt": "Q", "completion": "A", "verbosity": 9}], on_missing="skip")


# ---- conditioned SFT on the tiny verbosity task, then steering ---------------------------

STEPS = 120


def steerlm_config(output_dir: Path, **trainer: Any) -> dict[str, Any]:
    """examples/steerlm.yaml on the smaller test model (32 hidden, 1 layer), a shorter schedule."""
    config = read_yaml(EXAMPLES / "steerlm.yaml")
    config["output_dir"] = str(output_dir)
    config["model"] = TINY_MODEL
    config["data"] |= {"train": str(DATA / "steerlm_train.jsonl"), "eval": str(DATA / "steerlm_eval.jsonl")}
    config["trainer"] = {
        "max_steps": STEPS,
        "batch_size": 16,
        "eval_every": STEPS,
        **QUIET_TRAINER,
        **trainer,
    }
    config["optim"] = {"lr": 1e-2}
    return config


@pytest.fixture(scope="module")
def steerlm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("steerlm")
    config = write_yaml(tmp / "run.yaml", steerlm_config(tmp / "run", save_every=STEPS))
    assert align.cli.main(["run", config]) == 0
    return tmp / "run"


def steered(capsys: pytest.CaptureFixture[str], model: Path, out: Path, level: int) -> list[dict[str, Any]]:
    prompts = str(DATA / "steerlm_prompts.jsonl")
    result = run_cli(
        capsys, "generate", "--model", str(model), "--prompts", prompts, "--out", str(out),
        "data.format=steerlm_prompts", "data.attributes=[verbosity]", f"data.steer=verbosity:{level}",
        "temperature=0", "max_tokens=96",
    )  # fmt: skip
    assert result.code == 0, result.err
    return read_jsonl(out)


def test_asking_for_more_verbosity_gives_longer_completions(
    steerlm_run: Path, tmp_path: Path, capsys
) -> None:
    metrics = [json.loads(line) for line in (steerlm_run / "metrics.jsonl").read_text().splitlines()]
    evals = [row["loss"] for row in metrics if row["split"] == "eval"]
    assert evals[-1] < 0.5 * evals[0]  # the held-out answers became far likelier
    lengths = {}
    for level in (0, 4):
        rows = steered(capsys, steerlm_run / "final", tmp_path / f"v{level}.jsonl", level)
        assert len(rows) == 12 and all(row["attributes"] == {"verbosity": level} for row in rows)
        lengths[level] = sum(len(row["completion"]) for row in rows) / len(rows)
    # the task's answers are 22 characters on average at verbosity 0 and 65 at 4
    assert lengths[4] > lengths[0] + 15, lengths


def test_a_resumed_steerlm_run_ends_with_the_same_weights(tmp_path: Path, capsys) -> None:
    # 36 rows / 8 a batch: the run crosses an epoch boundary, so the data position and the
    # per-epoch shuffle are part of what must resume exactly.
    rows = write_jsonl(tmp_path / "train.jsonl", read_jsonl(DATA / "steerlm_train.jsonl")[:36])
    schedule = {"max_steps": 8, "batch_size": 8, "save_every": 4, "lr_scheduler": "linear", "warmup_steps": 2}
    straight = steerlm_config(tmp_path / "straight", **schedule)
    straight["data"] |= {"train": rows, "eval": None}
    assert run_cli(capsys, "run", write_yaml(tmp_path / "straight.yaml", straight)).code == 0
    resumed = straight | {
        "output_dir": str(tmp_path / "resumed"),
        "resume": str(tmp_path / "straight" / "checkpoints" / "step_4"),
    }
    result = run_cli(capsys, "run", write_yaml(tmp_path / "resumed.yaml", resumed))
    assert result.code == 0, result.err
    assert_same_weights(
        load_weights(tmp_path / "resumed" / "final"), load_weights(tmp_path / "straight" / "final")
    )


def test_generate_needs_a_value_for_every_attribute_and_a_prompts_format(tmp_path: Path, capsys) -> None:
    prompts = str(DATA / "steerlm_prompts.jsonl")
    result = run_cli(capsys, "generate", "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"),
                     "data.format=steerlm_prompts", "data.steer=verbosity:4")  # fmt: skip
    assert_user_error(
        result, "steerlm_prompts.jsonl, row 1: no value for attribute 'helpfulness'", "data.steer"
    )
    result = run_cli(
        capsys, "generate", "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), "data.format=sft"
    )
    assert_user_error(result, "data.format=sft", "not a prompts format")
    assert not (tmp_path / "o.jsonl").exists()


# ---- align annotate ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attribute_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """reward_regression's verbosity head on the task's training rows (their `verbosity` column)."""
    tmp = tmp_path_factory.mktemp("attributes")
    config = {
        "algo": "reward_regression",
        "output_dir": str(tmp / "run"),
        "model": TINY_MODEL,
        "data": {"train": str(DATA / "steerlm_train.jsonl"), "attributes": ["verbosity"], "max_length": 96},
        "trainer": {"max_steps": 80, "batch_size": 16, **QUIET_TRAINER},
        "optim": {"lr": 5e-3},
    }
    assert align.cli.main(["run", write_yaml(tmp / "run.yaml", config)]) == 0
    return tmp / "run" / "final"


def test_annotate_labels_rows_with_the_attribute_model(attribute_model: Path, tmp_path: Path, capsys) -> None:
    truth = read_jsonl(DATA / "steerlm_eval.jsonl")  # tasks the attribute model never saw
    plain = write_jsonl(
        tmp_path / "plain.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in truth]
    )
    nemo = [
        {"system": "", "mask": "User", "conversations": [
            {"from": "User", "value": r["prompt"], "label": None},
            {"from": "Assistant", "value": r["completion"], "label": None},
        ]}
        for r in truth
    ]  # fmt: skip
    nemo_path = write_jsonl(tmp_path / "nemo.jsonl", nemo)
    out = tmp_path / "labelled.jsonl"
    result = run_cli(capsys, "annotate", "--model", str(attribute_model), "--data", plain, "--out", str(out))
    assert result.code == 0, result.err
    labelled = read_jsonl(out)
    assert [r["prompt"] for r in labelled] == [r["prompt"] for r in truth]  # same rows, same order
    right = sum(
        r["attributes"] == {"verbosity": t["verbosity"]} for r, t in zip(labelled, truth, strict=True)
    )
    assert right >= 0.8 * len(truth), [
        (r["attributes"], t["verbosity"]) for r, t in zip(labelled, truth, strict=True)
    ]
    # the labelled file is training data for --algo steerlm as it is
    fmt = SteerLMFormat(SteerLMData(train=str(out), **VERBOSITY), byte_tokenizer())
    assert len(fmt.load("train")) == len(truth)

    # an existing file is kept unless overwrite=true
    again = run_cli(
        capsys, "annotate", "--model", str(attribute_model), "--data", nemo_path, "--out", str(out)
    )
    assert_user_error(again, str(out), "overwrite=true")
    assert read_jsonl(out) == labelled
    again = run_cli(
        capsys,
        "annotate",
        "--model",
        str(attribute_model),
        "--data",
        nemo_path,
        "--out",
        str(out),
        "overwrite=true",
    )
    assert again.code == 0, again.err
    labels = [row["conversations"][1]["label"] for row in read_jsonl(out)]
    assert labels == [
        f"verbosity:{r['attributes']['verbosity']}" for r in labelled
    ]  # same model, same answers


def test_annotate_refuses_unknown_attributes_and_bad_rows(
    attribute_model: Path, tmp_path: Path, capsys
) -> None:
    data = write_jsonl(
        tmp_path / "in.jsonl", [{"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": ""}]
    )
    out = str(tmp_path / "out.jsonl")
    result = run_cli(
        capsys,
        "annotate",
        "--model",
        str(attribute_model),
        "--data",
        data,
        "--out",
        out,
        "attributes=[helpfulness]",
    )
    assert_user_error(result, "no head 'helpfulness'", "its heads: verbosity")
    result = run_cli(capsys, "annotate", "--model", str(attribute_model), "--data", data, "--out", out)
    assert_user_error(result, "in.jsonl, row 2: the completion is missing or empty")
    assert not Path(out).exists()


def test_the_chat_template_variant_goes_through_the_tokenizers_template(tmp_path: Path) -> None:
    rows = [{"prompt": "Q", "completion": "A", "verbosity": 2}]
    _, data = load_format(tmp_path, rows, template="chat", system="Be kind.")
    tok = byte_tokenizer()
    assert tok.decode(data[0]["prompt_ids"]) == (
        "<bos><|system|>Be kind.\n\nattributes: verbosity:2<|end|><|user|>Q<|end|><|assistant|>"
    )
    assert tok.decode(data[0]["completion_ids"]) == "A<|end|>"


def test_steer_values_are_checked_with_the_config(tmp_path: Path, capsys) -> None:
    prompts = str(DATA / "steerlm_prompts.jsonl")
    out = str(tmp_path / "o.jsonl")
    for steer, message in (
        ("verbosity:9", "'verbosity' is 9, outside 0..4"),
        ("verbosity:high", "not a number"),
    ):
        steering = ["data.format=steerlm_prompts", "data.attributes=[verbosity]", f"data.steer={steer}"]
        result = run_cli(capsys, "generate", "--prompts", prompts, "--out", out, *steering)
        assert_user_error(result, "align generate, data", message)
