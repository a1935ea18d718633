"""Backup: push (blockdev-backup into target files) and pull (an NBD export of scratch-file
fleecing), incremental from a checkpoint's bitmap, and the checkpoint a backup creates.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import weakref
from typing import Any

import anyio
from attrs import define, field

from drivers.qemu.domain import Disk, Layer, blockdev_args
from drivers.qemu.images import (
    OwnedFile,
    claimed_file,
    create_new_image,
    file_ident,
    fsync_files,
    holds_inode,
    remove_created,
)
from drivers.qemu.process import Outcome, QemuProcess, SubJob
from drivers.qemu.rundir import nbd_socket
from drivers.qemu.runners.backup_checks import (
    check_backup_stores,
    check_pull_server,
    export_bitmap_exists,
    node_bitmaps,
    socket_exists,
)
from drivers.qemu.runners.base import CLEANUP_TIMEOUT, KEEP_OUTCOME, Phase, Runner
from jobcore.backup import ServerTransport, StoreType
from jobcore.driver import NotStarted, Recovered, store_exists
from jobcore.errors import DriverError, InvalidArgument, OperationInvalid, Unsupported
from jobcore.lifecycle import JobState
from jobcore.types.backup import PreparedBackup, PreparedBackupDisk

COPY_CHUNK = 64 << 20


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
                raise socket_exists(path) from None
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


def _owned_to_json(f: OwnedFile | None) -> list[Any] | None:
    return None if f is None else [f.path, list(f.ident), list(f.dir_ident)]


def _owned_from_json(v: Any) -> OwnedFile | None:
    if not v:
        return None
    path, (dev, ino), (dir_dev, dir_ino) = v
    return OwnedFile(str(path), (int(dev), int(ino)), (int(dir_dev), int(dir_ino)))


#: the fields of a _BackupDisk a job record keeps (its disk and spec come from the domain
#: and the job's prepared spec)
_RECORDED = (
    "path",
    "fmt",
    "node",
    "filter",
    "job_id",
    "export_id",
    "export_name",
    "export_bitmap",
    "export_bitmap_created",
    "incremental",
)


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
    #: the store path being created, recorded before its name is claimed (an owner dying
    #: then leaves at most an empty file there: ``claimed_file``)
    claiming: str | None = None
    #: the checkpoint bitmaps the transaction of start_actions creates, once it ran
    transaction_bitmaps: list[tuple[str, str]] = field(factory=list)

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
            bd = _BackupDisk(
                disk=disk,
                spec=d,
                path=path,
                fmt=fmt,
                created=None,
                node=self.domain.new_node_name(("s" if self.pull else "t") + self.short),
                filter=self.domain.new_node_name("f" + self.short),
                job_id=self.job_id("backup", d.name),
                incremental=d.incremental,
            )
            self.disks.append(bd)

            async def claimed(created: OwnedFile, bd: _BackupDisk = bd) -> None:
                bd.created = created  # recorded at once: the file, and its node to come
                self.claiming = None
                await self.conn.save_record(self.job, self.starting_record())

            # libvirt's rule: create unless REUSE_EXTERNAL; only created files are removed
            if not reuse:
                self.claiming = path
                await self.conn.save_record(self.job, self.starting_record())
                created = await create_new_image(path, fmt, disk.virtual_size, claimed)
                self.claiming = None
                if created is None:
                    raise store_exists(path, d.name)  # appeared since the check
                ident = created.ident
            else:
                ident = file_ident(path, d.name)
                await self.conn.save_record(self.job, self.starting_record())
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
        actions = await self.start_actions()
        try:
            # Not completion-mode=grouped: QEMU refuses it next to bitmap actions. A
            # failing disk cancels its siblings in supervise() instead.
            await self.proc.execute("transaction", {"actions": actions})
        except BaseException:
            await self.undo_start()
            raise
        await self.started()

    async def start_actions(self) -> list[dict[str, Any]]:
        """Everything before QEMU's transaction (the target nodes, the server, the record
        that names the QEMU jobs), and the transaction's actions: QEMU starts the job when
        they run, alone (``start``) or in one transaction with other jobs' (the
        connection's ``start_all``). Undone by ``undo_start`` if the transaction fails."""
        try:
            if self.pull:
                await self._start_server()
                await self.conn.save_record(self.job, self.starting_record())
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
                    **KEEP_OUTCOME,
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
            # on disk before QEMU starts a job: a later owner finds the jobs it names, or
            # knows (started false, no such job) that QEMU never started them
            await self.conn.save_record(self.job, self.starting_record())
        except BaseException:
            await self.undo_start()
            raise
        self.transaction_bitmaps = checkpoint_bitmaps
        return actions

    async def undo_start(self) -> None:
        """The transaction did not happen: undo what ``start_actions`` did (no bitmap is
        this job's to remove)."""
        self.untrack()
        with anyio.CancelScope(shield=True):
            await self._cleanup(keep_checkpoint=False, nodes_only=False)

    async def started(self) -> None:
        """QEMU ran the transaction: the job runs (a pull backup's exports are added)."""
        # from here on, the bitmaps the transaction created are this job's
        self.checkpoint_bitmaps = self.transaction_bitmaps
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
                if not (self.recovered and self.phase is Phase.READY):
                    self.report(lambda r: r.ready())
                self.phase = Phase.READY
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
            if not reported and not self.detached:
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

    async def _finish(
        self, outcome: Outcome, err: str | None, *, report: bool, note: bool = True
    ) -> None:
        self.phase = Phase.ENDING
        if self.pull:
            await self._teardown_pull()
        kept = outcome is Outcome.COMPLETED and not self.pull  # the target stays
        await self.dismiss(outcome if note else None, err, discard=not kept)
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

    # ---------------------------------------------------------------- recovery

    def starting_record(self) -> dict[str, Any]:
        """The record while ``start`` runs: QEMU has not started its jobs yet."""
        return {**self.record(), "started": False}

    def record(self) -> dict[str, Any]:
        return {
            "disks": [
                {
                    "disk": bd.disk.name,
                    "created": _owned_to_json(bd.created),
                    **{k: getattr(bd, k) for k in _RECORDED},
                }
                for bd in self.disks
            ],
            "checkpoint_bitmaps": [list(cb) for cb in self.checkpoint_bitmaps],
            "server_socket": self.server_socket,
            "server_socket_id": list(self.server_socket_id) if self.server_socket_id else None,
            "server_started": self.server_started,
            "claiming": self.claiming,
        }

    @classmethod
    def discard_record(cls, record: dict[str, Any]) -> None:
        claiming = record.get("claiming")
        remove_created(
            f
            for f in (
                *(_owned_from_json(d.get("created")) for d in record["disks"]),
                claimed_file(claiming) if isinstance(claiming, str) else None,
            )
            if f
        )
        sock, ident = record.get("server_socket"), record.get("server_socket_id")
        if sock and ident:
            remove_own_socket(sock, (int(ident[0]), int(ident[1])))

    def _restore(self, record: dict[str, Any]) -> None:
        specs = {d.name: d for d in self.spec.disks}
        for d in record["disks"]:
            disk = self.domain.disk(d["disk"])
            bd = _BackupDisk(
                disk=disk,
                spec=specs[d["disk"]],
                created=_owned_from_json(d.get("created")),
                **{k: d[k] for k in _RECORDED},
            )
            self.disks.append(bd)
            if bd.filter not in disk.filters:
                disk.filters.append(bd.filter)
        claiming = record.get("claiming")
        for bd in self.disks:  # its owner died as it claimed the name: what it left
            if bd.created is None and isinstance(claiming, str) and bd.path == claiming:
                bd.created = claimed_file(claiming)
        self.checkpoint_bitmaps = [(str(n), str(b)) for n, b in record["checkpoint_bitmaps"]]
        self.server_socket = record.get("server_socket")
        ident = record.get("server_socket_id")
        self.server_socket_id = (int(ident[0]), int(ident[1])) if ident else None
        self.server_started = bool(record.get("server_started"))

    async def recover(self, last_state: JobState, record: dict[str, Any] | None) -> Recovered:
        if record is None:
            return self.vanished("the run directory's record")
        self._restore(record)
        present = await self.adopt_subjobs([bd.job_id for bd in self.disks])
        if not present and record.get("started") is False:
            # its owner died before QEMU's transaction: no QEMU job ran; undo what the
            # start created, and the job can be started afresh
            await self._finish(Outcome.FAILED, None, report=False)
            return NotStarted(
                f"QEMU of domain '{self.domain.name}' never started the jobs of job "
                f"{self.job.uuid}: its owner stopped before"
            )
        exports_up = True
        if self.pull and present and self.noted is None:
            exports = await self.proc.execute("query-block-exports")
            ids = {str(e.get("id")) for e in exports}
            exports_up = all(bd.export_id in ids for bd in self.disks)
        if not present or not exports_up:
            await self._finish(Outcome.FAILED, None, report=False, note=False)
            return self.vanished("a QEMU job" if not present else "the NBD export")
        self.cancel_requested = last_state is JobState.ABORTING
        if all(sj.done.is_set() for sj in self.subjobs):
            outcome, err = self.outcome()
            if self.pull and self.noted is None:  # the fleecing jobs never end by themselves
                outcome = Outcome.FAILED
            await self._finish(outcome, err, report=False)
            return self.concluded(outcome, err)
        if self.pull:
            self.phase = Phase.READY
            return self.reattached(last_state)
        self.phase = Phase.RUNNING
        return self.reattached(last_state)

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
