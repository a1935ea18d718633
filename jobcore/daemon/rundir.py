"""jobd's run directory lock: ``DIR/jobd.pid``, locked (``jobcore.filelock``) and holding
the daemon's pid, so that two daemons never share a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from jobcore.errors import JobError
from jobcore.filelock import FileLock, LockHeld

PID_FILE = "jobd.pid"


class DaemonAlreadyRunning(JobError):
    """Another jobd holds the run directory's lock."""


class RunDirLock:
    """The lock on ``DIR/jobd.pid``; ``acquire`` raises DaemonAlreadyRunning (naming the
    holder's pid) when another jobd holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / PID_FILE
        self._lock = FileLock(self.path, mode=0o644, follow_symlinks=True)

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except LockHeld as held:
            raise DaemonAlreadyRunning(
                f"another jobd (pid {held.holder or '?'}) is already serving '{self.path.parent}'"
            ) from None
        try:
            self._lock.write(f"{os.getpid()}\n")
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        self._lock.release(remove=True)
