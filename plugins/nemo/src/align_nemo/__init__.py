"""align-nemo: NeMo and NeMo-Aligner checkpoints (``.nemo`` archives, NeMo 2 folders) as HF
checkpoints, through align_megatron's Megatron -> HF conversion.

``align import-nemo SRC --out DIR`` writes an HF folder that ``model.path`` takes (on any
backend, the megatron one included). See docs/nemo.md for exactly which layouts are read.
"""

from __future__ import annotations

from typing import Any

import align
from align_nemo.checkpoints import SUPPORTED, NemoCheckpoint, read_checkpoint
from align_nemo.errors import NemoFormatError, UntrustedPickle
from align_nemo.importer import add_import_command, import_nemo

__all__ = [
    "SUPPORTED",
    "NemoCheckpoint",
    "NemoFormatError",
    "UntrustedPickle",
    "import_nemo",
    "read_checkpoint",
]


@align.hookimpl
def register_commands(add_command: Any) -> None:
    add_import_command(add_command)
