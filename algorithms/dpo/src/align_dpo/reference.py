"""The reference model's log-probs for the DPO family: precomputed once and cached, or live.

``precompute`` (the default): before training, the frozen reference runs once over the train and
eval pairs (no autograd, length-sorted batches); the per-pair sums are saved as safetensors under
a fingerprint of everything that determines them, and the model is freed. Training then reads
the sums by ``example_id``: no reference in memory and no reference forward pass per step. A
resumed run, or another run on the same model and data (a sweep over ``beta`` or ``lr`` sharing a
``cache_dir``), finds the file and never builds the reference.

``live``: the reference stays in memory and scores every batch (forward only).

LoRA hook: a backend whose policy can serve as its own reference (adapters switched off)
provides ``reference_view(policy)``, a context manager that yields the model to score with;
then no second copy of the weights is ever built, in either mode.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import align

CACHE_FORMAT = "align-dpo-reference-v1"
ROW_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "example_id")


class ReferenceConfig(align.StrictConfig):
    """Where the reference log-probs come from (only used by losses that need a reference)."""

    mode: Literal["precompute", "live"] = Field(
        "precompute",
        description="precompute: score the data once before training and cache it (the reference is "
        "freed: faster steps, less memory); live: keep the reference and score every batch.",
    )
    cache_dir: align.WritableDir | None = Field(
        None,
        description="Folder of precomputed log-probs; default <output_dir>/reference_cache. Point runs "
        "on the same model and data at one folder to compute once.",
    )
    batch_size: int = Field(16, gt=0, description="Pairs per reference forward pass while precomputing.")


Collate = Callable[[list[dict[str, Any]]], align.PairedTokens]


def reference_scope(backend: Any, policy: nn.Module) -> AbstractContextManager[nn.Module] | None:
    """The policy seen as the reference (LoRA with adapters off), when the backend offers it."""
    view = getattr(backend, "reference_view", None)
    return view(policy) if callable(view) else None


@contextmanager
def open_reference(backend: Any, policy: nn.Module) -> Iterator[nn.Module]:
    """The reference for the length of a block: the backend's view of the policy, or a frozen
    copy with the initial weights that is dropped when the block ends."""
    scope = reference_scope(backend, policy)
    if scope is not None:
        with scope as model:
            yield model
        return
    yield backend.build_reference()


class LiveReference:
    """``mode: live``: scores each batch as it comes."""

    def __init__(self, backend: Any, policy: nn.Module) -> None:
        self.backend, self.policy = backend, policy
        self.model = None if reference_scope(backend, policy) is not None else backend.build_reference()

    def _scope(self) -> AbstractContextManager[nn.Module]:
        return (
            nullcontext(self.model) if self.model is not None else open_reference(self.backend, self.policy)
        )

    def logps(self, batch: align.PairedTokens) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(), self._scope() as model:
            chosen, rejected = self.backend.sequence_logps(model, batch.tokens).split(batch.num_pairs)
        # Inference tensors cannot enter autograd; clones made outside inference mode can.
        return chosen.sum.clone(), rejected.sum.clone()

    def token_logps(self, batch: align.PairedTokens) -> align.TokenLogps:
        """Per-token log-probs of the chosen and rejected completions (losses that need them)."""
        with torch.inference_mode(), self._scope() as model:
            scores = self.backend.token_logps(model, batch.tokens)
        return align.TokenLogps(scores.values.clone(), scores.mask.clone())


@dataclass
class CachedSplit:
    """Precomputed sums of one split, indexed by example id (``NaN`` where no example)."""

    table: Tensor  # [max_example_id + 1, 2]: chosen, rejected
    path: Path

    def logps(self, example_ids: Tensor) -> tuple[Tensor, Tensor]:
        ids = example_ids.cpu()
        known = ids < len(self.table)
        rows = self.table[ids.clamp(max=len(self.table) - 1)]
        missing = ~known | rows[:, 0].isnan()
        if bool(missing.any()):
            raise RuntimeError(
                f"reference cache {self.path} has no log-probs for examples {ids[missing].tolist()}"
            )
        rows = rows.to(example_ids.device)
        return rows[:, 0], rows[:, 1]


class CachedReference:
    """``mode: precompute``: the sums of every split, read by example id."""

    def __init__(self, splits: dict[str, CachedSplit]) -> None:
        self.splits = splits

    def logps(self, split: str, batch: align.PairedTokens) -> tuple[Tensor, Tensor]:
        return self.splits[split].logps(batch.example_ids)


# ---- fingerprint -------------------------------------------------------------------------------
def data_digest(data: Any) -> str:
    """SHA-256 of the tokenized pairs (prompt, chosen and rejected ids, example ids)."""
    h = hashlib.sha256()
    if hasattr(data, "with_format"):  # a datasets.Dataset: hash the arrow buffers, row order kept
        table: pa.Table = data.with_format("arrow")[:]
        for name in ROW_COLUMNS:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                h.update(
                    name.encode() + pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes()
                )
                column = pc.list_flatten(column)
            h.update(column.cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
    else:
        for row in data:
            h.update(json.dumps([row[name] for name in ROW_COLUMNS]).encode())
    return h.hexdigest()


def weights_signature(path: str) -> list[Any]:
    """Name, size and modification time of a local model's files (cheap, unlike hashing
    gigabytes of weights); a hub id or the embedded ``tiny`` model is named by the config."""
    folder = Path(path)
    if not folder.exists():
        return []
    files = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(cfg: align.RunConfig, batching: str, digest: str) -> tuple[str, dict[str, Any]]:
    """A key of everything that determines the reference sums; returns (hash, what was hashed)."""
    key = {
        "format": CACHE_FORMAT,
        "torch": torch.__version__,
        # A LoRA policy's reference is its base model with the adapters off: the same sums.
        "model": cfg.model.model_dump(mode="json", exclude={"lora"}),
        "weights": weights_signature(cfg.model.path),
        "backend": cfg.backend.model_dump(mode="json"),
        "padding_free": cfg.data.padding_free,
        "batching": batching,
        "data": digest,
    }
    if cfg.trainer.precision == "bf16_mixed":  # fp32 and bf16 are told apart by model.dtype
        key["precision"] = cfg.trainer.precision
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20], key


# ---- precompute --------------------------------------------------------------------------------
def example_ids(data: Any) -> list[int]:
    if hasattr(data, "with_format"):
        return [int(i) for i in data.with_format("arrow")[:].column("example_id").to_pylist()]
    return [int(row["example_id"]) for row in data]


def score_pairs(
    model: nn.Module, backend: Any, data: Any, collate: Collate, batch_size: int, by_length: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(example ids, chosen sums, rejected sums) of every pair: in length-sorted batches (least
    padding; longest first, so an out-of-memory shows at once) or in the data's order."""
    order = list(range(len(data)))
    if by_length:
        lengths = align.row_lengths(data)  # prompt + the longer of chosen and rejected
        order.sort(key=lambda i: -lengths[i])
    ids, chosen, rejected = [], [], []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate([data[i] for i in order[start : start + batch_size]])
            c, r = backend.sequence_logps(model, batch.tokens).split(batch.num_pairs)
            ids.append(batch.example_ids.cpu())
            chosen.append(c.sum.float().cpu())
            rejected.append(r.sum.float().cpu())
    return torch.cat(ids).clone(), torch.cat(chosen).clone(), torch.cat(rejected).clone()


