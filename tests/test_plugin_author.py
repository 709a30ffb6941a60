"""What docs/writing-a-plugin.md promises a plugin author: a loss is testable through the public
``align.loss_function``; the learner detaches metrics; the default evaluation averages over
the whole split by ``LossOutput.weight``; a custom data format built on ``align.TokenizedFormat``
gets statuses counted and example ids; errors about data paths, unfit plugins and a switched
``loss.name`` say what happened.

The SimPO example package (``examples/plugins/align-simpo``) is registered from its source
folder with ``ALIGN_PLUGIN_MODULES``, as the docs suggest while developing a plugin.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from helpers import (
    DATA,
    EXAMPLES,
    assert_user_error,
    dpo_config,
    head_jsonl,
    read_metrics,
    run_cli,
    sft_config,
    write_jsonl,
    write_yaml,
)

import align
from align.builtin.data import SFTFormat
from align.loading import apply_overrides, read_yaml, validate_run_config
from align_hf import byte_tokenizer
from align_sft import SFT

SIMPO_SOURCE = EXAMPLES / "plugins" / "align-simpo" / "src"


@pytest.fixture
def simpo_plugins(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every installed plugin plus the SimPO example, registered from its source folder."""
    monkeypatch.syspath_prepend(str(SIMPO_SOURCE))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "align_simpo")
    yield align.load_plugins()
    sys.modules.pop("align_simpo", None)


def preference_batch() -> align.PreferenceBatch:
    """Two pairs, with every number small enough to follow by hand."""
    return align.PreferenceBatch(
        chosen_logps=torch.tensor([-4.0, -6.0]),
        rejected_logps=torch.tensor([-9.0, -6.0]),
        chosen_lengths=torch.tensor([2, 3]),
        rejected_lengths=torch.tensor([3, 2]),
        ref_chosen_logps=torch.tensor([-5.0, -6.0]),
        ref_rejected_logps=torch.tensor([-8.0, -7.0]),
    )


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- testing a loss --------------------------------------------------------------------------


def test_a_registered_loss_is_called_on_a_hand_built_batch():
    dpo = align.loss_function("dpo", beta=0.5)
    # logits: (-4 - -5) - (-9 - -8) = 2 and (-6 - -6) - (-6 - -7) = -1
    expected = -(log_sigmoid(0.5 * 2) + log_sigmoid(0.5 * -1)) / 2
    assert float(dpo(preference_batch()).loss) == pytest.approx(expected, rel=1e-6)


def test_a_plugin_loss_under_development_is_reached_the_same_way(simpo_plugins):
    simpo = align.loss_function("simpo", registry=simpo_plugins.registry, gamma=0.5)
    # means: chosen -2, -2; rejected -3, -3 -> margins 2.0 * 1 - 0.5 = 1.5 for both pairs
    out = simpo(preference_batch())
    assert float(out.loss) == pytest.approx(-log_sigmoid(1.5), rel=1e-6)
    assert float(out.metrics["margin"]) == pytest.approx(1.5)


def test_loss_function_validates_settings_like_a_run_config():
    with pytest.raises(align.ConfigError, match="bta"):
        align.loss_function("dpo", bta=0.5)
    with pytest.raises(align.ConfigError, match="unknown loss 'nope'"):
        align.loss_function("nope")


# ---- metrics that require grad ---------------------------------------------------------------


def test_a_metric_that_requires_grad_is_detached_without_a_warning(tmp_path, simpo_plugins):
    out = tmp_path / "out"
    config = dpo_config(
        out,
        data={
            "train": head_jsonl(DATA / "preference_train.jsonl", tmp_path / "train.jsonl", 8),
            "eval": None,
        },
        loss={"name": "simpo", "beta": 2.0},
        trainer={"max_steps": 2, "batch_size": 4},
    )
    cfg = validate_run_config(config, simpo_plugins.registry)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad.*")
        align.train(cfg, simpo_plugins)
    train = read_metrics(out, "train")
    assert [row["step"] for row in train] == [1, 2]
    assert all(math.isfinite(row["margin"]) for row in train)


# ---- evaluation ------------------------------------------------------------------------------


class FixedLosses(align.Algorithm):
    """Each batch is (loss, weight, metric): the loss an algorithm would compute for it."""

    def __init__(self) -> None:
        super().__init__(types.SimpleNamespace(config=None))  # type: ignore[arg-type]
        self.grad_enabled: list[bool] = []

    def loss(self, batch: tuple[float, float | None, float]) -> align.LossOutput:
        self.grad_enabled.append(torch.is_grad_enabled())
        value, weight, metric = batch
        return align.LossOutput(torch.tensor(value), {"metric": torch.tensor(metric)}, weight=weight)


