"""``align import-nemo SRC --out DIR``: a NeMo checkpoint as an HF folder (``model.path``).

    align import-nemo llama.nemo --out models/llama-hf
    align import-nemo nemo2_ckpt/ --out models/llama-hf --tokenizer path/to/hf-tokenizer
    align run examples/dpo.yaml model.path=models/llama-hf backend.name=megatron

The weights go through align_megatron's Megatron -> HF conversion (``to_hf``), the config through
``align_nemo.config``. The folder is written beside ``--out`` and renamed into place when it is
complete: an interrupted import leaves no half-written model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

import align
from align_megatron import LlamaLayout, megatron_names, to_hf
from align_nemo.checkpoints import NemoCheckpoint, checkpoint_dtype, read_checkpoint
from align_nemo.config import hf_config, llama_layout
from align_nemo.errors import NemoFormatError

MARKER = "nemo_import.json"  # written into every folder this makes; --overwrite replaces only those
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def add_import_command(add_command: Any) -> None:
    add_command(
        "import-nemo",
        "convert a NeMo checkpoint (.nemo archive or NeMo 2 folder) into an HF folder for model.path",
        _arguments,
        run_import,
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a .nemo file, an extracted .nemo folder, or a NeMo 2 checkpoint folder"
    )
    parser.add_argument("--out", required=True, help="the HF folder to write (must not exist, or be empty)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle the checkpoint's files fully (runs code they name: only for files you trust)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="keep only the first N embedding rows (NeMo pads the tokenizer's vocabulary; default: keep all)",
    )
    parser.add_argument("--tokenizer", help="an HF tokenizer (folder or hub id) to save into --out")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out when an earlier import-nemo wrote it"
    )


def run_import(args: argparse.Namespace, plugins: align.Plugins) -> None:
    try:
        out = import_nemo(
            Path(args.source),
            Path(args.out),
            trust_pickle=args.trust_pickle,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
        )
    except OSError as error:  # writing the staging folder or --out (reading errors name the source)
        raise align.OutputWriteError(
            f"--out {args.out}: cannot write the HF folder there ({error})"
        ) from error
    summary = json.loads((out / MARKER).read_text())
    print(f"wrote {out}: {summary['model_type']} from {summary['layout']} ({summary['source']})")
    if not summary["tokenizer"]:
        print(
            "note: no HF tokenizer was found in the checkpoint; set model.tokenizer (an HF id or folder) "
            "when you use this folder, or import again with --tokenizer"
        )


def import_nemo(
    source: Path,
    out: Path,
    *,
    trust_pickle: bool = False,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the NeMo checkpoint ``source`` as an HF folder ``out``; ``out``."""
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Extraction and staging next to --out: the same disk, and no copy through /tmp.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.importing-", dir=out.parent) as work:
        extracted, staging = Path(work) / "extracted", Path(work) / "hf"
        extracted.mkdir()
        checkpoint = read_checkpoint(source, extracted, trust_pickle)
        layout = checkpoint_layout(checkpoint, vocab_size)
        config = hf_config(layout, str(checkpoint_dtype(checkpoint.shards)).removeprefix("torch."))
        weights = hf_weights(checkpoint, layout)
        staging.mkdir()
        config.save_pretrained(staging)
        _save_safetensors(weights, staging / "model.safetensors")
        has_tokenizer = _write_tokenizer(checkpoint, tokenizer, staging)
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "source": str(source),
                    "layout": checkpoint.layout_name,
                    "model_type": config.model_type,
                    "tensor_parallel_shards": len(checkpoint.shards),
                    "vocab_rows_in_checkpoint": _rows(checkpoint),
                    "vocab_size": layout.vocab_size,
                    "tokenizer": has_tokenizer,
                },
                indent=2,
            )
        )
        if out.exists():  # empty, or an earlier import with --overwrite (checked above)
            shutil.rmtree(out)
        staging.rename(out)
    return out


