"""LoRA (align-lora): adapters on the trained model, the reference as the same model with its
adapters off (no second copy), PEFT-format checkpoints that resume bit-exact, merged export and
engine refits with merged weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    ALIGN,
    DATA,
    QUIET_TRAINER,
    TINY_MODEL,
    assert_user_error,
    dpo_config,
    load_weights,
    merge,
    read_metrics,
    run_cli,
    sft_config,
    subprocess_env,
    write_yaml,
)
from helpers.online import arith_config
from helpers.resume import assert_resumes_bit_exact, train
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import align

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
LORA_MODEL = merge(TINY_MODEL, {"lora": LORA})
PAIRS = [([5, 6, 7], [8, 9, 10, 11]), ([40, 41], [42, 43, 44]), ([100, 101, 102, 103], [104])]


# For tests that call the models the backend built with their own (CPU) tensors and compare
# with models built outside it: on a GPU machine the default (auto) would put the first on the GPU.
ON_CPU = {"name": "hf", "device": "cpu"}


def lora_backend(tmp_path: Path, backend: dict[str, Any] | None = None, **lora: Any) -> tuple[Any, Any]:
    """The LoRA-wrapped backend of a small run and the plain hf backend of the same config."""
    plugins = align.default_plugins()
    config = dpo_config(tmp_path / "run", model=merge(TINY_MODEL, {"lora": {**LORA, **lora}}))
    if backend is not None:
        config["backend"] = backend
    cfg = align.validate_run_config(config, plugins.registry)
    plain = plugins.registry.get("backend", "hf").factory(cfg)
    return align.build_backend(cfg, plugins), plain


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adapter weights (peft starts B at zero: the policy would equal its base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_only_adapters_train_and_the_reference_is_the_base_model_without_a_copy(tmp_path: Path) -> None:
    backend, plain = lora_backend(tmp_path)
    policy = backend.build_policy()
    perturb_adapters(policy)
    reference = backend.build_reference()
    base = plain.build_reference()  # a separate frozen model with the same initial weights
    batch = align.pad_sequences(PAIRS, pad_id=0)

    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # The reference owns no tensor: every weight it runs with is the policy's.
    assert list(reference.parameters()) == [] and list(reference.buffers()) == []
    base_count = sum(p.numel() for p in base.parameters())
    adapter_count = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert sum(p.numel() for p in policy.parameters()) == base_count + adapter_count

    policy.train()
    with torch.no_grad():
        expected = plain.sequence_logps(base, batch).sum
        from_reference = backend.sequence_logps(reference, batch).sum
        with backend.reference_view(policy) as view:
            from_view = backend.sequence_logps(view, batch).sum
        from_policy = backend.sequence_logps(policy, batch).sum
        tokens = backend.token_logps(reference, batch).values
    assert torch.equal(from_reference, expected)  # bit for bit
    assert torch.equal(from_view, expected)
    assert torch.equal(tokens, plain.token_logps(base, batch).values)
    assert not torch.allclose(from_policy, expected)  # the adapters are back on afterwards
    assert policy.training and all(m.training for m in policy.modules())


def test_merged_weights_are_hf_named_and_give_the_adapted_logits(tmp_path: Path) -> None:
    backend, plain = lora_backend(tmp_path, backend=ON_CPU)  # the models are called directly
    policy = backend.build_policy()
    perturb_adapters(policy)
    base = plain.build_reference()
    merged = dict(backend.named_weights(policy))
    assert merged.keys() == dict(plain.named_weights(base)).keys()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base.load_state_dict(merged)
        adapted = policy(input_ids=ids).logits
        assert torch.allclose(base(input_ids=ids).logits, adapted, atol=1e-5)
    # Reading the merged weights changed nothing in the policy.
    before = {n: p.clone() for n, p in policy.named_parameters()}
    backend.save_merged(policy, tmp_path / "merged")
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, adapted, atol=1e-5)


def test_engine_refit_with_merged_weights_matches_the_policy(tmp_path: Path) -> None:
    """The hf engine starts on the merged policy, then is refit after the adapters change: its
    log-probs of what it generates are the LoRA policy's."""
    backend, _ = lora_backend(tmp_path)
    policy = backend.build_policy().eval()
    align.save_merged(backend, policy, tmp_path / "engine")
    entry = align.default_plugins().registry.get("rollout_engine", "hf")
    spec = align.EngineSpec(model_dir=tmp_path / "engine", eos_token_id=2, pad_token_id=0, max_model_len=64)
    engine = entry.factory(entry.config.model_validate({"name": "hf"}), spec)
    try:
        perturb_adapters(policy, seed=3)
        engine.refit(backend.named_weights(policy))
        prompts = [prompt for prompt, _ in PAIRS]
        outputs = engine.generate(prompts, align.SamplingConfig(n=1, max_tokens=6, temperature=1.0, seed=1))
    finally:
        engine.close()
    completions = [group[0] for group in outputs]
    batch = align.pad_sequences(
        [(p, list(c.token_ids)) for p, c in zip(prompts, completions, strict=True)], 0
    )
    with torch.no_grad():
        mine = backend.token_logps(policy, batch)
    for row, completion in enumerate(completions):
        length = len(completion.token_ids)
        assert mine.values[row, :length].tolist() == pytest.approx(list(completion.logprobs), abs=1e-4)


