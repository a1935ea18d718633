"""Job runners: one class per job type, each mapping a jobcore job onto QEMU jobs.

A runner's ``start()`` issues the QMP commands and returns once QEMU accepted them (its
refusal is a DriverError carrying QEMU's text). Its ``supervise()`` runs in the engine's
task group: it waits for the QEMU jobs' outcome (BLOCK_JOB_COMPLETED / _CANCELLED events,
or the process exiting), updates the driver's view of the backing chains, cleans up, and
reports exactly one terminal outcome. Verbs (pause, resume, set_speed, cancel, complete)
are forwarded to QEMU; the *user* paused flag is tracked here, never derived from QEMU's
status, which flips paused/running on its own whenever the block graph is drained.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import socket
import stat
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from attrs import define, field
from structlog.stdlib import BoundLogger

from drivers.qemu.domain import Disk, Domain, Layer, blockdev_args
from drivers.qemu.images import (
    OwnedFile,
    create_new_image,
    file_ident,
    fsync_files,
    holds_inode,
    image_info,
    remove_created,
)
from drivers.qemu.process import Outcome, QemuProcess, QmpTimeout, SubJob
from drivers.qemu.rundir import migration_socket, nbd_socket
from jobcore.backup import ServerTransport, StoreType
from jobcore.driver import (
    DriverJob,
    JobReporter,
    store_exists,
    store_in_use,
    store_missing,
    store_unusable,
)
from jobcore.errors import DriverError, InvalidArgument, OperationInvalid, Unsupported
from jobcore.log import get_logger
from jobcore.rundir import reserved_dir_holding
from jobcore.scheduler import normalize_path
from jobcore.types.backup import PreparedBackup, PreparedBackupDisk
from jobcore.types.chain import PreparedCommit, PreparedPull
from jobcore.types.migration import MigrationSpec

if TYPE_CHECKING:
    from drivers.qemu.connection import QemuConnection

CLEANUP_TIMEOUT = 10.0
COPY_CHUNK = 64 << 20
#: QEMU's migration default is 32 MiB/s; "no limit" has to be said explicitly.
UNLIMITED_MIGRATION_BANDWIDTH = 1 << 40


class Phase(enum.Enum):
    """Where a runner is, from the driver's side (the engine owns the job's state)."""

    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    ENDING = "ending"
    ENDED = "ended"


def _verb_error(exc: DriverError, job: DriverJob, verb: str) -> Exception:
    text = str(exc)
    if "cannot accept command verb" in text or "already paused" in text or "not paused" in text:
        return OperationInvalid(text, job=job.uuid, verb=verb)
    return exc


@define(eq=False)
class Runner:
    conn: QemuConnection
    job: DriverJob
    domain: Domain
    proc: QemuProcess
    subjobs: list[SubJob] = field(factory=list)
    phase: Phase = Phase.STARTING
    user_paused: bool = False
    cancel_requested: bool = False
    complete_requested: bool = False
    end_requested: anyio.Event = field(factory=anyio.Event)
    log: BoundLogger = field(init=False)
    short: str = ""

    def __attrs_post_init__(self) -> None:
        self.short = self.job.uuid.hex[:8]
        self.log = get_logger(__name__).bind(
            job=str(self.job.uuid), job_type=str(self.job.type), domain=self.job.domain
        )

    # ------------------------------------------------------------ subclass API

    async def start(self) -> None:
        raise NotImplementedError

    async def supervise(self) -> None:
        raise NotImplementedError

    def report_progress(self) -> None:
        """Called by the connection's poller after it refreshed the subjobs' counters."""
        total = sum(sj.total for sj in self.subjobs)
        done = sum(sj.current for sj in self.subjobs)
        self.progress(done, total)

    async def poll(self) -> None:
        """Extra polling for runners that are not QEMU jobs (migration)."""

    # ----------------------------------------------------------------- helpers

    def report(self, call: Callable[[JobReporter], None]) -> None:
        """Make one report; the engine refusing a report must not kill the driver."""
        try:
            call(self.job.reporter)
        except Exception:
            self.log.exception("reporter refused a report")

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self.report(lambda r: r.progress(processed, total, extra))

    def job_id(self, kind: str, disk: str | None = None) -> str:
        """The QEMU job id: the job's whole UUID, so that no two jobs ever share one (two
        caller-chosen UUIDs may share any prefix)."""
        return f"{kind}-{self.job.uuid.hex}" + (f"-{disk}" if disk else "")

    def track(self, job_id: str) -> SubJob:
        """Register a QEMU job id *before* creating it: its events may beat the reply. An id
        another job registered is refused (never taken over)."""
        if job_id in self.proc.subjobs:
            raise DriverError(
                f"QEMU job id '{job_id}' is in use by another job of domain "
                f"'{self.domain.name}'; job {self.job.uuid} is not started"
            )
        sj = SubJob(job_id)
        self.proc.subjobs[job_id] = sj
        self.subjobs.append(sj)
        return sj

    def untrack(self) -> None:
        """Drop this runner's own QEMU job ids (an id is dropped only if it is ours)."""
        for sj in self.subjobs:
            if self.proc.subjobs.get(sj.id) is sj:
                del self.proc.subjobs[sj.id]

    async def wait_subjobs(self) -> None:
        for sj in self.subjobs:
            await sj.done.wait()

    def outcome(self) -> tuple[Outcome, str | None]:
        """Combined outcome of the QEMU jobs: any failure wins, then cancel, then success."""
        for sj in self.subjobs:
            if sj.outcome is Outcome.FAILED:
                return Outcome.FAILED, sj.error or "job failed"
        if any(sj.outcome is Outcome.CANCELLED for sj in self.subjobs):
            if self.cancel_requested:
                return Outcome.CANCELLED, None
            # nobody asked: QEMU cancelled it (e.g. while quitting), so the job failed
            reason = self.proc.exit_reason or "was cancelled by QEMU"
            return (
                Outcome.FAILED,
                f"QEMU process {self.proc.pid} of domain '{self.domain.name}' {reason}",
            )
        return Outcome.COMPLETED, None

    async def _each(self, verb: str, cmd: str, key: str = "id", **extra: Any) -> None:
        """Apply a verb to every QEMU job still running; QEMU's refusal is OperationInvalid."""
        for sj in self.subjobs:
            if sj.done.is_set():
                continue
            try:
                await self.proc.execute(cmd, {key: sj.id, **extra})
            except DriverError as exc:
                raise _verb_error(exc, self.job, verb) from None

    def _require_active(self, verb: str) -> None:
        if self.phase in (Phase.ENDING, Phase.ENDED) or self.cancel_requested:
            raise OperationInvalid(
                f"job {self.job.uuid} is ending and cannot accept '{verb}'",
                job=self.job.uuid,
                verb=verb,
            )

    # ------------------------------------------------------------------- verbs

    async def pause(self) -> None:
        self._require_active("pause")
        if self.user_paused:
            raise OperationInvalid(
                f"job {self.job.uuid} is already paused",
                job=self.job.uuid,
                state="paused",
                verb="pause",
            )
        await self._each("pause", "job-pause")
        self.user_paused = True

    async def resume(self) -> None:
        self._require_active("resume")
        if not self.user_paused:
            raise OperationInvalid(
                f"job {self.job.uuid} is not paused", job=self.job.uuid, verb="resume"
            )
        await self._each("resume", "job-resume")
        self.user_paused = False

    async def set_speed(self, bandwidth: int | None) -> None:
        self._require_active("set-speed")
        await self._each("set-speed", "block-job-set-speed", "device", speed=bandwidth or 0)

    async def cancel(self) -> None:
        if self.phase is Phase.ENDED:
            raise OperationInvalid(
                f"job {self.job.uuid} has ended", job=self.job.uuid, verb="cancel"
            )
        self.cancel_requested = True
        self.end_requested.set()
        for sj in self.subjobs:
            if not sj.done.is_set():
                try:
                    await self.proc.execute("job-cancel", {"id": sj.id})
                except QmpTimeout:  # QEMU does not answer: say so, do not pretend
                    raise
                except DriverError:  # it may have just ended
                    pass

    async def complete(self) -> None:
        raise OperationInvalid(
            f"a {self.job.type} job does not wait for 'complete'",
            job=self.job.uuid,
            verb="complete",
        )

    # ------------------------------------------------------------------ common

    async def del_nodes(self, nodes: list[str]) -> None:
        for node in nodes:
            try:
                await self.proc.execute("blockdev-del", {"node-name": node})
            except DriverError as exc:
                self.log.warning("blockdev-del failed", node=node, error=str(exc))

    def end(
        self, outcome: Outcome, errmsg: str | None, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self.phase = Phase.ENDED
        self.untrack()
        self.log.info("job ended", outcome=outcome.value, error=errmsg)
        if outcome is Outcome.COMPLETED:
            self.report(lambda r: r.completed(extra))
        elif outcome is Outcome.CANCELLED:
            self.report(lambda r: r.cancelled())
        else:
            self.report(lambda r: r.failed(errmsg or "job failed"))


# =============================================================================== backup


def image_owner(conn: QemuConnection, path: str) -> str | None:
    """Which domain's disk image ``path`` is (any layer of any chain), if any."""
    real = os.path.realpath(path)
    for dom in conn.domains.values():
        for disk in dom.disks.values():
            if any(os.path.realpath(layer.file) == real for layer in disk.layers):
                return f"an image of disk '{disk.name}' of domain '{dom.name}'"
    return None


def run_dir_holding(conn: QemuConnection, path: str) -> str | None:
    """The run directory (this connection's, or one jobd or another connection of this
    process reserved) that ``path`` would be created in, if any."""
    real = normalize_path(path)
    own = os.path.realpath(conn.run_dir)
    if real == own or real.startswith(own.rstrip("/") + "/"):
        return own
    return reserved_dir_holding(real)


def _refuse_present(
    conn: QemuConnection, reuse: bool, stores: list[tuple[str, str, str, int]]
) -> None:
    """The local part of check_backup_stores (a few stat calls, no I/O on the files)."""
    named: dict[str, str] = {}
    for disk, path, _fmt, _size in stores:
        real = os.path.realpath(path)
        if real in named:
            raise InvalidArgument(f"store '{path}' is named for disks '{named[real]}' and '{disk}'")
        named[real] = disk
        owner = image_owner(conn, path)
        if owner is not None:
            raise store_in_use(path, disk, owner)
        held = run_dir_holding(conn, path)
        if held is not None:
            raise InvalidArgument(
                f"store '{path}' for backup of '{disk}' is inside the run directory '{held}', "
                "whose files belong to jobd and the qemu driver: name a file elsewhere"
            )
        present = os.path.lexists(path)  # a dangling symlink exists too
        if present and not reuse:
            raise store_exists(path, disk)
        if not present and reuse:
            raise store_missing(path, disk)


async def check_backup_stores(
    conn: QemuConnection, reuse: bool, stores: list[tuple[str, str, str, int]]
) -> None:
    """libvirt's rule for (disk, path, format, disk size) of each target/scratch file: an
    existing file (a dangling symlink too) is refused unless ``reuse``
    (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL), and a reused one must exist with that format
    and the disk's virtual size (QEMU's backup job refuses another size). Nothing is
    opened for writing; a disk image of a domain is refused even with ``reuse``."""
    _refuse_present(conn, reuse, stores)
    if not reuse:
        return
    for disk, path, fmt, size in stores:
        try:
            info = await image_info(path)
        except DriverError as exc:
            raise store_unusable(path, disk, f"it cannot be read as an image ({exc})") from None
        if info.format != fmt:
            raise store_unusable(path, disk, f"its format is '{info.format}', not '{fmt}'")
        if info.virtual_size != size:
            raise store_unusable(
                path,
                disk,
                f"its virtual size is {info.virtual_size} bytes, disk '{disk}' has {size}",
            )


#: the only hosts a TCP NBD server binds to: NBD without TLS has no authentication
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _disk_names(spec: PreparedBackup) -> str:
    names = [d.name for d in spec.disks]
    return ("disk " if len(names) == 1 else "disks ") + ", ".join(f"'{n}'" for n in names)


def check_nbd_socket(conn: QemuConnection, path: str) -> None:
    """A socket a pull backup names: not inside a run directory, and nothing there yet
    (lstat: a dangling symlink counts). Binding it later fails if anything appeared."""
    held = run_dir_holding(conn, path)
    if held is not None:
        raise InvalidArgument(
            f"NBD socket '{path}' of the pull backup is inside the run directory '{held}', "
            "whose files belong to jobd and the qemu driver: name a socket path elsewhere"
        )
    if os.path.lexists(path):
        raise _socket_exists(path)


def _socket_exists(path: str) -> InvalidArgument:
    return InvalidArgument(
        f"NBD socket '{path}' of the pull backup exists: a pull backup creates its socket and "
        "never replaces a file (not even with VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, which "
        "reuses target and scratch images only): name a path where nothing is, or remove "
        "the file if it is a stale socket of yours"
    )


def check_pull_server(conn: QemuConnection, spec: PreparedBackup) -> None:
    """A pull backup's <server>, before anything starts: what the driver cannot serve as
    asked is refused, never served otherwise (TLS in clear text, another address)."""
    if not spec.pull:
        return
    server = spec.backup.server
    if server is not None and server.tls:
        raise Unsupported(
            f"pull backup of {_disk_names(spec)}: <server tls='yes'> asks for an NBD server "
            "with TLS, and the qemu driver has no TLS credentials configured (it would export "
            "the disk in clear text): leave tls out, or use a unix socket"
        )
    if server is None or server.transport is ServerTransport.UNIX:
        if server is not None and server.socket:
            check_nbd_socket(conn, server.socket)
        return
    if server.transport is ServerTransport.TCP or server.transport is None:
        if not server.port:
            raise DriverError("<domainbackup> must specify TCP port for now")
        host = server.name or "localhost"
        if host not in LOOPBACK_HOSTS:
            raise Unsupported(
                f"pull backup of {_disk_names(spec)}: the qemu driver serves NBD on loopback "
                f"only (localhost, 127.0.0.1, ::1), not on '{host}': NBD without TLS lets "
                "anyone who reaches the port read the disk; use a unix socket or localhost"
            )
        return
    raise Unsupported(f"NBD server transport '{server.transport}' is not supported")


async def node_bitmaps(proc: QemuProcess) -> dict[str, set[str]]:
    """node name -> the names of the dirty bitmaps QEMU has on it."""
    nodes = await proc.execute("query-named-block-nodes", {"flat": True})
    return {
        str(n.get("node-name")): {str(b.get("name")) for b in n.get("dirty-bitmaps") or ()}
        for n in nodes
    }


def export_bitmap_exists(disk: str, bitmap: str) -> InvalidArgument:
    return InvalidArgument(
        f"disk '{disk}': export bitmap '{bitmap}' of the pull backup already exists on the "
        "disk (a checkpoint's bitmap, or another backup's), and a backup never takes over a "
        "bitmap it did not create: name another one with exportbitmap='…'"
    )


async def check_export_bitmaps(spec: PreparedBackup, domain: Domain) -> None:
    """An incremental pull backup's export bitmaps must not exist yet (default
    'backup-<disk>'): the job creates them, and removes only what it created."""
    if not spec.pull or not domain.process.alive:
        return
    wanted = [
        (d.name, d.exportbitmap)
        for d in spec.disks
        if d.name in domain.disks and d.exportbitmap is not None
    ]
    if not wanted:
        return
    existing = await node_bitmaps(domain.process)
    for name, bitmap in wanted:
        if bitmap in existing.get(domain.disks[name].active.node, ()):
            raise export_bitmap_exists(name, bitmap)


async def check_backup_job(conn: QemuConnection, spec: PreparedBackup, domain: Domain) -> None:
    """Before admission: the pull server (check_pull_server), the export bitmaps
    (check_export_bitmaps) and the stores the prepared spec names (check_backup_stores)."""
    check_pull_server(conn, spec)
    await check_export_bitmaps(spec, domain)
    stores = []
    for d in spec.disks:
        if d.store_type is StoreType.BLOCK or d.name not in domain.disks:
            continue  # start() refuses
        stores.append((d.name, d.store, d.format, domain.disks[d.name].virtual_size))
    await check_backup_stores(conn, spec.reuse_external, stores)


@define
class _BackupDisk:
    disk: Disk
    spec: PreparedBackupDisk
    path: str
    fmt: str
    node: str
    #: the file the job created (None: reused), the only kind it removes
    created: OwnedFile | None
    filter: str
    job_id: str
    export_id: str = ""
    export_name: str = ""
    export_bitmap: str | None = None
    #: the transaction that adds the export bitmap succeeded: only then is it ours to remove
    export_bitmap_created: bool = False
    incremental: str | None = None


#: one fd at a time over a QEMU's QMP socket: ``getfd`` takes the last fd QEMU received
_FD_LOCKS: weakref.WeakKeyDictionary[QemuProcess, anyio.Lock] = weakref.WeakKeyDictionary()


def _fd_lock(proc: QemuProcess) -> anyio.Lock:
    lock = _FD_LOCKS.get(proc)
    if lock is None:
        lock = _FD_LOCKS[proc] = anyio.Lock()
    return lock


#: the longest UNIX socket path (sun_path holds 108 bytes with its NUL)
MAX_SOCKET_PATH = 107


def listen_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Create and listen on a UNIX socket at ``path``, and return it with the (st_dev,
    st_ino) of the socket file.

    Nothing is ever unlinked to make room: the socket is bound under a fresh random name in
    the same directory and hard-linked to ``path`` (``link`` fails if anything is there,
    even a dangling symlink), then the random name is removed. QEMU unlinks the name a
    listening socket was bound to when it closes it (and, given a path, whatever is there
    before binding): that name is the random one, which nobody uses."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"NBD socket '{path}' of the pull backup is longer than a UNIX socket path can "
            f"be ({MAX_SOCKET_PATH} bytes): name a shorter one"
        )
    temp = os.path.join(os.path.dirname(path), f".nbd-{secrets.token_hex(6)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(temp)
        except OSError as exc:
            if exc.errno is None:  # Python's own refusal: "AF_UNIX path too long"
                raise InvalidArgument(
                    f"NBD socket '{path}' of the pull backup cannot be created: its "
                    f"directory's name is too long for a UNIX socket: name a shorter path"
                ) from None
            raise DriverError(
                f"cannot create NBD socket '{path}' of the pull backup: "
                f"{exc.strerror or exc}; check that its directory exists and is writable"
            ) from None
        try:
            sock.listen(16)
            try:
                os.link(temp, path)
            except FileExistsError:
                raise _socket_exists(path) from None
            except OSError as exc:
                raise DriverError(
                    f"cannot create NBD socket '{path}' of the pull backup: {exc.strerror or exc}"
                ) from None
            st = os.lstat(path)
        finally:
            os.unlink(temp)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def remove_own_socket(path: str, ident: tuple[int, int]) -> None:
    """Unlink ``path`` only while it is still the socket file the driver created."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
        os.unlink(path)


@define(eq=False)
class BackupRunner(Runner):
    disks: list[_BackupDisk] = field(factory=list)
    #: (node, bitmap) of checkpoints this job's transaction created (never before it ran)
    checkpoint_bitmaps: list[tuple[str, str]] = field(factory=list)
    server_socket: str | None = None
    #: (st_dev, st_ino) of the socket file the driver created at ``server_socket``
    server_socket_id: tuple[int, int] | None = None
    server_started: bool = False

    @property
    def spec(self) -> PreparedBackup:
        spec = self.job.spec
        assert isinstance(spec, PreparedBackup)
        return spec

    @property
    def pull(self) -> bool:
        return self.spec.pull

    async def _prepare_disks(self) -> None:
        stores: list[tuple[PreparedBackupDisk, Disk, str, str]] = []
        for d in self.spec.disks:
            disk = self.domain.disk(d.name)
            if d.store_type is StoreType.BLOCK:
                raise Unsupported(f"disk '{d.name}': block-device backup stores are not supported")
            path, fmt = d.store, d.format
            if self.pull and fmt != "qcow2":
                raise DriverError(f"pull mode backup for disk '{d.name}' requires qcow2 driver")
            stores.append((d, disk, path, fmt))
        # checked before admission too; again here, as a queued job starts later
        reuse = self.spec.reuse_external
        await check_backup_stores(
            self.conn, reuse, [(d.name, p, f, disk.virtual_size) for d, disk, p, f in stores]
        )
        for d, disk, path, fmt in stores:
            # libvirt's rule: create unless REUSE_EXTERNAL; only created files are removed
            created = None
            if not reuse:
                created = await create_new_image(path, fmt, disk.virtual_size)
                if created is None:
                    raise store_exists(path, d.name)  # appeared since the check
                ident = created.ident
            else:
                ident = file_ident(path, d.name)
            bd = _BackupDisk(
                disk=disk,
                spec=d,
                path=path,
                fmt=fmt,
                created=created,
                node=self.domain.new_node_name(("s" if self.pull else "t") + self.short),
                filter=self.domain.new_node_name("f" + self.short),
                job_id=self.job_id("backup", d.name),
                incremental=d.incremental,
            )
            self.disks.append(bd)
            args = blockdev_args(Layer(bd.node, path, fmt), disk.active.node if self.pull else None)
            # Like qemu-img convert's destination: no flush per qcow2 metadata update (they
            # halve the throughput); a push target is fsynced once, after it is closed.
            args["cache"] = {"no-flush": True}
            await self.proc.execute("blockdev-add", args)
            if not holds_inode(self.proc.pid, ident):
                # QEMU opens by path: the path named another file by then (a directory
                # or the file swapped since the driver created or checked it)
                with contextlib.suppress(DriverError):
                    await self.proc.execute("blockdev-del", {"node-name": bd.node})
                raise DriverError(
                    f"store '{path}' for backup of '{d.name}' changed while the backup "
                    "started (QEMU found another file at that path than the one the driver "
                    "created or checked): nothing was written to it; begin the backup again"
                )

    def _checkpoint_actions(self, bitmaps: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The transaction actions creating the checkpoint's bitmaps, listed in ``bitmaps``."""
        actions = []
        for bd in self.disks:
            bitmap = bd.spec.checkpoint_bitmap
            if bitmap is None:
                continue
            node = bd.disk.active.node
            bitmaps.append((node, bitmap))
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": bitmap, "persistent": True},
                }
            )
        return actions

    async def _start_server(self) -> None:
        check_pull_server(self.conn, self.spec)  # again: a queued job starts later
        server = self.spec.backup.server
        if server is not None and server.transport is not ServerTransport.UNIX:
            assert server.port  # check_pull_server: TCP on loopback with a port
            host = server.name or "localhost"
            addr: dict[str, Any] = {
                "type": "inet",
                "data": {"host": host, "port": str(server.port)},
            }
            await self.proc.execute("nbd-server-start", {"addr": addr})
            self.server_started = True
            return
        path = (server.socket if server else None) or str(
            nbd_socket(self.conn.run_dir, self.domain.name, self.short)
        )
        # The driver binds the socket and hands QEMU the listening fd: QEMU given a path
        # unlinks whatever is there first, and its file would be QEMU's to replace.
        listener, ident = listen_unix(path)
        self.server_socket, self.server_socket_id = path, ident
        fdname = f"nbd-{self.job.uuid.hex}"
        try:
            async with _fd_lock(self.proc):
                try:
                    self.proc.qmp.send_fd_scm(listener.fileno())
                except Exception as exc:
                    raise DriverError(f"cannot pass the NBD socket to QEMU: {exc}") from None
                await self.proc.execute("getfd", {"fdname": fdname})
            try:
                await self.proc.execute(
                    "nbd-server-start", {"addr": {"type": "fd", "data": {"str": fdname}}}
                )
            except BaseException:
                with anyio.CancelScope(shield=True), contextlib.suppress(DriverError):
                    await self.proc.execute("closefd", {"fdname": fdname})
                raise
            self.server_started = True
        finally:
            listener.close()  # QEMU holds its own copy

    async def start(self) -> None:
        try:
            if self.pull:
                await self._start_server()
            await self._prepare_disks()
            checkpoint_bitmaps: list[tuple[str, str]] = []
            actions = self._checkpoint_actions(checkpoint_bitmaps)
            incremental_pull = self.pull and any(bd.incremental for bd in self.disks)
            existing = await node_bitmaps(self.proc) if incremental_pull else {}
            for bd in self.disks:
                data: dict[str, Any] = {
                    "job-id": bd.job_id,
                    "device": bd.disk.active.node,
                    "target": bd.node,
                    "sync": "none" if self.pull else "full",
                    "filter-node-name": bd.filter,
                    # copy_file_range between the images where the kernel can (block-copy
                    # falls back to read/write by itself), in chunks of up to 64 MiB
                    "x-perf": {"use-copy-range": True, "max-chunk": COPY_CHUNK},
                }
                speed = getattr(self.spec, "bandwidth", None) or self.conn.backup_bandwidth
                if speed and not self.pull:
                    data["speed"] = speed
                if bd.spec.exportbitmap is not None:  # an incremental pull's (prepare)
                    bd.export_bitmap = bitmap = bd.spec.exportbitmap
                    node = bd.disk.active.node
                    if bitmap in existing.get(node, ()):
                        raise export_bitmap_exists(bd.disk.name, bitmap)
                    actions += [
                        {
                            "type": "block-dirty-bitmap-add",
                            "data": {
                                "node": node,
                                "name": bd.export_bitmap,
                                "persistent": False,
                                "disabled": True,
                            },
                        },
                        {
                            "type": "block-dirty-bitmap-merge",
                            "data": {
                                "node": node,
                                "target": bd.export_bitmap,
                                "bitmaps": [bd.incremental],
                            },
                        },
                    ]
                elif bd.incremental:
                    # sync=bitmap with mode never: the checkpoint's bitmap keeps tracking
                    # (sync=incremental would clear it, breaking the next backup from it).
                    data.update(
                        {"sync": "bitmap", "bitmap": bd.incremental, "bitmap-mode": "never"}
                    )
                self.track(bd.job_id)
                actions.append({"type": "blockdev-backup", "data": data})
            # Not completion-mode=grouped: QEMU refuses it next to bitmap actions. A
            # failing disk cancels its siblings in supervise() instead.
            await self.proc.execute("transaction", {"actions": actions})
        except BaseException:
            self.untrack()
            with anyio.CancelScope(shield=True):
                # the transaction did not happen: no bitmap is this job's to remove
                await self._cleanup(keep_checkpoint=False, nodes_only=False)
            raise
        # from here on, the bitmaps the transaction created are this job's
        self.checkpoint_bitmaps = checkpoint_bitmaps
        for bd in self.disks:
            bd.export_bitmap_created = bd.export_bitmap is not None
        for bd in self.disks:
            bd.disk.filters.append(bd.filter)
        if self.pull:
            await self._add_exports()
        self.phase = Phase.RUNNING

    async def _add_exports(self) -> None:
        for bd in self.disks:
            bd.export_id = self.domain.new_node_name("e" + self.short)
            assert bd.spec.exportname is not None  # a pull backup's (prepare names it)
            bd.export_name = bd.spec.exportname
            args: dict[str, Any] = {
                "type": "nbd",
                "id": bd.export_id,
                "node-name": bd.node,
                "name": bd.export_name,
                "writable": False,
            }
            if bd.export_bitmap:
                args["bitmaps"] = [bd.export_bitmap]
            try:
                await self.proc.execute("block-export-add", args)
            except DriverError:
                bd.export_id = ""
                with anyio.CancelScope(shield=True):
                    await self.cancel()
                    await self._finish(Outcome.CANCELLED, None, report=False)
                raise

    async def supervise(self) -> None:
        reported = False
        try:
            if self.pull:
                self.phase = Phase.READY
                self.report(lambda r: r.ready())
                async with anyio.create_task_group() as tg:

                    async def _watch(sj: SubJob) -> None:
                        await sj.done.wait()
                        tg.cancel_scope.cancel()

                    for sj in self.subjobs:
                        tg.start_soon(_watch, sj)
                    await self.end_requested.wait()
                    tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self._teardown_pull()  # the fleecing jobs end when cancelled
            else:
                await self._wait_all_or_first_failure()
            outcome, err = self.outcome()
            if self.pull and not (outcome is Outcome.FAILED and not self.end_requested.is_set()):
                outcome = Outcome.COMPLETED if self.complete_requested else Outcome.CANCELLED
                err = None
            with anyio.CancelScope(shield=True):
                await self._finish(outcome, err, report=True)
            reported = True
        finally:
            if not reported:
                with anyio.CancelScope(shield=True):
                    await self._finish(Outcome.CANCELLED, None, report=False)

    async def _wait_all_or_first_failure(self) -> None:
        async def _watch(sj: SubJob) -> None:
            await sj.done.wait()
            if sj.outcome is Outcome.FAILED:
                for other in self.subjobs:
                    if not other.done.is_set() and self.proc.alive:
                        with contextlib.suppress(DriverError):
                            await self.proc.execute("job-cancel", {"id": other.id})

        async with anyio.create_task_group() as tg:
            for sj in self.subjobs:
                tg.start_soon(_watch, sj)

    async def _finish(self, outcome: Outcome, err: str | None, *, report: bool) -> None:
        self.phase = Phase.ENDING
        if self.pull:
            await self._teardown_pull()
        for bd in self.disks:
            if bd.filter in bd.disk.filters:
                bd.disk.filters.remove(bd.filter)
        await self._cleanup(
            keep_checkpoint=outcome is Outcome.COMPLETED,
            nodes_only=outcome is Outcome.COMPLETED and not self.pull,
        )
        if outcome is Outcome.COMPLETED and not self.pull:
            await anyio.to_thread.run_sync(fsync_files, [bd.path for bd in self.disks])
        if report:
            extra: dict[str, int | str] = {}
            if outcome is Outcome.COMPLETED and not self.pull:
                total = sum(sj.total for sj in self.subjobs)
                self.progress(total, total)
            self.end(outcome, err, extra or None)
        else:
            self.phase = Phase.ENDED
            self.untrack()

    async def _teardown_pull(self) -> None:
        with anyio.move_on_after(CLEANUP_TIMEOUT):
            for bd in self.disks:
                if not bd.export_id or not self.proc.alive:
                    continue
                gone = self.proc.export_deleted.setdefault(bd.export_id, anyio.Event())
                try:
                    await self.proc.execute(
                        "block-export-del", {"id": bd.export_id, "mode": "hard"}
                    )
                    await gone.wait()
                except DriverError as exc:
                    self.log.warning("block-export-del failed", error=str(exc))
                finally:
                    self.proc.export_deleted.pop(bd.export_id, None)
                    bd.export_id = ""  # teardown is idempotent
            for sj in self.subjobs:
                if not sj.done.is_set() and self.proc.alive:
                    with contextlib.suppress(DriverError):
                        await self.proc.execute("job-cancel", {"id": sj.id})
            for sj in self.subjobs:
                await sj.done.wait()

    async def _cleanup(self, *, keep_checkpoint: bool, nodes_only: bool) -> None:
        """Close targets/scratch nodes (flushing them), then drop what must not survive."""
        # first, the socket file, if it is still the one we created (while QEMU listens on
        # it, its inode cannot be another file's)
        if self.server_socket and self.server_socket_id:
            remove_own_socket(self.server_socket, self.server_socket_id)
            self.server_socket_id = None
        with anyio.move_on_after(CLEANUP_TIMEOUT):
            alive = self.proc.alive
            if alive:
                await self.del_nodes([bd.node for bd in self.disks])
                for bd in self.disks:
                    if bd.export_bitmap and bd.export_bitmap_created:
                        with contextlib.suppress(DriverError):
                            await self.proc.execute(
                                "block-dirty-bitmap-remove",
                                {"node": bd.disk.active.node, "name": bd.export_bitmap},
                            )
                if not keep_checkpoint:
                    for node, bitmap in self.checkpoint_bitmaps:
                        with contextlib.suppress(DriverError):
                            await self.proc.execute(
                                "block-dirty-bitmap-remove", {"node": node, "name": bitmap}
                            )
            if alive and self.server_started:
                with contextlib.suppress(DriverError):
                    await self.proc.execute("nbd-server-stop")
            self.server_started = False
            if not nodes_only:
                remove_created(bd.created for bd in self.disks if bd.created is not None)

    def report_progress(self) -> None:
        if self.phase is not Phase.RUNNING and self.phase is not Phase.READY:
            return
        done = sum(sj.current for sj in self.subjobs)
        total = sum(sj.total for sj in self.subjobs)
        if self.pull:
            self.progress(0, 0, {"disk_temp_used": done, "disk_temp_total": total})
        else:
            self.progress(done, total)

    async def pause(self) -> None:
        if self.pull:
            raise OperationInvalid(
                "a pull-mode backup cannot be paused; its client paces it",
                job=self.job.uuid,
                verb="pause",
            )
        await super().pause()

    async def resume(self) -> None:
        if self.pull:
            raise OperationInvalid(
                "a pull-mode backup is never paused", job=self.job.uuid, verb="resume"
            )
        await super().resume()

    async def set_speed(self, bandwidth: int | None) -> None:
        if self.pull:
            raise OperationInvalid(
                "a pull-mode backup has no speed; its client paces it",
                job=self.job.uuid,
                verb="set-speed",
            )
        await super().set_speed(bandwidth)

    async def cancel(self) -> None:
        if self.pull:
            if self.phase is Phase.ENDED or self.end_requested.is_set():
                raise OperationInvalid(
                    f"job {self.job.uuid} is already ending", job=self.job.uuid, verb="cancel"
                )
            self.cancel_requested = True
            self.end_requested.set()
            return
        await super().cancel()

    async def complete(self) -> None:
        if not self.pull:
            await super().complete()
        if self.phase is Phase.ENDED or self.end_requested.is_set():
            raise OperationInvalid(
                f"job {self.job.uuid} is already ending", job=self.job.uuid, verb="complete"
            )
        self.complete_requested = True
        self.end_requested.set()


