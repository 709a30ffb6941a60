"""Finding the model config and the megatron weights in a NeMo checkpoint.

Layouts read (``SUPPORTED`` says the same to the user):

- a ``.nemo`` archive (a tar, plain or gzip) or its extracted folder, with ``model_config.yaml``
  and the weights as
  - ``model_weights.ckpt`` (TP=1), or ``mp_rank_00/model_weights.ckpt``, ``mp_rank_01/...`` (one
    state dict per tensor-parallel rank, PP=1), or ``tp_rank_00_pp_rank_000/...`` (per TP rank
    and pipeline stage, an even split of the layers): a ``torch.save`` of megatron-core
    ``GPTModel`` names under ``model.`` (``model.module.`` with O2 mixed precision);
  - ``model_weights/``: a megatron-core distributed checkpoint (``torch_dist``), any TP/PP;
- a NeMo 2 checkpoint folder: ``context/model.yaml`` (the model's config under ``config:``) and
  ``weights/``, a distributed checkpoint of names under ``module.``.

Every layout ends as the state dicts of the TP ranks with megatron-core's local-spec names
(``decoder.layers.{i}.input_layernorm.weight`` ...), which align_megatron's ``to_hf`` takes.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from align import OutputWriteError
from align_nemo.errors import NemoFormatError
from align_nemo.safety import check_dcp_metadata, load_state_dict

SUPPORTED = (
    "a .nemo archive (tar or tar.gz) or its extracted folder holding model_config.yaml and "
    "model_weights.ckpt, mp_rank_NN/ or tp_rank_NN_pp_rank_NNN/model_weights.ckpt (TP/PP shards) "
    "or a model_weights/ "
    "distributed checkpoint (torch_dist); or a NeMo 2 checkpoint folder holding context/model.yaml "
    "and weights/ (torch_dist)"
)
NEMO1_CONFIG = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
MODEL_PREFIXES = ("model.", "module.")
MODEL_ROOTS = ("embedding.", "decoder.", "output_layer.")
LAYERS = "decoder.layers."
# Wrapper-prefixed entries that are not weights: TransformerEngine's FP8 metadata, RoPE's cache.
IGNORED_SUFFIXES = ("_extra_state", "inv_freq")
# megatron-core's dist checkpoints (and the TransformerEngine spec) name the layer norms after
# the fused linear layer that applies them.
FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass
class NemoCheckpoint:
    """What a NeMo checkpoint holds, read into memory."""

    source: Path
    layout_name: str  # "nemo1 model_weights.ckpt (TP=2)", "nemo2 weights/ (torch_dist)" ...
    config: dict[str, Any]
    config_file: str  # where the config came from, for messages
    shards: list[dict[str, Tensor]]  # one megatron state dict per TP rank
    tokenizer_files: dict[str, Path] = field(default_factory=dict)  # name in the HF folder -> file


def read_checkpoint(source: Path, workdir: Path, trust_pickle: bool) -> NemoCheckpoint:
    """Read ``source`` (an archive or a folder); ``workdir`` is an empty folder an archive is
    extracted into."""
    if not source.exists():
        raise NemoFormatError(f"{source}: no such file or folder")
    if source.is_file():
        folder = extract_archive(source, workdir)
        return read_nemo1_folder(folder, source, trust_pickle)
    if (source / "context").is_dir() and (source / "weights").is_dir():
        return read_nemo2_folder(source, trust_pickle)
    if (source / NEMO1_CONFIG).is_file():
        return read_nemo1_folder(source, source, trust_pickle)
    raise NemoFormatError(f"{source}: not a NeMo checkpoint this reads; supported: {SUPPORTED}")


def extract_archive(archive: Path, workdir: Path) -> Path:
    """Extract a ``.nemo`` tar (any compression tarfile knows) into ``workdir``; the folder
    holding its ``model_config.yaml``. Members that would land outside ``workdir`` (absolute
    paths, ``..``, links out) are refused by tarfile's ``data`` filter."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(workdir, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise NemoFormatError(
            f"{archive}: not a readable .nemo archive ({error}); supported: {SUPPORTED}"
        ) from error
    except OSError as error:  # a full disk, a quota, no permission: where it was extracting to
        raise OutputWriteError(f"{archive}: cannot extract it into {workdir} ({error})") from error
    for folder in (workdir, *sorted(p for p in workdir.iterdir() if p.is_dir())):
        if (folder / NEMO1_CONFIG).is_file():
            return folder
    raise NemoFormatError(f"{archive}: the archive has no {NEMO1_CONFIG}; supported: {SUPPORTED}")


