"""Every user mistake is a clear error: exit code 2, no traceback, a short message naming the
key, file or row. Paths of the wrong kind are found before any model loads; files that are not
what they claim are named with the line or row; ``align validate`` rejects what ``align run``
would; inputs that would silently change what is trained are refused.

Most cases run ``align validate`` (nothing is loaded); cases about rows run ``align run`` on a
few rows with the tiny model and stop while the data loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import DATA, assert_user_error, dpo_config, run_cli, sft_config, write_jsonl, write_yaml

import align.cli
import align.hf_models
import align.loading
import align_hf.backend

PAIR = {"prompt": "Q: 1+1?\nA: ", "chosen": "two", "rejected": "three"}


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a tokenizer or model, or starting a training, fails the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mistake must be found before any model loads")

    monkeypatch.setattr(align.hf_models, "load_causal_lm", forbidden)
    monkeypatch.setattr(align_hf.backend, "load_hf_tokenizer", forbidden)
    monkeypatch.setattr(align.cli, "train", forbidden)


def dpo_yaml(tmp_path: Path, output_dir: str | None = None, **sections: Any) -> str:
    config = dpo_config(Path(output_dir or tmp_path / "out"), **sections)
    return write_yaml(tmp_path / "run.yaml", config)


def pairs_run(tmp_path: Path, rows: list[dict[str, Any]], **data: Any) -> str:
    """A DPO config that trains on ``rows`` (no eval split)."""
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return dpo_yaml(tmp_path, data={"train": train, "eval": None, **data})


def sft_run(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = sft_config(tmp_path / "out", data={"train": train, "eval": None})
    return write_yaml(tmp_path / "run.yaml", config)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ---- paths of the wrong kind or permission -------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "run"])
def test_output_dir_that_is_a_file(capsys, tmp_path, no_model_loading, command):
    (tmp_path / "taken").write_text("a user's file")
    path = dpo_yaml(tmp_path, output_dir=str(tmp_path / "taken"))
    assert_user_error(run_cli(capsys, command, path), "output_dir", "taken is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "a user's file"


def test_output_dir_below_a_file(capsys, tmp_path, no_model_loading):
    (tmp_path / "taken").write_text("x")
    path = dpo_yaml(tmp_path, output_dir=str(tmp_path / "taken" / "run"))
    assert_user_error(run_cli(capsys, "validate", path), "output_dir", "cannot be created", "taken is a file")


def test_reference_cache_dir_that_is_a_file(capsys, tmp_path, no_model_loading):
    (tmp_path / "cache").write_text("x")
    path = dpo_yaml(tmp_path, reference={"cache_dir": str(tmp_path / "cache")})
    assert_user_error(run_cli(capsys, "run", path), "reference.cache_dir", "is a file, not a folder")


def test_read_only_output_dir(capsys, tmp_path, no_model_loading, monkeypatch):
    """Root may write anywhere, so the write probe is what is simulated here."""
    monkeypatch.setattr(align.loading, "can_write", lambda folder: False)
    (tmp_path / "ro").mkdir()
    path = dpo_yaml(tmp_path, output_dir=str(tmp_path / "ro"))
    assert_user_error(run_cli(capsys, "validate", path), "output_dir", "ro is read-only")
    path = dpo_yaml(tmp_path, output_dir=str(tmp_path / "ro" / "new" / "run"))
    assert_user_error(run_cli(capsys, "validate", path), "cannot be created", "ro is read-only")


@pytest.mark.skipif(is_root(), reason="root may write into a read-only folder")
def test_read_only_folder_by_permissions(capsys, tmp_path, no_model_loading):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        path = dpo_yaml(tmp_path, output_dir=str(folder / "run"))
        assert_user_error(run_cli(capsys, "validate", path), "output_dir", "is read-only")
    finally:
        folder.chmod(0o755)


def test_write_probe_leaves_nothing_behind(capsys, tmp_path, no_model_loading):
    out = tmp_path / "existing"
    out.mkdir()
    path = dpo_yaml(tmp_path, output_dir=str(out / "new" / "run"))
    result = run_cli(capsys, "validate", path)
    assert result.code == 0, result.err
    assert list(out.iterdir()) == [], "validate creates nothing"
    assert align.loading.can_write(out) and list(out.iterdir()) == []


def test_data_folder_that_is_not_a_saved_dataset(capsys, tmp_path, no_model_loading):
    folder = tmp_path / "jsonl_files"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [PAIR])
    path = dpo_yaml(tmp_path, data={"train": str(folder)})
    assert_user_error(
        run_cli(capsys, "validate", path), "data.train", "not a dataset saved with save_to_disk"
    )


def test_saved_dataset_dict_asks_for_one_split(capsys, tmp_path, no_model_loading):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([PAIR])}).save_to_disk(str(folder))
    path = dpo_yaml(tmp_path, data={"train": str(folder)})
    assert_user_error(run_cli(capsys, "validate", path), "data.train", "DatasetDict", f"{folder}/train")


def test_saved_dataset_folder_is_accepted(capsys, tmp_path, no_model_loading):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([PAIR]).save_to_disk(str(folder))
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path, data={"train": str(folder)}))
    assert result.code == 0, result.err


@pytest.mark.parametrize("split", ["train", "eval"])
def test_missing_data_file_is_found_by_validate(capsys, tmp_path, no_model_loading, split):
    missing = str(tmp_path / "nowhere.jsonl")
    path = dpo_yaml(tmp_path, data={split: missing})
    assert_user_error(run_cli(capsys, "validate", path), f"data.{split}", "data file not found", missing)


@pytest.mark.skipif(is_root(), reason="root reads files whatever their permissions")
def test_unreadable_data_file(capsys, tmp_path, no_model_loading):
    train = Path(write_jsonl(tmp_path / "pairs.jsonl", [PAIR]))
    train.chmod(0)
    try:
        path = dpo_yaml(tmp_path, data={"train": str(train)})
        assert_user_error(run_cli(capsys, "validate", path), "data.train", "cannot be read")
    finally:
        train.chmod(0o644)


def test_every_path_problem_is_listed_at_once(capsys, tmp_path, no_model_loading):
    (tmp_path / "taken").write_text("x")
    config = dpo_config(tmp_path / "taken", data={"train": str(tmp_path / "a.jsonl")}, model={"path": "./no"})
    result = run_cli(capsys, "validate", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "output_dir", "data.train", "model.path: no such file or folder: ./no")


def test_paths_are_checked_before_any_model_loads(capsys, tmp_path, monkeypatch):
    built: list[str] = []
    real = align.hf_models.load_causal_lm
    monkeypatch.setattr(
        align.hf_models, "load_causal_lm", lambda *a, **k: built.append("model") or real(*a, **k)
    )
    (tmp_path / "cache").write_text("x")
    path = dpo_yaml(tmp_path, reference={"cache_dir": str(tmp_path / "cache")})
    assert_user_error(run_cli(capsys, "run", path), "reference.cache_dir")
    assert built == [] and not (tmp_path / "out").exists()


# ---- files that are not what they claim ----------------------------------------------------------


def test_non_utf8_config_names_file_and_line(capsys, tmp_path, no_model_loading):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("algo: dpo\n# café\n".encode("latin-1"))
    assert_user_error(run_cli(capsys, "validate", str(path)), str(path), "line 2", "not UTF-8")


def test_non_utf8_data_names_file_and_line(capsys, tmp_path):
    train = tmp_path / "pairs.jsonl"
    lines = [json.dumps(PAIR), json.dumps(PAIR), json.dumps({**PAIR, "chosen": "café"}, ensure_ascii=False)]
    train.write_bytes("\n".join(lines).encode("latin-1"))
    path = dpo_yaml(tmp_path, data={"train": str(train), "eval": None})
    assert_user_error(run_cli(capsys, "run", path), str(train), "line 3", "not UTF-8")


def test_non_utf8_text_inside_parquet_names_the_row(capsys, tmp_path):
    chosen = pa.array([b"two", b"caf\xe9"], type=pa.binary()).view(pa.string())  # no UTF-8 check
    table = pa.table({"prompt": ["a", "b"], "chosen": chosen, "rejected": ["x", "y"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    path = dpo_yaml(tmp_path, data={"train": str(tmp_path / "pairs.parquet"), "eval": None})
    assert_user_error(run_cli(capsys, "run", path), "pairs.parquet", "row 2", "not UTF-8")


@pytest.mark.parametrize(("suffix", "kind"), [(".parquet", "Parquet"), (".arrow", "Arrow")])
def test_garbage_binary_data_file(capsys, tmp_path, suffix, kind):
    train = tmp_path / f"pairs{suffix}"
    train.write_bytes(b"this is not a table " * 20)
    path = dpo_yaml(tmp_path, data={"train": str(train), "eval": None})
    assert_user_error(
        run_cli(capsys, "run", path),
        str(train),
        f"cannot be read as a{'n' if kind == 'Arrow' else ''} {kind}",
    )


def test_bad_yaml_value_in_an_override(capsys, tmp_path, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path), "optim.betas=[0.9,")
    assert_user_error(result, "override 'optim.betas=[0.9,'", "is not valid YAML", "quote it")


def test_duplicate_key_names_key_and_both_lines(capsys, tmp_path, no_model_loading):
    path = tmp_path / "twice.yaml"
    path.write_text("algo: dpo\ntrainer:\n  max_steps: 5\n  batch_size: 2\n  max_steps: 50\n")
    assert_user_error(
        run_cli(capsys, "validate", str(path)), str(path), "duplicate key 'max_steps'", "line 5", "line 3"
    )


def test_duplicate_key_in_a_flow_mapping_and_in_an_override(capsys, tmp_path, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path), "loss={name: dpo, beta: 0.1, beta: 0.2}")
    assert_user_error(result, "duplicate key 'beta'")


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """``<<: *base`` then a key of the mapping's own is not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base {beta: 0.1, name: dpo}\nloss:\n  <<: *base\n  beta: 0.3\n")
    assert align.loading.read_yaml(path)["loss"] == {"beta": 0.3, "name": "dpo"}


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-5`` as a string; configs read it as the number it looks like."""
    path = tmp_path / "lr.yaml"
    path.write_text("optim: {lr: 1e-5, eps: 1.0e-8}\nname: '1e-5'\n")
    assert align.loading.read_yaml(path) == {"optim": {"lr": 1e-5, "eps": 1e-8}, "name": "1e-5"}


# ---- validate catches what run would reject ------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("loss=[]", ("loss", "at least 1 item")),
        ("optim.betas=[0.9, 1.0]", ("optim.betas", "[0, 1)")),
        ("optim.betas=[-0.1, 0.9]", ("optim.betas", "[0, 1)")),
        ("model.tiny.num_heads=3", ("model.tiny", "num_heads (3) must divide", "hidden_size (32)")),
        ("model.tiny.hidden_size=30", ("model.tiny", "must be even")),
        ("trainer.warmup_steps=5", ("trainer.warmup_steps (5) is longer than the run", "max_steps=4")),
        ("trainer.batch_size=true", ("trainer.batch_size", "true/false is not a number", "got true")),
        ("optim.lr=false", ("optim.lr", "true/false is not a number")),
        ("trainer.batch_size='8'", ("trainer.batch_size", "without quotes", "'8'")),
        ("trainer.batch_size=8.0", ("trainer.batch_size", "whole number", "8.0")),
        ("data.padding_free=1", ("data.padding_free", "true or false", "got 1")),
        ("optim.lr=.inf", ("optim.lr", "finite")),
        ("seed=-1", ("seed", "greater than or equal to 0")),
        ("loss.weight=-1", ("loss.weight", "greater than or equal to 0")),
        ("data.max_prompt_length=128", ("data.max_prompt_length (128) must be less than data.max_length",)),
    ],
)
def test_validate_rejects(capsys, tmp_path, no_model_loading, override, fragments):
    assert_user_error(run_cli(capsys, "validate", dpo_yaml(tmp_path), override), *fragments)


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=1",
        "trainer.warmup_steps=4",
        "optim.betas=[0, 0.99]",
        "model.tiny.num_heads=4",
        "optim.lr=2e-4",
    ],
)
def test_validate_accepts_the_edges(capsys, tmp_path, no_model_loading, override):
    """An integer stands for a float; a warmup as long as the run; beta1 = 0."""
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path), override)
    assert result.code == 0, result.err


# ---- inputs that would silently change what is trained -------------------------------------------


def test_algo_flag_contradicting_the_config(capsys, tmp_path, no_model_loading):
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path), "--algo", "sft")
    assert_user_error(result, "--algo sft contradicts `algo: dpo`")
    assert run_cli(capsys, "validate", dpo_yaml(tmp_path), "--algo", "dpo").code == 0


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "usr", "content": "hi"}], "unknown role 'usr'"),
        ([{"role": "human", "content": "hi"}], "unknown role 'human'"),
        ([{"role": 1, "content": "hi"}], "the role must be a string, got 1"),
        ([{"role": "user", "content": 5}], "the content must be a string, got 5"),
        ([{"role": "user", "text": "hi"}], "a message needs 'role' and 'content'"),
        ([], "'prompt' is an empty list of messages"),
    ],
)
def test_bad_chat_messages_name_file_row_and_message(capsys, tmp_path, messages, fragment):
    good = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    rows = [{**PAIR, "prompt": good}, {**PAIR, "prompt": messages}]
    result = run_cli(capsys, "run", pairs_run(tmp_path, rows))
    assert_user_error(result, "pairs.jsonl, row 2", fragment)


def test_sft_conversation_with_an_unknown_role(capsys, tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "gpt", "content": "hello"}]}
    result = run_cli(capsys, "run", sft_run(tmp_path, [bad]))
    assert_user_error(result, "sft.jsonl, row 1", "'messages', message 2", "unknown role 'gpt'")


def test_attribute_no_row_has(capsys, tmp_path):
    rows = [{"prompt": "a", "completion": "b", "helpfulness": 3.0, "verbosity": 1.0}] * 4
    train = write_jsonl(tmp_path / "scored.jsonl", rows)
    config = sft_config(
        tmp_path / "out",
        algo="reward_regression",
        data={"format": "scored", "train": train, "eval": None, "attributes": ["helpfulness", "correctnes"]},
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(
        result, "data.attributes", "'correctnes'", "scored.jsonl", "helpfulness, prompt, verbosity"
    )


def test_max_length_so_small_that_no_row_survives(capsys, tmp_path):
    result = run_cli(capsys, "run", pairs_run(tmp_path, [PAIR] * 3, max_length=4))
    assert_user_error(result, "data.train", "none of the 3 rows", "0 kept", "3 dropped", "data.max_length=4")


def test_every_pair_identical_says_so(capsys, tmp_path):
    result = run_cli(capsys, "run", pairs_run(tmp_path, [{**PAIR, "rejected": PAIR["chosen"]}] * 2))
    assert_user_error(result, "data.train", "2 skipped: chosen equals rejected")


# ---- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("run", "{cfg}", "--resum"),
        ("validate", "{cfg}", "--alg", "dpo"),
        ("list", "--js"),
        ("list", "--kin", "loss"),
    ],
)
def test_abbreviated_flags_are_errors(capsys, tmp_path, no_model_loading, argv):
    cfg = dpo_yaml(tmp_path)
    result = run_cli(capsys, *(arg.format(cfg=cfg) for arg in argv))
    assert result.code == 2
    assert "unrecognized arguments" in result.err or "invalid choice" in result.err, result.err


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("a..b=1", "has an empty part"),
        (".a=1", "has an empty part"),
        ("a.=1", "has an empty part"),
        ("=1", "has no key before '='"),
        ("trainer.max_steps", "has no '='"),
        ("trainer.max steps=3", "'max steps' is not a key"),
        ("trainer.max_steps=[1,", "is not valid YAML"),
    ],
)
def test_malformed_overrides_say_what_is_wrong(capsys, tmp_path, no_model_loading, override, fragment):
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path), override)
    assert_user_error(result, f"override '{override}'", fragment)


def test_plugin_env_naming_nothing_installed(capsys, tmp_path, no_model_loading, monkeypatch):
    monkeypatch.setenv("ALIGN_PLUGINS", "dpo,nosuch")
    result = run_cli(capsys, "validate", dpo_yaml(tmp_path))
    assert_user_error(result, "ALIGN_PLUGINS names nosuch", "installed:", "dpo")


# ---- a sweep of mistakes a new user makes --------------------------------------------------------

# (override, fragments): each is applied to a valid DPO config and `align validate` must refuse it.
CONFIG_MISTAKES = [
    ("model=tiny", ("model", "mapping of keys", "'tiny'")),
    ("trainer=[1, 2]", ("trainer", "mapping of keys")),
    ("data.train=5", ("data.train", "valid string")),
    ("data.train=[]", ("data.train", "names no data")),
    ("data.train=", ("data.train", "names no data")),
    ("loss=5", ("loss", "mapping of keys")),
    ("loss=[dpo]", ("loss.0", "mapping of keys", "'dpo'")),
    ("loss=[{name: dpo}, {name: nosuch}]", ("loss.1", "unknown loss 'nosuch'", "'ipo'")),
    ("loss.beta=high", ("loss.beta", "valid number", "'high'")),
    ("optim.lr=-0.1", ("optim.lr", "greater than 0")),
    ("optim.name=adam", ("optim.name", "'adam'", "'adamw'")),
    ("optim.betas=[0.9, 0.8, 0.7]", ("optim.betas", "at most 2 items")),
    ("trainer.epochs=0", ("trainer.epochs", "greater than 0")),
    ("trainer.lr_scheduler=poly", ("trainer.lr_scheduler", "'poly'")),
    ("trainer.keep_checkpoints=0", ("trainer.keep_checkpoints",)),
    ("model.dtype=float64", ("model.dtype", "'float64'")),
    ("model.tiny.hidden_size=0", ("model.tiny.hidden_size", "greater than 0")),
    ("model.path=./no/such/model", ("model.path", "no such file or folder")),
    ("model.tokenizer=/no/such/tokenizer", ("model.tokenizer", "no such file or folder")),
    ("data.format=sft", ("data.format", "'sft'", "'preference'")),
    ("data.overlong=cut", ("data.overlong", "'cut'")),
    ("data.max_length=0", ("data.max_length", "greater than 0")),
    ("reference.mode=lazy", ("reference.mode", "'lazy'")),
    ("reference.batch_size=true", ("reference.batch_size", "true/false is not a number")),
    ("overwrite=maybe", ("overwrite", "true or false", "'maybe'")),
    ("resume=5", ("resume",)),
    ("seed=2024-01-01", ("seed", "valid integer")),
    ("foo=1", ("foo", "unknown key")),
    ("trainer.max_step=3", ("trainer.max_step", "did you mean 'max_steps'")),
    ("algo=nosuch", ("unknown algorithm 'nosuch'",)),
    ("trainer=null", ("trainer", "mapping of keys", "got null")),
    ("trainer.max_steps=1e3", ("trainer.max_steps", "whole number (1000)")),
    ("trainer.max_steps.x=1", ("override 'trainer.max_steps.x=1'", "'max_steps' holds a value (4)")),
    ("trainer.tensorboard=maybe", ("trainer.tensorboard", "'maybe'")),
    ("trainer.save_every=-5", ("trainer.save_every", "greater than or equal to 0")),
    ("data.group_by_length=1", ("data.group_by_length", "true or false")),
    ("data.eval=[]", ("data.eval", "names no data")),
    ("data.columns.prompt=5", ("data.columns.prompt", "valid string")),
    ("callbacks=[{name: nosuch}]", ("callbacks.0.name", "'nosuch'")),
]


@pytest.mark.parametrize(("override", "fragments"), CONFIG_MISTAKES, ids=[m[0] for m in CONFIG_MISTAKES])
def test_config_mistakes(capsys, tmp_path, no_model_loading, override, fragments):
    assert_user_error(run_cli(capsys, "validate", dpo_yaml(tmp_path), override), *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ("data: required key is missing",)),
        ("- 1\n- 2\n", ("must hold a mapping of keys, not list",)),
        ("just words\n", ("must hold a mapping of keys, not str",)),
        ("algo: dpo\ntrainer: [\n", ("not valid YAML", "line 3")),
        ("algo: dpo\ntrainer:\n\tmax_steps: 1\n", ("not valid YAML", "line 3", "'\\t'")),
        ("algo: 5\n", ("--algo dpo contradicts `algo: 5`",)),
        ("algo: dpo\n---\nalgo: sft\n", ("not valid YAML", "line 2", "another document")),
        ("algo: dpo\nloss: *base\n", ("not valid YAML", "line 2", "undefined alias 'base'")),
        ("algo: dpo\x00\n", ("not valid YAML", "character 10", "not allowed")),
    ],
    ids=["empty", "list", "scalar", "unclosed", "tab", "algo-number", "two-documents", "alias", "nul"],
)
def test_config_files_that_are_not_configs(capsys, tmp_path, no_model_loading, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_user_error(run_cli(capsys, "validate", str(path), "--algo", "dpo"), *fragments)


def test_two_config_files(capsys, tmp_path, no_model_loading):
    first = dpo_yaml(tmp_path)
    assert_user_error(run_cli(capsys, "validate", first, first), f"override '{first}' has no '='")


def test_kto_label_that_is_not_a_boolean(capsys, tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": 1}] * 2
    train = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    config = sft_config(
        tmp_path / "out", algo="kto", data={"format": "unpaired", "train": train, "eval": None}
    )
    result = run_cli(capsys, "run", write_yaml(tmp_path / "run.yaml", config))
    assert_user_error(result, "unpaired.jsonl, row 1", "'label' must be true or false, got 1")


def test_config_path_that_is_a_folder(capsys, tmp_path, no_model_loading):
    assert_user_error(run_cli(capsys, "validate", str(tmp_path)), str(tmp_path), "is a folder")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ("is empty",)),
        (b"\n\n  \n", ("holds no rows",)),
        (b'{"prompt": "a", "chosen": "b"}\n', ("row 1", "missing 'rejected'")),
        (b'{"prompt": "a", "chosen": 5, "rejected": "c"}\n', ("row 1", "'chosen' must be a string")),
        (
            b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
            ("row 2", "not valid JSON"),
        ),
        (b'["a", "b"]\n', ("row 1",)),
    ],
    ids=["empty", "blank-lines", "missing-column", "number", "bad-json", "not-an-object"],
)
def test_data_files_with_bad_rows(capsys, tmp_path, content, fragments):
    train = tmp_path / "pairs.jsonl"
    train.write_bytes(content)
    path = dpo_yaml(tmp_path, data={"train": str(train), "eval": None})
    assert_user_error(run_cli(capsys, "run", path), "pairs.jsonl", *fragments)


def test_eval_file_with_other_columns(capsys, tmp_path):
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"question": "a", "answer": "b"}])
    path = dpo_yaml(tmp_path, data={"train": str(DATA / "preference_train.jsonl"), "eval": evaluation})
    assert_user_error(run_cli(capsys, "run", path), "eval.jsonl, row 1", "missing 'prompt'")


def test_unsupported_data_file_type(capsys, tmp_path, no_model_loading):
    (tmp_path / "pairs.txt").write_text("hello")
    path = dpo_yaml(tmp_path, data={"train": str(tmp_path / "pairs.txt")})
    assert_user_error(run_cli(capsys, "validate", path), "data.train", "unsupported file type '.txt'")


def test_unknown_schema_and_list_kind(capsys):
    assert_user_error(run_cli(capsys, "schema", "nosuch"), "unknown algorithm 'nosuch'")
    result = run_cli(capsys, "list", "--kind", "nosuch")
    assert result.code == 2 and "invalid choice: 'nosuch'" in result.err


def test_a_missing_model_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    """A pruned checkpoint or a mistyped run folder is "no such folder", not transformers'
    complaint about a malformed hub repository id."""
    from align import ConfigError, ModelConfig
    from align.hf_models import load_hf_tokenizer

    missing = tmp_path / "runs" / "x" / "checkpoints" / "step_12" / "model"
    with pytest.raises(ConfigError, match="no such folder"):
        load_hf_tokenizer(ModelConfig(path=str(missing)))
    with pytest.raises(ConfigError, match="no such folder"):
        load_hf_tokenizer(ModelConfig(path="runs/never/final"))
