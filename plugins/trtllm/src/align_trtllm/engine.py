"""The ``trtllm`` rollout engine on TensorRT-LLM's Python LLM API (PyTorch backend).

Written against the API as TensorRT-LLM's own RLHF tests and NeMo-RL use it; never run in this
project (see docs/engines.md).

- Start: ``tensorrt_llm.LLM`` on the HF folder the learner wrote, without a tokenizer (token ids
  in and out), with the Ray orchestrator and TensorRT-LLM's RLHF worker extension
  (``tensorrt_llm.llmapi.rlhf_utils.WorkerExtension``), which adds ``update_weights`` to every
  worker.
- Generate: one ``SamplingParams`` per prompt (its seed is the call's seed plus the prompt's
  index, as in the ``hf`` engine); EOS is handled as a stop token (``end_id=-1``,
  ``include_stop_str_in_output``) so that it is returned like any stop token; log-probs of the
  sampled tokens under the raw logits.
- Refit: the weights are copied onto each engine GPU in buckets, shared with the workers as CUDA
  IPC handles (``update_weights(handles)``, loaded partially), then ``update_weights(None)``
  finalises (post-load hooks, prefix cache reset). Nothing is rebuilt or read from disk.
- Sleep: the workers release the KV cache (``sleep``/``wakeup`` RPCs) while the trainer works.
"""

from __future__ import annotations

import base64
import importlib
import pickle
import random
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import align
from align_trtllm.config import TRTLLMEngineConfig, gpu_available, load_tensorrt_llm

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_trtllm_engine(cfg: TRTLLMEngineConfig, spec: align.EngineSpec) -> TRTLLMEngine:
    trt = load_tensorrt_llm()
    if not gpu_available():
        raise align.EngineUnavailable("rollout engine 'trtllm' needs an NVIDIA GPU, and torch sees none")
    return TRTLLMEngine(cfg, spec, trt)


