"""KTO: the loss against a hand computation, the unpaired data format, and a tiny training run
that widens the held-out gap between desirable and undesirable rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import align
from align.loading import validate_run_config
from align.plugins import load_plugins
from align_kto import KTOLoss, UnpairedTokens, kl_estimate, kto, reward_auc
from align_kto.data import UnpairedData, UnpairedFormat

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def plugins() -> align.Plugins:
    return load_plugins()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def byte_tok() -> Any:
    from align_hf import byte_tokenizer

    return byte_tokenizer()


# ---- the loss ----------------------------------------------------------------------------


def fixed_batch() -> align.UnpairedBatch:
    return align.UnpairedBatch(
        logps=torch.tensor([-10.0, -12.0, -9.0]),
        labels=torch.tensor([True, False, True]),
        lengths=torch.tensor([5, 6, 4]),
        ref_logps=torch.tensor([-11.0, -11.0, -9.5]),
        kl_logps=torch.tensor([-20.0, -19.0, -21.0]),
        ref_kl_logps=torch.tensor([-20.6, -19.2, -21.1]),
    )


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_matches_hand_computation() -> None:
    cfg = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    out = kto(cfg, fixed_batch())
    z0 = (0.6 + 0.2 + 0.1) / 3  # mean KL log-ratio = 0.3
    r = [1.0, -1.0, 0.5]
    expected = (
        (1.0 - 1.0 * sigmoid(0.5 * (r[0] - z0)))
        + (2.0 - 2.0 * sigmoid(0.5 * (z0 - r[1])))
        + (1.0 - 1.0 * sigmoid(0.5 * (r[2] - z0)))
    ) / 3
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert float(out.metrics["kl"]) == pytest.approx(z0, rel=1e-5)


def test_kl_estimate_is_clamped_at_zero_and_detached() -> None:
    b = fixed_batch()
    b.kl_logps = torch.tensor([-21.0, -20.0, -22.0], requires_grad=True)  # log-ratios < 0
    assert float(kl_estimate(b)) == 0.0
    b.kl_logps = torch.tensor([-20.0, -19.0, -21.0], requires_grad=True)
    b.logps = b.logps.clone().requires_grad_(True)
    loss = kto(KTOLoss(), b).loss
    loss.backward()
    assert b.kl_logps.grad is None or torch.all(b.kl_logps.grad == 0)
    assert b.logps.grad is not None and torch.all(b.logps.grad != 0)


def test_kto_loss_of_an_untrained_policy_is_half_the_weight() -> None:
    # policy == reference: every log-ratio is 0, z0 = 0, each term is lambda * (1 - 1/2)
    b = align.UnpairedBatch(
        logps=torch.zeros(4),
        labels=torch.tensor([True, True, False, False]),
        lengths=torch.ones(4),
        ref_logps=torch.zeros(4),
        kl_logps=torch.zeros(4),
        ref_kl_logps=torch.zeros(4),
    )
    out = kto(KTOLoss(desirable_weight=1.0, undesirable_weight=3.0), b)
    assert float(out.loss) == pytest.approx((0.5 + 0.5 + 1.5 + 1.5) / 4)


def test_reward_auc_matches_pairwise_count() -> None:
    rewards = torch.tensor([0.3, 0.1, 0.1, -0.2, 0.5, 0.1])
    desirable = torch.tensor([True, True, False, False, True, False])
    wins = 0.0
    for d in rewards[desirable]:
        for u in rewards[~desirable]:
            wins += 1.0 if d > u else 0.5 if d == u else 0.0
    assert reward_auc(rewards, desirable) == pytest.approx(wins / 9)
    assert reward_auc(rewards, torch.ones(6, dtype=torch.bool)) is None


# ---- the data format ---------------------------------------------------------------------


def unpaired_format(tmp_path: Path, rows: list[dict[str, Any]], **data: Any) -> UnpairedFormat:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = UnpairedData(train=str(path), **data)
    return UnpairedFormat(cfg, byte_tok())


def test_collate_appends_mismatched_pairs_shifted_by_one(tmp_path: Path) -> None:
    rows = [
        {"q": "Q1 ", "a": "aa", "ok": True},
        {"q": "Q22 ", "a": "bbbb", "ok": False},
        {"q": "Q333 ", "a": "c", "ok": True},
    ]
    fmt = unpaired_format(tmp_path, rows, columns={"prompt": "q", "completion": "a", "label": "ok"})
    data = fmt.load("train")
    batch = fmt.collate([data[i] for i in range(3)])
    assert isinstance(batch, UnpairedTokens)
    assert batch.num_examples == 3 and batch.tokens.num_sequences == 6
    assert batch.labels.tolist() == [True, False, True]
    tok = fmt.tokenizer
    texts = []
    for row in range(6):
        ids = batch.tokens.input_ids[row][batch.tokens.attention_mask[row].bool()]
        texts.append(tok.decode(ids, skip_special_tokens=True))
    assert texts[:3] == ["Q1 aa", "Q22 bbbb", "Q333 c"]
    assert texts[3:] == ["Q1 bbbb", "Q22 c", "Q333 aa"]
    completions = batch.tokens.loss_mask.sum(dim=1).tolist()  # completion + EOS tokens
    assert completions == [3, 5, 2, 5, 2, 3]


def test_packed_layout_holds_the_same_sequences(tmp_path: Path) -> None:
    rows = [{"prompt": f"P{i} ", "completion": "x" * (i + 1), "label": i % 2 == 0} for i in range(4)]
    fmt = unpaired_format(tmp_path, rows, padding_free=True)
    data = fmt.load("train")
    batch = fmt.collate([data[i] for i in range(4)])
    assert batch.tokens.packed and batch.tokens.input_ids.shape[0] == 1
    assert batch.tokens.num_sequences == 8
    assert batch.tokens.pad_fraction == 0.0


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_non_bool_label_is_an_error_naming_file_and_row(tmp_path: Path, label: Any) -> None:
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "completion": "b", "label": label},
    ]
    fmt = unpaired_format(tmp_path, rows)
    # A JSONL column of mixed kinds is caught while reading the file, a null by the format: both name the row.
    with pytest.raises(
        align.DataError, match=r"train\.jsonl, row 2: 'label' must be (true or false|a boolean)"
    ):
        fmt.load("train")


def test_length_rules_truncate_or_drop(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "completion": "short", "label": True},
        {"prompt": "p", "completion": "a much longer completion", "label": False},
        {"prompt": "a prompt far too long", "completion": "x", "label": True},
    ]
    fmt = unpaired_format(tmp_path, rows, max_length=12, overlong="truncate")
    data = fmt.load("train")
    assert len(data) == 2
    assert all(len(r["prompt_ids"]) + len(r["completion_ids"]) <= 12 for r in data)
    assert fmt.stats() == {"train_truncated": 1, "train_dropped_long_prompt": 1}
    fmt = unpaired_format(tmp_path, rows, max_length=12, overlong="drop")
    assert len(fmt.load("train")) == 1
    # the mismatched completion is cut to fit its prompt too
    fmt = unpaired_format(tmp_path, rows[:2], max_length=12, max_prompt_length=4)
    data = fmt.load("train")
    batch = fmt.collate([data[0], data[1]])
    assert int(batch.tokens.attention_mask.sum(dim=1).max()) <= 12


def test_config_defaults_and_registration(plugins: align.Plugins, tmp_path: Path) -> None:
    cfg = validate_run_config({"algo": "kto", "data": {"train": "x.jsonl"}}, plugins.registry)
    assert cfg.data.format == "unpaired"  # type: ignore[attr-defined]
    assert cfg.loss.name == "kto" and cfg.loss.beta == 0.1  # type: ignore[attr-defined]
    with pytest.raises(align.ConfigError, match="desirable_weight"):
        validate_run_config(
            {"algo": "kto", "data": {"train": "x.jsonl"}, "loss": {"name": "kto", "desirable_weight": -1}},
            plugins.registry,
        )
    with pytest.raises(align.ConfigError, match=r"loss 'dpo' is installed .*does not fit --algo kto.*'kto'"):
        validate_run_config(
            {"algo": "kto", "data": {"train": "x"}, "loss": {"name": "dpo"}}, plugins.registry
        )


def test_the_shipped_example_and_data(plugins: align.Plugins) -> None:
    from align.loading import read_yaml

    cfg = validate_run_config(read_yaml(DATA.parent / "kto.yaml"), plugins.registry)
    assert cfg.algo == "kto" and cfg.loss.name == "kto"  # type: ignore[attr-defined]
    train = [json.loads(line) for line in (DATA / "unpaired_train.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (DATA / "preference_train.jsonl").read_text().splitlines()]
    assert len(train) == len(pairs)  # one completion per prompt
    for row, pair in zip(train, pairs, strict=True):
        assert row["prompt"] == pair["prompt"]
        assert row["completion"] == (pair["chosen"] if row["label"] else pair["rejected"])
    assert 0.4 < sum(r["label"] for r in train) / len(train) < 0.6


# ---- training ----------------------------------------------------------------------------


def test_one_forward_pass_scores_real_and_mismatched_pairs(plugins: align.Plugins, tmp_path: Path) -> None:
    from align.trainer import Trainer

    rows = [{"prompt": f"Q{i}: ", "completion": "answer " * (i + 1), "label": i % 2 == 0} for i in range(4)]
    config = {
        "algo": "kto",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": TINY},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows))},
    }
    trainer = Trainer(validate_run_config(config, plugins.registry), plugins)
    trainer.build()
    algo, policy = trainer.algorithm, trainer.context.policy
    data = trainer.train_data
    batch = trainer.data_format.collate([data[i] for i in range(4)])
    calls = {"policy": 0, "reference": 0}
    policy.model.register_forward_hook(lambda *_: calls.__setitem__("policy", calls["policy"] + 1))
    algo.reference.model.register_forward_hook(  # type: ignore[attr-defined]
        lambda *_: calls.__setitem__("reference", calls["reference"] + 1)
    )
    b = algo.unpaired_batch(batch)  # type: ignore[attr-defined]
    assert calls == {"policy": 1, "reference": 1}
    mismatched = [(data[i]["prompt_ids"], data[(i + 1) % 4]["completion_ids"]) for i in range(4)]
    alone = trainer.backend.sequence_logps(policy, align.pad_sequences(mismatched, 0)).sum
    torch.testing.assert_close(b.kl_logps, alone, rtol=1e-4, atol=1e-4)
    assert b.labels.tolist() == [True, False, True, False]
    torch.testing.assert_close(b.logps, b.ref_logps)  # policy starts as the reference


def test_kto_training_widens_the_held_out_reward_gap(plugins: align.Plugins, tmp_path: Path) -> None:
    train_rows = [json.loads(line) for line in (DATA / "unpaired_train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (DATA / "unpaired_eval.jsonl").read_text().splitlines()]
    assert {r["label"] for r in train_rows} == {True, False}
    config = {
        "algo": "kto",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": TINY},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", train_rows[:160])),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", eval_rows[:64])),
            "max_length": 128,
        },
        "loss": {"name": "kto", "beta": 0.1},
        "trainer": {
            "max_steps": 20,
            "batch_size": 8,
            "progress": False,
            "tensorboard": False,
            "num_threads": 1,
        },
        "optim": {"lr": 3e-3},
    }
    result = align.train(validate_run_config(config, plugins.registry), plugins)
    before, after = result.eval_before, result.eval_after
    # the untrained policy is its own reference: all rewards 0, the loss is half the weight
    assert before["reward_gap"] == pytest.approx(0.0, abs=1e-6)
    assert before["loss"] == pytest.approx(0.5, abs=1e-6)
    assert after["reward_gap"] > 0.5
    assert after["reward_desirable"] > after["reward_undesirable"]
    assert after["reward_accuracy"] > 0.9
    assert after["loss"] < 0.45
    assert after["kl"] >= 0.0
    assert (result.final_dir / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if m.get("split") == "train"]
    assert len(train_lines) == 20 and all("kl" in m for m in train_lines)
