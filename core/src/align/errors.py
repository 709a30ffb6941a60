"""Errors the CLI turns into a one-paragraph message and exit code 2 (the user can fix them)."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's config, data, files or environment. Never a bug of ours.

    The CLI prints the message without a traceback and exits with code 2.
    """


class ConfigError(UserError):
    """The run config is invalid: unknown key, wrong type, unknown plugin name."""


class DataError(UserError):
    """A data file is missing or a row is malformed; the message names file and row."""


class TrainingDiverged(UserError):
    """The loss, the gradients or the weights became non-finite (or the weights exploded): the
    update is not saved; the last verified checkpoint is named and kept."""


class OutputWriteError(UserError):
    """Writing a run's outputs failed (a full disk, a quota, a read-only folder): the message says
    what and where; the partial write is removed and the last complete checkpoint kept."""