class TRTLLMEngine:
    """``align.RolloutEngine`` on ``tensorrt_llm.LLM`` (see the module docstring)."""

    def __init__(self, cfg: TRTLLMEngineConfig, spec: align.EngineSpec, trt: ModuleType) -> None:
        self.cfg, self.spec, self.trt = cfg, spec, trt
        self.llm = trt.LLM(**llm_kwargs(cfg, spec))
        self.sampling_fields = set(getattr(trt.SamplingParams, "__dataclass_fields__", {}))
        # Unseeded calls draw their seed here: samples depend on spec.seed, not on global RNGs.
        self.seeds = random.Random(spec.seed)
        self.asleep = False

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: align.SamplingConfig
    ) -> list[list[align.Completion]]:
        align.check_prompts("trtllm", prompts, self.spec.max_model_len)
        self.wake_up()
        seed = sampling.seed if sampling.seed is not None else self.seeds.randrange(2**31)
        params = [
            self.trt.SamplingParams(**sampling_kwargs(sampling, self.spec, seed + i, self.sampling_fields))
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(prompt)} for prompt in prompts], params, use_tqdm=False
        )
        return [[to_completion(choice, sampling) for choice in output.outputs] for output in outputs]

    def refit(self, weights: align.NamedWeights) -> None:
        for bucket in buckets(weights, self.cfg.refit_bucket_mb << 20):
            self._send(bucket)
        self._rpc("update_weights", None)  # finalise: post-load hooks, prefix cache reset

    def sleep(self) -> None:
        if self.cfg.sleep and not self.asleep:
            self._rpc("sleep", self._memory_tags())
        self.asleep = True

    def wake_up(self) -> None:
        if self.cfg.sleep and self.asleep:
            self._rpc("wakeup", self._memory_tags())
        self.asleep = False

    def close(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def _send(self, bucket: list[tuple[str, Tensor]]) -> None:
        """One bucket as CUDA IPC handles, a copy on each engine GPU, keyed by device UUID."""
        from torch.multiprocessing.reductions import reduce_tensor

        get_device_uuid = importlib.import_module("tensorrt_llm._torch.utils").get_device_uuid
        dtype = DTYPES[self.spec.dtype]
        handles: dict[str, str] = {}
        copies = []  # the workers map these; they must outlive the RPC
        for device in range(self.cfg.tensor_parallel_size):
            on_device = [(name, t.to(f"cuda:{device}", dtype).contiguous()) for name, t in bucket]
            copies.append(on_device)
            shared = [(name, reduce_tensor(t)) for name, t in on_device]
            handles[get_device_uuid(device)] = base64.b64encode(pickle.dumps(shared)).decode("ascii")
        torch.cuda.synchronize()
        self._rpc("update_weights", handles)
        del copies

    def _rpc(self, method: str, argument: Any) -> Any:
        call = getattr(self.llm, "collective_rpc", None) or self.llm._collective_rpc
        return call(method, (argument,))

    def _memory_tags(self) -> list[Any]:
        llm_args = importlib.import_module("tensorrt_llm.llmapi.llm_args")
        return [llm_args.ExecutorMemoryType.KV_CACHE]


def llm_kwargs(cfg: TRTLLMEngineConfig, spec: align.EngineSpec) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.LLM`` for an engine on ``spec``."""
    llmapi = importlib.import_module("tensorrt_llm.llmapi")
    kwargs: dict[str, Any] = {
        "model": str(spec.model_dir),
        "backend": "pytorch",
        "dtype": spec.dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_seq_len": spec.max_model_len,
        "max_input_len": spec.max_model_len,
        "max_batch_size": cfg.max_batch_size,
        "skip_tokenizer_init": True,  # token ids in and out: the tokenizer stays with the trainer
        "orchestrator_type": "ray",  # the worker extension's update_weights runs over Ray RPC
        "ray_worker_extension_cls": WORKER_EXTENSION,
        "kv_cache_config": llmapi.KvCacheConfig(free_gpu_memory_fraction=cfg.kv_cache_fraction),
        "enable_sleep": cfg.sleep,
    }
    if cfg.max_num_tokens is not None:
        kwargs["max_num_tokens"] = cfg.max_num_tokens
    return kwargs | cfg.llm_kwargs


def sampling_kwargs(
    sampling: align.SamplingConfig, spec: align.EngineSpec, seed: int, fields: set[str]
) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for one prompt. ``fields`` are the
    ones this TensorRT-LLM version has (newer versions return the sampled token's raw log-prob as
    a plain float; older ones a dict per token)."""
    greedy = sampling.temperature == 0
    stops = list(sampling.stop_token_ids)
    if not sampling.ignore_eos and spec.eos_token_id is not None:
        stops.append(spec.eos_token_id)
    kwargs: dict[str, Any] = {
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_k": 1 if greedy else sampling.top_k,  # 0: no cut, as in align
        "top_p": 1.0 if greedy else sampling.top_p,
        "seed": seed,
        "end_id": -1,  # EOS is one of the stop tokens: returned and finishing like them
        "stop_token_ids": stops or None,
        "include_stop_str_in_output": True,
        "ignore_eos": sampling.ignore_eos,
        "detokenize": False,
        "logprobs": 0 if "logprobs_simple_format" in fields else 1,
    }
    if spec.pad_token_id is not None:
        kwargs["pad_id"] = spec.pad_token_id
    if "logprobs_simple_format" in fields:
        kwargs["logprobs_simple_format"] = True
    if "logprobs_mode" in fields:
        kwargs["logprobs_mode"] = _raw_logprob_mode()
    return kwargs


def _raw_logprob_mode() -> Any:
    """Log-probs of the raw logits, before temperature / top-k / top-p: the trainer's quantity."""
    mode = getattr(importlib.import_module("tensorrt_llm.sampling_params"), "LogprobMode", None)
    return "raw" if mode is None else mode("raw")


def to_completion(choice: Any, sampling: align.SamplingConfig) -> align.Completion:
    """An ``align.Completion`` from one of TensorRT-LLM's ``CompletionOutput``s."""
    tokens = [int(t) for t in choice.token_ids]
    logprobs = [
        _sampled_logprob(entry, token) for entry, token in zip(choice.logprobs or [], tokens, strict=False)
    ]
    if len(logprobs) != len(tokens):
        raise align.EngineError(
            f"engine 'trtllm' returned {len(logprobs)} log-probs for {len(tokens)} tokens; it must return "
            "the sampled token's log-prob at every step"
        )
    reason = choice.finish_reason
    if reason not in ("stop", "length"):
        reason = "length" if len(tokens) >= sampling.max_tokens else "stop"
    return align.Completion(tokens, logprobs, reason)


def _sampled_logprob(entry: Any, token: int) -> float:
    """A step's log-prob: a float (simple format) or the sampled token's entry of a dict."""
    if isinstance(entry, dict):
        value: Any = entry.get(token)
        if value is None:
            raise align.EngineError(f"engine 'trtllm' returned no log-prob for the sampled token {token}")
        return float(getattr(value, "logprob", value))
    return float(entry)


def buckets(weights: align.NamedWeights, max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive groups of weights of at most ``max_bytes`` each (a larger tensor alone)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