@pytest.fixture(scope="module")
def dpo_lora_run(tmp_path_factory: pytest.TempPathFactory) -> align.RunResult:
    out = tmp_path_factory.mktemp("dpo_lora") / "run"
    config = dpo_config(
        out,
        model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        trainer={"max_steps": 8, "batch_size": 8},
        optim={"lr": 2e-3},
    )
    return train(config)


def test_dpo_with_lora_learns_and_saves_the_adapter_in_peft_format(dpo_lora_run: align.RunResult) -> None:
    before, after = dpo_lora_run.eval_before, dpo_lora_run.eval_after
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # policy == reference
    assert after["reward_margin"] > 0.05
    assert after["reward_accuracy"] > 0.7
    final = dpo_lora_run.final_dir
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"
    assert not (final / "model.safetensors").exists()  # the adapter only, not the base weights
    saved = load_weights(final)
    assert saved and all("lora_" in name for name in saved)


def test_export_merge_writes_full_weights_that_give_the_adapted_logits(
    dpo_lora_run: align.RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    result = run_cli(capsys, "export", str(dpo_lora_run.output_dir), "--merge", "--out", str(out))
    assert result.code == 0, result.err
    merged = AutoModelForCausalLM.from_pretrained(out)
    plugins = align.default_plugins()
    cfg = align.validate_run_config(
        dpo_config(tmp_path / "x", model=merge(TINY_MODEL, {"lora": {"r": 8}}), backend=ON_CPU),
        plugins.registry,
    )  # on the CPU: the adapted model is called directly, beside transformers' merged one
    base = plugins.registry.get("backend", "hf").factory(cfg).build_policy()
    adapted = PeftModel.from_pretrained(base, dpo_lora_run.final_dir)  # PEFT's own loader
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    # Never written over.
    again = run_cli(capsys, "export", str(dpo_lora_run.output_dir), "--merge", "--out", str(out))
    assert_user_error(again, "already exists")


def test_export_of_a_full_fine_tune_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "final"
    folder.mkdir()
    result = run_cli(capsys, "export", str(folder), "--merge", "--out", str(tmp_path / "out"))
    assert_user_error(result, "adapter_config.json")


def test_sft_with_lora_resumes_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def config(name: str) -> dict[str, Any]:
        return sft_config(
            tmp_path / name,
            model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},  # dropout: the RNG must resume too
            trainer={"max_steps": 4, "save_every": 2},
        )

    assert_resumes_bit_exact(config, tmp_path, monkeypatch, stop_at=2, steps=4)


