"""Reward models: the Bradley-Terry loss against a hand computation, the scorer the hf backend
builds, training a pairwise model past 0.8 held-out accuracy, a multi-attribute regression
model, saving in transformers' layout, and the ``model`` reward source."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import align
from align.loading import validate_run_config
from align.plugins import load_plugins
from align_reward import (
    AttributeData,
    AttributeFormat,
    ModelReward,
    ModelRewardConfig,
    bradley_terry,
    pair_metrics,
)
from align_reward.algorithm import scoring_backend

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
QUIET = {"progress": False, "tensorboard": False, "num_threads": 1}


@pytest.fixture(scope="module")
def plugins() -> align.Plugins:
    return load_plugins()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---- the loss ----------------------------------------------------------------------------


def test_bradley_terry_matches_hand_computation() -> None:
    chosen = torch.tensor([1.0, 0.5, -0.2])
    rejected = torch.tensor([0.0, 1.0, -0.2])

    def nls(x: float) -> float:  # -log sigmoid(x)
        return math.log(1 + math.exp(-x))

    expected = (nls(1.0) + nls(-0.5) + nls(0.0)) / 3
    assert float(bradley_terry(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    metrics = pair_metrics(chosen, rejected)
    assert float(metrics["accuracy"]) == pytest.approx((1 + 0 + 0.5) / 3)
    assert float(metrics["margin"]) == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    # gradients push chosen up and rejected down
    c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    bradley_terry(c, r).backward()
    assert torch.all(c.grad < 0) and torch.all(r.grad > 0)  # type: ignore[operator]


# ---- the scorer the hf backend builds ----------------------------------------------------


def hf_backend(plugins: align.Plugins, **model: Any) -> Any:
    """The hf backend of a reward run, pinned to the CPU: these tests call the models it builds
    directly and compare them bit for bit with models transformers loads on the CPU (on a GPU
    machine the default, auto, would put them on the GPU)."""
    from align_hf import HFBackend

    run = validate_run_config(
        {
            "algo": "reward",
            "data": {"train": "x.jsonl"},
            "model": {"tiny": TINY, **model},
            "backend": {"name": "hf", "device": "cpu"},
        },
        plugins.registry,
    )
    return HFBackend(run)


def test_hf_scorer_reads_the_last_token_padded_or_packed(plugins: align.Plugins) -> None:
    backend = hf_backend(plugins)
    assert isinstance(backend, align.ScoringBackend)
    model = backend.build_scorer(2, ["helpful", "short"]).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == backend.tokenizer.pad_token_id
    assert model.config.id2label == {0: "helpful", 1: "short"}
    sequences = [([1, 40, 41], [42, 43, 2]), ([1, 44], [45, 2]), ([1, 46, 47, 48, 49, 50], [51, 2])]
    padded = align.pad_sequences(sequences, backend.tokenizer.pad_token_id)
    packed = align.pack_sequences(sequences)
    with torch.no_grad():
        scores = backend.sequence_scores(model, padded)
        assert scores.shape == (3, 2)
        torch.testing.assert_close(backend.sequence_scores(model, packed), scores)
        hf = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
        torch.testing.assert_close(hf, scores)
        for row, (prompt, completion) in enumerate(sequences):  # one sequence at a time, no padding
            alone = model(input_ids=torch.tensor([[*prompt, *completion]])).logits
            torch.testing.assert_close(alone[0], scores[row], rtol=1e-4, atol=1e-5)


def test_a_backend_without_a_scorer_is_a_config_error() -> None:
    class LogpsOnly:
        tokenizer = None
        is_main = True

        def build_model(self, role: str, model: Any = None) -> Any: ...
        def named_weights(self, model: Any) -> Any: ...
        def build_policy(self) -> Any: ...
        def build_reference(self) -> Any: ...
        def sequence_logps(self, model: Any, batch: Any) -> Any: ...
        def token_logps(self, model: Any, batch: Any, *, with_entropy: bool = False) -> Any: ...
        def save_pretrained(self, model: Any, path: Any) -> None: ...
        def load_weights(self, model: Any, path: Any) -> None: ...

    assert isinstance(LogpsOnly(), align.Backend)
    with pytest.raises(align.ConfigError, match="cannot build reward models"):
        scoring_backend(LogpsOnly())  # type: ignore[arg-type]


def test_configs_and_the_shipped_example(plugins: align.Plugins) -> None:
    from align.loading import read_yaml

    example = validate_run_config(read_yaml(DATA.parent / "reward.yaml"), plugins.registry)
    assert example.algo == "reward" and example.data.format == "preference"
    regression = validate_run_config(
        {"algo": "reward_regression", "data": {"train": "x.jsonl", "attributes": ["a", "b"]}},
        plugins.registry,
    )
    assert regression.data.format == "scored"  # type: ignore[attr-defined]
    with pytest.raises(align.ConfigError, match=r"data\.attributes: required key is missing"):
        validate_run_config({"algo": "reward_regression", "data": {"train": "x.jsonl"}}, plugins.registry)
    with pytest.raises(align.ConfigError, match=r"data\.format"):  # pairs are not attribute rows
        validate_run_config(
            {"algo": "reward_regression", "data": {"format": "preference", "train": "x"}}, plugins.registry
        )


# ---- Bradley-Terry training, saving, and the reward source -------------------------------


@pytest.fixture(scope="module")
def pairwise_run(
    plugins: align.Plugins, tmp_path_factory: pytest.TempPathFactory
) -> tuple[align.RunResult, Path]:
    tmp = tmp_path_factory.mktemp("rm")
    config = {
        "algo": "reward",
        "output_dir": str(tmp / "run"),
        "model": {"tiny": TINY},
        "data": {
            "train": str(write_jsonl(tmp / "train.jsonl", read_jsonl(DATA / "preference_train.jsonl")[:192])),
            "eval": str(write_jsonl(tmp / "eval.jsonl", read_jsonl(DATA / "preference_eval.jsonl")[:64])),
            "max_length": 128,
        },
        "trainer": {"max_steps": 24, "batch_size": 8, "save_every": 12, **QUIET},
        "optim": {"lr": 3e-3},
    }
    return align.train(validate_run_config(config, plugins.registry), plugins), tmp


def test_pairwise_reward_model_learns_held_out_preferences(
    pairwise_run: tuple[align.RunResult, Path],
) -> None:
    result, _ = pairwise_run
    before, after = result.eval_before, result.eval_after
    assert after["accuracy"] > 0.8
    assert after["accuracy"] > before["accuracy"]
    assert after["loss"] < before["loss"] * 0.5
    assert after["margin"] > 1.0
    assert after["reward_chosen"] > after["reward_rejected"]


def test_checkpoints_hold_the_scorer_and_resume_bit_for_bit(
    pairwise_run: tuple[align.RunResult, Path], plugins: align.Plugins
) -> None:
    from safetensors.torch import load_file

    from align import checkpoint

    result, tmp = pairwise_run
    steps = checkpoint.list_checkpoints(result.output_dir)
    assert [p.name for p in steps] == ["step_12", "step_24"]
    for folder in (steps[0] / "model", result.final_dir):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config["id2label"] == {"0": "reward"}
    # resuming from step 12 loads the scorer's weights and ends where the full run ended
    config = yaml_config(result.output_dir)
    config |= {"output_dir": str(tmp / "resumed"), "resume": str(steps[0])}
    resumed = align.train(validate_run_config(config, plugins.registry), plugins)
    ours = load_file(resumed.final_dir / "model.safetensors")
    theirs = load_file(result.final_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def yaml_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load((run_dir / "config.yaml").read_text())
    data.pop("_provenance", None)
    return data


def test_saved_reward_model_loads_with_transformers_and_scores_identically(
    pairwise_run: tuple[align.RunResult, Path], plugins: align.Plugins
) -> None:
    result, tmp = pairwise_run
    backend = hf_backend(plugins)
    trained = backend.build_scorer(1, ["reward"]).eval()
    backend.load_weights(trained, result.final_dir)
    fmt = registry_format(plugins, tmp)
    rows = fmt.load("eval")
    batch = fmt.collate([rows[i] for i in range(6)])
    loaded = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert tokenizer.pad_token_id == loaded.config.pad_token_id == 0
    with torch.no_grad():
        ours = backend.sequence_scores(trained, batch.tokens)
        theirs = loaded(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    # and from plain texts through the reward source
    pairs = read_jsonl(tmp / "eval.jsonl")[:3]
    # as trained, on the CPU
    as_trained = ModelRewardConfig(path=str(result.final_dir), max_length=128, device="cpu")
    source = ModelReward(as_trained)
    from_text = source([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    torch.testing.assert_close(from_text, ours[:3, 0], rtol=1e-5, atol=1e-5)


def registry_format(plugins: align.Plugins, tmp: Path) -> Any:
    run = validate_run_config(
        {
            "algo": "reward",
            "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 128},
        },
        plugins.registry,
    )
    return plugins.registry.get("data_format", "preference").factory(
        run.data, AutoTokenizer.from_pretrained(tmp / "run" / "final")
    )


def test_model_reward_source_prefers_chosen_after_training(
    pairwise_run: tuple[align.RunResult, Path], plugins: align.Plugins
) -> None:
    result, _ = pairwise_run
    entry = plugins.registry.get("reward", "model")
    cfg = validate_reward(plugins, {"name": "model", "path": str(result.final_dir)})
    source = entry.factory(cfg)
    assert isinstance(source, align.RewardSource)
    pairs = read_jsonl(DATA / "preference_eval.jsonl")[64:96]  # not even used for evaluation
    chosen = source([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = source([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert chosen.shape == rejected.shape == (32,)
    assert float((chosen > rejected).float().mean()) > 0.8
    assert float(chosen.mean()) > float(rejected.mean())
    # conversational inputs go through the chat template
    chat = source(
        [[{"role": "user", "content": pairs[0]["prompt"]}]], [[{"role": "assistant", "content": "ok"}]]
    )
    assert chat.shape == (1,) and torch.isfinite(chat).all()
    with pytest.raises(align.ConfigError, match="1 heads"):
        entry.factory(
            validate_reward(plugins, {"name": "model", "path": str(result.final_dir), "weights": [1, 2]})
        )


def validate_reward(plugins: align.Plugins, data: dict[str, Any]) -> align.RewardConfig:
    cfg: align.RewardConfig = plugins.registry.get("reward", data["name"]).config.model_validate(data)  # type: ignore[assignment]
    return cfg


# ---- regression on attributes ------------------------------------------------------------


def attribute_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chosen answers are helpful (4) and polite (3); rejected ones unhelpful (0) and rude (0);
    every fifth row lacks its politeness label."""
    rows = []
    for i, pair in enumerate(pairs):
        good = i % 2 == 0
        rows.append(
            {
                "prompt": pair["prompt"],
                "completion": pair["chosen"] if good else pair["rejected"],
                "helpfulness": 4 if good else 0,
                "politeness": None if i % 5 == 0 else (3.0 if good else 0.0),
            }
        )
    return rows