def test_evaluate_weights_each_batch_by_its_loss_weight_and_runs_without_gradients():
    algorithm = FixedLosses()
    metrics = algorithm.evaluate([(1.0, 1.0, 10.0), (4.0, 3.0, 2.0)])
    # (1*1 + 4*3) / 4, not the mean of batch means (2.5)
    assert metrics["loss"] == pytest.approx(3.25)
    assert metrics["metric"] == pytest.approx((10.0 + 6.0) / 4)
    assert algorithm.grad_enabled == [False, False]


def test_evaluate_counts_each_batch_once_without_a_weight():
    assert FixedLosses().evaluate([(1.0, None, 0.0), (4.0, None, 0.0)])["loss"] == pytest.approx(2.5)


def test_the_learner_evaluates_without_gradients_and_in_eval_mode(tmp_path, monkeypatch):
    """An algorithm's own ``evaluate`` (here a wrapper without ``torch.no_grad``) still runs
    without gradients, with the policy in eval mode."""
    seen: list[tuple[bool, bool]] = []
    original = SFT.evaluate

    def recording_evaluate(self: SFT, batches: Any) -> dict[str, float]:
        seen.append((torch.is_grad_enabled(), self.ctx.policy.training))
        return original(self, batches)

    monkeypatch.setattr(SFT, "evaluate", recording_evaluate)
    eval_rows = head_jsonl(DATA / "sft_eval.jsonl", tmp_path / "eval.jsonl", 4)
    config = sft_config(
        tmp_path / "out",
        data={"train": head_jsonl(DATA / "sft_train.jsonl", tmp_path / "train.jsonl", 4), "eval": eval_rows},
        trainer={"max_steps": 1, "batch_size": 4},
    )
    plugins = align.load_plugins()
    align.train(validate_run_config(config, plugins.registry), plugins)
    assert seen == [(False, False), (False, False)]  # before and after training


def test_sft_evaluation_is_the_token_mean_over_the_whole_split():
    """Batches of 1 and 6 tokens: the split's mean NLL is 10/7 nats per token, where a mean of
    batch means would say (2 + 8/6) / 2."""
    logps = iter([align.SequenceLogps(torch.tensor([-2.0]), torch.tensor([1])),
                  align.SequenceLogps(torch.tensor([-3.0, -5.0]), torch.tensor([2, 4]))])  # fmt: skip
    backend = types.SimpleNamespace(sequence_logps=lambda policy, tokens: next(logps))
    sft = SFT(types.SimpleNamespace(config=None, backend=backend, policy=None))  # type: ignore[arg-type]
    batches = [types.SimpleNamespace(tokens=None), types.SimpleNamespace(tokens=None)]
    metrics = sft.evaluate(batches)  # type: ignore[arg-type]
    assert metrics["loss"] == pytest.approx(10 / 7, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(10 / 7), rel=1e-6)


# ---- a data format of one's own --------------------------------------------------------------


class EchoData(align.DataConfig):
    format: Literal["echo"] = "echo"
    columns: align.SFTColumns = align.SFTColumns()


class EchoFormat(align.TokenizedFormat):
    """The completion is the prompt repeated; a row whose prompt is 'skip' is skipped."""

    cfg: EchoData

    def tokenize_row(self, row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        prompt = align.text_or_messages(
            row.get(self.cfg.columns.prompt), self.cfg.columns.prompt, source, index
        )
        if prompt == "skip":
            return {"prompt_ids": [], "completion_ids": [], "status": "skipped_by_echo"}
        prompt_ids, completion_ids = self.encoder.encode(prompt, prompt)
        status, prompt_ids, (completion_ids,) = self.encoder.fit(prompt_ids, [completion_ids])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "status": status}

    collate = SFTFormat.collate


def test_a_tokenized_format_counts_statuses_and_numbers_rows_across_files(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"question": "hello"}, {"question": "skip"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"question": "x" * 40}])
    cfg = EchoData(train=[first, second], max_length=30, columns={"prompt": "question"})
    data = EchoFormat(cfg, byte_tokenizer())
    rows = data.load("train")
    assert rows is not None
    # statuses other than "ok" are counted per split; "skipped*"/"dropped*" rows are left out
    assert data.stats() == {"train_skipped_by_echo": 1, "train_dropped_long_prompt": 1}
    assert "status" not in rows.column_names
    # example_id: the row's place in the split (files in order), kept through the filtering
    assert rows["example_id"] == [0]
    assert data.collate([rows[0]]).example_ids.tolist() == [0]


