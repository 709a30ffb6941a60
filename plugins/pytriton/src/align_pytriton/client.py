"""A run's side of a server: PyTriton's ``FuturesModelClient`` with the server's readiness
awaited once, a timeout per request, a bounded retry of transient failures (refused or dropped
connections), the outputs' names and shapes checked, and every failure a ``ServerError`` that
names the server and its url.

``submit`` returns at once with a future; the caller waits only when it needs the answer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from align_pytriton.config import ClientSettings
from align_pytriton.errors import ServerError, ServerReplyError, ServerTimeout, ServerUnavailable
from align_pytriton.launcher import ChildServer, wait_until_ready

Outputs = dict[str, np.ndarray]

# Words in the error of a request that never reached a working server: worth another try.
TRANSIENT = (
    "connection refused",
    "connection reset",
    "broken pipe",
    "unavailable",
    "failed to connect",
    "connection aborted",
    "remote end closed",
    "errno 111",
    "errno 104",
    "not ready",
)


class ServerClient:
    """Requests to ``model`` on the server at ``url`` (``child``: a server this run started)."""

    def __init__(
        self,
        label: str,
        url: str,
        model: str,
        cfg: ClientSettings,
        child: ChildServer | None = None,
        batched: bool = True,
        text_outputs: tuple[str, ...] = (),
        idempotent: bool = True,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.child = child
        self.url = url
        self.label = label
        self.batched = batched  # a model without a batch dimension takes whole requests (infer_sample)
        self.text_outputs = text_outputs  # outputs of bytes (JSON), not numbers
        # a request that changes the server's state (a train step) is retried only when it
        # cannot have arrived (a refused connection), never after a dropped one
        self.idempotent = idempotent
        self._client: Any = None
        self._lock = threading.Lock()
        self._closed = False

    # ---- connection ----------------------------------------------------------------------
    def connect(self) -> None:
        """Wait (up to ``startup_timeout_s``) until the server is ready; once."""
        with self._lock:
            if self._closed:
                raise ServerError(f"{self.label}: the client was closed")
            if self._client is not None:
                return
            if self.child is not None:
                self.child.wait_until_ready(self.model, self.cfg.startup_timeout_s)
            else:
                wait_until_ready(self.url, self.model, self.label, self.cfg.startup_timeout_s)
            from pytriton.client import FuturesModelClient

            self._client = FuturesModelClient(
                self.url,
                self.model,
                max_workers=self.cfg.workers,
                init_timeout_s=self.cfg.startup_timeout_s,
                inference_timeout_s=self.cfg.timeout_s,
            )

    def close(self) -> None:
        """Stop the client (not the server); idempotent."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close(wait=False)

    # ---- requests ------------------------------------------------------------------------
    def submit(self, inputs: dict[str, np.ndarray], expect: dict[str, tuple[int, ...]]) -> Future[Outputs]:
        """Send a request; the future holds the outputs, each checked to have the ``expect``
        shape, or a ``ServerError``."""
        self.connect()
        result: Future[Outputs] = Future()
        self._attempt(inputs, expect, result, 0)
        return result

    def infer(self, inputs: dict[str, np.ndarray], expect: dict[str, tuple[int, ...]]) -> Outputs:
        return self.submit(inputs, expect).result()

    def _attempt(
        self,
        inputs: dict[str, np.ndarray],
        expect: dict[str, tuple[int, ...]],
        result: Future[Outputs],
        tries: int,
    ) -> None:
        client = self._client
        if client is None:
            result.set_exception(ServerError(f"{self.label}: the client was closed"))
            return
        try:
            send = client.infer_batch if self.batched else client.infer_sample
            future = send(**inputs)
        except Exception as exc:  # the client refused the request (closed, queue full)
            self._failed(exc, inputs, expect, result, tries)
            return
        future.add_done_callback(lambda done: self._done(done, inputs, expect, result, tries))

    def _done(
        self,
        done: Future[Outputs],
        inputs: dict[str, np.ndarray],
        expect: dict[str, tuple[int, ...]],
        result: Future[Outputs],
        tries: int,
    ) -> None:
        exc = done.exception()
        if exc is not None:
            self._failed(exc, inputs, expect, result, tries)
            return
        try:
            result.set_result(self._checked(done.result(), expect))
        except ServerError as bad:
            result.set_exception(bad)

    def _failed(
        self,
        exc: BaseException,
        inputs: dict[str, np.ndarray],
        expect: dict[str, tuple[int, ...]],
        result: Future[Outputs],
        tries: int,
    ) -> None:
        child_exited = self.child is not None and self.child.returncode is not None
        retryable = is_transient(exc) if self.idempotent else is_refused(exc)
        if retryable and tries < self.cfg.retries and not child_exited and not self._closed:
            delay = self.cfg.retry_delay_s * 2**tries
            timer = threading.Timer(delay, self._attempt, args=(inputs, expect, result, tries + 1))
            timer.daemon = True
            timer.start()
            return
        result.set_exception(self._error(exc, tries))

    # ---- errors --------------------------------------------------------------------------
    def _error(self, exc: BaseException, tries: int) -> ServerError:
        from pytriton.client.exceptions import PyTritonClientTimeoutError

        reason = f"{type(exc).__name__}: {exc}".strip()
        after = f" after {tries + 1} tries" if tries else ""
        if self.child is not None and self.child.returncode is not None:
            code, log = self.child.returncode, self.child.log_excerpt()
            return ServerUnavailable(f"{self.label} died (exit code {code}){after}: {reason}{log}")
        if isinstance(exc, (PyTritonClientTimeoutError, TimeoutError)) or "timed out" in reason.lower():
            return ServerTimeout(
                f"{self.label} did not answer within {self.cfg.timeout_s:g} s (timeout_s){after}: the server "
                f"hangs or is overloaded ({reason})"
            )
        if is_transient(exc):
            return ServerUnavailable(f"{self.label} is not answering{after}: {reason}; is it still running?")
        return ServerReplyError(f"{self.label} answered with an error: {reason}")

    def _checked(self, outputs: Outputs, expect: dict[str, tuple[int, ...]]) -> Outputs:
        for name, shape in expect.items():
            if name not in outputs:
                raise ServerReplyError(
                    f"{self.label} answered without the output '{name}' (it sent {sorted(outputs)}): is it a "
                    f"{self.model} server of align-pytriton?"
                )
            value = outputs[name]
            what = "texts" if name in self.text_outputs else "numbers"
            kind_ok = value.dtype.kind in ("OS" if name in self.text_outputs else "biuf")
            if tuple(value.shape) != tuple(shape) or not kind_ok:
                raise ServerReplyError(
                    f"{self.label} answered '{name}' with shape {tuple(value.shape)} and dtype "
                    f"{value.dtype}; expected shape {tuple(shape)} of {what}"
                )
        return outputs


def is_transient(exc: BaseException) -> bool:
    """A failure to reach the server (another try may work), not an answer or a timeout."""
    text = f"{type(exc).__name__} {exc} {exc.__cause__ or ''}".lower()
    return isinstance(exc, (ConnectionError, ServerUnavailable)) or any(word in text for word in TRANSIENT)


def connect_or_start(
    kind: str, cfg: ClientSettings, serve: dict[str, Any] | None, **child: Any
) -> tuple[str, str, ChildServer | None]:
    """(label, url, child): the server at ``cfg.url``, or a child started with ``serve``."""
    if serve is None:
        return f"{kind} server at {cfg.url}", str(cfg.url), None
    server = ChildServer(kind, serve, **child)
    return server.label, server.url, server


def is_refused(exc: BaseException) -> bool:
    """The server refused the connection: the request never reached it."""
    text = f"{exc} {exc.__cause__ or ''}".lower()
    return isinstance(exc, ConnectionRefusedError) or "connection refused" in text or "errno 111" in text
