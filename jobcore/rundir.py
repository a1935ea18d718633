"""Private run directories: where jobd and the qemu driver put sockets and pid files.

A run directory is trusted only when nobody else can change what is in it: it must be a
real directory (not a symbolic link), owned by the user running the process, not writable
by group or others, and not inside a directory that someone else could rename it out of
(one owned by another user than us or root, or one writable by group or others without
the sticky bit). Otherwise another user could pre-create it (``/tmp`` is
shared) and rename our sockets away or put their own in place. ``ensure_private_dir``
creates a missing directory (and missing parents) with mode 0700 and refuses an existing
one that fails these rules, with a message saying why and what to do.

``user_run_dir`` is the one rule for default run directories (jobd's and the qemu
driver's); ``jobcore.filelock`` gives each run directory its one owner.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path


def user_run_dir(name: str) -> Path:
    """The per-user default run directory ``name``: ``$XDG_RUNTIME_DIR/NAME`` when
    XDG_RUNTIME_DIR names a directory this user may write, else ``TMPDIR/NAME-UID``
    (``/tmp/NAME-UID``). jobd's is ``jobcore``, the qemu driver's ``jobcore-qemu``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / name
    import tempfile  # random and hashlib: only where XDG_RUNTIME_DIR does not serve

    return Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"


class UnsafeRunDir(PermissionError):
    """An existing run directory that another user could tamper with."""


_reserved_lock = threading.Lock()
#: resolved run directory -> how many users in this process hold it reserved
_reserved: dict[str, int] = {}


def reserve_dir(path: Path) -> None:
    """Mark ``path`` as a run directory of this process (until ``unreserve_dir``): drivers
    refuse to create files a job names there (``reserved_dir_holding``)."""
    key = os.path.realpath(path)
    with _reserved_lock:
        _reserved[key] = _reserved.get(key, 0) + 1


def unreserve_dir(path: Path) -> None:
    key = os.path.realpath(path)
    with _reserved_lock:
        count = _reserved.pop(key, 0) - 1
        if count > 0:
            _reserved[key] = count


def reserved_dir_holding(path: str) -> str | None:
    """The reserved run directory ``path`` (already normalized) lies in, if any."""
    with _reserved_lock:
        reserved = list(_reserved)
    for directory in reserved:
        if path == directory or path.startswith(directory.rstrip("/") + "/"):
            return directory
    return None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def ensure_private_dir(path: Path, *, what: str = "run directory") -> Path:
    """Create ``path`` with mode 0700 (and its missing parents), or check the existing one.

    Returns the absolute path. Raises ``UnsafeRunDir`` for a symbolic link, a non-directory,
    a directory owned by another uid or writable by group/others; other ``OSError`` when it
    cannot be created.
    """
    path = _absolute(path)
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if missing:  # nothing is created inside a directory where it could be swapped
        _check_ancestors(missing[-1], what, path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else: the check below decides
        os.chmod(directory, 0o700)  # whatever the umask took away from the owner
    check_private_dir(path, what=what)
    return path


def check_private_dir(path: Path, *, what: str = "run directory") -> None:
    """Raise ``UnsafeRunDir`` unless ``path`` is a directory only this user can change."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeRunDir(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRunDir(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); it is refused "
            "because whoever controls the link decides where the sockets go: name the "
            "real directory instead, or remove the link"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRunDir(
            f"{what} {path} exists and is not a directory: remove it or choose another one"
        )
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafeRunDir(
            f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {uid}); another "
            "user may have created it to take over its sockets: remove it (as its owner or "
            "root) or choose another directory"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(
            name
            for bit, name in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others"))
            if st.st_mode & bit
        )
        raise UnsafeRunDir(
            f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), so "
            f"they could replace its sockets: run 'chmod 700 {path}' or choose another "
            "directory"
        )
    _check_ancestors(path, what, path)


def _check_ancestors(entry: Path, what: str, path: Path) -> None:
    """Refuse ``path`` when a directory above ``entry`` lets someone else rename entries in
    it: one owned by another user than us or root (its owner may rename anything in it),
    or one writable by group or others without the sticky bit (``/tmp`` has it)."""
    uid = os.getuid()
    ancestor = Path(os.path.realpath(entry.parent))
    while True:
        st = os.stat(ancestor)
        if st.st_uid not in (uid, 0):
            raise UnsafeRunDir(
                f"{what} {path} is inside {ancestor}, which belongs to uid {st.st_uid}, not to "
                f"you (uid {uid}) or root, so its owner could move {path} away and put their "
                "own in its place: choose a directory under one of your own or root's"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
            raise UnsafeRunDir(
                f"{what} {path} is inside {ancestor}, which {who} may write and which has "
                f"no sticky bit (mode {stat.S_IMODE(st.st_mode):04o}), so others could move "
                f"{path} away and put their own in its place: choose a directory under a "
                f"private parent, or run 'chmod go-w {ancestor}' (or 'chmod +t')"
            )
        if ancestor == ancestor.parent:
            return
        ancestor = ancestor.parent
