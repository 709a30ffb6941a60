"""Data formats: malformed rows are errors naming file and row; over-long rows are truncated or
dropped and counted; prompt tokens are masked out of the loss; conversations go through the
chat template; the padding-free layout scores sequences exactly like the padded one.

The byte tokenizer makes lengths exact: every ASCII character is one token, a plain prompt
gets ``<bos>`` in front and a completion gets ``<|end|>`` (EOS) appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_user_error, dpo_config, run_cli, sft_config, write_jsonl, write_yaml

import align
from align import DataError, TinyModelConfig, default_plugins, lay_out
from align.builtin.data import PreferenceData, PreferenceFormat, SFTData, SFTFormat
from align_hf import byte_tokenizer, sequence_logps, tiny_llama

TOKENIZER = byte_tokenizer()
BOS, EOS = TOKENIZER.bos_token_id, TOKENIZER.eos_token_id


def ids(text: str) -> list[int]:
    out: list[int] = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    return out


def preference(tmp_path: Path, rows: list[dict[str, Any]], **cfg: Any) -> PreferenceFormat:
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    fmt = (
        default_plugins()
        .registry.get("data_format", "preference")
        .factory(PreferenceData(train=train, **cfg), TOKENIZER)
    )
    assert isinstance(fmt, PreferenceFormat)
    return fmt


def sft(tmp_path: Path, rows: list[dict[str, Any]], **cfg: Any) -> SFTFormat:
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    fmt = default_plugins().registry.get("data_format", "sft").factory(SFTData(train=train, **cfg), TOKENIZER)
    assert isinstance(fmt, SFTFormat)
    return fmt


GOOD = {"prompt": "Q: 1+1?\nA: ", "chosen": "two", "rejected": "three"}


# ---- malformed rows ------------------------------------------------------------------------


def test_bad_json_names_file_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"prompt": "x", "chosen": \n')
    fmt = (
        default_plugins()
        .registry.get("data_format", "preference")
        .factory(PreferenceData(train=str(path)), TOKENIZER)
    )
    with pytest.raises(DataError, match=rf"{path}, row 3: not valid JSON"):
        fmt.load("train")


def test_a_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    fmt = PreferenceFormat(PreferenceData(train=str(path)), TOKENIZER)
    with pytest.raises(DataError, match=rf"{path}, row 2: expected a JSON object"):
        fmt.load("train")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"prompt": "x", "rejected": "y"}, "row 4: missing 'chosen'"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "row 4: 'prompt' must be a string"),
        ({"prompt": "x", "chosen": ["a"], "rejected": "b"}, "row 4: 'chosen' must be a string"),
        ({"prompt": "x", "chosen": "", "rejected": "b"}, "row 4: 'chosen' is empty"),
    ],
    ids=["missing-column", "int", "list-of-str", "empty"],
)
def test_malformed_preference_row_names_file_and_row(tmp_path, bad_row, message):
    fmt = preference(tmp_path, [GOOD, GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(DataError, match=message) as info:
        fmt.load("train")
    assert str(tmp_path / "pairs.jsonl") in str(info.value)


def test_mixed_type_column_keeps_strings_that_look_like_json(tmp_path):
    good = {"prompt": "Q: 1+1?", "chosen": "2", "rejected": "3"}
    fmt = preference(tmp_path, [good, {"prompt": "x", "chosen": ["a"], "rejected": "b"}, good])
    with pytest.raises(DataError, match="row 2: 'chosen' must be a string"):
        fmt.load("train")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"prompt": "x"}, "row 2: missing 'completion'"),
        ({"prompt": "x", "completion": ""}, "row 2: 'completion' is empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: 'messages' must end with an assistant"),
        (
            {"messages": [{"role": "user"}]},
            "row 2: 'messages', message 1: a message needs 'role' and 'content'",
        ),
    ],
    ids=["missing", "empty", "no-assistant", "bad-message"],
)
def test_malformed_sft_row_names_file_and_row(tmp_path, bad_row, message):
    fmt = sft(tmp_path, [{"prompt": "a", "completion": "b"}, bad_row])
    with pytest.raises(DataError, match=message):
        fmt.load("train")


EMPTY_ANSWER = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"q": "x"}, r"^data\.jsonl, row 3: missing 'a'$"),
        ({"q": 5, "a": "y"}, r"^data\.jsonl, row 3: 'q' must be a string or a list"),
        ({"q": "x", "a": ""}, r"^data\.jsonl, row 3: 'a' is empty$"),
        ({"q": "x", "a": []}, r"^data\.jsonl, row 3: 'a' is an empty list of messages$"),
        ({"q": "x", "a": EMPTY_ANSWER[1:]}, r"^data\.jsonl, row 3: 'a' is empty \(its last message"),
    ],
    ids=["missing", "mistyped-prompt", "empty", "no-messages", "empty-message"],
)
def test_prompt_and_completion_names_file_row_and_column(row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        align.prompt_and_completion(row, "q", "a", "data.jsonl", 2)


def test_prompt_and_completion_returns_text_or_messages_as_given() -> None:
    assert align.prompt_and_completion({"q": "x", "a": "y"}, "q", "a", "f", 0) == ("x", "y")
    messages = EMPTY_ANSWER[:1]
    answer = [{"role": "assistant", "content": "ok"}]
    assert align.prompt_and_completion({"q": messages, "a": answer}, "q", "a", "f", 0) == (messages, answer)


def test_empty_assistant_message_is_an_error(tmp_path: Path) -> None:
    conversation = {"messages": [EMPTY_ANSWER[0], {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="row 2: 'messages' ends with an empty assistant message"):
        sft(tmp_path, [conversation, {"messages": EMPTY_ANSWER}]).load("train")
    pair = {"prompt": EMPTY_ANSWER[:1], "chosen": [{"role": "assistant", "content": "a"}]}
    rows = [
        {**pair, "rejected": [{"role": "assistant", "content": "b"}]},
        {**pair, "rejected": EMPTY_ANSWER[1:]},
    ]
    with pytest.raises(DataError, match=r"pairs\.jsonl, row 2: 'rejected' is empty \(its last message"):
        preference(tmp_path, rows).load("train")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"prompt": "x", "chosen": \n', "row 2: not valid JSON"),
        (json.dumps({"prompt": "x", "rejected": "y"}) + "\n", "row 2: missing 'chosen'"),
        (json.dumps({"prompt": 7, "chosen": "a", "rejected": "b"}) + "\n", "row 2: 'prompt' must be"),
    ],
    ids=["bad-json", "missing-column", "wrong-type"],
)
def test_malformed_data_stops_the_cli_with_exit_2(capsys, tmp_path, content, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + content)
    config = dpo_config(tmp_path / "out", data={"train": str(path), "eval": None})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, str(path), fragment)
    assert not (tmp_path / "out" / "final").exists()


def test_no_usable_rows_is_a_config_error(capsys, tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3)
    config = dpo_config(tmp_path / "out", data={"train": path, "eval": None})
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "no usable rows", path)


# ---- length rules --------------------------------------------------------------------------

# max_length 10 with a 3-character prompt ("abc" -> 4 tokens with <bos>) leaves room for 6
# completion tokens: "hello" + EOS fits exactly, "hello!" + EOS (7) does not.
LENGTH_ROWS = [
    {"prompt": "abc", "chosen": "hello", "rejected": "world"},  # fits
    {"prompt": "abc", "chosen": "hello!", "rejected": "world"},  # chosen too long
    {"prompt": "abc", "chosen": "hi", "rejected": "worlds"},  # rejected too long
    {"prompt": "abcdefghijkl", "chosen": "a", "rejected": "b"},  # prompt alone is 13 tokens
    {"prompt": "abc", "chosen": "same", "rejected": "same"},  # no signal: skipped
]


def test_overlong_rows_are_truncated_and_counted(tmp_path):
    fmt = preference(tmp_path, LENGTH_ROWS, max_length=10, overlong="truncate")
    data = fmt.load("train")
    assert len(data) == 3
    assert fmt.stats() == {
        "train_truncated": 2,
        "train_dropped_long_prompt": 1,
        "train_skipped_identical_pair": 1,
    }
    assert data["example_id"] == [0, 1, 2]
    for row in data:
        assert row["prompt_ids"] == [BOS, *ids("abc")]
        for key in ("chosen_ids", "rejected_ids"):
            assert len(row["prompt_ids"]) + len(row[key]) <= 10
    assert data[0]["chosen_ids"] == [*ids("hello"), EOS]  # untouched
    assert data[1]["chosen_ids"] == ids("hello!")  # cut to the 6 tokens that fit
    assert data[2]["rejected_ids"] == ids("worlds")


def test_overlong_rows_are_dropped_and_counted(tmp_path):
    fmt = preference(tmp_path, LENGTH_ROWS, max_length=10, overlong="drop")
    data = fmt.load("train")
    assert len(data) == 1
    assert data[0]["chosen_ids"] == [*ids("hello"), EOS]
    assert fmt.stats() == {
        "train_dropped_overlong": 2,
        "train_dropped_long_prompt": 1,
        "train_skipped_identical_pair": 1,
    }


def test_long_prompts_keep_their_last_tokens(tmp_path):
    rows = [{"prompt": "0123456789", "completion": "ok"}, {"prompt": "ab", "completion": "ok"}]
    fmt = sft(tmp_path, rows, max_prompt_length=4)
    data = fmt.load("train")
    assert data[0]["prompt_ids"] == ids("6789")
    assert data[1]["prompt_ids"] == [BOS, *ids("ab")]
    assert data[0]["completion_ids"] == [*ids("ok"), EOS]
    assert fmt.stats() == {"train_truncated": 1}


def test_several_train_files_are_concatenated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "x"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "completion": "y"}] * 2)
    data = SFTFormat(SFTData(train=[a, b]), TOKENIZER).load("train")
    assert data["example_id"] == [0, 1, 2, 3, 4]
    assert [row["prompt_ids"][-1] for row in data] == ids("aaabb")


# ---- masking and chat templates ------------------------------------------------------------

SFT_ROWS = [
    {"prompt": "Q: hi\nA: ", "completion": "hello"},
    {"prompt": "x", "completion": "a longer answer"},
    {"prompt": "a much longer prompt here", "completion": "ok"},
]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path, padding_free):
    fmt = sft(tmp_path, SFT_ROWS, padding_free=padding_free)
    rows = list(fmt.load("train"))
    tokens = fmt.collate(rows).tokens
    assert tokens.num_sequences == 3 and tokens.packed is padding_free
    for index, row in enumerate(rows):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        assert prompt == [BOS, *ids(SFT_ROWS[index]["prompt"])]
        assert completion == [*ids(SFT_ROWS[index]["completion"]), EOS]
        r = 0 if padding_free else index
        positions = (tokens.sequence_ids[r] == index).nonzero().flatten()
        assert tokens.input_ids[r, positions].tolist() == prompt + completion
        mask = tokens.loss_mask[r, positions].tolist()
        assert mask == [False] * len(prompt) + [True] * len(completion)
        if padding_free:
            assert tokens.position_ids[0, positions].tolist() == list(range(len(prompt) + len(completion)))
    # Nothing outside a completion is ever scored (pads included).
    assert int(tokens.loss_mask.sum()) == sum(len(r["completion_ids"]) for r in rows)
    assert not tokens.loss_mask[tokens.sequence_ids < 0].any()


def small_model(attn: str = "sdpa") -> torch.nn.Module:
    knobs = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, init_seed=3)
    model = tiny_llama(knobs, len(TOKENIZER), attn)
    model.eval()
    return model


def test_sequence_logps_score_only_completion_tokens(tmp_path):
    """The per-sequence log-prob is the sum over completion tokens of log p(token | prefix),
    recomputed here from the full logits of each sequence alone."""
    fmt = sft(tmp_path, SFT_ROWS)
    rows = list(fmt.load("train"))
    model = small_model()
    with torch.no_grad():
        got = sequence_logps(model, fmt.collate(rows).tokens)
        for index, row in enumerate(rows):
            prompt, completion = row["prompt_ids"], row["completion_ids"]
            full = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
            expected = sum(logp[t - 1, full[0, t]].item() for t in range(len(prompt), full.shape[1]))
            assert got.sum[index].item() == pytest.approx(expected, abs=1e-4)
            assert got.count[index].item() == len(completion)


def test_chat_messages_go_through_the_chat_template(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    ]
    row = sft(tmp_path, rows).load("train")[0]
    # The tokenizer's template, written out by hand.
    assert TOKENIZER.decode(row["prompt_ids"]) == (
        "<bos><|system|>be brief<|end|><|user|>hi there<|end|><|assistant|>"
    )
    assert TOKENIZER.decode(row["completion_ids"]) == "hello<|end|>"
    assert row["completion_ids"][-1] == EOS
    expected_prompt = TOKENIZER.apply_chat_template(rows[0]["messages"][:2], add_generation_prompt=True)
    if not isinstance(expected_prompt, list):  # transformers 5 returns a BatchEncoding
        expected_prompt = expected_prompt["input_ids"]
    assert row["prompt_ids"] == expected_prompt


def test_a_template_with_a_newline_after_end_of_turn_gets_no_second_eos(tmp_path, monkeypatch):
    """ChatML-style templates (SmolLM2, Qwen) render ``<|im_end|>\\n``: the completion ends at the
    end-of-turn token, not at an extra EOS appended after the newline."""
    chatml = TOKENIZER.chat_template.replace("<|end|>", "<|end|>\n")
    monkeypatch.setattr(TOKENIZER, "chat_template", chatml)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    row = sft(tmp_path, rows).load("train")[0]
    assert TOKENIZER.decode(row["completion_ids"]) == "hello<|end|>"
    assert row["completion_ids"].count(EOS) == 1


def test_conversational_preference_rows(tmp_path):
    prompt = [{"role": "user", "content": "2+2?"}]
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {"prompt": prompt, "chosen": "four", "rejected": "five"},  # plain completions, chat prompt
    ]
    # One kind of value per column (see the mixed-column test): each shape in its own file.
    data = [preference(tmp_path / str(i), [row]).load("train")[0] for i, row in enumerate(rows)]
    for row in data:
        assert TOKENIZER.decode(row["prompt_ids"]) == "<bos><|user|>2+2?<|end|><|assistant|>"
    assert TOKENIZER.decode(data[0]["chosen_ids"]) == "4<|end|>"
    assert TOKENIZER.decode(data[0]["rejected_ids"]) == "5<|end|>"
    assert TOKENIZER.decode(data[1]["chosen_ids"]) == "four<|end|>"


# ---- padding-free layout -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_gives_the_same_logps_as_padded(tmp_path, attn):
    rows = [
        {"prompt": "Q: what is up?\nA: ", "chosen": "the sky", "rejected": "down below, I think"},
        {"prompt": "x", "chosen": "a fairly long chosen answer", "rejected": "no"},
        {"prompt": "medium prompt", "chosen": "yes", "rejected": "maybe"},
    ]
    padded_fmt = preference(tmp_path / "padded", rows)
    packed_fmt = preference(tmp_path / "packed", rows, padding_free=True)
    batch_rows = list(padded_fmt.load("train"))
    padded = padded_fmt.collate(batch_rows).tokens
    packed = packed_fmt.collate(list(packed_fmt.load("train"))).tokens
    assert padded.input_ids.shape[0] == 6 and packed.input_ids.shape[0] == 1
    assert packed.pad_fraction == 0.0 and padded.pad_fraction > 0.2
    assert padded.num_tokens == packed.num_tokens
    model = small_model(attn)
    with torch.no_grad():
        a = sequence_logps(model, padded)
        b = sequence_logps(model, packed)
    assert torch.equal(a.count, b.count)
    # Sums of ~30 log-probs reach ~-160, where one float32 step (ulp) is 1.5e-5: allow 2 ulps.
    assert torch.allclose(a.sum, b.sum, atol=1e-5, rtol=2e-7)
    # ...and both equal each sequence scored on its own (the packed row leaks nothing across).
    with torch.no_grad():
        for index in range(6):
            row = batch_rows[index % 3]
            completion = row["chosen_ids"] if index < 3 else row["rejected_ids"]
            alone = sequence_logps(model, lay_out([(row["prompt_ids"], completion)], 0, False))
            assert alone.sum.item() == pytest.approx(b.sum[index].item(), abs=1e-5, rel=2e-7)


def test_sft_config_via_cli_validates_data_keys(capsys, tmp_path):
    config = sft_config(tmp_path / "out", data={"overlong": "drop", "padding_free": True, "max_length": 64})
    assert run_cli(capsys, "validate", write_yaml(tmp_path / "ok.yaml", config)).code == 0
    config["data"]["max_length"] = 0
    result = run_cli(capsys, "validate", write_yaml(tmp_path / "bad.yaml", config))
    assert_user_error(result, "data.max_length", "greater than 0")
