"""The run directory: where a connection keeps its sockets, logs and pid files.

One connection owns one run directory at a time, enforced by a lock (``jobcore.filelock``)
on ``RUN_DIR/jobcore-qemu.lock``, a file whose first line is ``LOCK_MARKER``. The directory
must be private (``jobcore.rundir``: a real directory, owned by the user, not writable by
group or others; a missing one is created 0700). Paths go into QEMU option strings with
``,`` doubled (``escape_option``), so a comma in the run directory's path is just a comma.

Every file the driver puts there has a name built here, and cleanup touches only names of
these shapes (``NAME.GEN.pid``, ``NAME.GEN.qmp``, ``NAME.GEN.mig.sock``,
``NAME.backup-XXXXXXXX.sock``, ``NAME.GEN.log``, ``jobcore-qemu.lock``): other programs'
files in the directory are never removed, and a directory without that lock file holding
the marker line (no driver ever owned it; another program's ``lock`` does not count) is
not cleaned at all. A connection that finds pid files left by a previous owner
that died or let go (the lock was free) touches a process only when it can prove the
driver started it: a ``qemu-system-*`` of this user whose command line names this domain,
this pid file and this QMP socket. Such a process is killed, or, in keep-guests mode,
left running and handed back for re-adoption (``Survivor``) with its files. A pid file
that points at anything else is just stale (removed, the process left alone).

A job that runs on a keep-guests connection has a record, ``NAME.job-<32 hex>.json``
(``job_record``, 0600): what it created and must remove on failure or abort (targets,
scratch files, its NBD socket, bitmaps, node names), so that a later owner recovering the
job removes exactly those.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

from attrs import define, field, frozen

from jobcore.errors import DriverError
from jobcore.filelock import FileLock, LockHeld
from jobcore.log import get_logger
from jobcore.rundir import UnsafeRunDir, ensure_private_dir, user_run_dir
from jobcore.uri import URI

log = get_logger(__name__)

LOCK = "jobcore-qemu.lock"
#: the lock file's content: a directory counts as the driver's only if its lock says this
LOCK_MARKER = "jobcore qemu driver run directory: do not remove while in use\n"
#: stems are ``NAME.GEN`` (domain name, process generation)
_PID = re.compile(r"^(?P<stem>(?P<name>.+)\.\d+)\.pid$")
_SOCKETS = (
    re.compile(r"^.+\.\d+\.qmp$"),  # QMP of one process
    re.compile(r"^.+\.\d+\.mig\.sock$"),  # migration into one process
    re.compile(r"^.+\.backup-[0-9a-f]{8}\.sock$"),  # default NBD socket of a pull backup
)
#: the domain a socket or job record belongs to
_OWNER = re.compile(
    r"^(?P<name>.+?)(?:\.\d+\.qmp|\.\d+\.mig\.sock|\.backup-[0-9a-f]{8}\.sock"
    r"|\.job-[0-9a-f]{32}\.json)$"
)
_RECORD = re.compile(r"^.+\.job-[0-9a-f]{32}\.json$")


def pid_file(run_dir: Path, stem: str) -> Path:
    return run_dir / f"{stem}.pid"


def qmp_socket(run_dir: Path, stem: str) -> Path:
    return run_dir / f"{stem}.qmp"


def log_file(run_dir: Path, stem: str) -> Path:
    return run_dir / f"{stem}.log"


def migration_socket(run_dir: Path, stem: str) -> Path:
    return run_dir / f"{stem}.mig.sock"


def nbd_socket(run_dir: Path, domain: str, short: str) -> Path:
    """A pull backup's NBD socket when its XML names none (``short``: 8 hex digits)."""
    return run_dir / f"{domain}.backup-{short}.sock"


def job_record(run_dir: Path, domain: str, job: uuid.UUID) -> Path:
    """What a job on a keep-guests connection created (see the module docstring)."""
    return run_dir / f"{domain}.job-{job.hex}.json"


def _record_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Write a job record atomically (a temporary name, fsync, rename), mode 0600."""
    tmp = _record_tmp(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    """A job record, or None when there is none (or it is not one). A writer killed
    before its rename (during the fsync) left the newest record, whole, under the
    temporary name: that one is read then (renamed into place)."""
    record = _read_record(path)
    if record is None:
        tmp = _record_tmp(path)
        record = _read_record(tmp)
        if record is not None:
            with contextlib.suppress(OSError):
                os.replace(tmp, path)
    return record


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, 1 << 20) or b"null")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


@frozen
class Survivor:
    """A QEMU a previous owner started that still runs (proven ours), to re-adopt."""

    name: str
    stem: str
    pid: int


def is_driver_socket(name: str) -> bool:
    """True for a file name the driver gives its sockets."""
    return any(p.match(name) for p in _SOCKETS)


def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/jobcore-qemu``, else ``/tmp/jobcore-qemu-UID``."""
    return user_run_dir("jobcore-qemu")


def run_dir_of(uri: URI) -> Path:
    """The run directory named by ``?dir=`` or the per-user default, absolute.

    Symbolic links in the parents are resolved; the directory itself is not followed (a
    run directory that is a symbolic link is refused when the connection opens).
    """
    named = uri.param("dir")
    path = Path(os.path.abspath(named or default_run_dir()))
    return path.parent.resolve() / path.name


