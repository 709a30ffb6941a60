"""The errors a server or its client raises: user errors (exit code 2, no traceback) that name
the server and its url, so the message says which process to look at."""

from __future__ import annotations

import align


class ServerError(align.UserError):
    """A model server could not be started, reached, or understood."""


class ServerStartError(ServerError):
    """A server did not come up: its process exited, or it was not ready within its timeout."""


class ServerUnavailable(ServerError):
    """A server stopped answering (refused or dropped connections) after the bounded retries."""


class ServerTimeout(ServerError):
    """A server took longer than its timeout to answer a request (it hangs, or is overloaded)."""


class ServerReplyError(ServerError):
    """A server answered, but with an error or with outputs of the wrong name, shape or type."""


class RewardServerError(ServerError, align.RewardError):
    """A ``ServerError`` of the reward server, raised as a ``RewardError`` so that the reward
    checks pass it on as it is (the original, e.g. a ``ServerTimeout``, is its ``__cause__``)."""


class CriticServerError(ServerError, align.CriticError):
    """A ``ServerError`` of the critic server, raised as the ``align.CriticError`` the critic
    protocol promises (the original is its ``__cause__``)."""
