"""The run directory: where a connection keeps its sockets, logs and pid files.

One connection owns one run directory at a time, enforced by an ``fcntl`` lock on
``RUN_DIR/lock``. Every QEMU process the driver starts writes ``NAME.GEN.pid`` there; a
connection that finds pid files left by a previous owner that died (the lock was free)
kills those processes before it starts anything, so a crashed driver never leaks QEMU.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
from pathlib import Path

from attrs import define, field

from jobcore.errors import DriverError
from jobcore.log import get_logger
from jobcore.uri import URI

log = get_logger(__name__)


def default_run_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "jobcore-qemu"
    return Path(tempfile.gettempdir()) / f"jobcore-qemu-{os.getuid()}"


def run_dir_of(uri: URI) -> Path:
    """The run directory named by ``?dir=`` or the per-user default, absolute."""
    named = uri.param("dir")
    return Path(named).resolve() if named else default_run_dir().resolve()


@define
class RunDir:
    """A locked run directory. ``acquire`` raises DriverError when another owner holds it."""

    path: Path
    _fd: int | None = field(default=None, init=False)

    def acquire(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DriverError(
                f"run directory {self.path} is in use by another qemu driver connection"
            ) from None
        self._fd = fd
        self.reap_stale()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def pidfile(self, stem: str) -> Path:
        return self.path / f"{stem}.pid"

    def reap_stale(self) -> None:
        """Kill QEMU processes recorded by a previous owner of this directory."""
        for pidfile in self.path.glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _is_our_qemu(pid, self.path):
                log.warning("killing leftover qemu", pid=pid, pidfile=str(pidfile))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pidfile.unlink(missing_ok=True)
        for leftover in self.path.glob("*.sock"):
            leftover.unlink(missing_ok=True)


def _is_our_qemu(pid: int, run_dir: Path) -> bool:
    """True when ``pid`` is a QEMU whose command line points into ``run_dir``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and b"qemu" in cmdline[0]
        and any(str(run_dir).encode() in arg for arg in cmdline)
    )