@define
class RunDir:
    """A locked run directory. ``acquire`` raises DriverError when another owner holds it
    or when the directory is not private."""

    path: Path
    #: keep-guests mode: live QEMUs of a previous owner are re-adopted, not killed
    keep_guests: bool = False
    #: what ``acquire`` found to re-adopt (keep-guests mode)
    survivors: list[Survivor] = field(factory=list)
    _lock: FileLock = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._lock = FileLock(self.path / LOCK)

    def acquire(self) -> None:
        try:
            ensure_private_dir(self.path, what="qemu run directory")
        except UnsafeRunDir as exc:
            raise DriverError(str(exc)) from None
        except OSError as exc:
            raise DriverError(f"cannot create qemu run directory {self.path}: {exc}") from None
        # a directory whose lock file lacks the marker never had an owner: nothing in it is ours
        used_before = _is_marked(self.path / LOCK)
        try:
            self._lock.acquire()
        except LockHeld:
            raise DriverError(
                f"run directory {self.path} is in use by another qemu driver connection"
            ) from None
        except OSError as exc:
            raise DriverError(
                f"cannot open the lock file of qemu run directory {self.path}: {exc}"
            ) from None
        if not used_before:
            try:
                self._lock.write(LOCK_MARKER)
            except OSError as exc:
                self.release()
                raise DriverError(
                    f"cannot write the lock file of qemu run directory {self.path}: {exc}"
                ) from None
            return
        try:
            self.reap_stale()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._lock.release()

    def pidfile(self, stem: str) -> Path:
        return pid_file(self.path, stem)

    def reap_stale(self) -> None:
        """Kill QEMU processes a previous owner started (keep-guests mode: keep them in
        ``survivors``); remove the pid files and sockets of the others.

        Only names the driver gives its files are considered; a pid file is removed (or
        kept, for a survivor), and its process killed only when ``_started_by_driver``
        proves it is ours. In keep-guests mode the sockets and job records of a domain
        with a survivor stay; job records stay whatever their domain (recovery reads
        them); otherwise records go too.
        """
        with os.scandir(self.path) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            pid_match = _PID.match(name)
            path = self.path / name
            if pid_match and _is_regular(path):
                self._reap_pidfile(path, pid_match["stem"], pid_match["name"])
        living = {s.name for s in self.survivors}
        for name in names:
            path = self.path / name
            owner = _OWNER.match(name)
            if owner is not None and owner["name"] in living:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if is_driver_socket(name) and stat.S_ISSOCK(st.st_mode):
                log.info("removing stale socket", path=str(path))
                path.unlink(missing_ok=True)
            elif _RECORD.match(name) and stat.S_ISREG(st.st_mode) and not self.keep_guests:
                log.info("removing stale job record", path=str(path))
                path.unlink(missing_ok=True)

    def _reap_pidfile(self, path: Path, stem: str, name: str) -> None:
        try:
            pid = int(path.read_text().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and _started_by_driver(pid, self.path, stem, name):
            if self.keep_guests:
                log.info("leftover qemu kept for re-adoption", pid=pid, pidfile=str(path))
                self.survivors.append(Survivor(name, stem, pid))
                return
            log.warning("killing leftover qemu", pid=pid, pidfile=str(path))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elif pid > 0:
            log.info("stale pid file: not a process the driver started", pid=pid, pidfile=str(path))
        path.unlink(missing_ok=True)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_marked(lock: Path) -> bool:
    """True when ``lock`` is a regular file that starts with the driver's marker line."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.pread(fd, len(LOCK_MARKER), 0) == LOCK_MARKER.encode()
    finally:
        os.close(fd)


def _argument(argv: list[bytes], option: bytes) -> bytes | None:
    """The value after ``option`` in ``argv`` (last one wins, as in QEMU)."""
    value = None
    for i, arg in enumerate(argv[:-1]):
        if arg == option:
            value = argv[i + 1]
    return value


def _started_by_driver(pid: int, run_dir: Path, stem: str, name: str) -> bool:
    """True when ``pid`` is a QEMU of this user started as the driver starts them for
    ``stem``: ``-name NAME``, ``-pidfile RUN_DIR/STEM.pid``, ``-qmp unix:RUN_DIR/STEM.qmp,…``."""
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        status = (proc / "status").read_text()
    except OSError:
        return False
    uid = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), -1
    )
    if uid != os.getuid() or not os.path.basename(argv[0]).startswith(b"qemu-system"):
        return False
    qmp = _argument(argv, b"-qmp") or b""
    pidfile = _argument(argv, b"-pidfile")
    return (
        _argument(argv, b"-name") == os.fsencode(name)
        and pidfile is not None
        and _same_path(pidfile, pid_file(run_dir, stem))
        and qmp.startswith(b"unix:")
        and _same_path(first_option_value(qmp.removeprefix(b"unix:")), qmp_socket(run_dir, stem))
    )


def escape_option(value: str) -> str:
    """A value inside a QEMU ``-option a,b=c`` string: QEMU reads ``,,`` as one comma."""
    return value.replace(",", ",,")


def first_option_value(arg: bytes) -> bytes:
    """The first value of a QEMU option string, up to its first unescaped comma."""
    out = bytearray()
    i = 0
    while i < len(arg):
        if arg[i : i + 1] == b",":
            if arg[i + 1 : i + 2] != b",":
                break
            i += 1
        out += arg[i : i + 1]
        i += 1
    return bytes(out)


def _same_path(arg: bytes, path: Path) -> bool:
    return os.path.realpath(os.fsdecode(arg)) == os.path.realpath(path)
