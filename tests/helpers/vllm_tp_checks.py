"""One vllm engine spread over the ranks of a ``torchrun`` world (``rollout.tensor_parallel_size``).

``torchrun --nproc_per_node 2 tests/helpers/vllm_tp_checks.py SPEC.json`` joins a gloo world (as a
backend would before any engine starts), builds the engine on SPEC's ``model`` folder with SPEC's
``engine`` settings on every rank, and records per rank: vLLM's group sizes, the executor it was
given, the engine's device and the current CUDA device before and after it started, greedy
completions (tokens and log-probs) of SPEC's ``prompts``, seeded samples, the greedy completions
again after a refit to SPEC's ``refit_model`` weights, and what a call whose prompts differ
between the ranks raises. Rank 0 writes every rank's record to ``SPEC["report"]``. Then, in the
same world, it trains each run config in SPEC's ``runs`` (e.g. GRPO on the megatron backend with
an engine per rank and with one engine over the ranks); their metrics are in their output
folders.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron_vllm_checks import report_every_rank  # a sibling: torchrun runs this file as a script

import align


def completions(
    engine: Any, prompts: list[list[int]], sampling: align.SamplingConfig
) -> list[dict[str, Any]]:
    return [
        {"tokens": c.token_ids, "logprobs": c.logprobs}
        for group in engine.generate(prompts, sampling)
        for c in group
    ]


def hf_weights(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors by HF name (what a backend's ``named_weights`` streams)."""
    from safetensors.torch import load_file

    return list(load_file(str(Path(model_dir) / "model.safetensors")).items())


def train(configs: list[str]) -> None:
    """Train each run config in this world (the backend finds the process group made)."""
    from align.cli import load_config
    from align.plugins import default_plugins

    plugins = default_plugins()
    for config in configs:
        align.train(load_config(config, [], None, plugins), plugins)


def main(spec_path: str) -> None:
    from vllm.distributed import parallel_state

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    entry = align.default_plugins().registry.get("rollout_engine", "vllm")
    cfg = entry.config.model_validate({"name": "vllm", **spec["engine"]})
    current = torch.cuda.current_device if torch.cuda.is_available() else lambda: None
    before = current()
    engine = entry.factory(cfg, align.EngineSpec(model_dir=Path(spec["model"]), **spec["spec"]))
    after = current()
    prompts = spec["prompts"]
    greedy = align.SamplingConfig(n=1, temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    sampled = align.SamplingConfig(
        n=2, temperature=1.0, max_tokens=spec["max_tokens"], ignore_eos=True, seed=7
    )
    record: dict[str, Any] = {
        "rank": dist.get_rank(),
        "executor": engine.placement.llm_kwargs,
        "device": str(engine.placement.device),
        "current_device": [before, after],  # the trainer's, before and after the engine started
        "groups": {
            "world": parallel_state.get_world_group().world_size,
            "tensor_parallel": parallel_state.get_tp_group().world_size,
            "tensor_parallel_ranks": parallel_state.get_tp_group().ranks,
        },
        "greedy": completions(engine, prompts, greedy),
        "sampled": completions(engine, prompts, sampled),
    }
    engine.refit(hf_weights(spec["refit_model"]))
    record["greedy_after_refit"] = completions(engine, prompts, greedy)
    try:
        engine.generate([prompts[dist.get_rank() % len(prompts)]], greedy)
        record["mismatch"] = None
    except align.EngineError as exc:
        record["mismatch"] = str(exc)
    record["greedy_after_mismatch"] = completions(engine, prompts, greedy)
    engine.close()
    train(spec.get("runs", []))
    report_every_rank(record, Path(spec["report"]))


if __name__ == "__main__":
    main(sys.argv[1])
