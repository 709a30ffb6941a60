"""Starting a server as a child process, waiting until it is ready, and stopping it.

No ``tritonserver`` outlives the run that started it:
- the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which
  covers a parent killed by SIGKILL or an unhandled SIGTERM; the child's SIGTERM handler stops
  tritonserver, whose own parent-death signal (set by PyTriton) covers the child being killed;
- a normal exit, an exception or Ctrl-C of the parent stops the child through ``stop()``
  (called by the plugin's ``close()`` and, as a last resort, at interpreter exit);
- the child runs in its own session, so ``stop()`` can kill its whole process group when it
  does not stop in time, and Ctrl-C in a terminal reaches only the parent, which then stops it.

The parent-death signal fires when the *thread* that started the child exits: start servers
from the main thread or from a thread that lives as long as the server should.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from align_pytriton.config import LOCALHOST
from align_pytriton.errors import ServerStartError

PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 8
_RUNNING: set[ChildServer] = set()  # strong references: each is stopped at exit even if dropped


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """``count`` distinct ports free on ``host`` now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def model_ready(url: str, model: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at ``url`` answers that ``model`` is ready (Triton's HTTP API)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until_ready(
    url: str, model: str, label: str, timeout_s: float, child: ChildServer | None = None
) -> None:
    """Return once ``model`` is ready at ``url``; a ``ServerStartError`` naming ``label`` when the
    child exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not model_ready(url, model):
        if child is not None and child.returncode is not None:
            raise ServerStartError(
                f"{label} exited with code {child.returncode} before it was ready{child.log_excerpt()}"
            )
        if time.monotonic() > deadline:
            where = child.log_excerpt() if child is not None else ""
            raise ServerStartError(
                f"{label} was not ready within {timeout_s:g} s (startup_timeout_s): nothing answered "
                f"{url}/v2/models/{model}/ready{where}"
            )
        time.sleep(0.2)


class ChildServer:
    """``python -m align_pytriton.serve KIND CONFIG`` on free local ports, in a temporary folder
    holding its config and log (removed by ``stop``)."""

    def __init__(
        self,
        kind: str,
        config: dict[str, Any],
        host: str = LOCALHOST,
        settings_at: tuple[str, ...] = ("server",),
    ) -> None:
        """``config`` is the server's config file as a dict; its server settings (at the keys
        ``settings_at``) get ``host`` and free ports."""
        self.kind = kind
        self.folder = Path(tempfile.mkdtemp(prefix=f"align-{kind}-server-"))
        http, grpc, metrics = free_ports(3, host)
        ports = {"host": host, "http_port": http, "grpc_port": grpc, "metrics_port": metrics}
        config = copy.deepcopy(config)
        node = config
        for key in settings_at[:-1]:
            node = node.setdefault(key, {})
        node[settings_at[-1]] = {**(node.get(settings_at[-1]) or {}), **ports}
        config_path = self.folder / "server.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.folder / "server.log"
        self.url = f"http://{host}:{http}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "align_pytriton.serve",
                    kind,
                    str(config_path),
                    "--folder",
                    str(self.folder),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        self.label = f"{kind} server (child process {self.process.pid}, {self.url})"
        _RUNNING.add(self)

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait_until_ready(self, model: str, timeout_s: float) -> None:
        try:
            wait_until_ready(self.url, model, self.label, timeout_s, child=self)
        except BaseException:
            self.stop(keep_log=True)  # the error message points at the log
            raise

    def log_excerpt(self) -> str:
        """The end of the child's log, for an error message ("" when it wrote nothing)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
        return f"; the end of its log ({self.log_path}):\n  " + "\n  ".join(lines) if lines else ""

    def stop(self, grace_s: float = 15.0, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL to the whole process group after ``grace_s``; idempotent. The
        temporary folder is removed unless ``keep_log`` (an error message names the log)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of its group (tritonserver)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        _RUNNING.discard(self)
        if not keep_log:
            shutil.rmtree(self.folder, ignore_errors=True)  # ours: the config and log written above


@atexit.register
def _stop_running_servers() -> None:
    for server in list(_RUNNING):
        server.stop()