def test_a_tokenized_format_keeps_truncated_rows_and_numbers_them_across_files(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"question": "skip"}, {"question": "hi"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"question": "x" * 20}])
    data = EchoFormat(
        EchoData(train=[first, second], max_length=30, columns={"prompt": "question"}), byte_tokenizer()
    )
    rows = data.load("train")
    assert rows is not None and rows["example_id"] == [1, 2]
    assert data.stats() == {"train_skipped_by_echo": 1, "train_truncated": 1}


# ---- errors that say what happened -----------------------------------------------------------


def test_a_missing_relative_data_path_says_what_it_is_relative_to(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dpo_config(tmp_path / "out", data={"train": "data/train.jsonl"})
    path = write_yaml(tmp_path / "configs" / "dpo.yaml", config)
    result = run_cli(capsys, "validate", path)
    assert_user_error(
        result, "data file not found: data/train.jsonl", "current working directory", str(tmp_path)
    )


def test_an_installed_data_format_that_does_not_fit_is_not_called_unknown(tmp_path, capsys):
    path = write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))
    result = run_cli(capsys, "validate", path, "data.format=sft")
    assert_user_error(result, "data.format", "'sft' is installed", "does not fit --algo dpo", "'preference'")
    assert "Install a plugin" not in result.err
    assert "SFTTokens" in result.err and "PairedTokens" in result.err


def test_an_installed_loss_that_does_not_fit_lists_the_ones_that_do(tmp_path, capsys):
    path = write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))
    result = run_cli(capsys, "validate", path, "loss.name=kto")
    assert_user_error(result, "loss 'kto' is installed", "does not fit --algo dpo", "'ipo'")
    assert "UnpairedBatch" in result.err and "PreferenceBatch" in result.err


def test_an_unknown_name_still_says_install_a_plugin(tmp_path, capsys):
    path = write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))
    assert_user_error(
        run_cli(capsys, "validate", path, "loss.name=nope"), "unknown loss 'nope'", "Install a plugin"
    )


# ---- switching a plugin by name --------------------------------------------------------------


def test_switching_loss_name_starts_from_the_new_loss_defaults(simpo_plugins):
    notes: list[str] = []
    data = apply_overrides(
        read_yaml(EXAMPLES / "dpo.yaml"), ["loss.name=simpo"], notes, simpo_plugins.registry
    )
    cfg = validate_run_config(data, simpo_plugins.registry)
    assert cfg.loss.model_dump() == {"name": "simpo", "weight": 1.0, "beta": 2.0, "gamma": 0.5}  # type: ignore[union-attr]
    assert notes == [
        "loss.name=simpo: the config's settings for 'dpo' (beta: 0.1) are not carried over; "
        "'simpo' starts from its own defaults (set them with loss.KEY=VALUE)"
    ]


def test_settings_given_with_the_switch_are_kept_in_any_order(simpo_plugins):
    for overrides in (["loss.name=simpo", "loss.beta=2.5"], ["loss.beta=2.5", "loss.name=simpo"]):
        data = apply_overrides(read_yaml(EXAMPLES / "dpo.yaml"), overrides, registry=simpo_plugins.registry)
        assert validate_run_config(data, simpo_plugins.registry).loss.beta == 2.5  # type: ignore[union-attr]


def test_the_same_name_a_whole_section_or_a_section_that_is_no_plugin_keeps_what_is_written():
    registry = align.load_plugins().registry
    notes: list[str] = []

    def overridden(*overrides: str) -> dict[str, Any]:
        config = dpo_config(Path("out"), optim={"name": "adamw", "lr": 1e-3})
        return apply_overrides(config, list(overrides), notes, registry)

    assert overridden("loss.name=dpo")["loss"] == {"name": "dpo", "beta": 0.1}
    assert overridden("loss={name: ipo, beta: 0.3}")["loss"] == {"name": "ipo", "beta": 0.3}
    assert overridden("optim.name=sgd")["optim"] == {"name": "sgd", "lr": 1e-3}
    assert overridden("loss.name=nope")["loss"] == {"name": "nope", "beta": 0.1}  # then refused as unknown
    assert overridden("data.format=sft")["data"]["train"] == str(DATA / "preference_train.jsonl")
    assert notes == []


def test_the_cli_prints_the_note(tmp_path, capsys):
    path = write_yaml(tmp_path / "dpo.yaml", dpo_config(tmp_path / "out"))
    result = run_cli(capsys, "validate", path, "loss.name=ipo")
    assert result.code == 0, result.err
    assert (
        "note: loss.name=ipo: the config's settings for 'dpo' (beta: 0.1) are not carried over" in result.err
    )
