"""The DPO speed features keep the math: fused token log-probs, packed and mask-free padded
layouts, the precomputed (cached) reference, and length-grouped batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    DATA,
    TINY_MODEL,
    assert_same_weights,
    dpo_config,
    load_weights,
    merge,
    read_metrics,
)
from safetensors.torch import load_file

import align
import align_hf.backend
from align import TinyModelConfig, pack_sequences, pad_sequences
from align.builtin.data import PreferenceData, PreferenceFormat
from align.loading import validate_run_config
from align.trainer import BatchStream, DataPosition
from align_hf import byte_tokenizer, tiny_llama
from align_hf.backend import sequence_logps, token_logps_of

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
SMALL = TinyModelConfig(**TINY_MODEL["tiny"])  # what the runs below train (helpers.dpo_config)
SEQUENCES = [([1, 5, 6, 7], [8, 9, 2]), ([1, 4], [10, 11, 12, 13, 2]), ([1, 3, 3, 3, 3, 3], [2])]


# ---- log-probs -------------------------------------------------------------------------------
def test_fused_token_logps_equal_log_softmax_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 50, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    (grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    got = token_logps_of(logits, targets)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    assert torch.allclose(got, expected, atol=1e-12) and torch.allclose(got_grad, grad, atol=1e-12)
    # bfloat16 logits: float32 results, no float32 copy of the logits kept for the backward.
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    out = token_logps_of(low, targets)
    out.sum().backward()
    assert out.dtype == torch.float32 and low.grad is not None and low.grad.dtype == torch.bfloat16
    exact = torch.log_softmax(low.detach().double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(out.double(), exact, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_layouts_give_the_same_logps(attn: str):
    model = tiny_llama(TINY, 300, attn)
    padded = pad_sequences(SEQUENCES, pad_id=0)
    with torch.no_grad():
        masked = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits
    token = torch.log_softmax(masked[:, :-1], -1).gather(-1, padded.input_ids[:, 1:, None]).squeeze(-1)
    expected = (token * padded.loss_mask[:, 1:]).sum(1)
    for batch in (padded, pack_sequences(SEQUENCES)):
        got = sequence_logps(model, batch)
        assert torch.allclose(got.sum, expected, atol=1e-5), (batch.packed, got.sum, expected)
        assert got.count.tolist() == [3, 5, 1]
    # Gradients agree too (packed: one row, position ids restart, block-diagonal attention).
    grads = []
    for batch in (padded, pack_sequences(SEQUENCES)):
        model.zero_grad()
        sequence_logps(model, batch).sum.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_chunked_rows_give_the_same_logps_and_gradients():
    """CPU runs a padded batch in length-sorted row chunks, each trimmed to its longest row."""
    model = tiny_llama(TINY, 300, "sdpa")
    batch = pad_sequences([*SEQUENCES, ([1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 2])], pad_id=0)
    results = []
    for chunk_tokens in (None, 1, 8, 16):
        model.zero_grad()
        out = sequence_logps(model, batch, chunk_tokens)
        (out.sum * torch.arange(1.0, 5.0)).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.sum.detach(), out.count, grad))
    for sums, counts, grad in results[1:]:
        assert torch.allclose(sums, results[0][0], atol=1e-5) and torch.equal(counts, results[0][1])
        assert torch.allclose(grad, results[0][2], atol=1e-5)


def test_row_chunks_share_one_embedding_lookup_and_one_lm_head():
    """With several row chunks the decoder runs per chunk, the embedding and the LM head once
    over all of them (one vocabulary-sized weight gradient each), giving one pass's numbers."""
    model = tiny_llama(TINY, 300, "sdpa")
    batch = pad_sequences([*SEQUENCES, ([1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 2])], pad_id=0)
    calls = {"embed": 0, "head": 0, "decoder": 0}

    def counter(name: str) -> Any:
        def count(*_: Any) -> None:
            calls[name] += 1

        return count

    model.get_input_embeddings().register_forward_hook(counter("embed"))
    model.get_output_embeddings().register_forward_hook(counter("head"))
    model.model.register_forward_hook(counter("decoder"))
    whole = sequence_logps(model, batch, None)
    calls.update(embed=0, head=0, decoder=0)
    chunked = sequence_logps(model, batch, 8)  # 4 rows of 8-11 tokens: one row per chunk
    assert calls == {"embed": 1, "head": 1, "decoder": 4}
    assert torch.allclose(chunked.sum, whole.sum, atol=1e-5) and torch.equal(chunked.count, whole.count)