# ---- NeMo 1 (.nemo) ---------------------------------------------------------------------------


def read_nemo1_folder(folder: Path, source: Path, trust_pickle: bool) -> NemoCheckpoint:
    config_file = _inside(source, folder, folder / NEMO1_CONFIG)
    config = _read_yaml(folder / NEMO1_CONFIG, config_file)
    tokenizer = _nemo1_tokenizer_files(config, folder)
    if (folder / WEIGHTS_FILE).is_file():
        where = _inside(source, folder, folder / WEIGHTS_FILE)
        state = megatron_names_of(load_state_dict(folder / WEIGHTS_FILE, trust_pickle, where), where)
        return NemoCheckpoint(source, f"nemo1 {WEIGHTS_FILE} (TP=1)", config, config_file, [state], tokenizer)
    grid = _rank_files(folder, source)
    if grid:
        shards = [_merge_stages(stages, folder, source, config, trust_pickle) for stages in grid]
        pp = f", PP={len(grid[0])}" if len(grid[0]) > 1 else ""
        names = "tp_rank_NN_pp_rank_NNN" if pp else "mp_rank_NN"
        layout = f"nemo1 {names}/{WEIGHTS_FILE} (TP={len(shards)}{pp})"
        return NemoCheckpoint(source, layout, config, config_file, shards, tokenizer)
    if (folder / "model_weights").is_dir():
        where = _inside(source, folder, folder / "model_weights") + "/"
        state = read_dist_checkpoint(folder / "model_weights", trust_pickle, where)
        return NemoCheckpoint(
            source, "nemo1 model_weights/ (torch_dist)", config, config_file, [state], tokenizer
        )
    raise NemoFormatError(
        f"{source}: has {NEMO1_CONFIG} but no weights this reads (found: {_listing(folder)}); "
        f"supported: {SUPPORTED}"
    )


def _rank_files(folder: Path, source: Path) -> list[list[Path]]:
    """The shard files by TP rank, then pipeline stage: ``mp_rank_NN/model_weights.ckpt`` (PP=1)
    or ``tp_rank_NN_pp_rank_NNN/model_weights.ckpt``, as NeMo names them; [] when there are none."""
    found: dict[tuple[int, int], Path] = {}
    for path in folder.glob(f"*/{WEIGHTS_FILE}"):
        if m := re.fullmatch(r"mp_rank_(\d+)", path.parent.name):
            found[(int(m.group(1)), 0)] = path
        elif m := re.fullmatch(r"tp_rank_(\d+)_pp_rank_(\d+)", path.parent.name):
            found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        return []
    tp, pp = max(t for t, _ in found) + 1, max(p for _, p in found) + 1
    if set(found) != {(t, p) for t in range(tp) for p in range(pp)}:
        raise NemoFormatError(
            f"{source}: the model-parallel shards are not a full grid of {tp} TP rank(s) x {pp} pipeline "
            f"stage(s) (found {', '.join(sorted(found[key].parent.name for key in found))})"
        )
    return [[found[(t, p)] for p in range(pp)] for t in range(tp)]


def _merge_stages(
    stages: list[Path], folder: Path, source: Path, config: Mapping[str, Any], trust_pickle: bool
) -> dict[str, Tensor]:
    """One TP rank's state dict from its pipeline stages: stage ``p`` numbers its layers from 0,
    and holds global layers ``p * L/PP`` on (megatron-core's even split: the first/last-stage
    overrides and virtual pipelines are refused)."""
    pp = len(stages)
    per_stage = _layers_per_stage(config, pp, source)
    merged: dict[str, Tensor] = {}
    for stage, path in enumerate(stages):
        where = _inside(source, folder, path)
        for name, tensor in megatron_names_of(load_state_dict(path, trust_pickle, where), where).items():
            if name.startswith(LAYERS):
                local, part = name[len(LAYERS) :].split(".", 1)
                name = f"{LAYERS}{stage * per_stage + int(local)}.{part}"
            if name in merged:
                raise NemoFormatError(f"{where}: {name} is on an earlier pipeline stage too")
            merged[name] = tensor
    return merged