def checkpoint_layout(checkpoint: NemoCheckpoint, vocab_size: int | None) -> LlamaLayout:
    """The decoder's layout from the checkpoint's config, with the vocabulary the embedding has
    (or ``vocab_size`` rows of it); the shards' names checked against it."""
    rows = _rows(checkpoint)
    if vocab_size is not None and not 0 < vocab_size <= rows:
        raise NemoFormatError(f"--vocab-size {vocab_size}: the checkpoint's embedding has {rows} rows")
    layout = llama_layout(checkpoint.config, rows, checkpoint.config_file)
    _check_names(checkpoint, layout)
    return layout if vocab_size is None else replace(layout, vocab_size=vocab_size)


def hf_weights(checkpoint: NemoCheckpoint, layout: LlamaLayout) -> dict[str, Tensor]:
    """HF tensors of the checkpoint's TP shards (align_megatron's Megatron -> HF mapping)."""
    return to_hf(checkpoint.shards, layout)


def _check_names(checkpoint: NemoCheckpoint, layout: LlamaLayout) -> None:
    """Every TP shard has exactly the weights of the config's decoder, of the right shapes."""
    expected = set(megatron_names(layout))
    tied_head = "output_layer.weight"
    for rank, shard in enumerate(checkpoint.shards):
        if layout.tied_embeddings:
            shard.pop(tied_head, None)  # tied: the head is the embedding (a copy kept by PP>1 runs)
        missing, unexpected = sorted(expected - set(shard)), sorted(set(shard) - expected)
        if missing or unexpected:
            where = (
                f"{checkpoint.source} (TP rank {rank})"
                if len(checkpoint.shards) > 1
                else str(checkpoint.source)
            )
            raise NemoFormatError(
                f"{where}: its weights do not match the decoder {checkpoint.config_file} describes: "
                f"missing {_few(missing)}; unexpected {_few(unexpected)} (MoE, other architectures and "
                "TransformerEngine-only extras such as layer-norm biases are not converted)"
            )
    tp = len(checkpoint.shards)
    qkv = checkpoint.shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    qkv_rows = (layout.num_heads + 2 * layout.num_kv_heads) * layout.head_dim
    if tuple(qkv.shape) != (qkv_rows // tp, layout.hidden_size):
        raise NemoFormatError(
            f"{checkpoint.source}: linear_qkv of shape {tuple(qkv.shape)} does not fit "
            f"{checkpoint.config_file} "
            f"(heads {layout.num_heads}, query groups {layout.num_kv_heads}, head size {layout.head_dim}, "
            f"hidden {layout.hidden_size}, TP={tp}: expected {(qkv_rows // tp, layout.hidden_size)})"
        )


def _rows(checkpoint: NemoCheckpoint) -> int:
    return sum(int(shard["embedding.word_embeddings.weight"].shape[0]) for shard in checkpoint.shards)


def _save_safetensors(weights: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # to_hf returns views into shared buffers (q/k/v of one fused tensor): own copies for safetensors.
    save_file(
        {name: t.detach().contiguous().clone() for name, t in weights.items()},
        path,
        metadata={"format": "pt"},
    )


def _write_tokenizer(checkpoint: NemoCheckpoint, tokenizer: str | None, staging: Path) -> bool:
    """Save ``--tokenizer`` or copy the checkpoint's tokenizer files; whether an HF tokenizer
    (``tokenizer.json`` or ``tokenizer_config.json``) is in the folder."""
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(staging)
        except (OSError, ValueError) as error:
            raise align.ConfigError(
                f"--tokenizer {tokenizer}: not a loadable HF tokenizer ({error})"
            ) from error
    else:
        for name, path in checkpoint.tokenizer_files.items():
            shutil.copyfile(path, staging / name)
    return any((staging / name).is_file() for name in HF_TOKENIZER_FILES)


def _check_out(out: Path, overwrite: bool) -> None:
    """Never write over what the user made: ``out`` is new, empty, or (with ``overwrite``) a
    folder an earlier import wrote."""
    if out.is_file():
        raise align.ConfigError(f"--out {out}: is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise align.ConfigError(
            f"--out {out}: already exists and is not empty; choose a new folder or pass --overwrite"
        )
    if not (out / MARKER).is_file():
        raise align.ConfigError(
            f"--out {out}: --overwrite replaces only a folder an earlier import-nemo wrote (it has "
            f"{MARKER}); this one was not: choose a new folder"
        )


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


__all__ = ["MARKER", "add_import_command", "checkpoint_layout", "hf_weights", "import_nemo"]
