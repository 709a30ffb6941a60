"""align-nemo: NeMo checkpoints written by the tests from tiny HF models (in each layout the
plugin reads) come back from ``align import-nemo`` as HF folders with the same tensors and the
same logits; unsafe pickles, damaged archives and unsupported configs are exit-2 errors naming
the file; --out is never written over unless asked."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DATA, REPO, assert_user_error, dpo_config, head_jsonl, run_cli, subprocess_env, write_yaml
from safetensors.torch import load_file

pytest.importorskip("megatron.core")
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from nemo_checkpoints import (
    hf_state,
    megatron_shards,
    nemo1_config,
    nemo2_config,
    nemo_state_dict,
    rope_theta,
    tiny_model,
    write_dist_checkpoint,
    write_nemo_tar,
)

LOGIT_TOLERANCE = 1e-5
WRITER = REPO / "tests" / "helpers" / "nemo_checkpoints.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
TOKENIZER_BYTES = b"sentencepiece model bytes"


def import_nemo(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *flags: str) -> Any:
    return run_cli(capsys, "import-nemo", str(source), "--out", str(out), *flags)


def assert_same_model(original: Any, out: Path, vocab: int | None = None) -> None:
    """``out`` holds ``original``'s tensors (the first ``vocab`` embedding rows when the import
    kept NeMo's padding) and gives its logits."""
    from transformers import AutoModelForCausalLM

    imported = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(imported) is type(original)
    assert rope_theta(imported.config) == rope_theta(original.config) in (5e5, 1e6)  # not the default
    expected, got = hf_state(original), load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        kept = got[name][: tensor.shape[0]] if vocab is not None else got[name]
        assert torch.equal(kept, tensor), name
    tokens = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, have = original(tokens).logits, imported(tokens).logits
    assert have.shape[-1] == (vocab or want.shape[-1])
    assert float((have[..., : want.shape[-1]] - want).abs().max()) < LOGIT_TOLERANCE


def test_nemo1_model_weights_ckpt_tp1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An uncompressed .nemo with model_weights.ckpt (TransformerEngine's fused norm names and
    BytesIO extra state, read without --trust-pickle) and a sentencepiece tokenizer file."""
    model = tiny_model("llama")
    [shard] = megatron_shards(model, tp=1)
    archive = write_nemo_tar(
        tmp_path / "llama.nemo",
        {
            "model_config.yaml": nemo1_config(model),
            "model_weights.ckpt": nemo_state_dict(shard),
            "a1b2_tokenizer.model": TOKENIZER_BYTES,
        },
    )
    result = import_nemo(capsys, archive, tmp_path / "hf")
    assert result.code == 0, result.err
    assert "nemo1 model_weights.ckpt (TP=1)" in result.out and "model.tokenizer" in result.out
    assert_same_model(model, tmp_path / "hf")
    assert (tmp_path / "hf/tokenizer.model").read_bytes() == TOKENIZER_BYTES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.importing-")]  # staging removed


def test_nemo1_tp2_shards_gzip_qwen2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A gzipped .nemo with mp_rank_00/01 (TP=2, O2's model.module. prefix) of a Qwen2 (QKV
    biases): the padded vocabulary row is kept by default and cut by --vocab-size."""
    model = tiny_model("qwen2")
    shards = megatron_shards(model, tp=2)
    assert sum(s["embedding.word_embeddings.weight"].shape[0] for s in shards) == 102  # 101 padded
    files: dict[str, Any] = {"model_config.yaml": nemo1_config(model, tp=2)}
    for rank, shard in enumerate(shards):
        files[f"mp_rank_0{rank}/model_weights.ckpt"] = nemo_state_dict(shard, prefix="model.module.")
    archive = write_nemo_tar(tmp_path / "qwen.nemo", files, compress=True)

    assert import_nemo(capsys, archive, tmp_path / "padded").code == 0
    assert_same_model(model, tmp_path / "padded", vocab=102)
    summary = json.loads((tmp_path / "padded/nemo_import.json").read_text())
    assert (
        summary["layout"] == "nemo1 mp_rank_NN/model_weights.ckpt (TP=2)" and summary["model_type"] == "qwen2"
    )

    from align_hf import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")
    cut = import_nemo(
        capsys, archive, tmp_path / "cut", "--vocab-size", "101", "--tokenizer", str(tmp_path / "tokenizer")
    )
    assert cut.code == 0 and "note:" not in cut.out
    assert_same_model(model, tmp_path / "cut")
    assert (tmp_path / "cut/tokenizer.json").is_file()