def _to_table(ids: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    table = torch.full((int(ids.max()) + 1 if len(ids) else 0, 2), float("nan"))
    table[ids, 0], table[ids, 1] = chosen, rejected
    return table


def _load(path: Path, expected_ids: Sequence[int]) -> CachedSplit | None:
    if not path.is_file():
        return None
    try:
        saved = load_file(path)
    except Exception:  # unreadable (safetensors raises its own error type): compute again
        return None
    ids = saved.get("example_ids")
    if ids is None or sorted(ids.tolist()) != sorted(expected_ids):
        return None
    return CachedSplit(_to_table(ids, saved["chosen"], saved["rejected"]), path)


def _save(path: Path, ids: Tensor, chosen: Tensor, rejected: Tensor, key: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {
        "example_ids": ids.contiguous(),
        "chosen": chosen.contiguous(),
        "rejected": rejected.contiguous(),
    }
    save_file(tensors, tmp, metadata={"key": json.dumps(key, sort_keys=True)})
    os.replace(tmp, path)  # atomic: a killed run never leaves half a cache file


def precompute(
    cfg: align.RunConfig,
    ref: ReferenceConfig,
    backend: Any,
    policy: nn.Module,
    splits: dict[str, Any],
    batch_sizes: dict[str, int],
    collate: Collate,
) -> CachedReference:
    """Read each split's sums from the cache, or compute the missing ones with one reference
    (built only on a miss) and cache them. ``batch_sizes[split]``: score in the data's order in
    batches of this size (as evaluation does), or 0: length-sorted ``ref.batch_size`` batches."""
    folder = ref.cache_dir or Path(cfg.output_dir) / "reference_cache"
    found: dict[str, CachedSplit] = {}
    missing: dict[str, tuple[Path, dict[str, Any]]] = {}
    for split, data in splits.items():
        size = batch_sizes.get(split, 0)
        batching = f"in order, {size}" if size else f"by length, {ref.batch_size}"
        digest, key = fingerprint(cfg, batching, data_digest(data))
        path = folder / f"{split}-{digest}.safetensors"
        cached = _load(path, example_ids(data))
        if cached is None:
            missing[split] = (path, key)
        else:
            found[split] = cached
    if missing:
        pairs = sum(len(splits[s]) for s in missing)
        _note(f"reference: scoring {pairs} pairs once ({', '.join(missing)}); later runs reuse {folder}")
        started = time.perf_counter()
        with open_reference(backend, policy) as model:
            for split, (path, key) in missing.items():
                size = batch_sizes.get(split, 0)
                # In the policy's precision: at step 0 policy and reference log-probs are equal.
                with align.precision_scope(cfg.trainer.precision, model):
                    ids, chosen, rejected = score_pairs(
                        model, backend, splits[split], collate, size or ref.batch_size, by_length=not size
                    )
                _save(path, ids, chosen, rejected, key)
                found[split] = CachedSplit(_to_table(ids, chosen, rejected), path)
        del model
        gc.collect()  # the reference's memory goes back before training allocates its own
        _note(f"reference: scored {pairs} pairs in {time.perf_counter() - started:.1f}s, cached in {folder}")
    reused = sorted(found.keys() - missing.keys())
    if reused:
        _note(f"reference: reusing cached log-probs of {', '.join(reused)} from {folder}")
    return CachedReference(found)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
