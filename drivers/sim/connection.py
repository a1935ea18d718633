"""The sim driver's connection (a DriverConnection over its simulated world) and SimDriver.

One scheduler loop per connection drives every job from a heap of deadlines, so starting
a job costs O(log n) whatever the number of jobs. What each job type does to the world is
its family's Behaviour (``backup``, ``chain``, ``migration``), picked from ``_BEHAVIOURS``.
Failure injection: ``?fail_at=F`` makes every job fail at fraction F of its work;
``inject_failure()`` targets the next job of a type; ``crash()`` fails every job at once,
as a hypervisor that died would.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskGroup
from attrs import define

from drivers.sim import backup, chain, migration
from drivers.sim.clock import ManualClock, RealClock
from drivers.sim.job import Behaviour, Phase, SimJob
from drivers.sim.persist import (
    SimState,
    dump_domain,
    job_key,
    load_domain,
    restore_job,
    sim_job_key,
)
from drivers.sim.world import MiB, SimDomain, SimFile, SimWorld, define_domain
from jobcore.driver import (
    BitmapInfo,
    BitmapRemoval,
    Concluded,
    DomainInfo,
    DriverJob,
    DriverState,
    FleetPeers,
    NotStarted,
    Reattached,
    Recovered,
    Vanished,
)
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    InvalidURI,
    JobError,
    NoSuchDomain,
    OperationInvalid,
    StoreError,
    Unsupported,
)
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.paths import PathGuard
from jobcore.spec import JobType
from jobcore.types.backup import PreparedBackup
from jobcore.types.chain import PreparedCommit
from jobcore.types.migration import MigrationSpec
from jobcore.uri import URI, parse_uri
from jobcore.xml.domain import DomainDef

log = get_logger(__name__)

DEFAULT_RATE = 256 * MiB
_TERMINAL = {
    "completed": JobState.COMPLETED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
}
PROGRESS_INTERVAL = 0.1  # seconds between progress reports of a running job
#: seconds between attempts to hand a migrated domain to its member (doubling up to MAX)
HANDOVER_RETRY = 0.5
HANDOVER_RETRY_MAX = 5.0
#: seconds the sweep of ended jobs' records waits after one round (gathering the next)
SWEEP_PAUSE = 0.05
#: seconds a backup's check_job stands for its start, on an unchanged world
RECHECK_AFTER = 1.0
#: what each job type does to the world
_BEHAVIOURS: dict[JobType, Behaviour] = {
    JobType.BACKUP: backup.BEHAVIOUR,
    JobType.BLOCKPULL: chain.BEHAVIOUR,
    JobType.BLOCKCOMMIT: chain.BEHAVIOUR,
    JobType.MIGRATION: migration.BEHAVIOUR,
}


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


def _loop_call_soon() -> Callable[[Callable[[], object]], object]:
    """Run a callback soon on the running event loop (asyncio or trio), from its thread."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return asyncio.get_running_loop().call_soon