def test_nemo1_tp2_pp2_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tp_rank_NN_pp_rank_NNN/ shards (TP=2 x PP=2): each stage numbers its layers from 0 and
    holds its share (embedding on the first, final norm and head on the last)."""
    model = tiny_model("llama")
    files: dict[str, Any] = {
        "model_config.yaml": {**nemo1_config(model, tp=2), "pipeline_model_parallel_size": 2}
    }
    for rank, shard in enumerate(megatron_shards(model, tp=2)):
        first = {k: v for k, v in shard.items() if k.startswith(("embedding.", "decoder.layers.0."))}
        last = {
            k.replace("decoder.layers.1.", "decoder.layers.0."): v for k, v in shard.items() if k not in first
        }
        for stage, part in enumerate((first, last)):
            files[f"tp_rank_0{rank}_pp_rank_00{stage}/model_weights.ckpt"] = nemo_state_dict(part)
    archive = write_nemo_tar(tmp_path / "pp.nemo", files)
    result = import_nemo(capsys, archive, tmp_path / "hf", "--vocab-size", "101")
    assert result.code == 0, result.err
    assert "nemo1 tp_rank_NN_pp_rank_NNN/model_weights.ckpt (TP=2, PP=2)" in result.out
    assert_same_model(model, tmp_path / "hf")


@pytest.fixture(scope="module")
def dist_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A .nemo with a model_weights/ distributed checkpoint (tied Llama) and a NeMo 2 folder
    (untied Llama with the byte tokenizer's 262-token vocabulary, an optimizer entry beside the
    weights), written by megatron-core."""
    from align_hf import byte_tokenizer

    root = tmp_path_factory.mktemp("nemo_dist")
    tied, nemo2 = tiny_model("llama_tied"), tiny_model("llama", vocab_size=262)
    nemo2_folder = root / "nemo2_ckpt"
    write_dist_checkpoint(tied, root / "model_weights", prefix="model.")
    write_dist_checkpoint(nemo2, nemo2_folder / "weights", prefix="module.", optimizer=True)
    archive = write_nemo_tar(
        root / "tied.nemo", {"model_config.yaml": nemo1_config(tied), "model_weights": root / "model_weights"}
    )
    write_yaml(nemo2_folder / "context/model.yaml", nemo2_config(nemo2))
    byte_tokenizer().save_pretrained(nemo2_folder / "context/nemo_tokenizer")
    return {"tied": tied, "archive": archive, "nemo2": nemo2, "nemo2_folder": nemo2_folder}


