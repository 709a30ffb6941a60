"""The vllm engine against a megatron policy, in-process (a world of one) or in every process of
a ``torchrun`` world.

``torchrun --nproc_per_node 2 tests/helpers/megatron_vllm_checks.py SPEC.json`` trains SPEC's
``run`` (a GRPO config with ``rollout: {name: vllm}``) with every iteration checked on every rank
(``check_every_iteration``), and rank 0 writes every rank's checks, and the sizes of vLLM's
process groups, to ``SPEC["report"]``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import align


def engine_against_policy(algorithm: Any) -> dict[str, Any]:
    """How far the vllm engine is from the policy's HF export (``named_weights``, what a refit
    streams; on any backend: the megatron tests here, tests/test_grpo.py's on hf; collective
    under torchrun, so every rank calls this): the tensors vLLM keeps
    as they are (embedding, norms, LM head; its vocabulary padded) compared directly, and the
    linear layers it repacks on CPU through the engine's log-probs of its own greedy completions
    of four prompts against the policy's. ``policy`` is the export itself."""
    engine = algorithm.rollouts().engine
    backend, policy_model = algorithm.ctx.backend, algorithm.ctx.policy
    policy = {name: tensor.clone() for name, tensor in backend.named_weights(policy_model)}

    def plain(worker: Any) -> dict[str, torch.Tensor]:
        model = worker.model_runner.model
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.numel() > 0}

    held = engine.llm.collective_rpc(plain)[0]
    shared = [name for name in held if name in policy]
    weight_diff = max((held[n][: policy[n].shape[0]] - policy[n]).abs().max().item() for n in shared)
    prompts = [row.prompt_ids for row in algorithm.prompts.take(4)]
    algorithm.prompts.position -= 4  # the run's prompt stream goes on as if not read
    greedy = align.SamplingConfig(n=1, temperature=0.0, max_tokens=4, ignore_eos=True)
    completions = [group[0] for group in engine.generate(prompts, greedy)]
    layout = align.lay_out([(p, c.token_ids) for p, c in zip(prompts, completions, strict=True)], 0, False)
    with torch.no_grad():
        trainer = backend.token_logps(policy_model, layout).values
    logp_diff = max(
        (torch.tensor(c.logprobs) - trainer[row, : len(c.logprobs)]).abs().max().item()
        for row, c in enumerate(completions)
    )
    return {
        "checked": len(shared),
        "weight_diff": weight_diff,
        "logp_diff": logp_diff,
        "refits": algorithm.rollouts().version,
        "policy": policy,
    }


def check_every_iteration(record: list[dict[str, Any]]) -> None:
    """After each GRPO iteration (its update and the engine's refit), append
    ``engine_against_policy`` to ``record``."""
    from align_grpo.algorithm import CriticFree

    run_iteration = CriticFree.run_iteration

    def checked(self: CriticFree, learner: Any) -> None:
        run_iteration(self, learner)
        record.append(engine_against_policy(self))

    CriticFree.run_iteration = checked  # type: ignore[method-assign]


def vllm_group_sizes() -> dict[str, int]:
    """The sizes of the process groups vLLM's engine made in this process (while it is open)."""
    from vllm.distributed import parallel_state

    return {
        "world": parallel_state.get_world_group().world_size,
        "tensor_parallel": parallel_state.get_tp_group().world_size,
        "pipeline_parallel": parallel_state.get_pp_group().world_size,
    }


def record_group_sizes(record: dict[str, int]) -> None:
    """Fill ``record`` with ``vllm_group_sizes`` when the first GRPO iteration ends (the engine is
    open then; the run closes it before it returns)."""
    from align_grpo.algorithm import CriticFree

    run_iteration = CriticFree.run_iteration

    def recorded(self: CriticFree, learner: Any) -> None:
        run_iteration(self, learner)
        record.update(vllm_group_sizes())

    CriticFree.run_iteration = recorded  # type: ignore[method-assign]


def main(spec_path: str) -> None:
    from align.cli import load_config
    from align.plugins import default_plugins

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    checks: list[dict[str, Any]] = []
    groups: dict[str, int] = {}
    check_every_iteration(checks)
    record_group_sizes(groups)
    plugins = default_plugins()
    align.train(load_config(spec["run"], [], None, plugins), plugins)
    policies = [check.pop("policy") for check in checks]
    moved = max(float((policies[0][k] - policies[-1][k]).abs().max()) for k in policies[0])
    mine = {"checks": checks, "policy_moved": moved, "vllm_groups": groups, "rank": dist.get_rank()}
    report_every_rank(mine, Path(spec["report"]))


def report_every_rank(record: dict[str, Any], report: Path) -> None:
    """Every rank's ``record``, gathered and written by rank 0 as ``{"ranks": [...],
    "world_size": n}``; then the process group ends."""
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, record)
    if dist.get_rank() == 0:
        report.write_text(json.dumps({"ranks": ranks, "world_size": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