def test_attribute_format_rows(tmp_path: Path) -> None:
    from align_hf import byte_tokenizer

    rows = [
        {"prompt": "p", "completion": "a", "h": 1, "v": 2.5},
        {"prompt": "p", "completion": "b", "h": None, "v": None},
        {"prompt": "p", "completion": "c", "h": None, "v": 1},
    ]
    cfg = AttributeData(train=str(write_jsonl(tmp_path / "a.jsonl", rows)), attributes=["h", "v"])
    fmt = AttributeFormat(cfg, byte_tokenizer())
    data = fmt.load("train")
    assert len(data) == 2 and fmt.stats() == {"train_skipped_unlabelled": 1}
    batch = fmt.collate([data[0], data[1]])
    assert batch.targets.tolist() == [[1.0, 2.5], [0.0, 1.0]]
    assert batch.labelled.tolist() == [[True, True], [False, True]]
    bad = [*rows, {"prompt": "p", "completion": "d", "h": "high", "v": 1}]
    cfg = AttributeData(train=str(write_jsonl(tmp_path / "b.jsonl", bad)), attributes=["h", "v"])
    with pytest.raises(align.DataError, match=r"b\.jsonl, row 4: (attribute )?'h' must be a number"):
        AttributeFormat(cfg, byte_tokenizer()).load("train")
    with pytest.raises(ValueError, match="more than once"):
        AttributeData(train="x", attributes=["h", "h"])


