"""An exclusive ``flock`` on one file, taken without waiting: jobd's run directory
(``jobd.pid``), the qemu driver's (``jobcore-qemu.lock``) and the SQLite job store
(``PATH.lock``) each allow one owner at a time with it.

The lock belongs to the open file: it is dropped when the file is closed, so an owner that
dies (even killed) lets go of it at once and the next owner finds the file in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from attrs import define, field

#: flock's answers when another open file holds the lock
_HELD = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


class LockHeld(Exception):
    """Another owner holds the lock; ``holder`` is the first line of the lock file (jobd
    writes its pid there), stripped, or ''."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by another owner")
        self.path = path
        self.holder = holder


@define(eq=False)
class FileLock:
    """The lock on ``path``, created with ``mode`` if missing. ``acquire`` raises LockHeld
    when someone else holds it and OSError when the file cannot be opened or locked."""

    path: Path
    mode: int = 0o600
    #: open ``path`` even when it is a symbolic link (else ELOOP: an OSError)
    follow_symlinks: bool = False
    _fd: int | None = field(default=None, init=False)

    @property
    def fd(self) -> int:
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        if not self.follow_symlinks:
            flags |= os.O_NOFOLLOW
        fd = os.open(self.path, flags, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = b""
            if exc.errno in _HELD:
                with contextlib.suppress(OSError):
                    holder = os.pread(fd, 64, 0)
            os.close(fd)
            if exc.errno in _HELD:
                text = holder.decode(errors="replace").splitlines()
                raise LockHeld(self.path, text[0].strip() if text else "") from None
            raise
        self._fd = fd

    def write(self, text: str) -> None:
        """Replace the lock file's content with ``text`` (the lock stays held)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def release(self, *, remove: bool = False) -> None:
        """Let go of the lock (``remove``: delete the file first); nothing if not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)  # closing drops the lock in any case