# ========================================================================= block pull


@define(eq=False)
class BlockPullRunner(Runner):
    disk: Disk | None = None
    top: int = 0
    base: int | None = None
    nothing_to_do: bool = False

    async def start(self) -> None:
        spec = self.job.spec
        assert isinstance(spec, PreparedPull)
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        if not spec.merged:
            self.nothing_to_do = True  # no backing below top, or nothing between
            self.phase = Phase.RUNNING
            return
        args: dict[str, Any] = {
            "job-id": self.job_id("pull", disk.name),
            "device": disk.layers[self.top].node,
        }
        if self.base is not None:
            args["base-node"] = disk.layers[self.base].node
        if spec.bandwidth:
            args["speed"] = spec.bandwidth
        self.track(args["job-id"])
        try:
            await self.proc.execute("block-stream", args)
        except BaseException:
            self.untrack()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        if self.nothing_to_do:
            self.progress(0, 0)
            self.end(Outcome.COMPLETED, None)
            return
        await self.wait_subjobs()
        outcome, err = self.outcome()
        if outcome is Outcome.COMPLETED:
            assert self.disk is not None
            stop = self.base if self.base is not None else len(self.disk.layers)
            removed = self.disk.layers[self.top + 1 : stop]
            del self.disk.layers[self.top + 1 : stop]
            with anyio.CancelScope(shield=True):
                await self.del_nodes([layer.node for layer in removed])
            total = sum(sj.total for sj in self.subjobs)
            self.progress(total, total)
        self.end(outcome, err)