class SimConnection:
    """A connection to one simulated host (a DriverConnection)."""

    #: a job due at once runs in a loop callback (False: through the deadline heap and a
    #: wake-up of the scheduler loop's task, as every job did before; tests compare both)
    due_now_callback = True

    def __init__(self, uri: URI, tg: TaskGroup, state: DriverState | None = None) -> None:
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
        self.host_name = uri.name or "default"
        #: where the world and the jobs are saved (None: they live as long as the
        #: connection; so with a state that is not durable, the memory store's: its
        #: records could only be read by a later process, and none will read them)
        durable = state is not None and getattr(state, "durable", True) is not False
        self._persist = SimState(state) if durable and state is not None else None
        self.clock: RealClock | ManualClock = RealClock()
        if clock_kind == "manual":  # goes on from the reading the last process saved
            saved = None if self._persist is None else self._persist.saved_clock()
            self.clock = ManualClock() if saved is None else ManualClock(*saved)
            self.clock.on_advance(self._poke)
            if self._persist is not None:
                self.clock.on_advance(self._save_clock)
        saved_hosts, self._saved_jobs = ({}, {}) if self._persist is None else self._persist.load()
        self.world = SimWorld(self.uri, self.host_name, saved=saved_hosts, persist=self._persist)
        #: the connection's own host
        self.host = self.world.home
        self.crashed = False
        self._jobs: dict[uuid.UUID, SimJob] = {}
        self._heap: list[tuple[float, int, int, SimJob]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        #: jobs due at once (an instant job's end, a verb's effect), with their versions:
        #: run by one loop callback, not by a wake-up of the scheduler loop's task
        self._due_now: list[tuple[int, SimJob]] = []
        #: a callback that runs ``_due_now`` is queued on the loop
        self._due_now_called = False
        self._call_soon = _loop_call_soon()
        #: what a callback of ``_due_now`` raised: the scheduler loop raises it
        self._failure: BaseException | None = None
        self._injections: list[_Injection] = []
        self._next_progress = math.inf
        self._scope = anyio.CancelScope()
        self._stopped = False
        #: ended jobs whose records go once the store has the engine's terminal write too
        #: (their records' keys)
        self._ended: list[str] = []
        self._sweep_wakeup = anyio.Event()
        #: the last check_job of a backup: (spec, world version, monotonic time, creates)
        self._checked: tuple[PreparedBackup, int, float, list[tuple[str, SimFile]]] | None = None
        #: domains handed to other fleet members and not yet taken in, by name
        self._handovers: dict[str, dict[str, Any]] = (
            {} if self._persist is None else self._persist.handovers()
        )
        self._delivering: set[str] = set()
        self._peers: FleetPeers | None = None

    # ---- the fleet: migrations to another member (design/sim.md "Fleets") -----------

    @property
    def fleet_peers(self) -> FleetPeers | None:
        """The fleet's other members (jobd sets it when it is a member): a migration to
        ``sim:///NAME`` where NAME is one of them hands the domain over to it."""
        return self._peers

    @fleet_peers.setter
    def fleet_peers(self, peers: FleetPeers | None) -> None:
        self._peers = peers
        for name in list(self._handovers):  # the hand-overs a previous process left
            self._deliver_soon(name)

    async def _handover_target(self, spec: MigrationSpec) -> str | None:
        """The fleet member a migration goes to (None: a simulated host of this world)."""
        if self._peers is None:
            return None
        dest = parse_uri(spec.destination)
        if dest.driver != "sim" or not dest.name or dest.host or dest.transport:
            return None  # plan says what is wrong with it
        return dest.name if dest.name in await self._peers.members() else None

    def _hand_over(self, sj: SimJob, dom: SimDomain, host: str) -> dict[str, int | str]:
        """A completed migration to member ``host``: the domain leaves this world (saved
        with the job's end) and a hand-over record goes to ``host`` until it has it."""
        source = self.world.host_of(dom.name)
        del source.domains[dom.name]
        self.world.where.pop(dom.name, None)
        self.world.changed(source)
        self._handovers[dom.name] = value = {
            "host": host,
            "uri": self.uri,
            "domain": dom.name,
            "record": dump_domain(dom),
        }
        if self._persist is not None:
            self._persist.handover(dom.name, value)
        self._deliver_soon(dom.name)
        sj.job.reporter.domain_moved(f"sim:///{host}")
        assert isinstance(sj.job.spec, MigrationSpec)
        limit = sj.job.spec.downtime_limit
        return {"downtime": 30 if limit is None else min(limit, 30)}

    def _deliver_soon(self, name: str) -> None:
        if self._peers is not None and name not in self._delivering and not self._stopped:
            self._delivering.add(name)
            self._tg.start_soon(self._deliver, name)

    async def _deliver(self, name: str) -> None:
        """Hand the domain to its member, retrying while it or the database cannot be
        reached; a refusal is logged and the record kept (an operator decides)."""
        delay = HANDOVER_RETRY
        try:
            while (value := self._handovers.get(name)) is not None and self._peers is not None:
                host = value["host"]
                try:
                    await self._peers.adopt(host, value["uri"], value["domain"], value["record"])
                except (StoreError, OperationInvalid) as exc:
                    log.info(
                        "domain hand-over waits", domain=name, host=value["host"], error=str(exc)
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, HANDOVER_RETRY_MAX)
                    continue
                except JobError as exc:
                    log.error(
                        "domain hand-over refused", domain=name, host=value["host"], error=str(exc)
                    )
                    return
                log.info("domain handed over", domain=name, host=host)
                del self._handovers[name]
                if self._persist is not None:
                    self._persist.handover_done(name)
                return
        finally:
            self._delivering.discard(name)

    async def adopt_domain(self, name: str, record: dict[str, Any]) -> None:
        """Take in a domain another member's migration handed over (on this
        connection's own host), durable before it returns; again for the same domain is
        a no-op."""
        try:
            dom = load_domain(name, record)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidArgument(f"not a simulated domain's record: {exc}") from None
        held = self.world.where.get(name)
        if held is not None:
            if self.world.domain(name).uuid == dom.uuid:
                return  # taken in before (its answer was lost)
            raise DriverError(f"domain '{name}' already exists on '{self.uri}'")
        self.host.domains[name] = dom
        self.world.where[name] = self.host.name
        self.world.changed(self.host)
        log.info("domain taken in from another member", domain=name)
        if self._persist is not None:
            await self._persist.state.sync()

    # ---- DriverConnection: domains -------------------------------------------------

    def supports(self, job_type: JobType) -> bool:
        return job_type in _BEHAVIOURS

    async def list_domains(self) -> list[DomainInfo]:
        return [d.info() for d in self.host.domains.values()]

    async def lookup_domain(self, name: str) -> DomainInfo:
        return self.world.domain_info(name)

    async def create_domain(
        self, ddef: DomainDef, *, path_guard: PathGuard | None = None
    ) -> DomainInfo:
        """A simulated domain on this host whose disks are the files ``ddef`` names
        (drivers.sim.world.define_domain says which files and how)."""
        if self.crashed:
            raise DriverError("the simulated hypervisor is not running")
        dom, created = define_domain(self.world, self.host, ddef, path_guard)
        self.world.add_files(self.host, created)
        self.host.domains[dom.name] = dom
        self.world.where[dom.name] = self.host.name
        self.world.changed(self.host)
        log.info("domain created", domain=dom.name, disks=list(dom.disks))
        return dom.info()

    async def destroy_domain(self, name: str) -> None:
        self.world.domain(name)
        for sj in list(self._jobs.values()):
            if sj.job.domain == name:
                self._end(sj, "failed", "domain was destroyed")
        source = self.world.hosts[self.world.domain_host(name) or self.host_name]
        del source.domains[name]
        self.world.where.pop(name, None)
        self.world.changed(source)

    # ---- checkpoints' bitmaps (jobcore.driver; jobcore.checkpoints keeps the rest) ------

    async def bitmaps(self, domain: str) -> dict[str, list[BitmapInfo]]:
        """Each disk's simulated bitmaps; a bitmap's dirty bytes are what an incremental
        backup from it copies (1/INCREMENTAL_FRACTION of the disk)."""
        dom = self.world.domain(domain)
        found: dict[str, list[BitmapInfo]] = {d: [] for d in dom.disks}
        for name, disks in dom.checkpoints.items():
            for disk in disks:
                size = dom.disks[disk].virtual_size // backup.INCREMENTAL_FRACTION
                found[disk].append(BitmapInfo(name, size))
        return found

    async def add_bitmaps(self, domain: str, bitmaps: Sequence[tuple[str, str]]) -> None:
        if self.crashed:
            raise DriverError("the simulated hypervisor is not running")
        backup.add_bitmaps(self.world, self.world.domain(domain), list(bitmaps))

    async def remove_bitmaps(self, domain: str, removals: Sequence[BitmapRemoval]) -> None:
        if self.crashed:
            raise DriverError("the simulated hypervisor is not running")
        dom = self.world.domain(domain)
        backup.remove_bitmaps(self.world, dom, [(r.disk, r.bitmap) for r in removals])

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

    async def check_job(self, spec: Any, dom: DomainInfo) -> None:
        """Before admission: refuse a backup's existing (or unusable reused) files."""
        if isinstance(spec, PreparedBackup):
            creates = backup.check_stores(self.world, spec, self.world.domain(dom.name))
            self._checked = (spec, self.world.version, time.monotonic(), creates)

    def _backup_creates(self, spec: PreparedBackup, dom: SimDomain) -> list[tuple[str, SimFile]]:
        """The files a backup creates, checked again at its start (a queued job starts
        later, and files may have appeared meanwhile), unless its check_job just ran on
        the world as it still is (a job admitted at once)."""
        checked, self._checked = self._checked, None
        if (
            checked is not None
            and checked[0] is spec
            and checked[1] == self.world.version
            and time.monotonic() - checked[2] < RECHECK_AFTER
        ):
            return checked[3]
        return backup.check_stores(self.world, spec, dom)

    # ---- DriverConnection: jobs ----------------------------------------------------

    def start_inline(self, job: DriverJob) -> bool:
        """Whether ``start(job)`` runs to its end without waiting (the engine runs it
        without a cancel scope): every start but a migration's while fleet peers are
        set (it asks them whether its destination is a member)."""
        return self._peers is None or not isinstance(job.spec, MigrationSpec)

    async def start(self, job: DriverJob) -> None:
        if self.crashed:
            raise DriverError("the simulated hypervisor is not running")
        if self._saved_jobs:
            self._drop_unclaimed()
        spec = job.spec
        dom = self.world.domain(job.domain)
        backup_spec = spec if isinstance(spec, PreparedBackup) else None
        creates = self._backup_creates(backup_spec, dom) if backup_spec is not None else []
        handover_to = await self._handover_target(spec) if isinstance(spec, MigrationSpec) else None
        if handover_to is None:
            total, converges, extra = self._behaviour(job.type).plan(self.world, spec, dom)
        else:
            total, converges, extra = migration.plan_handover(dom)
        if backup_spec is not None:  # its checkpoint, atomically with it
            bitmaps = backup.checkpoint_bitmaps(backup_spec)
            if bitmaps:  # none: the host is unchanged (not saved again)
                backup.add_bitmaps(self.world, dom, bitmaps)
        bandwidth = getattr(spec, "bandwidth", None)
        rate = self.rate if not bandwidth else min(self.rate, float(bandwidth))
        fail = (
            self._take_injection(str(job.type))
            if self._injections or self._fail_at is not None
            else None
        )
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
            created=tuple([path for path, _ in creates]) if creates else (),
            handover_to=handover_to,
        )
        if backup_spec is not None and backup_spec.pull:
            sj.rate = math.inf  # the NBD export is up at once; its consumer reads at will
        self._save(sj)
        self._jobs[job.uuid] = sj
        if creates:
            self.world.add_files(self.world.host_of(dom.name), creates)
        job.reporter.progress(0, total, extra)
        self._schedule(sj)

    def _take_injection(self, job_type: str) -> _Injection | None:
        for i, inj in enumerate(self._injections):
            if inj.job_type in (None, job_type):
                return self._injections.pop(i)
        if self._fail_at is not None:
            return _Injection(None, self._fail_at, "simulated failure")
        return None

    def _behaviour(self, job_type: JobType) -> Behaviour:
        behaviour = _BEHAVIOURS.get(job_type)
        if behaviour is None:
            raise Unsupported(f"sim cannot run job type '{job_type}'")
        return behaviour

    def _job(self, job: DriverJob) -> SimJob:
        sj = self._jobs.get(job.uuid)
        if sj is None:
            raise OperationInvalid(f"job '{job.uuid}' is not running on '{self.uri}'")
        return sj

    def _rebase(self, sj: SimJob) -> None:
        now = self.clock.now()
        sj.base_bytes = sj.processed(now)
        sj.base_time = now

    def _save(self, sj: SimJob) -> None:
        """Save what the job needs to go on after a restart (its progress function)."""
        if self._persist is not None:
            self._persist.job(sj, sj.processed(self.clock.now()), self.clock.wall())

    async def cancel(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.phase, sj.outcome, sj.paused = Phase.FINISH, "cancelled", False
        self._save(sj)
        self._schedule(sj)

    async def pause(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.paused = True
        self._save(sj)
        self._schedule(sj)

    async def resume(self, job: DriverJob) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.paused = False
        self._save(sj)
        self._schedule(sj)

    async def complete(self, job: DriverJob) -> None:
        sj = self._job(job)
        if sj.phase is not Phase.READY:
            raise OperationInvalid(f"job '{job.uuid}' is not ready")
        sj.base_time = self.clock.now()
        sj.phase, sj.outcome, sj.paused = Phase.FINISH, "completed", False
        self._save(sj)
        self._schedule(sj)

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None:
        sj = self._job(job)
        self._rebase(sj)
        sj.rate = self.rate if not bandwidth else min(self.rate, float(bandwidth))
        self._save(sj)
        self._schedule(sj)

    # ---- the scheduler loop ---------------------------------------------------------

    def _schedule(self, sj: SimJob) -> None:
        sj.version += 1
        deadline = sj.deadline()
        now = self.clock.now()
        if deadline <= now and self.due_now_callback:  # at the loop's next step, by a callback
            self._due_now.append((sj.version, sj))
            if not self._due_now_called:  # one callback at a time runs them all
                self._due_now_called = True
                self._call_soon(self._on_due_now)
            return
        if not math.isinf(deadline):
            heapq.heappush(self._heap, (deadline, next(self._seq), sj.version, sj))
        # progress is due PROGRESS_INTERVAL from now, unless the job gets there first (an
        # instant job ends at once: no timer for it)
        if math.isinf(self._next_progress):
            due = now + PROGRESS_INTERVAL
            if deadline > due:
                self._next_progress = due
        self._poke()

    def _poke(self) -> None:
        self._wakeup.set()

    def settle(self, job: DriverJob) -> None:
        """What is due at once runs now if ``job`` is among it (an instant job's end: the
        engine's wait asks before it waits), not at the loop's next step; the callback
        then finds nothing left to run."""
        if any(sj.job is job for _, sj in self._due_now):
            self._run_due_now()

    def _on_due_now(self) -> None:
        self._due_now_called = False
        self._run_due_now()

    def _run_due_now(self) -> None:
        """The jobs due at once, as the loop would have run them at its next step (each
        only if nothing rescheduled or ended it meanwhile); what one raises fails the
        scheduler loop, as it would have there."""
        due, self._due_now = self._due_now, []
        if self._stopped or self._failure is not None:
            return
        now = self.clock.now()
        for version, sj in due:
            if version == sj.version and sj.job.uuid in self._jobs:
                try:
                    self._due(sj, now)
                except BaseException as exc:  # the loop's task raises it (a bug)
                    self._failure = exc
                    self._poke()
                    return

    def _save_clock(self) -> None:
        assert self._persist is not None
        self._persist.clock(self.clock.now(), self.clock.wall())

    def stop(self) -> None:
        """End the scheduler loop (the connection is closing)."""
        self._stopped = True
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            if self._stopped:
                return
            if self._persist is None:
                await self._loop()
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sweep, self._persist)
                await self._loop()

    async def _loop(self) -> None:
        while True:
            self._wakeup = anyio.Event()
            if self._failure is not None:
                raise self._failure
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
                self._save(sj)
                sj.job.reporter.progress(sj.total, sj.total, sj.extra)
                sj.job.reporter.ready()
                spec = sj.job.spec
                if isinstance(spec, PreparedCommit) and spec.pivot and sj.phase is Phase.READY:
                    sj.base_time = now
                    sj.phase, sj.outcome = Phase.FINISH, "completed"
                    self._save(sj)
                    self._schedule(sj)
            else:
                self._end(sj, "completed", None)
        else:  # rate or pause changed since this deadline was computed
            self._schedule(sj)

    def _end(self, sj: SimJob, outcome: str, errmsg: str | None) -> None:
        """Apply the job's effect on the simulated host and report how it ended."""
        outcome, errmsg, extra = self._conclude(sj, outcome, errmsg)
        job = sj.job
        if outcome == "completed":
            job.reporter.completed(extra)
        elif outcome == "cancelled":
            job.reporter.cancelled()
        else:
            job.reporter.failed(errmsg or "failed")

    def _conclude(
        self, sj: SimJob, outcome: str, errmsg: str | None
    ) -> tuple[str, str | None, dict[str, int | str]]:
        """Apply the job's effect on the simulated host (once: its record says it ended in
        the same store commit, or an earlier one); its real outcome and final stats."""
        del self._jobs[sj.job.uuid]
        sj.version += 1
        job = sj.job
        extra = dict(sj.extra)
        behaviour = self._behaviour(job.type)
        if outcome == "completed":
            try:
                try:
                    dom = self.world.domain(job.domain)
                except NoSuchDomain:
                    raise DriverError(f"domain '{job.domain}' vanished") from None
                if sj.handover_to is not None:
                    extra.update(self._hand_over(sj, dom, sj.handover_to))
                else:
                    extra.update(behaviour.apply(self.world, job, dom))
            except DriverError as exc:
                outcome, errmsg = "failed", str(exc)
        behaviour.ended(self.world, sj, outcome)
        if outcome == "completed":
            self._update_extra(sj, sj.total)
            extra.update(sj.extra)
        if self._persist is not None:
            self._persist.job_ended(sj, outcome, errmsg, extra)
            self._forget_later(sim_job_key(sj))
        return outcome, errmsg, extra

    # ---- durable state: recovery after a restart (drivers.sim.persist) -------------

    async def recover_job(self, job: DriverJob, last_state: JobState) -> Recovered:
        """The job as the last process left it, moved on by the wall time since: still
        running (rescheduled to finish on time), or ended meanwhile (its effect applied
        now, once). A manual clock does not move while no process runs: its jobs go on
        from their saved progress."""
        rec = self._saved_jobs.pop(job.uuid, None)
        if rec is None:
            why = f"the simulated host of '{self.uri}' has no record of job '{job.uuid}'"
            if self._persist is None:  # nothing is saved: the job ran in a world now gone
                return Vanished(why)
            # its start's save (committed with the world's changes of that start) was not
            # committed: nothing of it ran
            return NotStarted(why)
        if "ended" in rec:  # ended, and the engine's terminal write did not make it
            self._forget_later(job_key(job.uuid))
            outcome, errmsg = str(rec["ended"]), rec["errmsg"]
            return Concluded(_TERMINAL[outcome], errmsg, dict(rec["extra"]))
        if job.domain not in self.world.where:
            if self._persist is not None:
                self._persist.forget_job(job.uuid)
            return Vanished(f"domain '{job.domain}' is gone from '{self.uri}'")
        sj = SimJob(job, 0, 0.0, False, None, "")
        restore_job(sj, rec)
        now = self.clock.now()
        away = 0.0 if self.clock.manual else max(0.0, self.clock.wall() - float(rec["wall"]))
        sj.base_time = now - away
        if last_state is JobState.ABORTING and sj.phase is not Phase.FINISH:
            # the engine took the cancel, the process died before the driver saved it
            sj.phase, sj.outcome, sj.paused = Phase.FINISH, "cancelled", False
        elif last_state is JobState.COMPLETING and sj.phase is Phase.READY:
            sj.phase, sj.outcome = Phase.FINISH, "completed"
        self._jobs[job.uuid] = sj
        ended = self._while_away(sj, now)
        if ended is not None:
            outcome, errmsg, extra = self._conclude(sj, *ended)
            return Concluded(_TERMINAL[outcome], errmsg if outcome == "failed" else None, extra)
        self._rebase(sj)
        done = int(sj.base_bytes)
        self._update_extra(sj, done)
        self._save(sj)
        self._schedule(sj)
        if sj.phase is Phase.READY:  # paused while ready: standby
            state = JobState.STANDBY if sj.paused else JobState.READY
        else:
            state = JobState.PAUSED if sj.paused else JobState.RUNNING
        return Reattached(state, done, sj.total)

    def _while_away(self, sj: SimJob, now: float) -> tuple[str, str | None] | None:
        """How the job ended while no process ran (None: it goes on); a converging job
        that got there is READY (or, a commit that pivots by itself, completed)."""
        if sj.phase is Phase.FINISH:
            return sj.outcome, None
        if sj.phase is not Phase.COPY or sj.paused:
            return None
        done = sj.processed(now)
        if sj.fail_at is not None and done >= sj.fail_at:
            return "failed", f"{sj.fail_message} at {sj.fail_at} of {sj.total} bytes"
        if done < sj.total:
            return None
        if not sj.converges:
            return "completed", None
        sj.base_bytes, sj.phase = float(sj.total), Phase.READY
        spec = sj.job.spec
        if isinstance(spec, PreparedCommit) and spec.pivot:
            return "completed", None
        return None

    def _forget_later(self, key: str) -> None:
        """Delete a job's record (by its key: persist.sim_job_key) in the next sweep."""
        self._ended.append(key)
        self._sweep_wakeup.set()

    def _drop_unclaimed(self) -> None:
        """Recovery is over (the engine serves calls): the records no job was recovered
        from belong to jobs the engine had ended already."""
        assert self._persist is not None
        for job in self._saved_jobs:
            self._persist.forget_job(job)
        self._saved_jobs.clear()

    async def _sweep(self, persist: SimState) -> None:
        """Delete ended jobs' records once the store has everything queued with them
        (the engine queues a job's terminal write when the driver reports its end)."""
        while True:
            await self._sweep_wakeup.wait()
            self._sweep_wakeup = anyio.Event()
            batch, self._ended = self._ended, []
            try:
                await persist.state.sync()
            except Exception as exc:  # the records stay; the next process drops them
                log.warning("sim_state_sync_failed", uri=self.uri, error=str(exc))
                continue
            for key in batch:
                persist.forget_key(key)
            # the ends of the next moment are swept together (one wake-up for many)
            await anyio.sleep(SWEEP_PAUSE)

    def job_count(self) -> int:
        return len(self._jobs)


class SimDriver:
    """The ``jobcore.drivers`` entry point for ``sim://``."""

    scheme = "sim"
    #: the query parameters SimConnection reads; any other is refused
    uri_params = frozenset({"rate", "fail_at", "clock"})
    #: what an absent parameter means (jobd compares a hello's parameters with these)
    uri_defaults = {"rate": str(DEFAULT_RATE), "clock": "real"}
    #: the world and the jobs persist in the DriverState the engine passes to connect
    persistent_state = True
    #: what connect opens (a test driver built on sim names its subclass here)
    connection_class: type[SimConnection] = SimConnection

    def identity(self, uri: URI) -> tuple[tuple[str, str], ...]:
        """None of sim's parameters selects another host: ``sim:///NAME`` is the host."""
        return ()

    @asynccontextmanager
    async def connect(
        self, uri: URI, tg: TaskGroup, state: DriverState | None = None
    ) -> AsyncIterator[SimConnection]:
        """Open ``uri``'s host; with ``state``, its world and jobs are those the last
        process left there (see ``recover_job``), and every change is saved in it."""
        if uri.host:
            raise InvalidURI(f"the sim driver is local: no host allowed in '{uri}'")
        conn = self.connection_class(uri, tg, state)
        tg.start_soon(conn.run)
        try:
            yield conn
        finally:
            conn.stop()