def _layers_per_stage(config: Mapping[str, Any], pp: int, source: Path) -> int:
    if pp == 1:
        return 0
    for key in (
        "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage",
        "virtual_pipeline_model_parallel_size",
    ):
        if config.get(key):
            raise NemoFormatError(f"{source}: {key}: {config[key]}: only an even pipeline split is read")
    layers = config.get("num_layers")
    if not isinstance(layers, int) or layers % pp:
        raise NemoFormatError(
            f"{source}: num_layers ({layers}) is not split evenly over {pp} pipeline stages"
        )
    return layers // pp


def _nemo1_tokenizer_files(config: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """The tokenizer files the archive carries (``tokenizer.model: nemo:<file>`` ...), under the
    names an HF folder gives them."""
    tokenizer = config.get("tokenizer") or {}
    found: dict[str, Path] = {}
    for key, name in (
        ("model", "tokenizer.model"),
        ("vocab_file", "vocab.json"),
        ("merge_file", "merges.txt"),
    ):
        value = tokenizer.get(key) if isinstance(tokenizer, Mapping) else None
        if isinstance(value, str) and value.startswith("nemo:"):
            path = folder / value[len("nemo:") :]
            if path.is_file():
                found[name] = path
    return found


# ---- NeMo 2 -----------------------------------------------------------------------------------


def read_nemo2_folder(folder: Path, trust_pickle: bool) -> NemoCheckpoint:
    model_yaml = folder / "context" / "model.yaml"
    if not model_yaml.is_file():
        raise NemoFormatError(
            f"{folder}: a NeMo 2 checkpoint without context/model.yaml (only that file's config is "
            f"read, not io.json's); supported: {SUPPORTED}"
        )
    document = _read_yaml(model_yaml, str(model_yaml))
    config = document.get("config")
    if not isinstance(config, dict):
        raise NemoFormatError(f"{model_yaml}: has no config: section (the model's TransformerConfig)")
    state = read_dist_checkpoint(folder / "weights", trust_pickle, str(folder / "weights"))
    tokenizer = {
        path.name: path
        for path in sorted((folder / "context").rglob("*"))
        if path.is_file() and path.name in TOKENIZER_FILES
    }
    return NemoCheckpoint(
        folder, "nemo2 weights/ (torch_dist)", config, f"{model_yaml}:config", [state], tokenizer
    )


# ---- distributed checkpoints ------------------------------------------------------------------


def read_dist_checkpoint(folder: Path, trust_pickle: bool, where: str) -> dict[str, Tensor]:
    """The model tensors of a megatron-core ``torch_dist`` checkpoint as whole (unsharded)
    tensors with local-spec names; other entries (optimizer state, ``_extra_state``,
    ``common.pt``) are not read."""
    backend = _dist_backend(folder, where)
    if backend != "torch_dist":
        raise NemoFormatError(f"{where}: a '{backend}' distributed checkpoint; only torch_dist is read")
    if not trust_pickle:
        check_dcp_metadata(folder, where)
    # megatron-core warns on import (no TransformerEngine/Apex, which reading does not need) and
    # about its own use of a deprecated torch call: noise for a user of this command.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _load_model_tensors(folder, where)


def _load_model_tensors(folder: Path, where: str) -> dict[str, Tensor]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from torch.distributed.checkpoint.api import CheckpointException

    with _process_group():
        stored = dist_checkpointing.load_tensors_metadata(str(folder))
        _refuse_foreign_weights([key for key in stored if key.startswith(MODEL_PREFIXES)], where)
        wanted = {
            key: tensor
            for key, tensor in stored.items()
            if _model_name(key) is not None and not key.endswith("_extra_state")
        }
        if not wanted:
            raise NemoFormatError(
                f"{where}: holds no model weights (no embedding.*, decoder.*, output_layer.*)"
            )
        try:
            loaded = get_default_load_sharded_strategy(str(folder)).load(wanted, str(folder))
        except (
            CheckpointException,
            CheckpointingException,
            OSError,
            RuntimeError,
            ValueError,
            KeyError,
        ) as error:
            # A missing or damaged *.distcp file: torch's reader raises these, wrapped or not.
            raise NemoFormatError(f"{where}: cannot read its tensors ({_cause(error)})") from error
    return megatron_names_of(_unstack_layers(loaded, where), where)


def _dist_backend(folder: Path, where: str) -> str:
    import json

    path = folder / "metadata.json"
    try:
        return str(json.loads(path.read_text())["sharded_backend"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise NemoFormatError(
            f"{where}: no readable metadata.json: not a megatron-core distributed checkpoint"
        ) from error


@contextmanager
def _process_group() -> Iterator[None]:
    """megatron-core's loader asks torch.distributed for the rank: a world of one (gloo, a file
    rendezvous, no network) unless the caller already runs in one."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="align-nemo-pg-") as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _unstack_layers(tensors: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """``decoder.layers.<part>`` saved with the layer as a leading axis (megatron-core's default
    for homogeneous layers) as ``decoder.layers.{i}.<part>``."""
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = _model_name(key)
        assert name is not None
        rest = name[len(LAYERS) :] if name.startswith(LAYERS) else None
        if rest is None or rest.split(".", 1)[0].isdigit():
            out[name] = tensor
            continue
        for index, layer in enumerate(tensor.unbind(0)):
            out[f"{LAYERS}{index}.{rest}"] = layer
    return out


# ---- names ------------------------------------------------------------------------------------


def megatron_names_of(state: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """A NeMo state dict with megatron-core local-spec names: the ``model.``/``module.``
    prefixes dropped, fused layer-norm names renamed, ``_extra_state`` and non-model entries
    dropped."""
    _refuse_foreign_weights([key for key, value in state.items() if isinstance(value, Tensor)], where)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _model_name(key)
        if name is None or name.endswith("_extra_state"):
            continue
        if not isinstance(value, Tensor):
            raise NemoFormatError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        out[_unfused_norm(name)] = value
    if not out:
        sample = ", ".join(list(state)[:3])
        raise NemoFormatError(
            f"{where}: no megatron-core GPT weights (embedding.*, decoder.*, output_layer.*) in it "
            f"(first keys: {sample}); legacy NeMo GPT (language_model.*) checkpoints are not read"
        )
    return out


def _refuse_foreign_weights(keys: list[str], where: str) -> None:
    """Model weights outside a GPT decoder (a NeMo-Aligner reward model's ``rm_head``, a value
    head, adapters) are an error, not silently dropped: the HF model would lack them."""
    foreign = sorted(
        key
        for key in keys
        if _model_name(key) is None and not key.endswith(IGNORED_SUFFIXES) and _strip(key) != key
    )
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise NemoFormatError(
            f"{where}: holds weights outside a GPT decoder, which are not converted: {shown} (a "
            "NeMo-Aligner reward or value head, adapters?); only causal LMs are imported"
        )


def _strip(key: str) -> str:
    name = key
    while name.startswith(MODEL_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _model_name(key: str) -> str | None:
    """``key`` without its wrapper prefixes, or None when it is not a model weight."""
    name = _strip(key)
    return name if name.startswith(MODEL_ROOTS) else None


def _unfused_norm(name: str) -> str:
    if not name.startswith(LAYERS):
        return name
    layer, part = name[len(LAYERS) :].split(".", 1)
    return f"{LAYERS}{layer}.{FUSED_NORMS.get(part, part)}"


def _inside(source: Path, folder: Path, path: Path) -> str:
    """``path`` as the user knows it: ``model.nemo:mp_rank_00/model_weights.ckpt`` for a file
    of an archive (``folder`` is where it was extracted), the path itself otherwise."""
    return f"{source}:{path.relative_to(folder)}" if source.is_file() else str(path)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise NemoFormatError(f"{where}: not readable YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise NemoFormatError(f"{where}: not a mapping of config keys")
    return loaded


def _cause(error: BaseException) -> str:
    """The first line of the error, or of the first rank's failure torch's checkpoint reader
    wrapped in a ``CheckpointException``."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def checkpoint_dtype(shards: list[dict[str, Tensor]]) -> torch.dtype:
    """The checkpoint's dtype (its embedding's)."""
    return shards[0]["embedding.word_embeddings.weight"].dtype
