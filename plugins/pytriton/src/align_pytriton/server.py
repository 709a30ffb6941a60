"""The server side: bind models to PyTriton and serve them until told to stop.

PyTriton runs ``tritonserver`` as a child process (it dies with us: PyTriton sets its
parent-death signal) and calls our Python functions in this process. ``serve`` blocks until
SIGTERM, SIGINT or SIGHUP (a launcher's parent-death signal is SIGTERM), then stops
tritonserver and returns, so no ``tritonserver`` outlives the server process.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from align_pytriton.config import ServerSettings
from align_pytriton.errors import ServerStartError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Endpoint:
    """One model of a server: a ``@batch``-decorated function and its named tensors, given as
    (name, numpy dtype, per-row shape)."""

    name: str
    infer: Callable[..., Any]  # one dict of outputs per call (``@batch``), or a list per request list
    inputs: Sequence[tuple[str, Any, tuple[int, ...]]]
    outputs: Sequence[tuple[str, Any, tuple[int, ...]]]
    batched: bool = True  # dynamic batching merges concurrent requests into one call
    max_batch_size: int | None = None  # else the server's
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_environment() -> None:
    """tritonserver's Python backend needs this interpreter's libpython first on the path."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def allow_slow_model_loads(timeout_s: float) -> None:
    """Raise PyTriton's network timeout for loading a model into tritonserver.

    ``Triton.run`` loads each bound model through a ``ModelClient`` built with default settings,
    whose requests time out after ``pytriton.client.client._DEFAULT_NETWORK_TIMEOUT_S`` (60 s)
    with no way to pass another value. Loading the Python backend's stub took longer than that
    on a loaded 2-core machine and the server exited. This is a private name of PyTriton 0.7.0;
    if a later version drops it, the default (60 s) applies again and nothing else changes.
    """
    import pytriton.client.client as pytriton_client

    if hasattr(pytriton_client, "_DEFAULT_NETWORK_TIMEOUT_S"):
        pytriton_client._DEFAULT_NETWORK_TIMEOUT_S = max(
            float(pytriton_client._DEFAULT_NETWORK_TIMEOUT_S),
            timeout_s,
        )


def serve(
    settings: ServerSettings, endpoints: Sequence[Endpoint], label: str, workspace: Path | None = None
) -> None:
    """Serve ``endpoints`` until a stop signal; raise ``ServerStartError`` if tritonserver cannot
    start or dies. ``workspace``: where PyTriton puts its model store and sockets (default a new
    folder under ~/.cache/pytriton, removed when it stops cleanly)."""
    prepare_environment()
    allow_slow_model_loads(settings.model_load_timeout_s)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    config = TritonConfig(
        http_address=settings.host,
        grpc_address=settings.host,
        metrics_address=settings.host,
        http_port=settings.http_port,
        grpc_port=settings.grpc_port,
        metrics_port=settings.metrics_port,
        exit_timeout_secs=settings.exit_timeout_s,
        log_verbose=0,
    )
    try:
        with Triton(config=config, workspace=workspace) as triton:
            for ep in endpoints:
                size = ep.max_batch_size or settings.max_batch_size
                batcher = DynamicBatcher(max_queue_delay_microseconds=settings.max_queue_delay_us)
                triton.bind(
                    model_name=ep.name,
                    infer_func=ep.infer,
                    inputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in ep.inputs],
                    outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in ep.outputs],
                    config=ModelConfig(max_batch_size=size, batcher=batcher)
                    if ep.batched
                    else ModelConfig(batching=False),
                    strict=True,
                )
            try:
                triton.run()
            except Exception as exc:
                raise ServerStartError(
                    f"{label}: tritonserver did not start: {type(exc).__name__}: {exc}"
                ) from exc
            names = ", ".join(ep.name for ep in endpoints)
            print(
                f"{label} ready: http://{settings.host}:{settings.http_port} "
                f"(grpc {settings.grpc_port}, metrics {settings.metrics_port}); models: {names}",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise ServerStartError(f"{label}: tritonserver exited unexpectedly")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