def test_nemo1_distributed_checkpoint(
    dist_checkpoints: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = import_nemo(capsys, dist_checkpoints["archive"], tmp_path / "hf")
    assert result.code == 0, result.err
    assert "nemo1 model_weights/ (torch_dist)" in result.out
    assert_same_model(dist_checkpoints["tied"], tmp_path / "hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf/model.safetensors")  # tied


def test_nemo2_folder_imports_and_trains_on_the_megatron_backend(
    dist_checkpoints: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The NeMo 2 folder's weights (the optimizer entry skipped) and tokenizer; the folder is a
    model.path the megatron backend trains from: DPO's first loss is ln 2 (policy = reference)."""
    result = import_nemo(capsys, dist_checkpoints["nemo2_folder"], tmp_path / "hf")
    assert result.code == 0, result.err
    assert "nemo2 weights/ (torch_dist)" in result.out and "note:" not in result.out
    assert_same_model(dist_checkpoints["nemo2"], tmp_path / "hf")

    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == 262
    train = head_jsonl(DATA / "preference_train.jsonl", tmp_path / "train.jsonl", 16)
    config = dpo_config(
        tmp_path / "run",
        model={"path": str(tmp_path / "hf")},
        backend={"name": "megatron"},
        data={"train": train, "eval": None, "max_length": 48},
        trainer={"max_steps": 2, "batch_size": 8},
    )
    assert run_cli(capsys, "run", write_yaml(tmp_path / "dpo.yaml", config)).code == 0
    losses = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = next(m["loss"] for m in losses if m.get("split") == "train")
    assert first == pytest.approx(0.693147, abs=1e-5)
    assert (tmp_path / "run/final/model.safetensors").is_file()


@pytest.mark.slow
def test_distributed_checkpoint_written_at_tp2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A distributed checkpoint saved by two TP ranks (torchrun, gloo) reads back as the whole
    model: megatron-core stores global tensors (QKV by query group, gate/up halves of
    linear_fc1 from every rank), so the import does not depend on the TP it was written at."""
    folder = tmp_path / "extracted"
    command = [
        *TORCHRUN,
        "--master_port",
        str(29600 + os.getpid() % 1000),
        str(WRITER),
        str(folder / "model_weights"),
    ]
    done = subprocess.run(["timeout", "300", *command], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    model = tiny_model("llama")
    write_yaml(folder / "model_config.yaml", nemo1_config(model, tp=2))
    result = import_nemo(capsys, folder, tmp_path / "hf")
    assert result.code == 0, result.err
    assert_same_model(model, tmp_path / "hf", vocab=102)  # 101 padded to a multiple of TP=2


def test_weights_only_refusal_and_trust_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model_weights.ckpt holding an object a weights-only load does not build is refused
    (exit 2, the file and the class named, nothing written); --trust-pickle reads it."""
    model = tiny_model("llama")
    [shard] = megatron_shards(model, tp=1)
    state = {**nemo_state_dict(shard), "saved_on": datetime.date(2024, 1, 1)}
    archive = write_nemo_tar(
        tmp_path / "pickled.nemo", {"model_config.yaml": nemo1_config(model), "model_weights.ckpt": state}
    )
    refused = import_nemo(capsys, archive, tmp_path / "hf")
    assert_user_error(refused, "pickled.nemo:model_weights.ckpt", "datetime.date", "--trust-pickle")
    assert not (tmp_path / "hf").exists()
    assert import_nemo(capsys, archive, tmp_path / "hf", "--trust-pickle").code == 0
    assert_same_model(model, tmp_path / "hf")


def test_distributed_metadata_with_a_foreign_class_or_lost_shards_is_refused(
    dist_checkpoints: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "nemo2"
    shutil.copytree(dist_checkpoints["nemo2_folder"], folder)
    metadata = folder / "weights/.metadata"
    original = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(argparse.Namespace(x=1)))
    result = import_nemo(capsys, folder, tmp_path / "hf")
    assert_user_error(result, "weights/.metadata", "argparse.Namespace", "--trust-pickle")
    # A lost tensor file is a user error naming the checkpoint too.
    metadata.write_bytes(original)
    for shard in (folder / "weights").glob("*.distcp"):
        shard.unlink()
    assert_user_error(
        import_nemo(capsys, folder, tmp_path / "hf"), "nemo2/weights", "cannot read its tensors"
    )
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("garbage", ("garbage.nemo", "not a readable .nemo archive", "supported:")),
        ("truncated", ("truncated.nemo", "not a readable .nemo archive")),
        ("no_config", ("no_config.nemo", "no model_config.yaml")),
        ("no_weights", ("no_weights.nemo", "no weights this reads", "model_config.yaml")),
        ("moe", ("moe.nemo:model_config.yaml", "num_moe_experts: 8")),
        ("layernorm", ("layernorm.nemo:model_config.yaml", "normalization: layernorm")),
        ("legacy", ("legacy.nemo:model_config.yaml", "mcore_gpt is false")),
        ("reward_head", ("reward_head.nemo:model_weights.ckpt", "model.rm_head.weight", "not converted")),
        ("missing_stage", ("missing_stage.nemo", "not a full grid of 1 TP rank(s) x 2 pipeline stage(s)")),
        ("wrong_heads", ("wrong_heads.nemo", "linear_qkv of shape")),
        ("folder", ("not a NeMo checkpoint", "NeMo 2 checkpoint folder")),
    ],
)
def test_bad_checkpoints_are_user_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, fragments: tuple[str, ...]
) -> None:
    model = tiny_model("llama")
    [shard] = megatron_shards(model, tp=1)
    config, weights = nemo1_config(model), nemo_state_dict(shard)
    source = tmp_path / f"{case}.nemo"
    if case == "garbage":
        source.write_bytes(b"this is not a tar archive at all" * 20)
    elif case == "truncated":
        whole = write_nemo_tar(
            tmp_path / "whole.nemo", {"model_config.yaml": config, "model_weights.ckpt": weights}
        )
        source.write_bytes(whole.read_bytes()[:2000])
    elif case == "folder":
        source = tmp_path / "folder"
        source.mkdir()
        (source / "notes.txt").write_text("hello")
    else:
        files: dict[str, Any] = {"model_config.yaml": config, "model_weights.ckpt": weights}
        if case == "no_config":
            files.pop("model_config.yaml")
        elif case == "no_weights":
            files = {"model_config.yaml": config, "README": b"weights elsewhere"}
        elif case == "moe":
            config["num_moe_experts"] = 8
        elif case == "layernorm":
            config["normalization"] = "layernorm"
        elif case == "legacy":
            config["mcore_gpt"] = False
        elif case == "reward_head":
            weights["model.rm_head.weight"] = torch.zeros(1, 64)
        elif case == "missing_stage":
            files = {"model_config.yaml": config, "tp_rank_00_pp_rank_001/model_weights.ckpt": weights}
        elif case == "wrong_heads":
            config["num_query_groups"] = 4
        write_nemo_tar(source, files)
    result = import_nemo(capsys, source, tmp_path / "hf")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "hf").exists()