def test_regression_heads_reduce_held_out_mse(plugins: align.Plugins, tmp_path: Path) -> None:
    train = attribute_rows(read_jsonl(DATA / "preference_train.jsonl")[:160])
    held_out = attribute_rows(read_jsonl(DATA / "preference_eval.jsonl")[:48])
    config = {
        "algo": "reward_regression",
        "output_dir": str(tmp_path / "run"),
        "model": {"tiny": TINY},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", train)),
            "eval": str(write_jsonl(tmp_path / "eval.jsonl", held_out)),
            "attributes": ["helpfulness", "politeness"],
            "max_length": 128,
        },
        "trainer": {"max_steps": 40, "batch_size": 8, **QUIET},
        "optim": {"lr": 5e-3},
    }
    cfg = validate_run_config(config, plugins.registry)
    assert cfg.data.format == "scored"  # type: ignore[attr-defined]
    result = align.train(cfg, plugins)
    before, after = result.eval_before, result.eval_after
    assert set(after) == {"loss", "mse_helpfulness", "mse_politeness"}
    assert before["mse_helpfulness"] > 3.0  # targets 0/4 against ~0 initial scores
    assert after["loss"] < 0.25 * before["loss"]
    assert after["mse_helpfulness"] < 0.25 * before["mse_helpfulness"]
    assert after["mse_politeness"] < 0.25 * before["mse_politeness"]
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["id2label"] == {"0": "helpfulness", "1": "politeness"}
    # as a reward source: a weighted sum of the heads, required for several heads
    path = str(result.final_dir)
    with pytest.raises(align.ConfigError, match="2 heads"):
        ModelReward(ModelRewardConfig(path=path))
    source = ModelReward(ModelRewardConfig(path=path, weights=[1.0, 0.5]))
    assert source.labels == ["helpfulness", "politeness"]
    prompts = [r["prompt"] for r in held_out[:4]]
    completions = [r["completion"] for r in held_out[:4]]
    heads = source.scores(prompts, completions)
    assert heads.shape == (4, 2)
    torch.testing.assert_close(source(prompts, completions), heads[:, 0] + 0.5 * heads[:, 1])
    assert float(heads[0, 0]) > float(heads[1, 0]) + 2  # row 0 is helpful, row 1 is not