# ======================================================================= block commit


@define(eq=False)
class BlockCommitRunner(Runner):
    disk: Disk | None = None
    top: int = 0
    base: int = 0

    @property
    def spec(self) -> PreparedCommit:
        spec = self.job.spec
        assert isinstance(spec, PreparedCommit)
        return spec

    @property
    def active(self) -> bool:
        return self.top == 0

    async def start(self) -> None:
        spec = self.spec
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        args: dict[str, Any] = {
            "job-id": self.job_id("commit", disk.name),
            "device": disk.active.node,
            "base-node": disk.layers[self.base].node,
        }
        if not self.active:
            args["top-node"] = disk.layers[self.top].node
        if spec.bandwidth:
            args["speed"] = spec.bandwidth
        self.track(args["job-id"])
        try:
            await self.proc.execute("block-commit", args)
        except BaseException:
            self.untrack()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        (sj,) = self.subjobs
        if self.active:
            async with anyio.create_task_group() as tg:

                async def _ended() -> None:
                    await sj.done.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_ended)
                await sj.ready.wait()
                tg.cancel_scope.cancel()
            if not sj.done.is_set() and not self.cancel_requested:
                self.phase = Phase.READY
                self.progress(sj.total, sj.total)
                self.report(lambda r: r.ready())
                if self.spec.pivot:
                    with contextlib.suppress(OperationInvalid, DriverError):
                        await self.complete()
        await sj.done.wait()
        outcome, err = self.outcome()
        if outcome is Outcome.COMPLETED:
            assert self.disk is not None
            removed = self.disk.layers[self.top : self.base]
            del self.disk.layers[self.top : self.base]
            with anyio.CancelScope(shield=True):
                await self.del_nodes([layer.node for layer in removed])
            if self.spec.delete:
                remove_created(layer.owned for layer in removed if layer.owned is not None)
            self.progress(sj.total, sj.total)
        self.end(outcome, err)

    async def complete(self) -> None:
        if not self.active:
            await super().complete()
        (sj,) = self.subjobs
        if self.phase is not Phase.READY and not sj.ready.is_set():
            raise OperationInvalid(
                f"job {self.job.uuid} is not ready",
                job=self.job.uuid,
                state=self.phase.value,
                verb="complete",
            )
        self.complete_requested = True
        try:
            await self.proc.execute("job-complete", {"id": sj.id})
            if self.user_paused:
                # QEMU accepts complete in standby but pivots only once resumed: finishing
                # is what was asked, so let it run
                await self.proc.execute("job-resume", {"id": sj.id})
                self.user_paused = False
        except DriverError as exc:
            raise _verb_error(exc, self.job, "complete") from None
        self.phase = Phase.ENDING


