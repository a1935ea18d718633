"""The in-process implementation of jobcore.api: connections that own their engine and
driver connection, and their domain and job handles (anyio; asyncio and trio).

``jobcore.connect(uri)`` yields a ``LocalConnection`` for every URI without a transport;
jobd serves its clients from these. ``conn.engine`` and ``conn.driver`` exist only here.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import attrs
from anyio.lowlevel import RunVar

from jobcore import constants as C
from jobcore.driver import DomainInfo, DriverConnection, DriverState
from jobcore.drivers import check_uri_params, load_driver
from jobcore.engine import Engine
from jobcore.errors import (
    AccessDenied,
    InvalidArgument,
    NoSuchJob,
    OperationInvalid,
    Unsupported,
)
from jobcore.events import EventFilter, EventHub, EventKind, Subscription
from jobcore.flags import check_flags
from jobcore.groups import JobGroup, JobGroups
from jobcore.handles import CheckpointHandle
from jobcore.info import Explanation, GroupInfo, HostInfo, JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import Named, as_uuid, uuid_prefix
from jobcore.paths import PathGuard
from jobcore.scheduler import PolicyTable, policy_table
from jobcore.snapshots import JobSnapshot, kept
from jobcore.spec import DEFAULT_RETENTION, MAX_INT64, ChainRef, JobType
from jobcore.store import (
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_PER_DOMAIN,
    DEFAULT_STORE_URL,
    JobRecord,
    JobStore,
    MemoryDriverState,
)
from jobcore.store_pg import open_store
from jobcore.store_sqlite import SQLiteJobStore, StoreDriverState, parse_store_url
from jobcore.types.backup import BackupJobSpec
from jobcore.types.chain import BlockCommitSpec, BlockPullSpec
from jobcore.uri import parse_uri
from jobcore.xml import format_backup, format_job, parse_backup, parse_checkpoint, parse_job
from jobcore.xml.domain import BackingDef, DiskDef, DomainDef, format_domain, parse_domain
from jobcore.xml.group import parse_group

if TYPE_CHECKING:
    from jobcore.fleet import FleetView

MiB = 1 << 20

#: XML documents (and specs that format to about as much) larger than this are parsed and
#: formatted on a worker thread: a 1 MiB document takes a few hundred milliseconds, which
#: must not stall the event loop (jobd's only one) for every other client.
XML_THREAD_BYTES = 64 * 1024
#: at most this many such documents are parsed or formatted at once per event loop, so
#: the memory their trees take stays bounded; more wait their turn
XML_THREADS = 2
_xml_limiter: RunVar[anyio.CapacityLimiter] = RunVar("jobcore_xml_limiter")

_A = TypeVar("_A")
_R = TypeVar("_R")


async def xml_work(fn: Callable[[_A], _R], arg: _A, size: int) -> _R:
    """``fn(arg)`` (a parse or format of about ``size`` bytes): inline when small, else on
    a worker thread, at most XML_THREADS at once."""
    if size <= XML_THREAD_BYTES:
        return fn(arg)
    try:
        limiter = _xml_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(XML_THREADS)
        _xml_limiter.set(limiter)
    return await anyio.to_thread.run_sync(fn, arg, limiter=limiter)


def text_weight(value: object, budget: int = XML_THREAD_BYTES) -> int:
    """About how much text ``value`` (a spec) formats to, counted only until it passes
    ``budget``: the lengths of its strings plus a little per field and item."""
    total = 0
    stack = [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 8
        elif isinstance(item, tuple | list | frozenset | set):
            stack.extend(item)
            total += 8
        elif isinstance(item, dict):
            stack.extend(item.values())
            total += 8 * len(item)
        elif attrs.has(type(item)):
            stack.extend(getattr(item, f.name) for f in attrs.fields(type(item)))  # type: ignore[arg-type]
            total += 16
        else:
            total += 8
    return total


def _doc_size(doc: str | bytes | None) -> int:
    return len(doc) if isinstance(doc, str | bytes | bytearray) else 0


class LocalConnection:
    """An open in-process connection to a hypervisor driver, owning its engine and tasks."""

    def __init__(
        self, uri: str, dconn: DriverConnection, engine: Engine, groups: JobGroups | None = None
    ) -> None:
        self.uri = uri
        self.driver = dconn
        self.engine = engine
        #: the fleet this connection's host is a member of (jobd on a PostgreSQL store
        #: sets it: jobcore.daemon.fleet.FleetService); None in-process and on other
        #: stores: the fleet calls are Unsupported
        self.fleet: FleetView | None = None
        #: the connection's job groups (jobcore.groups)
        self.groups = JobGroups(engine) if groups is None else groups

    async def lookup_domain(self, name: str) -> LocalDomain:
        info = await self.driver.lookup_domain(name)
        return LocalDomain(self, info.name, info.uuid)

    async def list_domains(self) -> list[LocalDomain]:
        return [LocalDomain(self, d.name, d.uuid) for d in await self.driver.list_domains()]

    async def create_domain(self, xml: str, *, path_guard: PathGuard | None = None) -> LocalDomain:
        """Start a domain from its XML; ``path_guard`` (jobcore.paths) sees the files the
        driver would open (disk images and their backing chains) before it opens them,
        and a driver that takes no guard is refused one."""
        create: Any = self.driver.create_domain
        if path_guard is not None and "path_guard" not in inspect.signature(create).parameters:
            raise AccessDenied(
                f"driver '{self.driver.uri}' cannot check the files a domain definition "
                "names: only jobd's own uid and root may create domains on it"
            )
        # the core parses (libvirt's domain XML, jobcore.xml.domain); the driver gets
        # the checked definition
        ddef = await xml_work(parse_domain, xml, _doc_size(xml))
        if path_guard is None:
            info = await create(ddef)
        else:
            info = await create(ddef, path_guard=path_guard)
        return LocalDomain(self, info.name, info.uuid)

    async def job_lookup_by_uuid(self, dom: Named, job: str | bytes | uuid.UUID) -> LocalJob:
        """Look a job up by UUID; ``C.LEGACY_DOMAIN_JOB_UUID`` resolves to the domain's
        legacy job at call time (the handle returned is that concrete job)."""
        job_id = as_uuid(job)
        if job_id == C.LEGACY_DOMAIN_JOB_UUID:
            rec = self.engine.legacy_job(dom.name)
            if rec is None:
                raise NoSuchJob(f"domain '{dom.name}' has no active or retained domain job")
            return LocalJob(self, rec)
        rec = self.engine.lookup(job_id)
        if rec.domain != dom.name:
            raise NoSuchJob(f"no job with UUID '{job_id}' on domain '{dom.name}'")
        return LocalJob(self, rec)

    async def lookup_job(self, job: str | bytes | uuid.UUID) -> LocalJob:
        """Look a job up by UUID on any domain of the connection (no alias here: the
        legacy domain job UUID needs a domain, see ``job_lookup_by_uuid``)."""
        job_id = as_uuid(job)
        if job_id == C.LEGACY_DOMAIN_JOB_UUID:
            raise InvalidArgument("the legacy domain job UUID names no job without a domain")
        return LocalJob(self, self.engine.lookup(job_id))

    async def find_jobs(self, prefix: str, limit: int = 16) -> list[LocalJob]:
        """Up to ``limit`` active or retained jobs whose UUID starts with ``prefix`` (hex
        digits; dashes ignored), in UUID order, found by an index: how a short form of a
        UUID is resolved (two results mean it is ambiguous)."""
        return [LocalJob(self, r) for r in self.engine.find_jobs(uuid_prefix(prefix), limit)]

    # ---- the fleet (design/fleet.md) --------------------------------------------------

    def _fleet(self) -> FleetView:
        if self.fleet is None:
            raise Unsupported(
                f"connection '{self.uri}' is not a fleet member: start jobd with "
                "--store postgresql://… (every jobd sharing that database is one)"
            )
        return self.fleet

    async def list_fleet_jobs(
        self, cursor: int = -1, limit: int = 1000
    ) -> tuple[list[JobInfo], int | None]:
        """One page of every fleet member's jobs in begin order, after ``cursor`` (-1: the
        start), and the next page's cursor (None: this was the last)."""
        if cursor < -1:
            raise InvalidArgument(f"a job page cursor is -1 (the start) or more, not {cursor}")
        if limit < 1:
            raise InvalidArgument(f"a job page holds at least one job: limit {limit}")
        return await self._fleet().jobs_page(cursor, limit)

    async def fleet_hosts(self) -> list[HostInfo]:
        """The fleet's members by name: state, lease age, job counts."""
        return await self._fleet().hosts()

    async def fence_host(self, name: str, reason: str | None = None, flags: int = 0) -> HostInfo:
        """Fence member ``name`` (refused for a LIVE one unless ``JOB_FENCE_FORCE``): its
        shared claims are released and its active jobs fail with ``reason``."""
        check_flags("fenceHost", flags)
        fleet = self._fleet()
        return await fleet.fence(name, reason, force=bool(flags & C.JOB_FENCE_FORCE))

    def subscribe(
        self,
        *,
        domain: str | None = None,
        job: uuid.UUID | None = None,
        types: Iterable[str] | None = None,
        kinds: Iterable[EventKind] | None = None,
        maxlen: int = EventHub.DEFAULT_BUFFER,
    ) -> Subscription:
        """A bounded, filtered event queue; close it (or use ``with``) when done."""
        return self.engine.subscribe(EventFilter.of(domain, job, types, kinds), maxlen)

    # groups

    async def job_group_begin(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> LocalJobGroup:
        """Begin a ``<jobgroup>``'s members as one (jobcore.groups); ``path_guard`` sees
        every member's host files, as a domain handle's guard does for JobBegin."""
        spec = await xml_work(parse_group, group_xml, _doc_size(group_xml))
        return LocalJobGroup(self, await self.groups.begin(spec, flags, path_guard=path_guard))

    async def job_group_explain(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> Explanation:
        """What ``job_group_begin(group_xml, flags)`` would do now; changes nothing."""
        spec = await xml_work(parse_group, group_xml, _doc_size(group_xml))
        return await self.groups.explain(spec, flags, path_guard=path_guard)

    async def job_group_lookup(self, group: str | bytes | uuid.UUID) -> LocalJobGroup:
        """A group of this connection by UUID (NoSuchJob once none of its members is
        retained)."""
        return LocalJobGroup(self, self.groups.lookup(as_uuid(group)))


class LocalDomain:
    """A domain handle. After a migration it follows the domain (see ``uri``)."""

    def __init__(
        self,
        conn: LocalConnection,
        name: str,
        dom_uuid: uuid.UUID,
        *,
        path_guard: PathGuard | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.uuid = dom_uuid
        #: sees the host files of every job this handle begins (jobcore.paths): jobd's
        #: handles for a client it confines carry that client's guard
        self.path_guard = path_guard

    def __repr__(self) -> str:
        return f"<Domain {self.name!r} on {self.uri!r}>"

    @property
    def uri(self) -> str:
        """The URI of the host the domain runs on now."""
        return self.conn.engine.domain_location.get(self.name, self.conn.uri)

    async def info(self) -> DomainInfo:
        return await self.conn.driver.lookup_domain(self.name)

    async def destroy(self) -> None:
        await self.conn.driver.destroy_domain(self.name)

    # ---- domain description and the QEMU monitor (slice domxml) -----------------------

    async def xml_desc(self, flags: int = 0) -> str:
        """virDomainGetXMLDesc: libvirt's domain XML of the domain as it is now, each
        disk's current backing chain nested as ``<backingStore>`` (VIR_DOMAIN_XML_INACTIVE:
        without the chains; VIR_DOMAIN_XML_SECURE changes nothing, jobcore keeps no
        secrets)."""
        check_flags("XMLDesc", flags)
        info = await self.info()
        ddef = description(info)
        inactive = bool(flags & C.VIR_DOMAIN_XML_INACTIVE)
        return await xml_work(
            lambda d: format_domain(d, inactive=inactive), ddef, text_weight(ddef)
        )

    async def is_active(self) -> bool:
        """virDomainIsActive: whether the domain runs (its hypervisor process is alive)."""
        return (await self.info()).running

    async def qemu_monitor_command(self, cmd: str, flags: int = 0) -> str:
        """libvirt-qemu's virDomainQemuMonitorCommand (design/qemu.md, "Monitor
        passthrough"): VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP, ``cmd`` is an HMP command line
        and the result its text; else ``cmd`` is a QMP command as JSON text and the result
        QEMU's JSON reply text. Drivers without a monitor raise Unsupported."""
        check_flags("qemuMonitorCommand", flags)
        if not isinstance(cmd, str) or not cmd.strip():
            raise InvalidArgument("a monitor command is a non-empty string")
        run = getattr(self.conn.driver, "monitor_command", None)
        if run is None:
            scheme = self.conn.uri.split(":", 1)[0]
            raise Unsupported(
                f"the {scheme} driver has no QEMU monitor: qemuMonitorCommand needs a "
                "qemu:/// connection"
            )
        result: str = await run(
            self.name, cmd, hmp=bool(flags & C.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        )
        return result

    async def job_begin(self, job_xml: str | bytes, flags: int = 0) -> LocalJob:
        """Parse a ``<job>`` document and begin it (JobBegin)."""
        check_flags("JobBegin", flags)  # the bits of any type; the engine checks the type's
        spec = await xml_work(parse_job, job_xml, _doc_size(job_xml))
        return await self.job_begin_spec(spec, flags)

    async def job_begin_spec(self, spec: Any, flags: int = 0) -> LocalJob:
        """Begin a job from a typed spec (what ``job_begin`` does after parsing); the
        engine refuses flag bits the spec's type does not accept (jobcore.flags). The
        handle's ``path_guard`` sees the host files the prepared spec names."""
        rec = await self.conn.engine.begin(self.name, spec, flags, path_guard=self.path_guard)
        return LocalJob(self.conn, rec)

    # explain
    async def job_explain(self, job_xml: str | bytes, flags: int = 0) -> Explanation:
        """What ``job_begin(job_xml, flags)`` would do now; changes nothing (the same
        checks as begin, the handle's path guard included, and the scheduler's verdict)."""
        check_flags("JobBegin", flags)
        spec = await xml_work(parse_job, job_xml, _doc_size(job_xml))
        return await self.conn.engine.explain(self.name, spec, flags, path_guard=self.path_guard)

    async def list_jobs(self) -> list[LocalJob]:
        """Active and retained jobs of the domain, in the order they began."""
        return [LocalJob(self.conn, r) for r in self.conn.engine.domain_jobs(self.name)]

    # ---- legacy calls (libvirt-python virDomain methods) -----------------------------

    def _legacy_active(self) -> JobRecord | None:
        rec = self.conn.engine.legacy_job(self.name)
        return rec if rec is not None and rec.state.active else None

    async def job_info(self) -> list[int]:
        """virDomainGetJobInfo: [type, timeElapsed, timeRemaining, dataTotal,
        dataProcessed, dataRemaining, memTotal, memProcessed, memRemaining, fileTotal,
        fileProcessed, fileRemaining]."""
        rec = self._legacy_active()
        return legacy_job_info(None if rec is None else self.conn.engine.stats(rec))

    async def job_stats(self, flags: int = 0) -> dict[str, Any]:
        """virDomainGetJobStats: the legacy job's stats, or with
        VIR_DOMAIN_JOB_STATS_COMPLETED the last ended one's (read once unless
        VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)."""
        check_flags("jobStats", flags)
        engine = self.conn.engine
        if not flags & C.VIR_DOMAIN_JOB_STATS_COMPLETED:
            rec = self._legacy_active()
            return {"type": C.VIR_DOMAIN_JOB_NONE} if rec is None else engine.stats(rec)
        rec = engine.legacy_job(self.name)
        if rec is None or rec.state.active or rec.legacy_stats_read:
            return {"type": C.VIR_DOMAIN_JOB_NONE}
        if not flags & C.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED:
            rec.legacy_stats_read = True
        return engine.stats(rec)

    async def abort_job(self) -> int:
        """virDomainAbortJob: abort the legacy job (a pull-mode backup serving its export
        ends successfully, as in libvirt)."""
        rec = self._legacy_active()
        if rec is None:
            raise OperationInvalid("no job is active on the domain")
        await self.conn.engine.abort(rec)
        return 0

    async def backup_begin(
        self, backup_xml: str | None, checkpoint_xml: str | None = None, flags: int = 0
    ) -> int:
        """virDomainBackupBegin; VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL reuses existing
        target/scratch files (without it, an existing one is refused)."""
        check_flags("backupBegin", flags)
        backup_doc = backup_xml or "<domainbackup/>"
        backup = await xml_work(parse_backup, backup_doc, _doc_size(backup_doc))
        checkpoint = (
            None
            if checkpoint_xml is None
            else await xml_work(parse_checkpoint, checkpoint_xml, _doc_size(checkpoint_xml))
        )
        await self.job_begin_spec(BackupJobSpec(backup, checkpoint), flags)
        return 0

    async def backup_get_xml_desc(self, flags: int = 0) -> str:
        check_flags("backupGetXMLDesc", flags)
        rec = self._legacy_active()
        if rec is None or not isinstance(rec.spec, BackupJobSpec):
            raise NoSuchJob("no domain backup job present")
        backup = rec.spec.backup
        return await xml_work(format_backup, backup, text_weight(backup))

    def _chain_job(self, disk: str) -> JobRecord | None:
        return self.conn.engine.store.chain_job(self.name, disk)

    async def block_job_info(self, disk: str, flags: int = 0) -> dict[str, int]:
        """virDomainGetBlockJobInfo: {'type', 'bandwidth', 'cur', 'end'}, or {} when the
        disk has no block job; a disk the domain does not have is an InvalidArgument."""
        check_flags("blockJobInfo", flags)
        rec = self._chain_job(disk)
        if rec is None:
            await self._require_disk(disk)
            return {}
        return block_job_values(rec.spec, rec.bandwidth, rec.processed, rec.total, rec.state, flags)

    # ---- the read-only legacy queries from published snapshots (jobcore.snapshots) -----
    #
    # Plain functions, safe on any thread: each answers as its coroutine above would, or
    # returns None where only the loop can (snapshots off, a write, the driver needed).

    def job_info_now(self) -> list[int] | None:
        """``job_info()`` from the published snapshots."""
        engine = self.conn.engine
        if not engine.snapshots.on:
            return None
        now = engine.clock.now()  # before the snapshot: see jobcore.snapshots
        snap = engine.snapshots.legacy.get(self.name)
        return legacy_job_info(None if snap is None else snap.stats_at(now))

    def job_stats_now(self, flags: int = 0) -> dict[str, Any] | None:
        """``job_stats(flags)`` from the published snapshots; None with
        VIR_DOMAIN_JOB_STATS_COMPLETED (it may mark the stats read, and it reads ended
        jobs, which the store's purge decides about)."""
        if flags:
            check_flags("jobStats", flags)
            if flags & C.VIR_DOMAIN_JOB_STATS_COMPLETED:
                return None
        engine = self.conn.engine
        snapshots = engine.snapshots
        if not snapshots.on:
            return None
        now = engine.clock.now()  # before the snapshot: see jobcore.snapshots
        snap = snapshots.legacy.get(self.name)
        return {"type": C.VIR_DOMAIN_JOB_NONE} if snap is None else snap.stats_at(now)

    def block_job_info_now(self, disk: str, flags: int = 0) -> dict[str, int] | None:
        """``block_job_info(disk, flags)`` from the published snapshots; None when the
        disk has no block job (whether the domain has the disk is the driver's to say)."""
        check_flags("blockJobInfo", flags)
        engine = self.conn.engine
        if not engine.snapshots.on:
            return None
        snap = engine.snapshots.chain.get((self.name, disk))
        if snap is None:
            return None
        info = snap.info
        return block_job_values(
            snap.spec, info.bandwidth, info.processed, info.total, info.state, flags
        )

    def legacy_job_now(self) -> LocalJob | None:
        """The handle ``job_lookup_by_uuid(LEGACY_DOMAIN_JOB_UUID)`` returns, from the
        published snapshots: the active domain job, else (the domain's list published)
        the last ended one while the purge keeps it; None: ask the loop."""
        engine = self.conn.engine
        snaps = engine.snapshots
        if not snaps.on:
            return None
        listed = snaps.domains.get(self.name)  # before the alias: see list_jobs_now
        snap = snaps.legacy.get(self.name)
        if snap is not None:
            return LocalJob(self.conn, snap.record)
        if listed is None or listed.last_ended is None:
            return None
        now = engine.clock.now()
        if snaps.domains.get(self.name) is not listed or not kept(listed.last_ended, now):
            return None  # it changed meanwhile, or the purge forgets it: the loop says
        return LocalJob(self.conn, listed.last_ended)

    def list_jobs_now(self) -> list[LocalJob] | None:
        """``list_jobs()`` from the published snapshots; None until the domain's list is
        published (``publish_jobs``) or when it changed during the call.

        The list is read before and after the clock: the same publication both times
        means the store held exactly its jobs at the clock reading, and the loop's
        purge at that reading keeps those whose deadline is later."""
        engine = self.conn.engine
        snaps = engine.snapshots
        if not snaps.on:
            return None
        listed = snaps.domains.get(self.name)
        if listed is None:
            return None
        now = engine.clock.now()
        if snaps.domains.get(self.name) is not listed:
            return None
        jobs: list[LocalJob] = []
        for rec in listed.jobs:
            keep = kept(rec, now)
            if keep is None:
                return None
            if keep:
                jobs.append(LocalJob(self.conn, rec))
        return jobs

    async def publish_jobs(self) -> None:
        """Publish the domain's job list from now on (then ``list_jobs_now`` answers)."""
        self.conn.engine.publish_domain(self.name)

    async def _require_disk(self, disk: str) -> None:
        if (await self.info()).disk(disk) is None:
            raise InvalidArgument(f"disk '{disk}' not found in domain '{self.name}'")

    async def block_job_abort(self, disk: str, flags: int = 0) -> int:
        check_flags("blockJobAbort", flags)
        rec = self._chain_job(disk)
        if rec is None:
            await self._require_disk(disk)
            raise OperationInvalid(f"disk '{disk}' does not have an active block job")
        engine = self.conn.engine
        if flags & C.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            if rec.state not in (JobState.READY, JobState.STANDBY):
                raise OperationInvalid(
                    f"block job '{rec.uuid}' not ready for pivot yet",
                    job=rec.uuid,
                    state=str(rec.state),
                    verb="complete",
                )
            await engine.complete(rec)
        else:
            await engine.abort(rec)
        if not flags & C.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC:
            await engine.wait(rec)
        return 0

    async def block_pull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int:
        check_flags("blockPull", flags)
        await self.job_begin_spec(
            BlockPullSpec(
                disk,
                bandwidth=_bandwidth(bandwidth, flags, C.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES),
            )
        )
        return 0

    async def block_commit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        check_flags("blockCommit", flags)
        info = await self.info()
        chain = info.disk(disk)
        top_ref = None if top is None else ChainRef(file=top)
        if (
            chain is not None
            and (top is None or top == chain.source)
            and not flags & C.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        ):
            raise InvalidArgument(
                "commit of the active layer requires VIR_DOMAIN_BLOCK_COMMIT_ACTIVE"
            )
        await self.job_begin_spec(
            BlockCommitSpec(
                disk,
                top=top_ref,
                base=None if base is None else ChainRef(file=base),
                delete=bool(flags & C.VIR_DOMAIN_BLOCK_COMMIT_DELETE),
                shallow=bool(flags & C.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW),
                bandwidth=_bandwidth(bandwidth, flags, C.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES),
            )
        )
        return 0

    # ---- checkpoints (jobcore.checkpoints) ---------------------------------------------

    async def checkpoint_create(self, xml: str, flags: int = 0) -> LocalCheckpoint:
        """virDomainCheckpointCreateXML: a new checkpoint (its bitmaps created at once on
        every disk it covers), or with REDEFINE the metadata of one whose bitmaps exist."""
        check_flags("checkpointCreateXML", flags)
        defn = await xml_work(parse_checkpoint, xml, _doc_size(xml))
        engine = self.conn.engine
        rec = await engine.checkpoints.create(await self.info(), defn, flags, engine.clock.wall())
        return LocalCheckpoint(self, rec.name)

    async def list_checkpoints(self, flags: int = 0) -> list[LocalCheckpoint]:
        """virDomainListAllCheckpoints: in creation order, LIST_* filters applied."""
        check_flags("listAllCheckpoints", flags)
        await self.info()  # NoSuchDomain
        return [
            LocalCheckpoint(self, r.name)
            for r in self.conn.engine.checkpoints.listed(self.name, flags)
        ]

    async def checkpoint_lookup(self, name: str) -> LocalCheckpoint:
        """virDomainCheckpointLookupByName; NoSuchCheckpoint if there is none."""
        await self.info()
        return LocalCheckpoint(self, self.conn.engine.checkpoints.get(self.name, name).name)


class LocalCheckpoint(CheckpointHandle):
    """A handle on a checkpoint of a domain (its name: the record is looked up per call)."""

    _dom: LocalDomain

    def __init__(self, dom: LocalDomain, name: str) -> None:
        super().__init__(dom, name)

    async def xml_desc(self, flags: int = 0) -> str:
        check_flags("checkpointGetXMLDesc", flags)
        checkpoints = self._dom.conn.engine.checkpoints
        return await checkpoints.xml_desc(await self._dom.info(), self._name, flags)

    async def parent(self) -> LocalCheckpoint | None:
        await self._dom.info()
        rec = self._dom.conn.engine.checkpoints.get(self.domain, self._name)
        return None if rec.parent is None else LocalCheckpoint(self._dom, rec.parent)

    async def delete(self, flags: int = 0) -> None:
        check_flags("checkpointDelete", flags)
        checkpoints = self._dom.conn.engine.checkpoints
        await checkpoints.delete(await self._dom.info(), self._name, flags)


def description(info: DomainInfo) -> DomainDef:
    """The definition a domain's XMLDesc shows: what its driver says of it now."""
    disks = tuple(
        DiskDef(
            d.name,
            d.source,
            d.format,
            d.bus,
            tuple(BackingDef(f, d.layer_format(i)) for i, f in enumerate(d.chain[1:], 1)),
        )
        for d in info.disks
    )
    return DomainDef(info.name, info.uuid, info.memory, disks, info.virt_type)


def legacy_job_info(st: Mapping[str, Any] | None) -> list[int]:
    """virDomainGetJobInfo's 12 numbers from the legacy job's stats (None: no job)."""
    if st is None:
        return [C.VIR_DOMAIN_JOB_NONE] + [0] * 11
    mem = [st.get(f"memory_{k}", 0) for k in ("total", "processed", "remaining")]
    disk = [st.get(f"disk_{k}", 0) for k in ("total", "processed", "remaining")]
    data = [m + d for m, d in zip(mem, disk, strict=True)]
    return [st["type"], st["time_elapsed"], 0, *data, *mem, *disk]


def block_job_values(
    spec: Any, bandwidth: int | None, processed: int, total: int, state: JobState, flags: int
) -> dict[str, int]:
    """virDomainGetBlockJobInfo's {'type', 'bandwidth', 'cur', 'end'} of a block job."""
    if isinstance(spec, BlockPullSpec):
        kind = C.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    elif isinstance(spec, BlockCommitSpec) and spec.active:
        kind = C.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    else:
        kind = C.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT
    bandwidth = bandwidth or 0
    if not flags & C.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES:
        bandwidth //= MiB
    cur, end = processed, total
    if end == 0:  # as libvirt: never show a finished-looking 0/0 for a live job
        cur, end = (1, 1) if state in (JobState.READY, JobState.STANDBY) else (0, 1)
    elif cur == end and state not in (JobState.READY, JobState.STANDBY):
        cur -= 1
    return {"type": kind, "bandwidth": bandwidth, "cur": cur, "end": end}


def _bandwidth(value: int, flags: int, bytes_flag: int) -> int | None:
    if value < 0:
        raise InvalidArgument("bandwidth must not be negative")
    if value == 0:
        return None
    if flags & bytes_flag:
        if value > MAX_INT64:
            raise InvalidArgument(
                f"bandwidth {value} bytes/s is too large: the maximum is {MAX_INT64} bytes/s"
            )
        return value
    if value > MAX_INT64 // MiB:
        raise InvalidArgument(
            f"bandwidth {value} MiB/s is too large: the maximum is {MAX_INT64 // MiB} MiB/s"
            " (pass the BANDWIDTH_BYTES flag for bytes/s)"
        )
    return value * MiB


class LocalJob:
    """A handle on one concrete job. ``uuid`` and ``type`` need no round trip."""

    def __init__(self, conn: LocalConnection, rec: JobRecord) -> None:
        self.conn = conn
        self._rec = rec
        self.uuid: uuid.UUID = rec.uuid
        self.type: JobType = rec.type
        self.domain: str = rec.domain

    def __repr__(self) -> str:
        return f"<Job {self.uuid} {self.type} on {self.domain!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalJob) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    @property
    def state(self) -> JobState:
        return self._rec.state

    async def info(self) -> JobInfo:
        return self.conn.engine.info(self._rec)

    async def stats(self) -> dict[str, Any]:
        return self.conn.engine.stats(self._rec)

    # the read-only queries from the published snapshot, on any thread (jobcore.snapshots);
    # None until the job has one (``publish``)

    def _now_and_snapshot(self) -> tuple[float, JobSnapshot | None]:
        engine = self.conn.engine
        if not engine.snapshots.on:
            return 0.0, None
        now = engine.clock.now()  # before the snapshot: see jobcore.snapshots
        snap: JobSnapshot | None = self._rec.snapshot
        return now, snap

    def info_now(self) -> JobInfo | None:
        """``info()`` from the published snapshot."""
        now, snap = self._now_and_snapshot()
        return None if snap is None else snap.info_at(now)

    def stats_now(self) -> dict[str, Any] | None:
        """``stats()`` from the published snapshot."""
        now, snap = self._now_and_snapshot()
        return None if snap is None else snap.stats_at(now)

    def xml_desc_now(self) -> str | None:
        """``xml_desc()`` from the published snapshot (formatted on the calling thread)."""
        _, snap = self._now_and_snapshot()
        if snap is None:
            return None
        spec = attrs.evolve(snap.spec, uuid=self.uuid)
        return format_job(spec, state=str(snap.info.state))

    @property
    def published(self) -> bool:
        """The job has a published snapshot (then the ``*_now`` calls answer)."""
        return self._rec.snapshot is not None

    async def publish(self) -> None:
        """Give the job a published snapshot if it has none (an ended job nobody read
        since the snapshots started); nothing while they are off."""
        self.conn.engine.snapshot(self._rec)

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """Until the job ends; returns its final info. TimeoutError after ``timeout``."""
        return await self.conn.engine.wait(self._rec, timeout)

    async def abort(self) -> None:
        await self.conn.engine.abort(self._rec)

    async def pause(self) -> None:
        await self.conn.engine.pause(self._rec)

    async def resume(self) -> None:
        await self.conn.engine.resume(self._rec)

    async def complete(self) -> None:
        await self.conn.engine.complete(self._rec)

    async def set_speed(self, bandwidth: int | None) -> None:
        """Bandwidth in bytes/s; None or 0 lifts the limit."""
        await self.conn.engine.set_speed(self._rec, bandwidth or None)

    async def xml_desc(self) -> str:
        """The job XML with its UUID, its state and the effective (aligned, defaulted)
        values; it parses back into the same spec."""
        rec = self._rec
        spec = attrs.evolve(rec.spec, uuid=rec.uuid)
        state = str(rec.state)
        return await xml_work(lambda s: format_job(s, state=state), spec, text_weight(spec))

    def events(self, maxlen: int = EventHub.DEFAULT_BUFFER) -> Subscription:
        return self.conn.subscribe(job=self.uuid, maxlen=maxlen)

    # explain
    async def explain(self) -> Explanation:
        """A queued job: what it waits for and its position; an admitted one: ``admit``."""
        return self.conn.engine.explain_job(self._rec)


# groups


class LocalJobGroup:
    """A handle on a job group (jobcore.groups.JobGroup). ``uuid`` needs no round trip."""

    def __init__(self, conn: LocalConnection, group: JobGroup) -> None:
        self.conn = conn
        self._group = group
        self.uuid: uuid.UUID = group.uuid

    def __repr__(self) -> str:
        return f"<JobGroup {self.uuid} {self._group.mode}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalJobGroup) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    async def jobs(self) -> list[LocalJob]:
        return [LocalJob(self.conn, rec) for rec in self._group.records]

    async def info(self) -> GroupInfo:
        return self._group.info()

    async def wait(self, timeout: float | None = None) -> GroupInfo:
        return await self._group.wait(timeout)

    async def abort(self) -> None:
        await self._group.abort()


@asynccontextmanager
async def connect_local(
    uri: str,
    *,
    retention: float = DEFAULT_RETENTION,
    max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
    max_retained: int = DEFAULT_MAX_RETAINED,
    store: str | None = None,
    keep_jobs: bool | None = None,
    scope: str | None = None,
    host: str | None = None,
    policy: str | PolicyTable | None = None,
) -> AsyncIterator[LocalConnection]:
    """Open an in-process connection (``jobcore.connect`` documents the arguments);
    everything it started is cancelled when the block exits. Closing fails the jobs still
    active, unless ``keep_jobs`` (default: whether the store is durable) and the driver
    recovers them at the next open (design/store.md "Recovery"). A durable store keeps
    the jobs under ``scope`` (default: the URI without its query; jobd names its driver
    connection's identity) with ``uri`` as what reopens them. ``policy``: the conflict
    policy table, by name (``scheduler.POLICY_TABLES``) or as one (default: no rule)."""
    table = None if policy is None else policy_table(policy)  # InvalidArgument if bad
    parsed = parse_uri(uri)
    store_url = DEFAULT_STORE_URL if store is None else store
    durable = parse_store_url(store_url).kind != "memory"  # InvalidArgument if malformed
    driver = load_driver(parsed)
    check_uri_params(driver, parsed)
    jstore: JobStore | None = None
    if durable:  # opening checks and loads the file: off the event loop
        jstore = await anyio.to_thread.run_sync(
            functools.partial(
                open_store,
                store_url,
                scope=f"{parsed.driver}://{parsed.host}{parsed.path}" if scope is None else scope,
                max_retained_per_domain=max_retained_per_domain,
                max_retained=max_retained,
                host=host,
            )
        )
        if isinstance(jstore, SQLiteJobStore):
            jstore.save_scope_uri(uri)  # what reopens it
    state: DriverState | None = None
    if getattr(driver, "persistent_state", False):
        state = jstore.driver_state() if isinstance(jstore, SQLiteJobStore) else MemoryDriverState()
    # the checkpoints' records (jobcore.checkpoints): in the store, beside the driver's
    checkpoint_state = (
        jstore.driver_state() if isinstance(jstore, SQLiteJobStore) else MemoryDriverState()
    )
    try:
        async with anyio.create_task_group() as tg:
            opened = (
                driver.connect(parsed, tg)
                if state is None
                else driver.connect(  # type: ignore[call-arg]
                    parsed, tg, state=state
                )
            )
            async with opened as dconn:
                engine = Engine(
                    dconn,
                    tg,
                    store=jstore,
                    retention=retention,
                    max_retained_per_domain=max_retained_per_domain,
                    max_retained=max_retained,
                    checkpoint_state=checkpoint_state,
                    host=host,
                    policy=table,
                )
                engine.driver_state_durable = isinstance(state, StoreDriverState)
                try:
                    # the groups' hooks first: a member's recovery may hold its completion
                    groups = JobGroups(engine, before_recovery=True)
                    await engine.recover()  # before anything is served
                    groups.restored()
                    yield LocalConnection(uri, dconn, engine, groups)
                finally:
                    engine.close(keep_jobs=durable if keep_jobs is None else keep_jobs)
                    await engine.drain()
            tg.cancel_scope.cancel()
    except ExceptionGroup as group:
        # one error (the caller's, or the driver's) comes out as itself, not wrapped
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if isinstance(jstore, SQLiteJobStore):
            jstore.close()


def as_local(conn: object) -> LocalConnection:
    """``conn`` as the in-process connection it is (its ``engine`` and ``driver``, for
    tests and tools); TypeError for a connection served by jobd."""
    if not isinstance(conn, LocalConnection):
        raise TypeError(f"{conn!r} is not an in-process connection (jobcore.local)")
    return conn
