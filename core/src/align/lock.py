"""One run per output folder: an exclusive ``flock`` on ``<output_dir>/.lock`` for the whole run.

The kernel releases a ``flock`` when its holder exits, however it exits (SIGKILL included),
so a lock left by a dead run is free and simply taken over; what the file says (pid, host,
start time) only names the holder in the message a second run gets. The file itself stays:
removing it on release would let two later runs lock two different files of the same name.
Locks on network filesystems depend on the server honouring ``flock``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from align.errors import ConfigError, UserError

LOCK_FILE = ".lock"


class OutputDirLocked(UserError):
    """Another live run holds the output folder."""


class OutputLock:
    """``with OutputLock(output_dir):`` holds the folder for the block; a second holder (in this
    process or another) gets ``OutputDirLocked`` naming the first one."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"output_dir {self.output_dir}: cannot create the run folder or its lock file "
                f"({exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirLocked(
                f"output_dir {self.output_dir} is in use by another run ({holder}). Wait for it to "
                f"finish, stop it, or choose another output_dir=..."
            ) from None
        self.fd = fd
        _write_holder(fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder_info() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info:
        # The holder has locked but not yet written its details.
        return "holder details not yet written"
    pid, host, started = info.get("pid", "?"), info.get("host", "?"), info.get("started", "?")
    return f"pid {pid} on host {host}, started {started}"
