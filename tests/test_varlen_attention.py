"""Packed rows on the CPU run attention per sequence (``align_hf.varlen``): the same log-probs,
gradients and DPO losses as padded rows, no [T, T] attention over the whole row, and models
switched to it compute what sdpa computes on every other input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import dpo_config, read_metrics
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import align
from align import TinyModelConfig, pack_sequences, pad_sequences, tiny_llama
from align.loading import validate_run_config
from align_hf.backend import sequence_logps, token_logps
from align_hf.varlen import VARLEN, use_varlen_attention

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
# Lengths 1 to 40, a one-token sequence among them, prompts of 1 to 9 tokens.
SEQUENCES = [
    ([1, 5, 6, 7], [8, 9, 2]),
    ([1], [2]),
    ([1, 4], [10, 11, 12, 13, 2]),
    ([1, *range(20, 28)], list(range(30, 61))),
    ([1, 3, 3, 3, 3, 3], [2]),
]


def gqa_llama() -> LlamaForCausalLM:
    """4 query heads sharing 2 key-value heads."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()


def models() -> list[tuple[str, Any]]:
    return [("llama", tiny_llama(TINY, 300, "sdpa")), ("llama-gqa", gqa_llama()), ("qwen2", tiny_qwen2())]


def logps_and_grads(
    model: Any, batch: align.TokenBatch, chunk_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    sums = sequence_logps(model, batch, chunk_tokens).sum
    (sums * torch.arange(1.0, len(SEQUENCES) + 1)).sum().backward()
    return sums.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(("name", "model"), models())
def test_packed_varlen_equals_padded_and_row_chunks_in_logps_and_gradients(name: str, model: Any):
    padded = pad_sequences(SEQUENCES, pad_id=0)
    expected = [logps_and_grads(model, padded, chunk) for chunk in (None, 16)]
    assert use_varlen_attention(model) and model.config._attn_implementation == VARLEN
    sums, grads = logps_and_grads(model, pack_sequences(SEQUENCES), None)
    for want_sums, want_grads in expected:
        assert torch.allclose(sums, want_sums, atol=1e-5), (name, sums, want_sums)
        assert torch.allclose(grads, want_grads, atol=1e-5), (name, (grads - want_grads).abs().max())
    # Per-token log-probs too (the online algorithms' path).
    model.config._attn_implementation = "sdpa"
    want = token_logps(model, padded)
    use_varlen_attention(model)
    got = token_logps(model, pack_sequences(SEQUENCES))
    assert torch.equal(got.mask, want.mask) and torch.allclose(got.values, want.values, atol=1e-5)


def test_attention_runs_per_sequence_without_a_mask(monkeypatch: pytest.MonkeyPatch):
    """Each sdpa call sees one sequence (causal, no mask): never the packed row's [T, T] square."""
    model = tiny_llama(TINY, 300, "sdpa")
    use_varlen_attention(model)
    calls: list[tuple[int, bool, Any]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append((query.shape[2], kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    sequence_logps(model, pack_sequences(SEQUENCES))
    lengths = [len(p) + len(c) for p, c in SEQUENCES]
    assert calls == [(length, True, None) for length in lengths] * TINY.num_layers


def test_a_switched_model_computes_what_sdpa_does_on_other_inputs():
    """Padded rows with a mask (left padding too), one sequence per row, cached generation."""
    model = tiny_llama(TINY, 300, "sdpa").eval()
    left = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 4, 10, 11, 12, 13]])
    left_mask = (left != 0).long()
    right = pad_sequences(SEQUENCES, pad_id=0)
    prompt = torch.tensor([[1, 5, 6, 7]])

    def outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
            return [
                model(input_ids=left, attention_mask=left_mask).logits[left_mask.bool()],
                model(input_ids=right.input_ids, attention_mask=right.attention_mask).logits,
                model(input_ids=right.input_ids).logits,
                generated.float(),
            ]

    before = outputs()
    assert use_varlen_attention(model)
    for got, want in zip(outputs(), before, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_only_plain_causal_sdpa_models_switch_and_checkpoints_do_not_keep_it(tmp_path: Path):
    assert not use_varlen_attention(tiny_llama(TINY, 300, "eager"))
    windowed = Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        use_sliding_window=True, sliding_window=8, attn_implementation="sdpa",
    )  # fmt: skip
    assert not use_varlen_attention(Qwen2ForCausalLM(windowed))
    model = tiny_llama(TINY, 300, "sdpa")
    assert use_varlen_attention(model)
    model.save_pretrained(tmp_path)
    assert VARLEN not in (tmp_path / "config.json").read_text()


def test_gradient_checkpointing_recomputes_with_the_same_attention():
    model = tiny_llama(TINY, 300, "sdpa").train()
    padded = pad_sequences(SEQUENCES, pad_id=0)
    want_sums, want_grads = logps_and_grads(model, padded, None)
    use_varlen_attention(model)
    model.gradient_checkpointing_enable()
    sums, grads = logps_and_grads(model, pack_sequences(SEQUENCES), None)
    assert torch.allclose(sums, want_sums, atol=1e-5) and torch.allclose(grads, want_grads, atol=1e-5)


def run_dpo(out: Path, padding_free: bool) -> list[dict[str, Any]]:
    config = dpo_config(out, data={"padding_free": padding_free, "eval": None}, trainer={"max_steps": 2})
    plugins = align.default_plugins()
    align.train(validate_run_config(config, plugins.registry), plugins)
    return read_metrics(out, "train")


def test_padding_free_dpo_uses_varlen_and_matches_padded_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import align_hf.varlen

    calls = []
    original = align_hf.varlen.varlen_sdpa

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(align_hf.varlen.AttentionInterface._global_mapping, VARLEN, counting)
    packed = run_dpo(tmp_path / "packed", True)
    assert calls  # the policy and the reference ran per sequence
    padded = run_dpo(tmp_path / "padded", False)
    assert len(packed) == len(padded) == 2
    for got, want in zip(packed, padded, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=1e-4)
        assert got["reward_margin"] == pytest.approx(want["reward_margin"], abs=1e-5)


def test_a_switched_scorer_reads_packed_rows_as_padded_ones():
    """Reward models and critics: sequence scores and per-token values, packed against padded."""
    from align.hf_models import tiny_llama_scorer
    from align_hf.backend import sequence_scores, token_scores

    model = tiny_llama_scorer(TINY, 300, 1, "sdpa").eval()
    model.config.pad_token_id = 0
    padded = pad_sequences(SEQUENCES, pad_id=0)
    want_scores, want_values = sequence_scores(model, padded), token_scores(model, padded)
    assert use_varlen_attention(model)
    packed = pack_sequences(SEQUENCES)
    got_scores, got_values = sequence_scores(model, packed), token_scores(model, packed)
    assert torch.allclose(got_scores, want_scores, atol=1e-5)
    assert torch.equal(got_values.mask, want_values.mask)
    assert torch.allclose(got_values.values, want_values.values, atol=1e-5)