# ---- the precomputed reference ---------------------------------------------------------------
def small_run(out: Path, **sections: Any) -> dict[str, Any]:
    base = dpo_config(
        out,
        data={"train": str(DATA / "preference_train.jsonl"), "eval": str(DATA / "preference_eval.jsonl")},
        trainer={"max_steps": 3, "batch_size": 8, "eval_batch_size": 32, "save_every": 0},
    )
    return merge(base, sections)


def train(config: dict[str, Any]) -> align.RunResult:
    plugins = align.default_plugins()
    return align.train(validate_run_config(config, plugins.registry), plugins)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the reference models the hf backend builds."""
    calls: list[int] = []
    original = align_hf.backend.HFBackend.build_reference

    def counting(self: Any) -> Any:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(align_hf.backend.HFBackend, "build_reference", counting)
    return calls


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_precomputed_reference_equals_live(tmp_path: Path, builds: list[int]):
    live = train(small_run(tmp_path / "live", reference={"mode": "live"}))
    pre = train(small_run(tmp_path / "pre", reference={"mode": "precompute"}))
    assert len(builds) == 2  # one each: live keeps it, precompute frees it after scoring
    for a, b in zip(read_metrics(live.output_dir), read_metrics(pre.output_dir), strict=True):
        assert (a["split"], a["step"]) == (b["split"], b["step"])
        for key in ("loss", "reward_margin", "reward_chosen", "reward_rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert_same_weights(load_weights(live.final_dir), load_weights(pre.final_dir), atol=1e-6)
    # The eval split is scored in evaluation's own batches: an untrained policy ties exactly.
    before = pre.eval_before
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.5
    # The cached sums are the reference's log-probs of each pair, by example id.
    files = {p.name.split("-")[0]: p for p in cache_files(tmp_path / "pre" / "reference_cache")}
    assert files.keys() == {"train", "eval"}
    saved = load_file(files["train"])
    fmt = PreferenceFormat(
        PreferenceData(train=str(DATA / "preference_train.jsonl"), max_length=128), byte_tokenizer()
    )
    data = fmt.load("train")
    rows = sorted(range(len(data)), key=lambda i: data[i]["example_id"])[:24]
    batch = fmt.collate([data[i] for i in rows])
    reference = tiny_llama(SMALL, len(byte_tokenizer()), "sdpa")
    with torch.no_grad():
        chosen, rejected = sequence_logps(reference, batch.tokens).split(batch.num_pairs)
    where = {int(i): n for n, i in enumerate(saved["example_ids"])}
    picked = torch.tensor([where[int(i)] for i in batch.example_ids])
    assert torch.allclose(saved["chosen"][picked], chosen.sum, atol=1e-4)
    assert torch.allclose(saved["rejected"][picked], rejected.sum, atol=1e-4)


def test_cache_is_reused_by_a_second_run_and_a_resume(tmp_path: Path, builds: list[int], capsys):
    cache = tmp_path / "cache"
    first = train(small_run(tmp_path / "a", reference={"cache_dir": str(cache)}, trainer={"save_every": 2}))
    assert len(builds) == 1 and len(cache_files(cache)) == 2
    # Another run on the same model and data (another lr: a sweep) finds the cache.
    train(small_run(tmp_path / "b", reference={"cache_dir": str(cache)}, optim={"lr": 1e-4}))
    assert len(builds) == 1, "the reference was built again despite a fingerprint hit"
    assert "reusing cached log-probs" in capsys.readouterr().err
    # A resumed run reuses it too, and continues bit-for-bit.
    stopped = small_run(tmp_path / "c", reference={"cache_dir": str(cache)}, trainer={"max_steps": 2})
    train(stopped)
    train(merge(stopped, {"trainer": {"max_steps": 3}, "resume": True}))
    assert len(builds) == 1 and len(cache_files(cache)) == 2
    assert_same_weights(load_weights(first.final_dir), load_weights(tmp_path / "c" / "final"))


def test_a_changed_dataset_invalidates_the_cache(tmp_path: Path, builds: list[int]):
    cache = tmp_path / "cache"
    rows = [json.loads(line) for line in (DATA / "preference_train.jsonl").read_text().splitlines()[:40]]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = small_run(
        tmp_path / "a", data={"train": str(train_file), "eval": None}, reference={"cache_dir": str(cache)}
    )
    train(config)
    assert len(builds) == 1
    rows[7]["chosen"] += " Really."
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(merge(config, {"output_dir": str(tmp_path / "b")}))
    assert len(builds) == 2 and len(cache_files(cache)) == 2  # a new key, a new file
    # A changed tokenization setting changes the token ids, hence the key, too.
    train(merge(config, {"output_dir": str(tmp_path / "c"), "data": {"max_length": 64}}))
    assert len(builds) == 3 and len(cache_files(cache)) == 3


# ---- length-grouped batches ------------------------------------------------------------------
def rows_of_lengths(lengths: list[int]) -> list[dict[str, Any]]:
    return [
        {"prompt_ids": [1] * 3, "chosen_ids": [2] * n, "rejected_ids": [3] * (n // 2), "example_id": i}
        for i, n in enumerate(lengths)
    ]


def test_grouped_batches_are_deterministic_resumable_and_cover_each_row_once():
    gen = torch.Generator().manual_seed(3)
    rows = rows_of_lengths((torch.randint(5, 400, (203,), generator=gen)).tolist())
    ids = lambda batch: [r["example_id"] for r in batch]  # noqa: E731
    grouped = BatchStream(rows, ids, batch_size=8, seed=11, group_by_length=True)
    plain = BatchStream(rows, ids, batch_size=8, seed=11)
    for epoch in (0, 1):
        batches = grouped.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        assert [len(b) for b in batches] == [8] * 25 + [3]  # the partial batch stays last
        assert batches == BatchStream(rows, ids, batch_size=8, seed=11, group_by_length=True).batches(epoch)
    assert grouped.batches(0) != grouped.batches(1)

    def padding(stream: BatchStream) -> float:
        widths = [max(3 + len(rows[i]["chosen_ids"]) for i in b) for b in stream.batches(0)]
        real = [sum(3 + len(rows[i]["chosen_ids"]) for i in b) for b in stream.batches(0)]
        return 1 - sum(real) / sum(w * len(b) for w, b in zip(widths, stream.batches(0), strict=True))

    assert padding(grouped) < 0.1 < padding(plain)
    # Resuming mid-epoch yields exactly the batches an uninterrupted stream would.
    straight = grouped.iterate(DataPosition())
    expected = [next(straight)[1] for _ in range(40)]
    resumed = grouped.iterate(DataPosition(epoch=0, batch=13))
    assert [next(resumed)[1] for _ in range(27)] == expected[13:]


def test_grouped_run_logs_less_padding(tmp_path: Path):
    runs = {}
    for grouped in (False, True):
        out = tmp_path / f"grouped_{grouped}"
        train(small_run(out, data={"group_by_length": grouped, "eval": None}, trainer={"max_steps": 6}))
        runs[grouped] = [row["pad_fraction"] for row in read_metrics(out, "train")]
    assert all(0 <= p < 1 for p in runs[False] + runs[True])
    assert sum(runs[True]) < sum(runs[False])


def test_a_lora_run_shares_the_reference_cache_of_its_base_model(tmp_path: Path):
    """With adapters off, a LoRA policy is its base model: the reference sums are the same."""
    from align_dpo.reference import fingerprint

    plugins = align.default_plugins()

    def key(**model: Any) -> str:
        cfg = validate_run_config(merge(small_run(tmp_path), {"model": model}), plugins.registry)
        return fingerprint(cfg, "fixed", "d")[0]

    assert key(lora={"r": 4}) == key()
    assert key(dtype="bfloat16") != key()
