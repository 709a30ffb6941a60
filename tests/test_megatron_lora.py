"""LoRA on the megatron backend (align_megatron.lora): HF target names map to megatron's fused
layers; only the adapters train; the reference is the base model bit for bit; merged weights and
PEFT-format adapters come out under HF names; DPO at TP=2 follows TP=1 (adapter dropout
included), a resumed TP=2 run ends bit-exact, sequence parallelism follows TP=1, and GRPO at
TP=2 refits its engine with merged weights (one torchrun launch, 2 processes, gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    assert_user_error,
    dpo_config,
    merge,
    read_metrics,
    run_cli,
    write_yaml,
)
from helpers.megatron_runs import (
    TWO_LAYERS,
    length_reward_run,
    pairs_config,
    run_in_process,
    torchrun,
    train_losses,
)
from safetensors.torch import load_file

import align

pytest.importorskip("megatron.core")
from test_megatron import LOSS_TOLERANCE

LORA = {"r": 4, "alpha": 8, "dropout": 0.1}
# Two layers (the adapters of both are checked), LoRA with dropout.
MODEL = merge(TWO_LAYERS, {"lora": LORA})
PAIRS = [([5, 6, 7], [8, 9, 10, 11]), ([40, 41], [42, 43, 44]), ([100, 101, 102, 103], [104])]
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_dpo(
    folder: Path, name: str, backend: dict[str, Any], lora: dict[str, Any] | None = None, **sections: Any
) -> str:
    """A 4-step DPO run with LoRA (lr 1e-2: adapters start at zero) on 16 shipped pairs, 4 a step."""
    config = pairs_config(
        folder,
        name,
        {"name": "megatron", **backend},
        pairs=16,
        model=merge(MODEL, {"lora": lora or {}}),
        optim={"lr": 1e-2},
        **merge({"trainer": {"batch_size": 4}}, sections),
    )
    return write_yaml(folder / f"{name}.yaml", config)


def backends(tmp_path: Path, **lora: Any) -> tuple[Any, Any]:
    """The LoRA megatron backend of a small run (TP=1, in this process) and the plain one."""
    plugins = align.default_plugins()
    config = dpo_config(tmp_path / "run", model=merge(MODEL, {"lora": lora}), backend={"name": "megatron"})
    cfg = align.validate_run_config(config, plugins.registry)
    return align.build_backend(cfg, plugins), plugins.registry.get("backend", "megatron").factory(cfg)


def perturb_adapters(model: torch.nn.Module) -> None:
    """Non-zero adapters (B starts at zero: the policy would equal its base)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora.A", "lora.B")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_hf_target_names_map_to_megatron_fused_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from align_megatron.lora import megatron_targets

    def targets(names: Any) -> list[str]:
        return megatron_targets(align.LoraConfig(target_modules=names))

    assert targets("all-linear") == [
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    ]
    assert targets(["q_proj", "k_proj", "v_proj", "o_proj"]) == targets(["linear_qkv", "linear_proj"])
    assert targets(["down_proj", "gate_proj", "up_proj"]) == ["mlp.linear_fc1", "mlp.linear_fc2"]
    # q and v alone are part of one fused layer: refused, as is an unknown name or a regex.
    config = lora_dpo(tmp_path, "run", {}, {"target_modules": ["q_proj", "v_proj"]})
    result = run_cli(capsys, "run", config)
    assert_user_error(result, "model.lora.target_modules", "without k_proj", "linear_qkv")
    assert not (tmp_path / "run" / "final").exists()
    for bad, fragment in ((["lm_head"], "no such linear layer"), (".*proj", "'all-linear' or a list")):
        with pytest.raises(align.ConfigError, match=fragment):
            targets(bad)


