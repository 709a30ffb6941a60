"""Our HF <-> Megatron conversion against Megatron-Bridge, NVIDIA's maintained converter.

Where Bridge is importable (it needs CUDA and TransformerEngine; see docs/megatron.md), tiny
Llama, tied-embedding Llama and Qwen2 (QKV bias) models converted by both give the same megatron
tensors on every TP rank, and Bridge's HF export of a model holding our shards is our export,
tensor for tensor (``helpers/megatron_bridge_checks.py`` under ``torchrun``). The parts that
need no Bridge (the local <-> TransformerEngine name mapping, the comparisons) are tested here
on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import subprocess_env
from helpers.megatron_bridge_checks import (
    KINDS,
    hf_mismatches,
    local_name_of,
    parameters_by_local_name,
    shard_mismatches,
    te_name,
    write_tiny_hf,
)
from helpers.megatron_runs import rank_logs

pytest.importorskip("megatron.core")

CHECKS = Path(__file__).parent / "helpers" / "megatron_bridge_checks.py"


def _layout_and_weights(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from align_megatron.conversion import layout_of, safetensors_weights

    layout = layout_of(AutoConfig.from_pretrained(folder))
    return layout, safetensors_weights(folder, layout.tied_embeddings)


# ---- on CPU: what the cross-check relies on -------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_conversion_fills_every_parameter_of_a_local_spec_gpt_model(tmp_path: Path, kind: str) -> None:
    """The megatron names the conversion writes are exactly the parameters of megatron-core's
    GPTModel (local spec) for the layout, each with the model's shape, also read through a
    wrapper's ``module.`` prefix (DDP, Float16Module: how Bridge hands out its models)."""
    from align_megatron.conversion import megatron_names, to_megatron
    from align_megatron.parallel import build_gpt, initialize

    layout, hf = _layout_and_weights(write_tiny_hf(tmp_path, kind))
    gpt = build_gpt(layout, initialize(1, 1, False), torch.float32, False)
    wrapped = torch.nn.Module()
    wrapped.module = gpt  # named "module.<name>", as Bridge's are
    params = parameters_by_local_name(wrapped)
    converted = to_megatron(hf.whole, layout, 0, 1)
    assert set(params) == set(converted) == set(megatron_names(layout))
    assert all(params[name].shape == converted[name].shape for name in converted)
    assert ("output_layer.weight" in params) != layout.tied_embeddings
    assert any(name.endswith("linear_qkv.bias") for name in params) == (kind == "qwen2")


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformer_engine_names_round_trip_every_parameter(tmp_path: Path, kind: str) -> None:
    """Each local-spec parameter has its own TransformerEngine name, which maps back to it (also
    behind wrappers' prefixes); the backend's ``MegatronModel.local_name`` with TE gives the same
    names; only the two norms of each layer are renamed, into the linear layers after them."""
    from align_megatron import MegatronModel
    from align_megatron.conversion import megatron_names

    layout, _ = _layout_and_weights(write_tiny_hf(tmp_path, kind))
    names = megatron_names(layout)
    fused = [te_name(name) for name in names]
    assert len(set(fused)) == len(names)
    assert [local_name_of(name) for name in fused] == names
    assert [local_name_of(f"module.module.{name}") for name in fused] == names
    with_te = MegatronModel(torch.nn.Identity(), layout, None, uses_te=True)
    assert [with_te.local_name(name) for name in names] == fused
    renamed = {old: new for old, new in zip(names, fused, strict=True) if old != new}
    assert len(renamed) == 2 * layout.num_layers
    for old, new in renamed.items():
        layer = old.split(".")[2]
        assert new in (
            f"decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
            f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
        )


def _unfused_qkv(hf: Any, layer: int, kind: str) -> torch.Tensor:
    """q, k and v stacked whole: the layout a converter gets wrong if it forgets the query groups."""
    prefix = f"model.layers.{layer}.self_attn."
    return torch.cat([hf.whole(f"{prefix}{x}_proj.{kind}") for x in "qkv"])


