"""``sim:///NAME``: the embedded simulated hypervisor, jobcore's reference driver.

Each connection owns a private simulated *world* of hosts; the host it opens holds two
running domains, ``vm1`` and ``vm2`` (disk ``vda``: 1 GiB, a 3-layer backing chain; disk
``vdb``: 512 MiB, no backing; 512 MiB of memory). Work advances at ``rate`` bytes/s of
simulated copying (``?rate=N``, default 256 MiB/s; ``rate=0`` means instant). With
``?clock=manual`` time moves only when a test calls ``clock.advance()``. Parameters are
checked when the connection opens (``rate`` finite and >= 0, ``fail_at`` in 0…1,
``clock`` real or manual): anything else is InvalidArgument naming it. ``sim:///`` (no
name) is refused. Migrations add hosts to the world, at most MAX_HOSTS in all.

One scheduler loop per connection drives every job from a heap of deadlines, so starting
a job costs O(log n) whatever the number of jobs. Failure injection: ``?fail_at=F`` makes
every job fail at fraction F of its work; ``inject_failure()`` targets the next job of a
type; ``crash()`` fails every job at once, as a hypervisor that died would.

Backup targets and scratch files follow libvirt's rule (design/xml.md): a file that exists
— a domain's disk image, an earlier backup's output, a file the host has (``files``), or a
real file at that path on this machine — is refused unless the job was begun with
VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, and then it must have the target's format and the
disk's size. The simulation never writes real files: what a job creates goes into
``files``, and leaves it again when the job fails or is aborted (scratch files always).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import os
import stat
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from attrs import define, field, frozen

from drivers.sim.clock import ManualClock, RealClock
from jobcore.backup import StoreType
from jobcore.driver import (
    DiskInfo,
    DomainInfo,
    DriverJob,
    store_exists,
    store_in_use,
    store_missing,
    store_unusable,
)
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    InvalidURI,
    NoSuchDomain,
    OperationInvalid,
    Unsupported,
)
from jobcore.log import get_logger
from jobcore.paths import PathGuard
from jobcore.spec import JobType
from jobcore.types.backup import PreparedBackup
from jobcore.types.chain import PreparedCommit, PreparedPull
from jobcore.types.migration import MigrationSpec
from jobcore.uri import URI, parse_uri

__all__ = ["ManualClock", "SimConnection", "SimDriver"]

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_RATE = 256 * MiB
PROGRESS_INTERVAL = 0.1  # seconds between progress reports of a running job
INCREMENTAL_FRACTION = 8  # an incremental backup copies 1/8 of the disk
#: simulated hosts one connection's world holds at most (its own and migration targets)
MAX_HOSTS = 64

_log = get_logger("drivers.sim")


@define
class SimDisk:
    name: str
    chain: list[str]
    virtual_size: int

    def info(self) -> DiskInfo:
        return DiskInfo(self.name, tuple(self.chain), "qcow2", self.virtual_size)


@define
class SimDomain:
    name: str
    uuid: uuid.UUID
    disks: dict[str, SimDisk]
    memory: int
    checkpoints: dict[str, tuple[str, ...]] = field(factory=dict)  # name -> disks

    def info(self) -> DomainInfo:
        return DomainInfo(
            self.name, self.uuid, tuple(d.info() for d in self.disks.values()), self.memory
        )


def default_domain(name: str) -> SimDomain:
    base = f"/var/lib/sim/{name}"
    return SimDomain(
        name,
        uuid.uuid5(uuid.NAMESPACE_URL, f"sim:{name}"),
        {
            "vda": SimDisk(
                "vda", [f"{base}/vda.qcow2", f"{base}/vda.1.qcow2", f"{base}/vda.2.qcow2"], GiB
            ),
            "vdb": SimDisk("vdb", [f"{base}/vdb.qcow2"], 512 * MiB),
        },
        512 * MiB,
    )


@frozen
class SimFile:
    """A simulated image file: its format and virtual size."""

    format: str
    virtual_size: int


QCOW2_MAGIC = b"QFI\xfb"


def probe_real_file(path: str) -> SimFile | str:
    """A real file's format and virtual size (qcow2 header, else raw), read-only and
    without following it into a FIFO or device; a string says why it is unusable."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            head = os.read(fd, 32)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if head[:4] == QCOW2_MAGIC and len(head) >= 32:
        return SimFile("qcow2", int.from_bytes(head[24:32], "big"))
    return SimFile("raw", st.st_size)


