"""Reading pickled files from a checkpoint without running code from it.

A ``model_weights.ckpt`` is a ``torch.save`` pickle, and a distributed checkpoint's ``.metadata``
is a plain pickle (torch.distributed.checkpoint writes it with ``pickle.dump`` and reads it with
``pickle.load``). Unpickling can run any code the file names, so unless the user says the file
is trusted (``--trust-pickle``):

- ``model_weights.ckpt`` is read with ``torch.load(weights_only=True)`` (tensors, containers and
  numbers only), plus ``io.BytesIO`` (TransformerEngine's ``_extra_state`` entries; building a
  ``BytesIO`` from bytes runs nothing);
- ``.metadata`` is first read by an unpickler that only knows the classes torch's distributed
  checkpoint metadata is made of, before megatron-core reads it for real.

Tensor data in a distributed checkpoint (``*.distcp``) is read by torch with
``weights_only=True``; its ``common.pt`` (non-tensor state) is never read.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from align_nemo.errors import NemoFormatError, UntrustedPickle

# torch.distributed.checkpoint's metadata: dataclasses, enums, torch.Size, dtypes, layouts.
DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
TORCH_NAMES = {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
SERIALIZATION_NAMES = {"_get_layout"}
BUILTIN_NAMES = {"set", "frozenset", "slice", "complex"}
COLLECTIONS_NAMES = {"OrderedDict"}


def load_state_dict(path: Path, trust_pickle: bool, where: str) -> dict[str, Any]:
    """The dict a ``model_weights.ckpt`` holds; a UserError naming ``where`` (the file as the
    user knows it: ``model.nemo:model_weights.ckpt``) when it is not a state dict, or when it
    needs a full unpickle and ``trust_pickle`` is off."""
    try:
        if trust_pickle:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([io.BytesIO]):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise NemoFormatError(
                f"{where}: not a readable torch checkpoint ({_first_line(error)})"
            ) from error
        raise UntrustedPickle(
            f"{where}: refused to unpickle it: it holds {_unsafe_global(error)}, which a weights-only "
            "load (tensors, containers, numbers) does not build, and unpickling it could run code "
            "from the file. If you trust where the checkpoint comes from, pass --trust-pickle."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise NemoFormatError(f"{where}: not a readable torch checkpoint ({_first_line(error)})") from error
    if not isinstance(loaded, dict):
        raise NemoFormatError(f"{where}: holds a {type(loaded).__name__}, not a state dict")
    return loaded


def check_dcp_metadata(folder: Path, where: str) -> None:
    """Read a distributed checkpoint's ``.metadata`` with an unpickler that builds only torch's
    checkpoint-metadata classes; an UntrustedPickle naming the file (``where`` is the folder as
    the user knows it) and the class otherwise."""
    path, shown = folder / ".metadata", f"{where.rstrip('/')}/.metadata"
    if not path.is_file():
        raise NemoFormatError(f"{where}: no .metadata file: not a torch_dist distributed checkpoint")
    with path.open("rb") as stream:
        try:
            _MetadataUnpickler(stream).load()
        except _Refused as refused:
            raise UntrustedPickle(
                f"{shown}: refused to unpickle it: it names {refused}, which torch's checkpoint "
                "metadata is not made of, and unpickling it could run code from the file. If you "
                "trust where the checkpoint comes from, pass --trust-pickle."
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise NemoFormatError(
                f"{shown}: not readable checkpoint metadata ({_first_line(error)})"
            ) from error


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _allowed(module, name):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _allowed(module: str, name: str) -> bool:
    if module in DCP_MODULES:
        return True
    if module == "torch":
        return name in TORCH_NAMES or isinstance(getattr(torch, name, None), torch.dtype)
    if module == "torch.serialization":
        return name in SERIALIZATION_NAMES
    if module == "builtins":
        return name in BUILTIN_NAMES
    if module == "collections":
        return name in COLLECTIONS_NAMES
    return False


def _unsafe_global(error: Exception) -> str:
    """The class torch's weights-only unpickler refused, as its message names it."""
    found = re.search(r"(?:Unsupported global: GLOBAL|global)\s+([\w.]+)", str(error))
    return found.group(1) if found else "an object that is not a tensor"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
