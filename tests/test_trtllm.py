"""The ``trtllm`` engine plugin: registered everywhere, a clear user error where TensorRT-LLM is
missing, and its translation to and from TensorRT-LLM's LLM API checked against a stand-in
module (TensorRT-LLM itself cannot be installed here; the engine contract suite skips it)."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import align
from align_trtllm import TRTLLMEngine, TRTLLMEngineConfig, unavailable_reason
from align_trtllm.engine import buckets, sampling_kwargs, to_completion

TRTLLM_INSTALLED = importlib.util.find_spec("tensorrt_llm") is not None
SPEC = align.EngineSpec(
    model_dir=Path("/models/policy"), max_model_len=16, eos_token_id=2, pad_token_id=0, seed=3
)


def test_the_engine_is_registered_with_its_config() -> None:
    registry = align.load_plugins().registry
    entry = registry.get("rollout_engine", "trtllm")
    assert entry.package == "align-trtllm" and entry.config is TRTLLMEngineConfig
    assert TRTLLMEngineConfig().refit_bucket_mb == 512
    with pytest.raises(ValidationError, match="kv_cache_fraction"):
        TRTLLMEngineConfig(kv_cache_fraction=1.5)


@pytest.mark.skipif(TRTLLM_INSTALLED, reason="TensorRT-LLM is installed")
def test_building_it_without_tensorrt_llm_says_why() -> None:
    registry = align.load_plugins().registry
    with pytest.raises(align.EngineUnavailable) as caught:
        align.build_engine(TRTLLMEngineConfig(), registry, SPEC)
    message = str(caught.value)
    assert isinstance(caught.value, align.UserError)
    for fragment in (
        "'trtllm' needs TensorRT-LLM, which is not installed",
        "NVIDIA",
        "pypi.nvidia.com",
        "vllm",
    ):
        assert fragment in message
    assert unavailable_reason() == message


# ---- the translation, against a stand-in for tensorrt_llm --------------------------------


@dataclass
class FakeSamplingParams:
    kwargs: dict[str, Any]
    logprobs_simple_format: bool = False  # the field newer versions have


@dataclass
class FakeChoice:
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str | None


@dataclass
class FakeLLM:
    kwargs: dict[str, Any]
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def generate(self, inputs: list[dict[str, Any]], params: list[Any], use_tqdm: bool) -> list[Any]:
        self.calls.append(("generate", (inputs, params)))
        # every prompt: n completions of [its length, EOS]
        return [
            types.SimpleNamespace(
                outputs=[FakeChoice([len(i["prompt_token_ids"]), 2], [-0.5, -0.25], "stop")] * p.kwargs["n"]
            )
            for i, p in zip(inputs, params, strict=True)
        ]

    def _collective_rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        self.calls.append((method, args[0]))
        return [True]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    trt = types.ModuleType("tensorrt_llm")
    trt.LLM = lambda **kwargs: FakeLLM(kwargs)  # type: ignore[attr-defined]
    trt.SamplingParams = lambda **kwargs: FakeSamplingParams(kwargs)  # type: ignore[attr-defined]
    trt.SamplingParams.__dataclass_fields__ = FakeSamplingParams.__dataclass_fields__  # type: ignore[attr-defined]
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kwargs: ("kv", kwargs)  # type: ignore[attr-defined]
    llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
    llm_args.ExecutorMemoryType = types.SimpleNamespace(KV_CACHE="kv_cache")  # type: ignore[attr-defined]
    for module in (trt, llmapi, llm_args):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return trt


def test_the_llm_is_started_for_token_ids_and_refit(fake_trt: types.ModuleType) -> None:
    engine = TRTLLMEngine(TRTLLMEngineConfig(llm_kwargs={"max_batch_size": 8}), SPEC, fake_trt)
    kwargs = engine.llm.kwargs
    assert kwargs["model"] == "/models/policy" and kwargs["backend"] == "pytorch"
    assert kwargs["skip_tokenizer_init"] and kwargs["orchestrator_type"] == "ray"
    assert kwargs["ray_worker_extension_cls"] == "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
    assert kwargs["max_seq_len"] == 16 and kwargs["max_batch_size"] == 8  # llm_kwargs win
    assert kwargs["kv_cache_config"] == ("kv", {"free_gpu_memory_fraction": 0.4})


def test_generate_maps_prompts_and_results(fake_trt: types.ModuleType) -> None:
    engine = TRTLLMEngine(TRTLLMEngineConfig(), SPEC, fake_trt)
    results = engine.generate([[1, 5, 6], [1, 7]], align.SamplingConfig(n=2, seed=10, max_tokens=4))
    assert [[c.token_ids for c in group] for group in results] == [[[3, 2], [3, 2]], [[2, 2], [2, 2]]]
    assert results[0][0].logprobs == [-0.5, -0.25] and results[0][0].finish_reason == "stop"
    inputs, params = engine.llm.calls[-1][1]
    assert inputs == [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 7]}]
    assert [p.kwargs["seed"] for p in params] == [10, 11]  # the call's seed plus the prompt's index
    with pytest.raises(align.EngineError, match="prompt 1 has 16 tokens"):
        engine.generate([[1], [1] * 16], align.SamplingConfig())


def test_sampling_settings(fake_trt: types.ModuleType) -> None:
    fields = {"logprobs_simple_format"}
    sampled = sampling_kwargs(
        align.SamplingConfig(n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=8, stop_token_ids=[9]),
        SPEC,
        4,
        fields,
    )
    assert {k: sampled[k] for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")} == {
        "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_tokens": 8, "seed": 4,
    }  # fmt: skip
    assert sampled["stop_token_ids"] == [9, 2] and sampled["end_id"] == -1 and sampled["pad_id"] == 0
    assert sampled["include_stop_str_in_output"] and not sampled["detokenize"]
    assert sampled["logprobs"] == 0 and sampled["logprobs_simple_format"]
    greedy = sampling_kwargs(align.SamplingConfig(temperature=0, ignore_eos=True), SPEC, 0, set())
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, 1, 1.0)
    assert greedy["stop_token_ids"] is None and greedy["logprobs"] == 1  # older versions: a dict per token


def test_completions_from_either_log_prob_format() -> None:
    sampling = align.SamplingConfig(max_tokens=3)
    logprob = types.SimpleNamespace
    as_dicts = FakeChoice(
        [4, 5, 6], [{4: logprob(logprob=-1.0), 8: logprob(logprob=-0.1)}, {5: -2.0}, {6: -3.0}], None
    )
    completion = to_completion(as_dicts, sampling)
    assert completion.logprobs == [-1.0, -2.0, -3.0] and completion.finish_reason == "length"
    assert to_completion(FakeChoice([4, 2], [-1.0, -0.5], None), sampling).finish_reason == "stop"
    with pytest.raises(align.EngineError, match="returned 1 log-probs for 2 tokens"):
        to_completion(FakeChoice([4, 2], [-1.0], "stop"), sampling)


def test_refit_sends_buckets_then_finalises_and_sleep_releases_the_kv_cache(
    fake_trt: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = TRTLLMEngine(TRTLLMEngineConfig(refit_bucket_mb=1), SPEC, fake_trt)
    sent: list[list[str]] = []
    monkeypatch.setattr(engine, "_send", lambda bucket: sent.append([name for name, _ in bucket]))
    quarter_mb = torch.zeros(64 * 1024)  # 256 KiB of float32
    engine.refit((f"w{i}", quarter_mb) for i in range(6))
    assert sent == [["w0", "w1", "w2", "w3"], ["w4", "w5"]]
    assert engine.llm.calls[-1] == ("update_weights", None)
    engine.sleep()
    engine.sleep()
    engine.wake_up()
    assert engine.llm.calls[-2:] == [("sleep", ["kv_cache"]), ("wakeup", ["kv_cache"])]


def test_buckets_keep_order_and_put_a_big_tensor_alone() -> None:
    tensors = [("a", torch.zeros(2)), ("big", torch.zeros(10)), ("b", torch.zeros(1)), ("c", torch.zeros(1))]
    assert [[n for n, _ in b] for b in buckets(tensors, max_bytes=12)] == [["a"], ["big"], ["b", "c"]]