def test_the_shard_comparison_finds_a_converter_that_ignores_query_groups(tmp_path: Path) -> None:
    """Against a conversion that stacks q, k and v whole instead of per query group, exactly the
    fused QKV weights and biases of every layer are reported; so are names on one side only, and
    a dtype; identical shards report nothing."""
    from align_megatron.conversion import to_megatron

    layout, hf = _layout_and_weights(write_tiny_hf(tmp_path, "qwen2"))
    ours = to_megatron(hf.whole, layout, 0, 1)
    assert shard_mismatches(ours, {name: t.clone() for name, t in ours.items()}) == []
    wrong = dict(ours)
    for layer in range(layout.num_layers):
        for kind in ("weight", "bias"):
            wrong[f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = _unfused_qkv(hf, layer, kind)
    found = shard_mismatches(ours, wrong)
    assert [line.split(":")[0] for line in found] == sorted(
        f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"
        for layer in range(layout.num_layers)
        for kind in ("weight", "bias")
    )
    assert all("values differ" in line for line in found)
    renamed = dict(ours)
    renamed["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] = renamed.pop(
        "decoder.layers.0.input_layernorm.weight"
    )
    renamed["decoder.final_layernorm.weight"] = renamed["decoder.final_layernorm.weight"].double()
    assert shard_mismatches(ours, renamed) == [
        "decoder.layers.0.input_layernorm.weight: only ours",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight: only Bridge's",
        "decoder.final_layernorm.weight: ours (64,) torch.float32, Bridge's (64,) torch.float64",
    ]


def test_the_export_comparison_takes_a_tied_output_weight_only_as_the_embedding(tmp_path: Path) -> None:
    """With tied embeddings, an exported ``lm_head.weight`` equal to the embedding table is Bridge
    writing the tie out, not a difference; another one is reported, and so is a missing tensor."""
    from align_megatron.conversion import to_hf, to_megatron

    layout, hf = _layout_and_weights(write_tiny_hf(tmp_path, "llama_tied"))
    ours = to_hf([to_megatron(hf.whole, layout, rank, 2) for rank in range(2)], layout)
    assert "lm_head.weight" not in ours
    table = ours["model.embed_tokens.weight"]
    assert hf_mismatches(ours, [*ours.items(), ("lm_head.weight", table.clone())], tied=True) == []
    assert hf_mismatches(ours, [*ours.items(), ("lm_head.weight", table + 1)], tied=True) == [
        "lm_head.weight: Bridge's tied output weight is not the embedding table"
    ]
    untied = [*ours.items(), ("lm_head.weight", table.clone())]
    assert hf_mismatches(ours, untied, tied=False) == ["lm_head.weight: only Bridge's"]
    fewer = [(name, t) for name, t in ours.items() if name != "model.norm.weight"]
    assert hf_mismatches(ours, fewer, tied=True) == ["model.norm.weight: only ours"]


# ---- with Megatron-Bridge (CUDA, TransformerEngine) ----------------------------------------


@pytest.fixture(scope="module")
def bridge() -> Any:
    module = pytest.importorskip(
        "megatron.bridge",
        reason=(
            "Megatron-Bridge is not installed: it needs CUDA and TransformerEngine (and Python 3.12, "
            "transformers <= 5.12), so the cross-check runs only on a GPU machine that has it"
        ),
    )
    if not torch.cuda.is_available():
        pytest.skip("Megatron-Bridge builds TransformerEngine's layer spec on a GPU: no CUDA here")
    return module


@pytest.mark.parametrize("tp", [1, 2])
def test_our_conversion_gives_megatron_bridges_tensors_both_ways(
    bridge: Any, tmp_path: Path, tp: int
) -> None:
    """For each tiny model at TP ``tp`` (one process per rank, one GPU each): HF -> Megatron, our
    shards equal Bridge's on every rank, bit for bit, for every parameter of Bridge's model;
    Megatron -> HF, Bridge's export of the model holding our shards equals ours, every tensor."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, {torch.cuda.device_count()} here")
    from align_megatron.conversion import megatron_names, to_hf, to_megatron

    folders = {kind: write_tiny_hf(tmp_path / kind, kind) for kind in KINDS}
    report = _torchrun(tmp_path, tp, {kind: str(folder) for kind, folder in folders.items()})
    print("Megatron-Bridge", report["version"])
    assert report["world_size"] == tp
    for kind, folder in folders.items():
        layout, hf = _layout_and_weights(folder)
        held = len(megatron_names(layout))
        written = len(to_hf([to_megatron(hf.whole, layout, 0, 1)], layout))
        print(kind, "Bridge's spec:", {mine["spec"] for mine in report[kind]})
        for rank, mine in enumerate(report[kind]):
            assert mine["to_megatron"] == [], f"{kind}, TP rank {rank}"
            assert mine["to_megatron_compared"] == held, f"{kind}, TP rank {rank}"
            assert mine["to_hf"] == [], f"{kind}, TP rank {rank}"
            # Bridge may write a tied model's output weight too (checked equal to the embedding).
            assert mine["to_hf_compared"] - written in (0, int(layout.tied_embeddings)), kind


def _torchrun(tmp_path: Path, tp: int, folders: dict[str, str]) -> dict[str, Any]:
    spec, report, logs = tmp_path / "spec.json", tmp_path / "report.json", tmp_path / "logs"
    spec.write_text(json.dumps({"tp": tp, "kinds": folders, "report": str(report)}))
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp)),
        *("--master_port", str(29600 + os.getpid() % 1000)),
        *("--log-dir", str(logs), "--redirects", "3"),
        *(str(CHECKS), str(spec)),
    ]
    # A ceiling for a hang (model builds and a few tiny tensors), not a speed check.
    done = subprocess.run(
        ["timeout", "600", *command], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, (
        f"torchrun exited {done.returncode}\n{rank_logs(logs)}\n{done.stderr[-2000:]}"
    )
    result: dict[str, Any] = json.loads(report.read_text())
    return result