@define
class SimHost:
    name: str
    domains: dict[str, SimDomain] = field(factory=dict)
    #: backup targets and scratch files that exist on the host, by path
    files: dict[str, SimFile] = field(factory=dict)


class Phase(enum.Enum):
    COPY = "copy"  # copying; ends in completion (or ready, for converging jobs)
    READY = "ready"  # converged, waiting for complete/cancel
    FINISH = "finish"  # a completion or cancel takes effect at the next step


@define(eq=False)
class SimJob:
    job: DriverJob
    total: int
    rate: float  # effective bytes/s; math.inf when instant
    converges: bool  # goes to ready instead of completing (active commit, pull backup)
    fail_at: int | None  # bytes at which the job fails
    fail_message: str
    base_bytes: float = 0.0
    base_time: float = 0.0
    paused: bool = False
    phase: Phase = Phase.COPY
    outcome: str = "completed"  # for Phase.FINISH: completed | cancelled | failed
    version: int = 0
    extra: dict[str, int | str] = field(factory=dict)
    #: target/scratch files this job created (removed again unless a push completes)
    created: tuple[str, ...] = ()

    def processed(self, now: float) -> int:
        if self.paused or self.phase is not Phase.COPY:
            return int(self.base_bytes)
        if math.isinf(self.rate):
            return self.total
        return int(min(self.total, self.base_bytes + self.rate * max(0.0, now - self.base_time)))

    def deadline(self) -> float:
        if self.phase is Phase.FINISH:
            return self.base_time
        if self.paused or self.phase is Phase.READY:
            return math.inf
        target = self.total if self.fail_at is None else min(self.total, self.fail_at)
        if math.isinf(self.rate) or target <= self.base_bytes:
            return self.base_time
        if self.rate <= 0:
            return math.inf
        return self.base_time + (target - self.base_bytes) / self.rate