# ========================================================================== migration


_MIGRATION_TERMINAL = {"completed", "failed", "cancelled"}


@define(eq=False)
class MigrationRunner(Runner):
    dest: QemuProcess | None = None
    dest_uri: str = ""
    status: str = "none"
    status_changed: anyio.Event = field(factory=anyio.Event)
    last_stats: dict[str, int | str] = field(factory=dict)
    source_paused: bool = False

    @property
    def spec(self) -> MigrationSpec:
        spec = self.job.spec
        assert isinstance(spec, MigrationSpec)
        return spec

    def _on_status(self, status: str) -> None:
        self.status = status
        self.status_changed.set()
        self.status_changed = anyio.Event()

    async def start(self) -> None:
        spec = self.spec
        self.dest_uri = self.conn.check_migration_destination(spec.destination)
        if spec.postcopy:
            raise Unsupported("post-copy migration is not supported by the qemu driver")
        self.dest = await self.conn.spawn_incoming(self.domain)
        try:
            sock = migration_socket(self.conn.run_dir, self.dest.stem)
            params: dict[str, Any] = {
                "max-bandwidth": spec.bandwidth or UNLIMITED_MIGRATION_BANDWIDTH
            }
            if spec.downtime_limit is not None:
                params["downtime-limit"] = spec.downtime_limit
            await self.proc.execute("migrate-set-parameters", params)
            await self.dest.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            if not spec.live:  # as libvirt: an offline-style migration pauses the guest
                await self.proc.execute("stop")
                self.source_paused = True
            self.proc.on_migration = self._on_status
            await self.proc.execute("migrate", {"uri": f"unix:{sock}"})
        except BaseException:
            self.proc.on_migration = None
            with anyio.CancelScope(shield=True):
                await self.conn.discard_process(self.dest, "migration did not start")
                await self._resume_source()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        assert self.dest is not None
        dest = self.dest
        try:
            async with anyio.create_task_group() as tg:

                async def _died(p: QemuProcess) -> None:
                    await p.exited.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_died, self.proc)
                while self.status not in _MIGRATION_TERMINAL:
                    await self.status_changed.wait()
                tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                if self.status == "completed":
                    await self.poll()
                    try:
                        await self._run_destination(dest)
                    except (DriverError, TimeoutError) as exc:
                        await self.conn.discard_process(dest, "did not take over the domain")
                        await self._resume_source()
                        self.end(Outcome.FAILED, f"the destination did not start: {exc}")
                        return
                    await self.conn.adopt_migrated(self.domain, dest)
                    self.report(lambda r: r.domain_moved(self.dest_uri))
                    self.end(Outcome.COMPLETED, None, dict(self.last_stats))
                    return
                if self.status == "failed":
                    err = "migration failed"
                    with contextlib.suppress(DriverError):
                        info = await self.proc.execute("query-migrate")
                        err = str(info.get("error-desc") or err)
                    await self.conn.discard_process(dest, "migration failed")
                    await self._resume_source()
                    self.end(Outcome.FAILED, err)
                    return
                await self.conn.discard_process(dest, "migration ended")
                await self._resume_source()
                if self.status == "cancelled":
                    self.end(Outcome.CANCELLED, None)
                else:  # source died
                    reason = (
                        self.proc.exit_reason or f"exited with status {self.proc.proc.returncode}"
                    )
                    self.end(
                        Outcome.FAILED,
                        f"QEMU process {self.proc.pid} of domain '{self.domain.name}' {reason}",
                    )
        finally:
            self.proc.on_migration = None
            if self.phase is not Phase.ENDED:
                with anyio.CancelScope(shield=True):
                    await self.conn.discard_process(dest, "migration abandoned")

    async def _run_destination(self, dest: QemuProcess) -> None:
        """Wait until the destination has taken over; resume it if the source was paused."""
        with anyio.fail_after(CLEANUP_TIMEOUT):
            while True:
                status = (await dest.execute("query-status")).get("status")
                if status == "running":
                    return
                if status == "paused":
                    await dest.execute("cont")
                    return
                await anyio.sleep(0.02)

    async def _resume_source(self) -> None:
        if self.source_paused and self.proc.alive:
            with contextlib.suppress(DriverError):
                await self.proc.execute("cont")
        self.source_paused = False

    async def poll(self) -> None:
        if not self.proc.alive:
            return
        try:
            info = await self.proc.execute("query-migrate")
        except DriverError:
            return
        ram = info.get("ram") or {}
        stats: dict[str, int | str] = {}
        for key, name in (
            ("total", "memory_total"),
            ("transferred", "memory_processed"),
            ("remaining", "memory_remaining"),
            ("duplicate", "memory_constant"),
            ("normal", "memory_normal"),
            ("normal-bytes", "memory_normal_bytes"),
            ("dirty-pages-rate", "memory_dirty_rate"),
            ("page-size", "memory_page_size"),
            ("dirty-sync-count", "memory_iteration"),
            ("postcopy-requests", "memory_postcopy_requests"),
        ):
            if key in ram:
                stats[name] = int(ram[key])
        if "mbps" in ram:
            stats["memory_bps"] = int(float(ram["mbps"]) * 1_000_000 / 8)
        for key, name in (
            ("downtime", "downtime"),
            ("setup-time", "setup_time"),
        ):
            if key in info:
                stats[name] = int(info[key])
        if "downtime" not in info and "expected-downtime" in info:
            stats["downtime"] = int(info["expected-downtime"])
        total = int(ram.get("total", 0))
        done = int(ram.get("transferred", 0))
        stats.update(
            data_total=total,
            data_processed=min(done, total),
            data_remaining=int(ram.get("remaining", 0)),
        )
        self.last_stats = stats
        if self.phase is Phase.RUNNING:
            self.progress(min(done, total), total, dict(stats))

    def report_progress(self) -> None:
        """Migration progress is reported from ``poll``."""

    async def pause(self) -> None:
        raise Unsupported("a migration cannot be paused")

    async def resume(self) -> None:
        raise Unsupported("a migration cannot be paused or resumed")

    async def set_speed(self, bandwidth: int | None) -> None:
        self._require_active("set-speed")
        await self.proc.execute(
            "migrate-set-parameters", {"max-bandwidth": bandwidth or UNLIMITED_MIGRATION_BANDWIDTH}
        )

    async def cancel(self) -> None:
        if self.phase is Phase.ENDED:
            raise OperationInvalid(
                f"job {self.job.uuid} has ended", job=self.job.uuid, verb="cancel"
            )
        self.cancel_requested = True
        try:
            await self.proc.execute("migrate_cancel")
        except QmpTimeout:
            raise
        except DriverError:
            pass
