"""Checks of the megatron backend that run in every process of a world (in-process as a world of
one, or under ``torchrun``): the conversion against transformers, and align runs.

``torchrun --nproc_per_node 2 tests/helpers/megatron_checks.py SPEC.json`` runs ``SPEC``'s conversion
checks at its ``tp`` and its list of runs (config files, in order), and rank 0 writes a JSON
report to ``SPEC["report"]`` (``tp: 0``: no conversion checks, only the runs).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# Vocabulary 101: odd, so TP=2 exercises the padded vocabulary row.
SHAPES: dict[str, Any] = {
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: 2 query heads per group
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}


def tiny_hf_models() -> dict[str, torch.nn.Module]:
    """Llama untied and tied (GQA), and Qwen2 (QKV bias), with seeded random weights."""
    models: dict[str, torch.nn.Module] = {}
    for name, cls, config_cls, extra in (
        ("llama", LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": False}),
        ("llama_tied", LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True}),
        ("qwen2", Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": False, "rope_theta": 1e6}),
    ):
        config = config_cls(**SHAPES, **extra)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = cls(config).eval()
        if name == "qwen2":  # non-zero biases, so a wrong bias layout shows
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_()
        models[name] = model
    return models


def conversion_report(tp: int) -> dict[str, dict[str, float | bool]]:
    """For each tiny HF model converted at ``tp``: the largest logit, log-prob and entropy
    differences from transformers, and whether HF -> Megatron -> HF is identical."""
    from align_megatron import MegatronModel, layout_of, to_hf, to_megatron, vocab_parallel_logps
    from align_megatron.parallel import build_gpt, initialize

    par = initialize(tp, 1, False)
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    report: dict[str, dict[str, float | bool]] = {}
    tokens = torch.randint(0, SHAPES["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(3, 16)
    causal = ~torch.ones(16, 16, dtype=torch.bool).tril()[None, None].expand(3, 1, 16, 16)
    for name, hf in tiny_hf_models().items():
        layout = layout_of(hf.config)
        state = hf.state_dict()
        if layout.tied_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model = MegatronModel(build_gpt(layout, par, torch.float32, False), layout, hf.config, False)
        model.gpt.load_state_dict(to_megatron(state, layout, par.tp_rank, tp), strict=False)
        with torch.no_grad():
            expected = hf(tokens).logits
            local = model(tokens, positions, causal)
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local.contiguous(), group=group)
            logits = torch.cat(pieces, dim=-1)[..., : layout.vocab_size]
            targets = tokens[:, 1:].reshape(-1)
            logps, entropy = vocab_parallel_logps(
                local[:, :-1].reshape(-1, local.shape[-1]), targets, layout.vocab_size, par.tp_rank, True
            )
        log_probs = torch.log_softmax(expected[:, :-1].reshape(-1, layout.vocab_size).float(), -1)
        hf_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        hf_entropy = -(log_probs.exp() * log_probs).sum(-1)
        megatron_state = {}
        for key, value in model.gpt.state_dict().items():
            if isinstance(value, torch.Tensor):
                shards = [torch.empty_like(value) for _ in range(tp)]
                dist.all_gather(shards, value.contiguous(), group=group)
                megatron_state[key] = shards
        back = to_hf([{k: v[r] for k, v in megatron_state.items()} for r in range(tp)], layout)
        original = hf.state_dict()
        if layout.tied_embeddings:
            original.pop("lm_head.weight", None)
        assert entropy is not None  # asked for
        report[name] = {
            "logits": float((logits - expected).abs().max()),
            "logps": float((logps - hf_logps).abs().max()),
            "entropy": float((entropy - hf_entropy).abs().max()),
            "round_trip_identical": set(back) == set(original)
            and all(torch.equal(back[k], original[k]) for k in original),
        }
    return report


def run_configs(paths: list[str]) -> list[list[float]]:
    """Train each config file in turn (``align run``); the train losses of each run."""
    import align
    from align.cli import load_config
    from align.plugins import default_plugins

    losses = []
    for path in paths:
        plugins = default_plugins()
        align.train(load_config(path, [], None, plugins), plugins)
        metrics = Path(yaml_output_dir(path)) / "metrics.jsonl"
        if dist.get_rank() == 0:
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
            losses.append([line["loss"] for line in lines if line["split"] == "train" and "loss" in line])
    return losses


def yaml_output_dir(path: str) -> str:
    import yaml

    return str(yaml.safe_load(Path(path).read_text())["output_dir"])


def delay_main_rank_checkpoints(seconds: float) -> None:
    """Make the main rank start every checkpoint ``seconds`` late, as a slow disk or its own
    logging can: the other ranks must still write their state into the folder it makes, not
    into one it then clears (the race behind a 1-in-3 crash of the 2-process test)."""
    import align.checkpoint

    begin = align.checkpoint.begin

    def late_begin(output_dir: Path, step: int) -> Path:
        if dist.get_rank() == 0:
            time.sleep(seconds)
        return begin(output_dir, step)

    align.checkpoint.begin = late_begin


def check_refits(record: list[dict[str, float]]) -> None:
    """After every refit of an online run's engine (the hf engine, in this process), append how
    far the engine's logits on fixed tokens are from the megatron policy's (TP-gathered), and how
    much the refit changed the engine's weights."""
    from megatron.core import parallel_state as ps

    from align import OnlineAlgorithm

    sync = OnlineAlgorithm.sync_engine

    def checked(self: Any) -> float:
        engine = self._rollouts.engine.model if self._rollouts is not None else None
        before = None if engine is None else {k: v.clone() for k, v in engine.state_dict().items()}
        seconds = sync(self)
        if engine is None or before is None or not seconds:
            return seconds
        policy = self.ctx.policy
        tokens = torch.randint(
            0, policy.layout.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2)
        )
        causal = ~torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
        with torch.no_grad():
            local = policy(tokens, torch.arange(12).expand(2, 12), causal).contiguous()
            pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(pieces, local, group=ps.get_tensor_model_parallel_group())
            megatron = torch.cat(pieces, dim=-1)[..., : policy.layout.vocab_size]
            hf = engine(tokens).logits
        after = engine.state_dict()
        record.append(
            {
                "logits": float((megatron - hf).abs().max()),
                "changed": max(float((after[k] - before[k]).abs().max()) for k in before),
            }
        )
        return seconds

    OnlineAlgorithm.sync_engine = checked  # type: ignore[method-assign]


def main(spec_path: str) -> None:
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("delay_main_checkpoints"):
        delay_main_rank_checkpoints(float(spec["delay_main_checkpoints"]))
    started = time.perf_counter()
    report: dict[str, Any] = {"conversion": conversion_report(int(spec["tp"])) if spec["tp"] else {}}
    converted = time.perf_counter()
    refits: list[dict[str, float]] = []
    if spec.get("check_refits"):
        check_refits(refits)
    report["losses"] = run_configs(spec.get("runs", []))
    report["refits"] = refits
    # Where a slow test's time goes (not asserted).
    report["seconds"] = {"conversion": converted - started, "runs": time.perf_counter() - converted}
    report["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
