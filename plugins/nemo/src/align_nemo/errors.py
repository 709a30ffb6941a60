"""The user errors of ``align import-nemo`` (exit code 2, the file at fault named)."""

from __future__ import annotations

import align


class NemoFormatError(align.UserError):
    """The checkpoint is not in a layout this plugin reads, or a file in it is damaged."""


class UntrustedPickle(align.UserError):
    """A file in the checkpoint needs a full unpickle and the user did not say it is trusted."""
