"""The blocking, libvirt-flavoured facade: a thin synchronous wrapper over the async API.

``open()`` starts one event loop on a daemon thread per in-process connection and runs
every call there through an anyio blocking portal; a jobd connection runs its calls on the
caller's thread over a blocking socket and starts its loop only for events. Nothing here
re-implements behaviour. An unclosed connection never keeps the process alive: the
thread is a daemon, and an ``atexit`` hook closes what is still open (so drivers can reap
their processes).

On an in-process connection the read-only queries (``jobStats`` without COMPLETED,
``jobInfo``, ``blockJobInfo`` of a disk with a block job, ``JobGetInfo``, ``JobGetStats``,
``JobGetXMLDesc``, ``JobLookupByUUID`` of a job the store holds, ``listJobs``) are
answered on the caller's thread from the immutable snapshots the engine publishes
(jobcore.snapshots says why that is safe and gives the loop's answer); the first such
query starts the publishing with one hop (and a domain's first ``listJobs`` publishes its
list with another). Every other call of an in-process connection hops to its loop.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast

import anyio
from anyio.from_thread import BlockingPortal

from jobcore.api import (
    Checkpoint,
    Connection,
    Domain,
    Job,
    JobGroup,
    connect,
    refuse_daemon_settings,
)
from jobcore.constants import LEGACY_DOMAIN_JOB_UUID
from jobcore.driver import DriverConnection
from jobcore.errors import InvalidArgument, JobError, NoSuchCheckpoint
from jobcore.events import EventHub, JobEvent, Subscription
from jobcore.flags import check_flags
from jobcore.info import Explanation, GroupInfo, HostInfo, JobInfo
from jobcore.local import LocalConnection, LocalDomain, LocalJob
from jobcore.methods import as_uuid
from jobcore.snapshots import kept
from jobcore.spec import DEFAULT_RETENTION, JobType, check_timeout
from jobcore.uri import parse_uri

T = TypeVar("T")

_open_connections: weakref.WeakSet[BlockingConnection] = weakref.WeakSet()

#: the event loops ``open(backend=…)`` can run a connection on (anyio's backends)
BACKENDS = ("asyncio", "trio")


class BlockingConnection:
    """virConnect-like. Create with ``jobcore.open(uri)``.

    In-process URIs run on an event loop on the connection's own daemon thread, every
    call hopping there through an anyio blocking portal. A jobd URI
    (``DRIVER+unix:///…?socket=…``) talks to jobd on the caller's thread over a blocking
    socket (jobcore.remote.connect_blocking: the same frames, method table, typed errors
    and results); its event loop starts only when something needs one: events
    (``subscribe``), ``run`` of a coroutine that is no remote handle's call, ``run_sync``.
    """

    def __init__(
        self,
        uri: str,
        *,
        backend: str = "asyncio",
        retention: float = DEFAULT_RETENTION,
        store: str | None = None,
        policy: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(
                f"unknown event loop backend {backend!r}: use one of "
                + ", ".join(repr(b) for b in BACKENDS)
            )
        self.uri = uri
        self._backend = backend
        self._retention = retention
        self._portal: BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._cm: AbstractContextManager[Connection] | None = None
        self._loop_lock = threading.Lock()
        self._open = False
        #: handle types whose calls run on the caller's thread (a jobd URI's)
        self._inline: frozenset[type] = frozenset()
        if parse_uri(uri).transport == "unix":
            refuse_daemon_settings(uri, store=store, policy=policy)
            from jobcore import remote

            self._remote: Any = remote.connect_blocking(uri)
            self.aconn: Connection = self._remote
            self._inline = remote.INLINE_HANDLES
        else:
            self._remote = None
            self._start_loop()
            try:
                assert self._portal is not None
                self._cm = self._portal.wrap_async_context_manager(
                    connect(uri, retention=retention, store=store, policy=policy)
                )
                self.aconn = self._cm.__enter__()
            except BaseException:
                self._cm = None
                self._stop_loop()
                raise
        self._open = True
        _open_connections.add(self)

    def _start_loop(self) -> None:
        backend, uri = self._backend, self.uri
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                async with BlockingPortal() as portal:
                    self._portal = portal
                    started.set()
                    await portal.sleep_until_stopped()
            except BaseException as exc:  # surfaced to the opening thread
                failure.append(exc)
                started.set()
                raise

        def run_loop() -> None:
            try:
                anyio.run(main, backend=backend)
            except BaseException as exc:  # e.g. the backend's library is not installed
                if not started.is_set():
                    failure.append(exc)
                    started.set()

        self._thread = threading.Thread(target=run_loop, daemon=True, name=f"jobcore {uri}")
        self._thread.start()
        started.wait()
        if failure or self._portal is None:
            cause = failure[0] if failure else None
            raise JobError(
                f"cannot start the {backend} event loop for '{uri}'"
                + (f": {type(cause).__name__}: {cause}" if cause is not None else "")
            ) from cause

    def _loop(self) -> BlockingPortal:
        """The event loop's portal, started now if this (jobd) connection had none yet:
        its calls made there, and its subscriptions, go over a second socket."""
        portal = self._portal
        if portal is not None:
            return portal
        with self._loop_lock:
            if not self._open:
                raise JobError("the connection is closed")
            if self._portal is None:
                self._start_loop()
                assert self._portal is not None and self._thread is not None
                try:
                    cm = self._portal.wrap_async_context_manager(
                        connect(self.uri, retention=self._retention)
                    )
                    events_conn = cm.__enter__()
                except BaseException:
                    self._stop_loop()
                    raise
                self._cm = cm
                assert self._thread.ident is not None
                self._remote.attach_link(events_conn, self._thread.ident)
            return self._portal

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        if not self._open:
            raise JobError("the connection is closed")
        if type(getattr(fn, "__self__", None)) in self._inline:
            return _run_inline(fn(*args))
        return cast(T, self._loop().call(fn, *args))

    def _stop_loop(self) -> None:
        if self._portal is not None:
            with contextlib.suppress(RuntimeError):
                self._portal.call(self._portal.stop, True)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._portal = None

    def close(self) -> int:
        """Close the connection: jobs it runs end, drivers clean up. Idempotent."""
        with self._loop_lock:
            was_open, self._open = self._open, False
        if not was_open:
            return 0
        cm, self._cm = self._cm, None
        try:
            if self._remote is not None:
                self._remote.close_blocking()
            if cm is not None:
                cm.__exit__(None, None, None)
        finally:
            self._stop_loop()
            _open_connections.discard(self)
        return 0

    def isAlive(self) -> bool:
        return self._open

    @property
    def driver(self) -> DriverConnection:
        """The driver connection (e.g. the sim's clock and failure injection); an
        in-process connection's only."""
        if not isinstance(self.aconn, LocalConnection):
            raise JobError(f"'{self.uri}' is served by jobd: its driver is the daemon's")
        return self.aconn.driver

    def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run a coroutine function on this connection's event loop (a remote handle's
        call on a jobd connection: on this thread, as every call of the facade)."""
        return self._call(fn, *args)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the event loop's thread (for driver helpers)."""
        if not self._open:
            raise JobError("the connection is closed")
        return cast(T, self._loop().call(_sync_to_async(fn), *args))

    def lookupByName(self, name: str) -> BlockingDomain:
        return BlockingDomain(self, self._call(self.aconn.lookup_domain, name))

    def JobGroupBegin(self, group_xml: str | bytes, flags: int = 0) -> BlockingJobGroup:
        """jobcore.JobGroupBegin(conn, group_xml, flags) (groups)."""
        return BlockingJobGroup(self, self._call(self.aconn.job_group_begin, group_xml, flags))

    def JobGroupExplain(self, group_xml: str | bytes, flags: int = 0) -> Explanation:
        """jobcore.JobGroupExplain(conn, group_xml, flags) (groups)."""
        return self._call(self.aconn.job_group_explain, group_xml, flags)

    def listAllDomains(self, flags: int = 0) -> list[BlockingDomain]:
        check_flags("listAllDomains", flags)
        return [BlockingDomain(self, d) for d in self._call(self.aconn.list_domains)]

    def createXML(self, xml: str, flags: int = 0) -> BlockingDomain:
        check_flags("createXML", flags)
        return BlockingDomain(self, self._call(self.aconn.create_domain, xml))

    def getURI(self) -> str:
        return self.uri

    # the fleet (jobd on a postgresql:// store): Unsupported on any other connection
    def listFleetJobs(
        self, cursor: int = -1, limit: int = 1000
    ) -> tuple[list[JobInfo], int | None]:
        """One page of every fleet member's jobs and the next page's cursor (None: the last)."""
        return self._call(self.aconn.list_fleet_jobs, cursor, limit)

    def fleetHosts(self) -> list[HostInfo]:
        return self._call(self.aconn.fleet_hosts)

    def fenceHost(self, name: str, reason: str | None = None, flags: int = 0) -> HostInfo:
        """Fence a lost member (flags JOB_FENCE_FORCE: even a LIVE one)."""
        return self._call(self.aconn.fence_host, name, reason, flags)

    def subscribe(
        self,
        *,
        domain: str | None = None,
        job: uuid.UUID | None = None,
        types: Iterable[str] | None = None,
        maxlen: int = EventHub.DEFAULT_BUFFER,
    ) -> BlockingSubscription:
        """Job events without polling: iterate, or ``get(timeout)``; ``close()`` when done."""
        sub = self.run_sync(
            lambda: self.aconn.subscribe(domain=domain, job=job, types=types, maxlen=maxlen)
        )
        if self._remote is not None:  # jobd took it before any later call of this thread
            self._loop().call(self._remote.events_barrier)
        return BlockingSubscription(self, sub)

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_H = TypeVar("_H", LocalDomain, LocalJob)


def _published(conn: BlockingConnection, handle: object, kind: type[_H]) -> _H | None:
    """``handle`` if it is an in-process ``kind`` of an open connection, its engine
    publishing snapshots (started on first use: one hop); else None."""
    if not isinstance(handle, kind) or not conn.isAlive():
        return None
    engine = handle.conn.engine
    if not engine.snapshots.on:
        conn.run_sync(engine.start_snapshots)
    return handle


def _run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that completes without suspending (a remote handle's call on a
    blocking connection) on this thread."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise JobError("internal error: a remote call suspended on a blocking connection")


def _sync_to_async(fn: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    async def wrapper(*args: Any) -> T:
        return fn(*args)

    return wrapper


class BlockingSubscription:
    """A blocking view of an event subscription (see jobcore.events for the loss policy)."""

    def __init__(self, conn: BlockingConnection, sub: Subscription) -> None:
        self.conn = conn
        self.sub = sub

    def get(self, timeout: float | None = None) -> JobEvent:
        """The next event; TimeoutError after ``timeout`` seconds without one."""
        timeout = check_timeout(timeout)

        async def next_event() -> JobEvent:
            with anyio.fail_after(timeout):
                return await self.sub.get()

        return self.conn._call(next_event)

    def __iter__(self) -> Iterator[JobEvent]:
        while True:
            try:
                yield self.get()
            except anyio.EndOfStream:
                return

    @property
    def lost(self) -> int:
        return self.sub.lost

    def close(self) -> None:
        if self.conn.isAlive():
            self.conn.run_sync(self.sub.close)

    def __enter__(self) -> BlockingSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingDomain:
    """virDomain-like: the legacy calls keep libvirt-python's names and return shapes."""

    def __init__(self, conn: BlockingConnection, dom: Domain) -> None:
        self.conn = conn
        self.adom = dom

    def __repr__(self) -> str:
        return f"<BlockingDomain {self.adom.name!r}>"

    def name(self) -> str:
        return self.adom.name

    def UUIDString(self) -> str:
        return str(self.adom.uuid)

    def connect(self) -> BlockingConnection:
        return self.conn

    def destroy(self) -> int:
        self.conn._call(self.adom.destroy)
        return 0

    # domain description and the QEMU monitor (slice domxml)
    def XMLDesc(self, flags: int = 0) -> str:
        return self.conn._call(self.adom.xml_desc, flags)

    def isActive(self) -> int:
        return 1 if self.conn._call(self.adom.is_active) else 0

    def qemuMonitorCommand(self, cmd: str, flags: int = 0) -> str:
        return self.conn._call(self.adom.qemu_monitor_command, cmd, flags)

    def _published(self) -> LocalDomain | None:
        """The in-process domain, its engine publishing snapshots (started here on first
        use: one hop); None on a jobd connection or a closed one (the hop says so)."""
        return _published(self.conn, self.adom, LocalDomain)

    def jobInfo(self) -> list[int]:
        local = self._published()
        if local is not None:
            return local.job_info_now() or self.conn._call(self.adom.job_info)
        return self.conn._call(self.adom.job_info)

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        local = self._published()
        if local is not None:
            stats = local.job_stats_now(flags)
            if stats is not None:
                return stats
        return self.conn._call(self.adom.job_stats, flags)

    def abortJob(self) -> int:
        return self.conn._call(self.adom.abort_job)

    def backupBegin(
        self, backupXML: str | None, checkpointXML: str | None = None, flags: int = 0
    ) -> int:
        return self.conn._call(self.adom.backup_begin, backupXML, checkpointXML, flags)

    def backupGetXMLDesc(self, flags: int = 0) -> str:
        return self.conn._call(self.adom.backup_get_xml_desc, flags)

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:
        local = self._published()
        if local is not None:
            found = local.block_job_info_now(disk, flags)
            if found is not None:
                return found
        return self.conn._call(self.adom.block_job_info, disk, flags)

    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        return self.conn._call(self.adom.block_job_abort, disk, flags)

    def blockPull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int:
        return self.conn._call(self.adom.block_pull, disk, bandwidth, flags)

    def blockCommit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        return self.conn._call(self.adom.block_commit, disk, base, top, bandwidth, flags)

    def listJobs(self) -> list[BlockingJob]:
        local = self._published()
        if local is not None:
            jobs = local.list_jobs_now()
            if jobs is None and local.conn.engine.snapshots.lists:
                self.conn._call(local.publish_jobs)  # the first time: one hop
                jobs = local.list_jobs_now()
            if jobs is not None:
                return [BlockingJob(self.conn, j) for j in jobs]
        return [BlockingJob(self.conn, j) for j in self.conn._call(self.adom.list_jobs)]

    # ---- checkpoints (virDomainCheckpoint*) --------------------------------------------

    def checkpointCreateXML(self, xml: str, flags: int = 0) -> BlockingCheckpoint:
        return BlockingCheckpoint(self, self.conn._call(self.adom.checkpoint_create, xml, flags))

    def listAllCheckpoints(self, flags: int = 0) -> list[BlockingCheckpoint]:
        found = self.conn._call(self.adom.list_checkpoints, flags)
        return [BlockingCheckpoint(self, cp) for cp in found]

    def checkpointLookupByName(self, name: str, flags: int = 0) -> BlockingCheckpoint:
        check_flags("checkpointLookupByName", flags)
        return BlockingCheckpoint(self, self.conn._call(self.adom.checkpoint_lookup, name))


class BlockingCheckpoint:
    """virDomainCheckpoint-like: libvirt-python's names and return values."""

    def __init__(self, dom: BlockingDomain, checkpoint: Checkpoint) -> None:
        self.dom = dom
        self.acheckpoint = checkpoint

    def __repr__(self) -> str:
        return f"<BlockingCheckpoint {self.acheckpoint.name!r} of {self.dom.name()!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockingCheckpoint) and other.acheckpoint == self.acheckpoint

    def __hash__(self) -> int:
        return hash(self.acheckpoint)

    def getName(self) -> str:
        return self.acheckpoint.name

    def domain(self) -> BlockingDomain:
        return self.dom

    def getXMLDesc(self, flags: int = 0) -> str:
        return self.dom.conn._call(self.acheckpoint.xml_desc, flags)

    def getParent(self, flags: int = 0) -> BlockingCheckpoint:
        """The parent; NoSuchCheckpoint when it has none, as libvirt."""
        check_flags("checkpointGetParent", flags)
        parent = self.dom.conn._call(self.acheckpoint.parent)
        if parent is None:
            raise NoSuchCheckpoint(f"checkpoint '{self.acheckpoint.name}' does not have a parent")
        return BlockingCheckpoint(self.dom, parent)

    def delete(self, flags: int = 0) -> int:
        self.dom.conn._call(self.acheckpoint.delete, flags)
        return 0


class BlockingJob:
    """virDomainJob-like handle; use the module functions (JobGetType, …) on it."""

    def __init__(self, conn: BlockingConnection, job: Job) -> None:
        self.conn = conn
        self.ajob = job
        self.freed = False

    def __repr__(self) -> str:
        return f"<BlockingJob {self.ajob.uuid} {self.ajob.type}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockingJob) and other.ajob == self.ajob

    def __hash__(self) -> int:
        return hash(self.ajob)

    @property
    def uuid(self) -> uuid.UUID:
        return self.ajob.uuid

    @property
    def type(self) -> JobType:
        return self.ajob.type

    def _live(self) -> Job:
        if self.freed:
            raise JobError("the job handle was freed")
        return self.ajob


def open(
    uri: str = "sim:///default",
    *,
    backend: str = "asyncio",
    retention: float = DEFAULT_RETENTION,
    store: str | None = None,
    policy: str | None = None,
) -> BlockingConnection:
    """Open a blocking connection (an in-process one's event loop runs on its own daemon
    thread); ``store``: the job store URL (``memory:`` by default, or
    ``sqlite:///ABS/PATH``); ``policy``: the conflict policy table by name (``default``,
    ``kubevirt``; in-process only: jobd's is ``jobd --policy``)."""
    return BlockingConnection(uri, backend=backend, retention=retention, store=store, policy=policy)


def JobBegin(dom: BlockingDomain, job_xml: str | bytes, flags: int = 0) -> BlockingJob:
    return BlockingJob(dom.conn, dom.conn._call(dom.adom.job_begin, job_xml, flags))


# explain


def JobExplain(
    target: BlockingDomain | BlockingJob, job_xml: str | bytes | None = None, flags: int = 0
) -> Explanation:
    """What ``JobBegin(dom, job_xml, flags)`` would do now (changes nothing); or, given
    a job, where that queued job stands (what it waits for, its position)."""
    if isinstance(target, BlockingJob):
        if job_xml is not None or flags:
            raise InvalidArgument("JobExplain(job) takes no job XML and no flags")
        return target.conn._call(target._live().explain)
    if job_xml is None:
        raise InvalidArgument("JobExplain(dom, job_xml): the job XML is missing")
    return target.conn._call(target.adom.job_explain, job_xml, flags)


def JobLookupByUUID(dom: BlockingDomain, job_uuid: str | bytes | uuid.UUID) -> BlockingJob:
    job_id = as_uuid(job_uuid)
    local = dom._published()
    if local is not None:
        found = _lookup_now(local, job_id)
        if found is not None:
            return BlockingJob(dom.conn, found)
    return BlockingJob(
        dom.conn, dom.conn._call(dom.conn.aconn.job_lookup_by_uuid, dom.adom, job_id)
    )


def _lookup_now(dom: LocalDomain, job_id: uuid.UUID) -> LocalJob | None:
    """The job's handle from the published snapshots: an active job, or an ended one
    the store still holds and the purge keeps at the clock reading; else None (the loop
    answers, or raises NoSuchJob)."""
    if job_id == LEGACY_DOMAIN_JOB_UUID:
        return dom.legacy_job_now()
    engine = dom.conn.engine
    snaps = engine.snapshots
    snap = snaps.active.get(job_id)
    if snap is not None:
        return LocalJob(dom.conn, snap.record) if snap.record.domain == dom.name else None
    rec = snaps.jobs.get(job_id)  # before the clock: the store held it then
    if rec is None or rec.domain != dom.name or not kept(rec, engine.clock.now()):
        return None
    return LocalJob(dom.conn, rec)


def _published_job(job: BlockingJob) -> LocalJob | None:
    """The in-process job (see ``_published``) with its snapshot published (one hop the
    first time an ended job is read); None: ask the loop."""
    local = _published(job.conn, job._live(), LocalJob)
    if local is not None and not local.published:
        job.conn._call(local.publish)
    return local


def JobGetType(job: BlockingJob) -> JobType:
    return job._live().type


def JobGetUUID(job: BlockingJob) -> bytes:
    return job._live().uuid.bytes


def JobGetUUIDString(job: BlockingJob) -> str:
    return str(job._live().uuid)


def JobGetXMLDesc(job: BlockingJob, flags: int = 0) -> str:
    check_flags("JobGetXMLDesc", flags)
    local = _published_job(job)
    xml = None if local is None else local.xml_desc_now()
    return job.conn._call(job._live().xml_desc) if xml is None else xml


def JobGetInfo(job: BlockingJob) -> JobInfo:
    local = _published_job(job)
    info = None if local is None else local.info_now()
    return job.conn._call(job._live().info) if info is None else info


def JobGetStats(job: BlockingJob, flags: int = 0) -> dict[str, Any]:
    check_flags("JobGetStats", flags)
    local = _published_job(job)
    stats = None if local is None else local.stats_now()
    return job.conn._call(job._live().stats) if stats is None else stats


def JobAbort(job: BlockingJob, flags: int = 0) -> int:
    check_flags("JobAbort", flags)
    job.conn._call(job._live().abort)
    return 0


def JobPause(job: BlockingJob, flags: int = 0) -> int:
    check_flags("JobPause", flags)
    job.conn._call(job._live().pause)
    return 0


def JobResume(job: BlockingJob, flags: int = 0) -> int:
    check_flags("JobResume", flags)
    job.conn._call(job._live().resume)
    return 0


def JobComplete(job: BlockingJob, flags: int = 0) -> int:
    check_flags("JobComplete", flags)
    job.conn._call(job._live().complete)
    return 0


def JobSetSpeed(job: BlockingJob, bandwidth: int, flags: int = 0) -> int:
    check_flags("JobSetSpeed", flags)
    job.conn._call(job._live().set_speed, bandwidth)
    return 0


def JobWait(job: BlockingJob, timeout: float | None = None) -> JobInfo:
    return job.conn._call(job._live().wait, timeout)


def JobFree(job: BlockingJob) -> int:
    job.freed = True
    return 0


# groups


class BlockingJobGroup:
    """A job group handle; use the module functions (JobGroupGetJobs, …) on it."""

    def __init__(self, conn: BlockingConnection, group: JobGroup) -> None:
        self.conn = conn
        self.agroup = group

    def __repr__(self) -> str:
        return f"<BlockingJobGroup {self.agroup.uuid}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockingJobGroup) and other.agroup == self.agroup

    def __hash__(self) -> int:
        return hash(self.agroup)

    @property
    def uuid(self) -> uuid.UUID:
        return self.agroup.uuid


def JobGroupBegin(
    conn: BlockingConnection, group_xml: str | bytes, flags: int = 0
) -> BlockingJobGroup:
    """Begin a ``<jobgroup>``'s members as one: all admitted (or queued) or none."""
    return conn.JobGroupBegin(group_xml, flags)


def JobGroupExplain(
    conn: BlockingConnection, group_xml: str | bytes, flags: int = 0
) -> Explanation:
    """What ``JobGroupBegin(conn, group_xml, flags)`` would do now; changes nothing."""
    return conn.JobGroupExplain(group_xml, flags)


def JobGroupGetJobs(group: BlockingJobGroup) -> list[BlockingJob]:
    return [BlockingJob(group.conn, j) for j in group.conn._call(group.agroup.jobs)]


def JobGroupGetInfo(group: BlockingJobGroup) -> GroupInfo:
    return group.conn._call(group.agroup.info)


def JobGroupWait(group: BlockingJobGroup, timeout: float | None = None) -> GroupInfo:
    return group.conn._call(group.agroup.wait, timeout)


def JobGroupAbort(group: BlockingJobGroup) -> int:
    group.conn._call(group.agroup.abort)
    return 0


@atexit.register
def _close_open_connections() -> None:
    for conn in list(_open_connections):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            conn.close()