def _number_param(uri: URI, name: str, what: str, low: float, high: float) -> float | None:
    """URI parameter ``name`` as a finite number in low…high (None when absent or empty);
    InvalidArgument naming it and its value otherwise."""
    text = uri.param(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{name}={text[:80]!r} in '{uri}': it must be {what}")
    return value


@define
class _Injection:
    job_type: str | None
    at: float
    message: str


class SimConnection:
    """A connection to one simulated host (a DriverConnection)."""

    def __init__(self, uri: URI, tg: TaskGroup) -> None:
        self.uri = str(uri)
        self._tg = tg
        if not uri.name:
            raise InvalidURI(f"'{uri}' names no simulated host: write sim:///NAME")
        rate = _number_param(
            uri, "rate", "a finite number of bytes/s >= 0 (0: instant)", 0.0, math.inf
        )
        self._fail_at = _number_param(uri, "fail_at", "a fraction in 0…1", 0.0, 1.0)
        if rate is None:
            rate = float(DEFAULT_RATE)
        self.rate = math.inf if rate == 0 else rate
        clock_kind = uri.param("clock", "real")
        if clock_kind not in ("real", "manual"):
            raise InvalidArgument(
                f"clock={str(clock_kind)[:80]!r} in '{uri}': it must be 'real' or 'manual'"
            )
        self.clock: RealClock | ManualClock = (
            ManualClock() if clock_kind == "manual" else RealClock()
        )
        if isinstance(self.clock, ManualClock):
            self.clock.on_advance(self._poke)
        self.host_name = uri.name or "default"
        self.hosts: dict[str, SimHost] = {}
        #: domain name -> the host holding it (every lookup is O(1), whatever the hosts)
        self._where: dict[str, str] = {}
        self.host = self._new_host(self.host_name, seed=True)
        self.crashed = False
        self._jobs: dict[uuid.UUID, SimJob] = {}
        self._heap: list[tuple[float, int, int, SimJob]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        self._injections: list[_Injection] = []
        self._next_progress = math.inf
        self._scope = anyio.CancelScope()
        self._stopped = False

    def _new_host(self, name: str, *, seed: bool) -> SimHost:
        host = SimHost(name)
        if len(self.hosts) >= MAX_HOSTS:
            raise InvalidArgument(
                f"cannot add simulated host '{name[:80]}' to the world of '{self.uri}': it "
                f"has {len(self.hosts)} hosts, the limit (drivers.sim.MAX_HOSTS); migrate "
                "to a host it has"
            )
        if seed:
            host.domains = {n: default_domain(n) for n in ("vm1", "vm2")}
            self._where.update((n, name) for n in host.domains)
        self.hosts[name] = host
        return host

    # ---- DriverConnection: domains -------------------------------------------------

    def supports(self, job_type: JobType) -> bool:
        return job_type in (
            JobType.BACKUP,
            JobType.BLOCKPULL,
            JobType.BLOCKCOMMIT,
            JobType.MIGRATION,
        )

    async def list_domains(self) -> list[DomainInfo]:
        return [d.info() for d in self.host.domains.values()]

    async def lookup_domain(self, name: str) -> DomainInfo:
        return self._domain(name).info()

    def _domain(self, name: str) -> SimDomain:
        """A domain of this host or, once migrated, of another host of this world: the
        connection's handles follow their domains."""
        where = self._where.get(name)
        dom = None if where is None else self.hosts[where].domains.get(name)
        if dom is None:
            raise NoSuchDomain(f"domain '{name}' not found on '{self.uri}'")
        return dom

    async def create_domain(self, xml: str, *, path_guard: PathGuard | None = None) -> DomainInfo:
        raise Unsupported("the sim driver's domains are built in; createXML is for qemu")

    async def destroy_domain(self, name: str) -> None:
        self._domain(name)
        for sj in list(self._jobs.values()):
            if sj.job.domain == name:
                self._end(sj, "failed", "domain was destroyed")
        source = self.hosts[self.domain_host(name) or self.host_name]
        del source.domains[name]
        self._where.pop(name, None)

    # ---- failure injection ----------------------------------------------------------

    def inject_failure(
        self, job_type: str | None = None, at: float = 0.5, message: str = "simulated I/O error"
    ) -> None:
        """Make the next started job (of ``job_type``, if given) fail at fraction ``at``."""
        if not 0 <= at <= 1:
            raise ValueError("at is a fraction between 0 and 1")
        self._injections.append(_Injection(job_type, at, message))

    def crash(self) -> None:
        """The hypervisor dies: every job fails; starts fail until ``restart()``."""
        self.crashed = True
        for sj in list(self._jobs.values()):
            self._end(sj, "failed", "simulated hypervisor crash: the process exited")

    def restart(self) -> None:
        self.crashed = False

    # ---- backup targets ------------------------------------------------------------

    def _host_of(self, domain: str) -> SimHost:
        name = self.domain_host(domain)
        return self.hosts[name] if name is not None else self.host

    def _image_owner(self, path: str) -> str | None:
        for name, host_name in self._where.items():
            dom = self.hosts[host_name].domains[name]
            for disk in dom.disks.values():
                if path in disk.chain:
                    return f"an image of disk '{disk.name}' of domain '{dom.name}'"
        return None

    def _existing(self, host: SimHost, path: str) -> SimFile | str | None:
        """The file at ``path``: simulated, else a real one on this machine, else None."""
        known = host.files.get(path)
        if known is not None:
            return known
        if os.path.lexists(path):  # a dangling symlink exists too
            return probe_real_file(path)
        return None

    def _check_stores(self, spec: PreparedBackup, dom: SimDomain) -> list[tuple[str, SimFile]]:
        """Refuse targets/scratch files as libvirt does; return the files the job creates."""
        host = self._host_of(dom.name)
        creates: list[tuple[str, SimFile]] = []
        named: dict[str, str] = {}
        for bdisk in spec.disks:
            if bdisk.store_type is StoreType.BLOCK:
                continue  # a block device is the caller's (libvirt checks files only)
            path = bdisk.store
            if path in named:
                raise InvalidArgument(
                    f"store '{path}' is named for disks '{named[path]}' and '{bdisk.name}'"
                )
            named[path] = bdisk.name
            owner = self._image_owner(path)
            if owner is not None:
                raise store_in_use(path, bdisk.name, owner)
            fmt = bdisk.format
            size = dom.disks[bdisk.name].virtual_size
            existing = self._existing(host, path)
            if not spec.reuse_external:
                if existing is not None:
                    raise store_exists(path, bdisk.name)
                creates.append((path, SimFile(fmt, size)))
            elif existing is None:
                raise store_missing(path, bdisk.name)
            elif isinstance(existing, str):
                raise store_unusable(path, bdisk.name, existing)
            elif existing.format != fmt:
                raise store_unusable(
                    path, bdisk.name, f"its format is '{existing.format}', not '{fmt}'"
                )
            elif existing.virtual_size != size:
                raise store_unusable(
                    path,
                    bdisk.name,
                    f"its virtual size is {existing.virtual_size} bytes, "
                    f"disk '{bdisk.name}' has {size}",
                )
        return creates

    async def check_job(self, spec: Any, dom: DomainInfo) -> None:
        """Before admission: refuse a backup's existing (or unusable reused) files."""
        if isinstance(spec, PreparedBackup):
            self._check_stores(spec, self._domain(dom.name))

    # ---- DriverConnection: jobs ----------------------------------------------------

    async def start(self, job: DriverJob) -> None:
        if self.crashed:
            raise DriverError("the simulated hypervisor is not running")
        dom = self._domain(job.domain)
        # again: a queued job starts later, and files may have appeared meanwhile
        creates = self._check_stores(job.spec, dom) if isinstance(job.spec, PreparedBackup) else []
        total, converges, extra = self._plan(job.spec, dom)
        bandwidth = getattr(job.spec, "bandwidth", None)
        rate = self.rate if not bandwidth else min(self.rate, float(bandwidth))
        fail = self._take_injection(str(job.type))
        fail_at = None if fail is None else int(total * fail.at)
        sj = SimJob(
            job,
            total,
            rate,
            converges,
            fail_at,
            "" if fail is None else fail.message,
            base_time=self.clock.now(),
            extra=extra,
            created=tuple(path for path, _ in creates),
        )
        self._jobs[job.uuid] = sj
        self._host_of(dom.name).files.update(creates)
        if isinstance(job.spec, PreparedBackup) and job.spec.pull:
            sj.rate = math.inf  # the NBD export is up at once; its consumer reads at will
        job.reporter.progress(0, total, extra)
        self._schedule(sj)

    def _take_injection(self, job_type: str) -> _Injection | None:
        for i, inj in enumerate(self._injections):
            if inj.job_type in (None, job_type):
                return self._injections.pop(i)
        if self._fail_at is not None:
            return _Injection(None, self._fail_at, "simulated failure")
        return None

    def _plan(self, spec: Any, dom: SimDomain) -> tuple[int, bool, dict[str, int | str]]:
        """Bytes of work, whether the job converges to ready, and its initial extra stats."""
        if isinstance(spec, PreparedBackup):
            total = 0
            for bdisk in spec.disks:
                sim_disk = dom.disks[bdisk.name]
                incremental = bdisk.incremental
                if incremental is not None:
                    if incremental not in dom.checkpoints:
                        raise DriverError(
                            f"Checkpoint '{incremental}' for incremental "
                            f"backup of disk '{bdisk.name}' not found"
                        )
                    total += sim_disk.virtual_size // INCREMENTAL_FRACTION
                else:
                    total += sim_disk.virtual_size
            if spec.pull:
                return total, True, {"disk_temp_used": 0, "disk_temp_total": total}
            return total, False, {}
        if isinstance(spec, PreparedPull | PreparedCommit):
            disk = dom.disks[spec.disk]
            share = disk.virtual_size // max(1, len(disk.chain))
            if isinstance(spec, PreparedPull):
                return share * len(spec.merged), False, {}
            return share * len(spec.committed), spec.active, {}
        if isinstance(spec, MigrationSpec):
            dest = parse_uri(spec.destination)
            if dest.driver != "sim":
                raise DriverError(f"cannot migrate from sim to '{spec.destination}'")
            if not dest.name or dest.host or dest.transport:
                raise InvalidURI(
                    f"migration destination '{spec.destination[:200]}': a simulated host is "
                    "named sim:///NAME"
                )
            if dest.name == self.domain_host(dom.name):
                raise DriverError("the migration destination is the source host")
            target = self.hosts.get(dest.name)
            if target is not None and dom.name in target.domains:
                raise DriverError(f"domain '{dom.name}' already exists on the destination")
            if target is None and len(self.hosts) >= MAX_HOSTS:
                raise InvalidArgument(
                    f"cannot migrate to '{spec.destination[:200]}': the world of '{self.uri}' "
                    f"has {len(self.hosts)} simulated hosts, the limit (drivers.sim.MAX_HOSTS);"
                    " migrate to a host it has"
                )
            return (
                dom.memory,
                False,
                {
                    "memory_total": dom.memory,
                    "memory_processed": 0,
                    "memory_remaining": dom.memory,
                    "disk_total": 0,
                    "disk_processed": 0,
                    "disk_remaining": 0,
                },
            )
        raise Unsupported(f"sim cannot run job type '{getattr(spec, 'TYPE', '?')}'")

    def _job(self, job: DriverJob) -> SimJob:
        sj = self._jobs.get(job.uuid)
        if sj is None:
            raise OperationInvalid(f"job '{job.uuid}' is not running on '{self.uri}'")
        return sj

    def _rebase(self, sj: SimJob) -> None:
        now = self.clock.now()
        sj.base_bytes = sj.processed(now)
        sj.base_time = now

    async def cancel(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.phase, sj.outcome, sj.paused = Phase.FINISH, "cancelled", False
        self._schedule(sj)

    async def pause(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.paused = True
        self._schedule(sj)

    async def resume(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.paused = False
        self._schedule(sj)

    async def complete(self, job: DriverJob) -> None:
        sj = self._job(job)
        if sj.phase is not Phase.READY:
            raise OperationInvalid(f"job '{job.uuid}' is not ready")
        sj.base_time = self.clock.now()
        sj.phase, sj.outcome, sj.paused = Phase.FINISH, "completed", False
        self._schedule(sj)

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.rate = self.rate if not bandwidth else min(self.rate, float(bandwidth))
        self._schedule(sj)

    # ---- the scheduler loop ---------------------------------------------------------

    def _schedule(self, sj: SimJob) -> None:
        sj.version += 1
        deadline = sj.deadline()
        if not math.isinf(deadline):
            heapq.heappush(self._heap, (deadline, next(self._seq), sj.version, sj))
        if math.isinf(self._next_progress):
            self._next_progress = self.clock.now() + PROGRESS_INTERVAL
        self._poke()

    def _poke(self) -> None:
        self._wakeup.set()

    def stop(self) -> None:
        """End the scheduler loop (the connection is closing)."""
        self._stopped = True
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            if not self._stopped:
                await self._loop()

    async def _loop(self) -> None:
        while True:
            self._wakeup = anyio.Event()
            now = self.clock.now()
            while self._heap and self._heap[0][0] <= now:
                _, _, version, sj = heapq.heappop(self._heap)
                if version == sj.version and sj.job.uuid in self._jobs:
                    self._due(sj, now)
            if now >= self._next_progress:
                self._report_progress(now)
            next_at = min(self._heap[0][0] if self._heap else math.inf, self._next_progress)
            await self.clock.sleep_until(next_at, self._wakeup)

    def _report_progress(self, now: float) -> None:
        running = False
        for sj in self._jobs.values():
            if sj.phase is Phase.COPY and not sj.paused:
                running = True
                done = sj.processed(now)
                self._update_extra(sj, done)
                sj.job.reporter.progress(done, sj.total, sj.extra)
        self._next_progress = now + PROGRESS_INTERVAL if running else math.inf

    def _update_extra(self, sj: SimJob, done: int) -> None:
        if "memory_total" in sj.extra:
            sj.extra["memory_processed"] = done
            sj.extra["memory_remaining"] = sj.total - done

    def _due(self, sj: SimJob, now: float) -> None:
        if sj.phase is Phase.FINISH:
            self._end(sj, sj.outcome, None)
            return
        done = sj.processed(now)
        if sj.fail_at is not None and done >= sj.fail_at:
            self._end(sj, "failed", f"{sj.fail_message} at {done} of {sj.total} bytes")
        elif done >= sj.total:
            if sj.converges:
                sj.base_bytes, sj.phase = float(sj.total), Phase.READY
                self._update_extra(sj, sj.total)
                sj.job.reporter.progress(sj.total, sj.total, sj.extra)
                sj.job.reporter.ready()
                spec = sj.job.spec
                if isinstance(spec, PreparedCommit) and spec.pivot and sj.phase is Phase.READY:
                    sj.base_time = now
                    sj.phase, sj.outcome = Phase.FINISH, "completed"
                    self._schedule(sj)
            else:
                self._end(sj, "completed", None)
        else:  # rate or pause changed since this deadline was computed
            self._schedule(sj)

    def _end(self, sj: SimJob, outcome: str, errmsg: str | None) -> None:
        """Apply the job's effect on the simulated host and report how it ended."""
        del self._jobs[sj.job.uuid]
        sj.version += 1
        job = sj.job
        extra = dict(sj.extra)
        if outcome == "completed":
            try:
                extra.update(self._apply(job))
            except DriverError as exc:
                outcome, errmsg = "failed", str(exc)
        self._cleanup(sj, outcome)
        if outcome == "completed":
            self._update_extra(sj, sj.total)
            extra.update(sj.extra)
            job.reporter.completed(extra)
        elif outcome == "cancelled":
            job.reporter.cancelled()
        else:
            job.reporter.failed(errmsg or "failed")

    def _apply(self, job: DriverJob) -> Mapping[str, int | str]:
        spec = job.spec
        try:
            dom = self._domain(job.domain)
        except NoSuchDomain:
            raise DriverError(f"domain '{job.domain}' vanished") from None
        if isinstance(spec, PreparedBackup):
            if spec.checkpoint_name is not None:
                dom.checkpoints[spec.checkpoint_name] = tuple(d.name for d in spec.disks)
            return {}
        if isinstance(spec, PreparedPull):
            disk = dom.disks[spec.disk]
            top, base = spec.top_index, spec.base_index
            disk.chain = disk.chain[: top + 1] + ([] if base is None else disk.chain[base:])
            return {}
        if isinstance(spec, PreparedCommit):
            disk = dom.disks[spec.disk]
            disk.chain = disk.chain[: spec.top_index] + disk.chain[spec.base_index :]
            return {}
        if isinstance(spec, MigrationSpec):
            dest = parse_uri(spec.destination)
            name = dest.name
            target = self.hosts.get(name) or self._new_host(name, seed=False)
            if dom.name in target.domains:
                raise DriverError(f"domain '{dom.name}' already exists on the destination")
            source = self.hosts[self.domain_host(dom.name) or self.host_name]
            del source.domains[dom.name]
            target.domains[dom.name] = dom
            self._where[dom.name] = name
            job.reporter.domain_moved(str(dest))
            limit = spec.downtime_limit
            return {"downtime": 30 if limit is None else min(limit, 30)}
        return {}

    def _cleanup(self, sj: SimJob, outcome: str) -> None:
        spec = sj.job.spec
        if not isinstance(spec, PreparedBackup):
            return
        # files the job created: scratch files always go, push targets stay only after
        # success; reused files (REUSE_EXTERNAL) are never the job's to remove
        if spec.pull or outcome != "completed":
            files = self._host_of(sj.job.domain).files
            for path in sj.created:
                files.pop(path, None)

    def domain_host(self, name: str) -> str | None:
        """The name of the host in this world that holds domain ``name`` now."""
        return self._where.get(name)

    def job_count(self) -> int:
        return len(self._jobs)


class SimDriver:
    """The ``jobcore.drivers`` entry point for ``sim://``."""

    scheme = "sim"
    #: the query parameters SimConnection reads; any other is refused
    uri_params = frozenset({"rate", "fail_at", "clock"})
    #: what an absent parameter means (jobd compares a hello's parameters with these)
    uri_defaults = {"rate": str(DEFAULT_RATE), "clock": "real"}

    def identity(self, uri: URI) -> tuple[tuple[str, str], ...]:
        """None of sim's parameters selects another host: ``sim:///NAME`` is the host."""
        return ()

    @asynccontextmanager
    async def connect(self, uri: URI, tg: TaskGroup) -> AsyncIterator[SimConnection]:
        if uri.host:
            raise InvalidURI(f"the sim driver is local: no host allowed in '{uri}'")
        conn = SimConnection(uri, tg)
        tg.start_soon(conn.run)
        try:
            yield conn
        finally:
            conn.stop()