def test_lora_without_the_plugin_is_a_config_error(tmp_path: Path) -> None:
    """Without align-lora, model.lora stops the run before training (never a full fine-tune)."""
    config = write_yaml(tmp_path / "run.yaml", dpo_config(tmp_path / "run", model=LORA_MODEL))
    env = subprocess_env(ALIGN_PLUGINS="hf,dpo")
    done = subprocess.run([*ALIGN, "run", config], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "model.lora: no installed plugin applies LoRA adapters" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_kto_with_lora_scores_its_reference_as_the_policy_without_adapters(tmp_path: Path) -> None:
    """KTO builds its reference through the backend: with LoRA that is the policy with adapters
    off, so before any update the implicit rewards (policy - reference) are exactly 0, and the
    run learns (desirable rewards above undesirable ones) without a second model."""
    config = {
        "algo": "kto",
        "output_dir": str(tmp_path / "kto"),
        "model": LORA_MODEL,
        "data": {
            "format": "unpaired",
            "train": str(DATA / "unpaired_train.jsonl"),
            "eval": str(DATA / "unpaired_eval.jsonl"),
            "max_length": 128,
        },
        "loss": {"name": "kto", "beta": 0.1},
        "trainer": {"max_steps": 6, "batch_size": 8, **QUIET_TRAINER},
        "optim": {"lr": 5e-3},
    }
    result = train(config)
    before, after = result.eval_before, result.eval_after
    assert before["reward_desirable"] == 0.0 and before["reward_undesirable"] == 0.0
    assert after["reward_desirable"] - after["reward_undesirable"] > 0.0


def test_grpo_with_lora_refits_the_engine_with_merged_weights(warm_model: Path, tmp_path: Path) -> None:
    """Two GRPO iterations with LoRA and a KL term: the engine starts on the merged policy and is
    refit after the first update, so in the second iteration its log-probs are still the
    trainer's (mismatch 1 to rounding) although the policy moved away from its reference. With
    LoRA's default adapter dropout (0.05): the old policy's pass runs with dropout off, as the
    engine samples (with it on, the mismatch was 1.002)."""
    out = tmp_path / "grpo"
    config = arith_config("grpo", out, warm_model)
    config["model"]["lora"] = {"r": 8, "alpha": 32}
    config = merge(
        config,
        dict(
            iterations=2,
            prompts_per_iteration=8,
            kl={"coef": 0.05},
            trainer={"batch_size": 16},
            optim={"lr": 2e-2},
        ),
    )
    result = train(config)
    first, second = read_metrics(out, "rollout")
    assert first["kl"] == 0.0  # policy == reference before any update (adapters start at zero)
    assert second["kl"] > 1e-4  # the policy moved: the refit had something to carry
    assert second["logprob_mismatch"] == pytest.approx(1.0, abs=1e-4)
    assert second["refit_s"] > 0.0
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_reward_model_with_lora_trains_its_head_and_exports_a_merged_scorer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reward model trained with LoRA: adapters plus the score head in full (PEFT's SEQ_CLS);
    the merged export is a sequence classifier giving the same scores as the adapter."""
    config = merge(
        dpo_config(tmp_path / "rm", model=LORA_MODEL, trainer={"max_steps": 3}),
        {"algo": "reward", "loss": None},
    )
    result = train(config)
    assert result.eval_after["accuracy"] >= result.eval_before["accuracy"]
    saved = load_weights(result.final_dir)
    assert any(name.endswith("score.weight") for name in saved)  # the head, trained in full
    assert all("lora_" in name or "score" in name for name in saved)
    out = tmp_path / "merged"
    assert run_cli(capsys, "export", str(result.output_dir), "--merge", "--out", str(out)).code == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out)

    plugins = align.default_plugins()
    cfg = align.validate_run_config(config, plugins.registry)
    backend = align.build_backend(cfg, plugins)
    assert isinstance(backend, align.ScoringBackend)
    scorer = backend.build_scorer(1, ["reward"])
    backend.load_weights(scorer, result.final_dir)
    batch = align.pad_sequences(PAIRS, pad_id=0)
    with torch.no_grad():
        adapted = backend.sequence_scores(scorer.eval(), batch)
        exported = merged.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(exported, adapted, atol=1e-5)