def test_out_is_never_written_over_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("llama")
    [shard] = megatron_shards(model, tp=1)
    archive = write_nemo_tar(
        tmp_path / "m.nemo",
        {"model_config.yaml": nemo1_config(model), "model_weights.ckpt": nemo_state_dict(shard)},
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_user_error(import_nemo(capsys, archive, mine), "--out", "not empty", "--overwrite")
    assert_user_error(
        import_nemo(capsys, archive, mine, "--overwrite"), "nemo_import.json", "choose a new folder"
    )
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1

    assert import_nemo(capsys, archive, tmp_path / "hf").code == 0
    assert_user_error(import_nemo(capsys, archive, tmp_path / "hf"), "--overwrite")
    assert import_nemo(capsys, archive, tmp_path / "hf", "--overwrite").code == 0
    assert_same_model(model, tmp_path / "hf")


def test_config_mapping_follows_references_and_refuses_rope_scaling() -> None:
    """NeMo 1's ``${.encoder_seq_length}`` reference and NeMo 2's field names map to the layout;
    Llama 3.1-style RoPE scaling and a non-gated activation are refused by name."""
    from align_nemo.config import llama_layout
    from align_nemo.errors import NemoFormatError

    model = tiny_model("llama")
    nemo1 = llama_layout(nemo1_config(model), 101, "model_config.yaml")
    nemo2 = llama_layout(nemo2_config(model)["config"], 101, "model.yaml:config")
    assert nemo1 == nemo2
    assert (nemo1.max_position_embeddings, nemo1.num_kv_heads, nemo1.head_dim, nemo1.rope_theta) == (
        64,
        2,
        16,
        5e5,
    )
    config = nemo2_config(model)["config"]
    with pytest.raises(NemoFormatError, match=r"model\.yaml:config: scale_factor: 8\.0 is not converted"):
        llama_layout({**config, "scale_factor": 8.0}, 101, "model.yaml:config")
    gelu = {**config, "activation_func": {"_target_": "torch.nn.functional.gelu"}, "gated_linear_unit": False}
    with pytest.raises(
        NemoFormatError, match=r"activation: torch.nn.functional.gelu \(gated_linear_unit: False\)"
    ):
        llama_layout(gelu, 101, "model.yaml:config")
