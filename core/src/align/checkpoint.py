"""Checkpoints: ``checkpoints/step_N/`` holds the model (safetensors, loadable by its backend's
ecosystem), ``trainer_state.pt`` (optimizer, scheduler, RNG, data position, the algorithm's
state, the resolved config) and ``manifest.json`` (size and CRC-32 of every other file).

A checkpoint is written to ``step_N.tmp``, its manifest last, and renamed when complete: a run
killed while saving leaves no half-written ``step_N`` behind, and a checkpoint damaged later
(a truncated copy, a bad disk) fails ``verify`` and is never trusted or named as good.
CRC-32 detects truncation and corruption, not tampering: loading is ``weights_only`` anyway.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from align.errors import OutputWriteError

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# OSErrors that mean "the disk or folder cannot take this write", wherever they are raised.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
# torch.save (C++) and safetensors (Rust) report a failed write as a RuntimeError/SafetensorError.
WRITE_FAILURE_TEXT = (
    "no space left",
    "file write failed",
    "unexpected pos",
    "ioerror",
    "disk quota",
    "read-only",
)


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``step_N`` folder, complete or not, oldest first (``verify`` tells them apart)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found, key=step_of)


def newest_verified(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that did not, with why."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest verified checkpoint: the only kind ever named as good."""
    return newest_verified(output_dir)[0]


# ---- verification ------------------------------------------------------------------------


def file_checksum(path: Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    """Size and checksum of every file below ``folder``; written last, so its presence means
    everything it lists was complete."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "crc32": file_checksum(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def verify(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is complete and intact, else what is wrong with it."""
    if not path.is_dir():
        return "not a folder"
    if not (path / MANIFEST_FILE).is_file():
        return _verify_without_manifest(path)
    return verify_files(path, required=(STATE_FILE,))


def verify_files(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when every file of ``folder``'s manifest is there, whole and unchanged."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is missing or unreadable"
    for name in required:
        if name not in files:
            return f"its {MANIFEST_FILE} lists no {name}"
    for name, expected in files.items():
        problem = _check_file(folder / name, name, expected)
        if problem:
            return problem
    return None


def _check_file(file: Path, name: str, expected: dict[str, int]) -> str | None:
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != expected["size"]:
        return f"{name} is {size} bytes, its manifest says {expected['size']} (truncated or replaced)"
    if file_checksum(file) != expected["crc32"]:
        return f"{name} does not match its checksum (corrupt)"
    return None


def _verify_without_manifest(path: Path) -> str | None:
    """A checkpoint written before manifests existed: trusted only if it loads and its weights
    are finite."""
    if not (path / STATE_FILE).is_file():
        return f"it has no {STATE_FILE} or {MANIFEST_FILE}"
    try:
        load_state(path)
        weights = [t for file in sorted(path.rglob("*.safetensors")) for t in load_file(file).values()]
    except Exception as exc:  # whatever a damaged file makes the readers raise
        return f"it has no {MANIFEST_FILE} and does not load ({type(exc).__name__}: {exc})"
    if not all(bool(torch.isfinite(t).all()) for t in weights if t.is_floating_point()):
        return f"it has no {MANIFEST_FILE} and holds non-finite weights"
    return None


# ---- state --------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The CPU, Python and (once this process has used CUDA) every GPU's RNG state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    # A checkpoint written on GPUs resumed where torch sees fewer (or none): the CPU RNG still
    # resumes; the GPUs it cannot restore keep their seeded state.
    if cuda is not None and torch.cuda.is_available():
        for index, gpu_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def load_state(path: Path) -> dict[str, Any]:
    # weights_only: never unpickle arbitrary objects, even from our own files.
    # map_location: optimizer state saved from GPU weights loads on a machine without one;
    # ``Optimizer.load_state_dict`` moves it to each parameter's device.
    state: dict[str, Any] = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    return state


# ---- writing ------------------------------------------------------------------------------


def begin(output_dir: Path, step: int) -> Path:
    tmp = checkpoint_dir(output_dir) / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a partial write of ours, from a killed run
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Finish the checkpoint in ``tmp``: state, manifest, rename; then drop all but the newest
    ``keep`` older checkpoints."""
    torch.save(state, tmp / STATE_FILE)
    write_manifest(tmp)
    final = tmp.with_suffix("")
    if final.exists():  # this run's own earlier write of the same step
        shutil.rmtree(final)
    tmp.rename(final)
    older = [p for p in list_checkpoints(final.parent.parent) if step_of(p) < step_of(final)]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def replace_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder (``final/``) as ``<target>.tmp`` with a manifest, then swap it in: the
    target never holds a half-written model."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    write_manifest(tmp)
    previous = target.with_name(target.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    tmp.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def move_aside(path: Path, reason: str) -> Path:
    """Rename ``step_N`` to ``step_N.<reason>`` (never deleted: it may be all a user has)."""
    target = path.with_name(f"{path.name}.{reason}")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.{reason}{counter}")
    path.rename(target)
    return target


def is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # whatever the errno: it happened while writing
        return True
    text = str(exc).lower()
    return any(fragment in text for fragment in WRITE_FAILURE_TEXT)


def describe_write_failure(exc: BaseException, where: Path) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    free = _free_bytes(where)
    if free is not None and free < 64 * 2**20:
        reason += f"; {free / 2**20:.1f} MiB free on that disk"
    return reason


def _free_bytes(where: Path) -> int | None:
    for folder in (where, *where.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


@contextmanager
def guarded_write(what: str, partial: Path, output_dir: Path) -> Iterator[None]:
    """Turn a failed write of ``what`` into an ``OutputWriteError`` saying what, where and why,
    after removing ``partial`` (the half-written folder) so nothing incomplete looks complete."""
    try:
        yield
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if not is_write_failure(exc):
            raise
        last = latest_checkpoint(output_dir)
        kept = f"the last complete checkpoint is {last}" if last else "no complete checkpoint exists yet"
        raise OutputWriteError(
            f"could not write {what} to {partial.parent}: {describe_write_failure(exc, partial)}. "
            f"The partial write was removed; {kept}. Free space (or fix the folder) and rerun with --resume."
        ) from exc
