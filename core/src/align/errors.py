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
    """The loss became NaN or infinite; the last good checkpoint is kept."""