def test_only_adapters_train_and_the_reference_is_the_base_model(tmp_path: Path) -> None:
    backend, plain = backends(tmp_path)
    policy = backend.build_policy()
    perturb_adapters(policy)
    reference, base = backend.build_reference(), plain.build_reference()
    batch = align.pad_sequences(PAIRS, pad_id=0)

    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    # An A and a B on each of the 4 fused linear layers of each of the 2 layers.
    assert len(trainable) == 16 and all(name.endswith(("lora.A", "lora.B")) for name in trainable)
    assert list(reference.parameters()) == []  # no second copy
    policy.train()  # adapter dropout on: the reference must still be the frozen base
    with torch.no_grad():
        expected = plain.sequence_logps(base, batch).sum
        from_reference = backend.sequence_logps(reference, batch).sum
        with backend.reference_view(policy) as view:
            from_view = backend.sequence_logps(view, batch).sum
        tokens = backend.token_logps(reference, batch).values
        from_policy = backend.sequence_logps(policy, batch).sum
    assert torch.equal(from_reference, expected) and torch.equal(from_view, expected)  # bit for bit
    assert torch.equal(tokens, plain.token_logps(base, batch).values)
    assert not torch.allclose(from_policy, expected)  # adapters back on afterwards
    assert policy.training and all(m.training for m in policy.modules())

    # Merged weights: HF names, the base's except the adapted projections, W + (alpha/r) B A.
    merged = {name: tensor.clone() for name, tensor in backend.named_weights(policy)}
    original = dict(plain.named_weights(base))
    assert set(merged) == set(original)
    changed = {name for name in merged if not torch.equal(merged[name], original[name])}
    assert changed == {name for name in merged if name.endswith(tuple(f"{m}.weight" for m in ADAPTED))}
    qkv = policy.gpt.decoder.layers[0].self_attention.linear_qkv
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    proj = policy.gpt.decoder.layers[0].self_attention.linear_proj
    expected_o = original[o_proj] + 2.0 * proj.lora.B.detach() @ proj.lora.A.detach()
    assert torch.allclose(merged[o_proj], expected_o, atol=1e-6)
    # The reference's weights are the base's; merging left the trained model as it was.
    assert all(torch.equal(t, original[n]) for n, t in backend.named_weights(reference))
    assert torch.equal(dict(backend.named_weights(policy))[o_proj], merged[o_proj])
    assert all(adapter.enabled for adapter in (qkv.lora, proj.lora))


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DPO with LoRA at TP=1, in this process: the run the TP=2 runs are compared with."""
    folder = tmp_path_factory.mktemp("megatron_lora")
    run_in_process(lora_dpo(folder, "tp1", {}, trainer={"save_every": 2}))
    return folder / "tp1"


def test_dpo_with_lora_learns_and_writes_merged_and_peft_models(tp1_run: Path) -> None:
    """Learning happens; checkpoints hold the adapter alone; final/ is the merged HF model and
    final/adapter/ the adapter in PEFT's format: PEFT on the HF base model gives final/'s logits."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    losses = train_losses(tp1_run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.04
    checkpoint = load_file(tp1_run / "checkpoints/step_4/model/adapter_model.safetensors")
    assert checkpoint and all(".lora_A." in k or ".lora_B." in k for k in checkpoint)
    assert {k.split(".")[-3] for k in checkpoint} == set(ADAPTED)

    final = tp1_run / "final"
    merged_model = AutoModelForCausalLM.from_pretrained(final).eval()
    _, plain = backends(tp1_run.parent / "base", **LORA)  # the same tiny base model
    base_weights = dict(plain.named_weights(plain.build_policy()))
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final))
    missing, unexpected = base.load_state_dict(base_weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied embeddings
    base.tie_weights()
    peft = PeftModel.from_pretrained(base, final / "adapter").eval()
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        expected, got = merged_model(tokens).logits, peft(tokens).logits
    assert float((expected - got).abs().max()) < 1e-5
    assert not torch.allclose(expected, base(tokens).logits)  # the adapter did something


@pytest.mark.slow
def test_tp2_follows_tp1_and_resumes_bit_exact(tp1_run: Path, tmp_path: Path) -> None:
    """One torchrun launch: DPO with LoRA (dropout 0.1) at TP=2 with a checkpoint at step 2, and
    the same run resumed there."""
    tp2 = lora_dpo(tmp_path, "tp2", {"tensor_model_parallel_size": 2}, trainer={"save_every": 2})
    resumed = lora_dpo(
        tmp_path,
        "tp2_resumed",
        {"tensor_model_parallel_size": 2},
        resume=str(tmp_path / "tp2/checkpoints/step_2"),
    )
    torchrun(tmp_path, tp=0, runs=[tp2, resumed])

    reference = train_losses(tp1_run)
    assert train_losses(tmp_path / "tp2") == pytest.approx(reference, abs=LOSS_TOLERANCE)
    assert train_losses(tmp_path / "tp2_resumed") == train_losses(tmp_path / "tp2")[2:]  # bit for bit
    for part in ("model.safetensors", "adapter/adapter_model.safetensors"):
        first, second = (
            load_file(tmp_path / "tp2/final" / part),
            load_file(tmp_path / "tp2_resumed/final" / part),
        )
        assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
        ours = load_file(tp1_run / "final" / part)
        assert max(float((first[k] - ours[k]).abs().max()) for k in first) < 1e-4
    # The checkpoint's adapter: whole tensors under HF names, as final/adapter holds them.
    saved = load_file(tmp_path / "tp2/checkpoints/step_4/model/adapter_model.safetensors")
    final = load_file(tmp_path / "tp2/final/adapter/adapter_model.safetensors")
    assert set(saved) == set(final) and all(torch.equal(saved[k], final[k]) for k in saved)


@pytest.mark.slow
def test_sequence_parallel_follows_tp1_and_grpo_refits_merged(tmp_path: Path) -> None:
    """One torchrun launch: DPO with LoRA at TP=2 with sequence parallelism (dropout 0: a padded
    width draws a mask of another shape), and GRPO at TP=2 with LoRA and a KL term, each engine
    refit checked against the policy."""
    no_dropout = {"dropout": 0.0}
    sp = lora_dpo(tmp_path, "sp", {"tensor_model_parallel_size": 2, "sequence_parallel": True}, no_dropout)
    # No adapter dropout: the refit check compares the engine with the policy in train mode.
    grpo = length_reward_run(
        "grpo",
        tmp_path / "grpo",
        {"tensor_model_parallel_size": 2},
        samples=4,
        lr=1e-2,
        model=merge(MODEL, {"lora": no_dropout}),
        kl={"coef": 0.05},
    )
    report = torchrun(tmp_path, tp=0, runs=[sp, write_yaml(tmp_path / "grpo.yaml", grpo)], check_refits=True)

    run_in_process(lora_dpo(tmp_path, "tp1", {}, no_dropout))
    assert train_losses(tmp_path / "sp") == pytest.approx(train_losses(tmp_path / "tp1"), abs=LOSS_TOLERANCE)

    # GRPO: KL 0 before the first update (reference = adapters off, B = 0); the engine refit
    # with merged weights agrees with the LoRA policy after each update.
    first, second = read_metrics(tmp_path / "grpo", "rollout")
    assert first["kl"] == 0.0 and second["kl"] > 0
    assert second["logprob_mismatch"] == pytest.approx(1.0, abs=1e-3)
    refits = report["refits"]
    assert len(refits) >= 1 and all(r["logits"] < 1e-4 for r in refits)
    assert any(r["changed"] > 0 for r in refits)
