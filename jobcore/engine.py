"""The job engine of one connection: admission, the single transition function, verbs,
driver reports, retention, stats and events.

Everything here runs on the connection's event loop. State changes are synchronous (no
``await`` between a check and the change it guards); the only awaits are driver calls.
A state changes only once the driver has done what it was asked (events never report
what did not happen); verbs on one job run one at a time, and each driver call is
shielded from cancellation so the engine's record and the driver's never disagree.
With a durable store (design/store.md) begin, a queued job's start and wait also await
the store's commit, and each event is emitted once the state it reports is committed.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import anyio
import attrs
import sniffio
from anyio.abc import TaskGroup
from structlog.stdlib import BoundLogger

from jobcore import constants as C
from jobcore.checkpoints import Checkpoints
from jobcore.driver import (
    Concluded,
    DomainInfo,
    DriverConnection,
    DriverJob,
    DriverState,
    NotStarted,
    Reattached,
    Recovered,
    Vanished,
    job_verbs,
)
from jobcore.errors import (
    AccessDenied,
    DriverError,
    InvalidArgument,
    JobConflict,
    JobError,
    NoSuchJob,
    OperationInvalid,
    QueueTimeout,
    StoreError,
    Unsupported,
)
from jobcore.events import EventFilter, EventHub, EventKind, JobEvent, Subscription
from jobcore.flags import check_flags
from jobcore.info import Blocker, ClaimView, Explanation, JobInfo, job_stats
from jobcore.lifecycle import (
    REPORT_TARGET,
    TRANSITIONS,
    VERB_TARGET,
    VERBS,
    JobState,
    Report,
    Verb,
    check_verb,
)
from jobcore.log import get_logger
from jobcore.paths import PathGuard
from jobcore.registry import registry
from jobcore.scheduler import Decision, Mode, PolicyTable, Scheduler, Ticket, Verdict
from jobcore.snapshots import JobSnapshot, Snapshots, elapsed_ms
from jobcore.spec import (
    DEFAULT_RETENTION,
    MAX_INT64,
    MAX_SECONDS,
    check_timeout,
    evolved,
    random_uuid,
)
from jobcore.store import (
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_PER_DOMAIN,
    JobRecord,
    JobStore,
    MemoryJobStore,
    default_host,
)
from jobcore.store_sqlite import NO_PREPARED_SPEC, SQLiteJobStore
from jobcore.types.base import JobTypeInfo
from jobcore.xml.common import round_trips_as

S = JobState

#: Seconds a driver's ``start`` may take before the engine gives up on it (the job fails and
#: the driver is told to cancel): a bound independent of any driver's own time limits, so a
#: hung hypervisor cannot hold a (shielded) start, and with it jobd's shutdown, forever.
DEFAULT_START_TIMEOUT = 60.0
#: errmsg of the jobs a closing connection ends
CLOSED = "the connection was closed"

_log = get_logger("jobcore.engine")
#: the legacy domain job alias's UUID as an int (compared without UUID.__eq__'s call)
_LEGACY_UUID_INT = C.LEGACY_DOMAIN_JOB_UUID.int
_stdlib_log = logging.getLogger("jobcore.engine")


def job_log(rec: JobRecord) -> BoundLogger:
    """The job's logger, with its UUID, type and domain bound (made on first use)."""
    if rec.log is None:
        rec.log = _log.bind(job=str(rec.uuid), type=str(rec.type), domain=rec.domain)
    return rec.log


class InvalidTransition(AssertionError):
    """The engine (or a driver report) tried a move the transition table forbids: a bug."""


class Engine:
    def __init__(
        self,
        dconn: DriverConnection,
        tg: TaskGroup,
        *,
        store: JobStore | None = None,
        retention: float = DEFAULT_RETENTION,
        max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
        max_retained: int = DEFAULT_MAX_RETAINED,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        checkpoint_state: DriverState | None = None,
        host: str | None = None,
        policy: PolicyTable | None = None,
    ) -> None:
        self.dconn = dconn
        self.tg = tg
        #: the fleet member its jobs carry (a durable store's own host wins)
        self.host = getattr(store, "host", None) or host or default_host()
        #: the driver keeps a DriverState in this engine's durable store: what it saves
        #: while starting a job is on disk before JobBegin returns (set by jobcore.local)
        self.driver_state_durable = False
        self.clock = dconn.clock
        # the caps bound a store made here; a store passed in has its own
        self.store: JobStore = (
            store
            if store is not None
            else MemoryJobStore(
                max_retained_per_domain=max_retained_per_domain, max_retained=max_retained
            )
        )
        if not (isinstance(retention, int | float) and 0 <= retention <= MAX_SECONDS):
            raise InvalidArgument(
                f"retention {retention} is not a number of seconds in 0…{MAX_SECONDS:.0f}"
            )
        self.retention = float(retention)
        if not (isinstance(start_timeout, int | float) and 0 < start_timeout <= MAX_SECONDS):
            raise InvalidArgument(
                f"start_timeout {start_timeout} is not a number of seconds in 0…{MAX_SECONDS:.0f}"
            )
        self.start_timeout = float(start_timeout)
        self.events = EventHub()
        #: what readers on other threads see (jobcore.snapshots; off until one asks)
        self.snapshots = Snapshots()
        self.scheduler = Scheduler() if policy is None else Scheduler(policy)
        #: the domains' checkpoints (jobcore.checkpoints), kept in ``checkpoint_state``
        self.checkpoints = Checkpoints(dconn, self.scheduler, checkpoint_state)
        self._seq = itertools.count()
        #: the class of ``rec.done`` events (``_ended_event``), chosen at the first wait
        self._make_ended: Callable[[], anyio.Event | asyncio.Event] | None = None
        self._closed = False
        #: closed with its active jobs kept for the next process: reports are not applied
        self._kept = False
        #: domain name -> URI of the host a migration moved it to
        self.domain_location: dict[str, str] = {}
        #: where else a job UUID is taken (jobd: its other driver connections), as the
        #: name of the place that has it, or None: begin refuses those UUIDs too
        self.uuid_owner: Callable[[uuid.UUID], str | None] | None = None
        # ---- job groups (jobcore.groups): hooks of the jobs that are group members
        #: job -> called once the job ended (after its claims were released)
        self.member_ended: dict[uuid.UUID, Callable[[JobRecord], None]] = {}
        #: job -> asked when the driver reports the job completed; True: the group holds
        #: the completion back (it applies or undoes it later: hold_completion, end_held)
        self.completion_gate: dict[
            uuid.UUID, Callable[[JobRecord, Mapping[str, int | str] | None], bool]
        ] = {}
        #: job -> what aborting it does while its group holds its completion (the
        #: driver is done with it: the group undoes it)
        self.held_abort: dict[uuid.UUID, Callable[[JobRecord], None]] = {}
        #: job -> its recovery's outcome, known without asking the driver (a group member
        #: whose completion was held when the last process went: the driver may have
        #: forgotten the job it finished); set before ``recover``
        self.recovered_as: dict[uuid.UUID, Recovered] = {}
        # ---- durability (design/store.md): None for the memory store, which pays nothing
        self._dstore = self.store if isinstance(self.store, SQLiteJobStore) else None
        #: the active jobs the store held at open, for ``recover``
        self._recovering: list[JobRecord] = []
        if self._dstore is not None:
            self._recovering = self._dstore.restore(self.clock, self._seq, self.scheduler.ticket)
            for rec in self._recovering:  # what the policy table and the job's XML say
                options = rec.spec.options
                rec.ticket.type, rec.ticket.policy = str(rec.type), options.conflict
                rec.ticket.queue = options.queue
            tg.start_soon(self._dstore.run)

    @property
    def can_recover(self) -> bool:
        """The driver re-attaches jobs after a restart (it has ``recover_job``)."""
        return getattr(self.dconn, "recover_job", None) is not None

    # ---- recovery after a restart (design/store.md "Recovery") -----------------------

    async def recover(self) -> None:
        """Take over the active jobs the durable store held at open (call once, before
        serving): running ones are handed to the driver's ``recover_job`` in begin order
        (their claims taken again first), then queued ones are queued again in their
        ticket order. Every outcome is written like any state change, and a job that ends
        here gets its one FINAL event."""
        jobs, self._recovering = self._recovering, []
        if not jobs:
            return
        queued = [r for r in jobs if r.state is S.QUEUED]
        for rec in queued:  # a speed set while it waited (the row has it, the spec not)
            _speed_into_spec(rec, rec.bandwidth)
        running = [r for r in jobs if r.state is not S.QUEUED]
        active = {r.uuid for r in jobs}
        suspended = [r for r in running if _still_preempted(r, active)]
        for rec in running:  # what they held before the restart, before anything starts
            # held as they were: the hypervisor runs them, whatever the queue says
            if rec not in suspended:
                self.scheduler._hold(rec.ticket)
        for rec in suspended:  # paused by a preemptor still active: waiting again
            rec.preempt = str(rec.extra.get("preempt", "pause"))
            rec.ticket.preempted = True
            self.scheduler._enqueue(rec.ticket)
        recover_job = getattr(self.dconn, "recover_job", None)
        unprepared = self._dstore.unprepared if self._dstore is not None else set()
        again: list[JobRecord] = []  # never started on the hypervisor: start them again
        for rec in running:
            if rec.uuid in unprepared:
                self._recovered(rec, Vanished(NO_PREPARED_SPEC))
            elif recover_job is None:
                self._recovered(
                    rec,
                    Vanished(
                        f"the driver of {self.dconn.uri} cannot re-attach jobs after a restart"
                    ),
                )
            else:
                known = self.recovered_as.pop(rec.uuid, None)
                result = await self._recover_one(rec, recover_job) if known is None else known
                if isinstance(result, NotStarted) and rec.state is S.RUNNING:
                    again.append(rec)
                else:
                    self._recovered(rec, result)
                    await self._checkpoint_recovered(rec)
        unprepared.clear()
        await self.checkpoints.flush()
        for rec in again:  # admitted before every queued job: ahead of them, as before
            job_log(rec).info("job started again: the driver had not started it")
            rec.starting = True  # verbs wait until the driver has it
            self.tg.start_soon(self._start_queued, rec)
        by_ticket = {id(r.ticket): r for r in queued}
        linked: set[int] = set()
        for rec in queued:
            together = rec.ticket.together  # a queued all-or-nothing group (jobcore.groups)
            if together is None:
                batch = [rec]
                admitted = self.scheduler.admit_or_enqueue(rec.ticket)
            elif id(together) in linked:
                continue  # admitted or queued with the first of its group
            else:  # all its queued members or none, as before the restart
                linked.add(id(together))
                batch = [by_ticket[id(t)] for t in together if id(t) in by_ticket]
                admitted = self.scheduler.admit_or_enqueue_together([r.ticket for r in batch])
            for member in batch:
                if admitted:
                    member.starting = True  # verbs wait until the driver has it
                    self._transition(member, S.RUNNING)
                    self.tg.start_soon(self._start_queued, member)
                elif member.spec.options.queue_timeout is not None:
                    timeout = member.spec.options.queue_timeout
                    self.tg.start_soon(self._expire_queued, member, timeout)
        if self._dstore is not None:
            with anyio.CancelScope(shield=True):
                await self._dstore.sync(raise_errors=False)
        _log.info(
            "jobs recovered",
            driver=self.dconn.uri,
            running=len(running),
            queued=len(queued),
            active=self.store.active_count(),
        )

    async def _recover_one(self, rec: JobRecord, recover_job: Any) -> Recovered:
        rec.driver_job = job = DriverJob(
            rec.uuid, rec.type, rec.domain, rec.spec, _Reporter(self, rec)
        )
        last = rec.state
        rec.starting = True
        try:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.start_timeout) as bound:
                    result: Recovered = await recover_job(job, last)
            if bound.cancelled_caught:
                return Vanished(
                    f"driver '{self.dconn.uri}' did not re-attach job '{rec.uuid}' within "
                    f"{self.start_timeout:g} s"
                )
            return result
        except Exception as exc:  # a driver bug or a gone hypervisor: the job is lost
            job_log(rec).warning("driver recover_job raised", error=repr(exc))
            return Vanished(str(exc) or type(exc).__name__)
        finally:
            _start_finished(rec)

    def _recovered(self, rec: JobRecord, result: Recovered) -> None:
        """Apply what the driver found (recovery_hook: the engine's rules)."""
        if rec.state.terminal:  # the driver reported the end during recover_job
            return
        if isinstance(result, Reattached):
            if result.processed or result.total:
                rec.processed, rec.total = result.processed, result.total
            if result.state is not rec.state:
                self._transition(rec, result.state, checked=False)
            else:
                self._snapshot(rec)
            job_log(rec).info("job re-attached", state=str(rec.state))
            return
        if isinstance(result, Concluded):
            gate = self.completion_gate.get(rec.uuid) if result.state is S.COMPLETED else None
            held = (
                gate is not None
                and (Report.COMPLETED, rec.state) in REPORT_TARGET
                and gate(rec, result.extra or None)
            )
            if held:  # a group member (jobcore.groups): its completion is held back again
                return
            if result.extra:
                rec.extra.update(result.extra)
            if result.state is S.COMPLETED and rec.total:
                rec.processed = rec.total
            if result.errmsg is not None:
                rec.errmsg = result.errmsg
            self._transition(rec, result.state, checked=False)
            return
        if isinstance(result, NotStarted) and rec.state is S.ABORTING:
            self._transition(rec, S.CANCELLED, checked=False)  # nothing ran: abort taken
            return
        rec.errmsg = result.reason  # Vanished; NotStarted of a job the driver had moved
        self._transition(rec, S.FAILED, checked=False)

    # ---- admission -------------------------------------------------------------------

    async def _prepare(
        self, domain: str, spec: Any, flags: int, path_guard: PathGuard | None
    ) -> tuple[JobTypeInfo, Any, DomainInfo, uuid.UUID]:
        """What begin checks before the job exists (shared with begin_all): the type, its
        flags, the domain, the UUID, the prepared spec, the path guard, the driver's and
        the checkpoints' checks."""
        if self._closed:
            raise JobError("the connection is closed")
        if self._dstore is not None:
            self._dstore.check_writable()  # a full disk refuses new jobs
        info = registry.for_spec(spec)
        if type(flags) is not int or flags:  # (no flags: nothing to check)
            check_flags("JobBegin", flags, job_type=info.type)
            if flags & C.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL:  # only a backup accepts it
                spec = round_trips_as(attrs.evolve(spec, reuse_external=True), spec)  # not in XML
        if not self.dconn.supports(info.type):
            raise Unsupported(f"driver '{self.dconn.uri}' does not support job type '{info.type}'")
        dom = await self.dconn.lookup_domain(domain)
        job_id: uuid.UUID | None = spec.uuid
        if job_id is None:  # any UUID can be written
            job_id = random_uuid()
            spec = round_trips_as(evolved(spec, uuid=job_id), spec)
        if info.prepare is not None:
            spec = info.prepare(spec, dom, self.clock.wall())
        if path_guard is not None:
            if info.paths is None:
                raise AccessDenied(
                    f"job type '{info.type}' does not list the files it touches: only jobd's "
                    "own uid and root may begin it"
                )
            path_guard(info.paths(spec, dom))
        check_job = getattr(self.dconn, "check_job", None)
        if check_job is not None:  # the driver refuses before the job exists (targets, …)
            await check_job(spec, dom)
        self.checkpoints.check_backup(spec, dom)  # incremental bases, a new checkpoint
        return info, spec, dom, job_id

    def _check_new_uuid(self, job_id: uuid.UUID) -> None:
        """Refuse a UUID taken here or elsewhere (call with no await before the record is
        stored: the check holds)."""
        if self.store.get(job_id) is not None:
            raise InvalidArgument(f"a job with UUID '{job_id}' already exists")
        owner = None if self.uuid_owner is None else self.uuid_owner(job_id)
        if owner is not None:  # checked and stored with no await between: race-free
            raise InvalidArgument(
                f"a job with UUID '{job_id}' already exists (on '{owner}'): choose another UUID"
            )
        if job_id.int == _LEGACY_UUID_INT:
            raise InvalidArgument(f"'{job_id}' is reserved for the legacy domain job alias")

    def _new_ticket(
        self, info: JobTypeInfo, spec: Any, dom: Any, job_id: uuid.UUID, flags: int
    ) -> Ticket:
        options = spec.options
        return Ticket(
            job_id,
            info.claims(spec, dom),
            options.priority,
            type=str(info.type),
            policy=options.conflict,
            queue=bool(options.queue or flags & C.JOB_BEGIN_QUEUE),
        )

    async def explain(
        self, domain: str, spec: Any, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> Explanation:
        """What ``begin(domain, spec, flags)`` would do now, changing nothing: the same
        checks (their errors raised as begin raises them) and the scheduler's verdict."""
        if self._closed:
            raise JobError("the connection is closed")
        info, spec, dom, job_id = await self._prepare(domain, spec, flags, path_guard)
        self._purge()
        self._check_new_uuid(job_id)
        ticket = self.scheduler.probe(self._new_ticket(info, spec, dom, job_id, flags))
        return _explanation(ticket, self.scheduler.verdict(ticket), None)

    def explain_job(self, rec: JobRecord) -> Explanation:
        """A job's admission as it stands: a waiting one's blockers and queue position;
        an admitted one holds its claims (``admit``)."""
        if rec.state.terminal:
            raise OperationInvalid(
                f"job '{rec.uuid}' has ended ('{rec.state}'): it waits for nothing",
                job=rec.uuid,
                state=str(rec.state),
                verb="explain",
            )
        ticket = rec.ticket
        if not ticket.waiting:
            return _explanation(ticket, Verdict(Decision.ADMIT), None)
        found = self.scheduler.verdict(ticket)
        return _explanation(
            ticket, Verdict(Decision.QUEUE, found.blockers), self.scheduler.position(ticket)
        )

    async def begin(
        self, domain: str, spec: Any, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> JobRecord:
        """Admit and start a job; return once it runs (or is queued, when asked).
        ``path_guard`` sees the host files the prepared spec names (its type's ``paths``)
        before the driver looks at any of them."""
        info, spec, dom, job_id = await self._prepare(domain, spec, flags, path_guard)
        # no await from here until the record is stored: the UUID check holds
        if self._closed:
            raise JobError("the connection is closed")
        now = self.clock.now()
        self._purge(now)
        self._check_new_uuid(job_id)
        options = spec.options
        ticket = self._new_ticket(info, spec, dom, job_id, flags)
        self.scheduler.number(ticket)  # in begin order
        verdict = self.scheduler.verdict(ticket, every_blocker=False)
        self.scheduler.apply(ticket, verdict)  # raises JobConflict
        admitted = verdict.decision is Decision.ADMIT
        rec = self._new_record(info, spec, dom, ticket, admitted, now)
        if self._dstore is not None:  # durability: on disk before the driver starts it
            await self._persisted(rec, admitted)
        if verdict.decision is Decision.PREEMPT:
            # shielded (bounded by the start timeout inside): a begin cancelled meanwhile
            # still leaves its job started once admitted, or queued and started later
            with anyio.CancelScope(shield=True):
                admitted = await self._preempt(rec, verdict.victims)
        if admitted:
            await self._start(rec, raise_errors=True)
            await self.checkpoints.flush()  # a checkpoint the backup created is durable
            if self.driver_state_durable:  # durability: what the driver saved at start
                assert self._dstore is not None
                with anyio.CancelScope(shield=True):
                    await self._dstore.sync(raise_errors=False)
        elif options.queue_timeout is not None:
            self.tg.start_soon(self._expire_queued, rec, options.queue_timeout)
        return rec

    # ---- job groups (jobcore.groups; design/scheduling.md "Job groups") ---------------

    @property
    def closing(self) -> bool:
        """``close`` ran: nothing more is started."""
        return self._closed

    async def begin_all(
        self,
        members: Sequence[tuple[str, Any]],
        flags: int = 0,
        *,
        queue: bool = False,
        together: bool = True,
        path_guard: PathGuard | None = None,
        on_created: Callable[[list[JobRecord]], None] | None = None,
    ) -> list[JobRecord]:
        """Begin every member (domain, spec) or none. Each is prepared and checked as
        ``begin`` does (any refusal: nothing begun); then, with no await, all are admitted
        at once, or (``queue`` or JOB_BEGIN_QUEUE) all queued — ``together``: admitted
        later all at once, else each on its own — or JobConflict names the member and its
        blocker. ``on_created`` sees the records before any starts (a group's hooks)."""
        prepared = await self._prepare_all(members, flags, path_guard)
        now = self.clock.now()
        self._purge(now)
        tickets = self._group_tickets(prepared, bool(queue or flags & C.JOB_BEGIN_QUEUE))
        for ticket in tickets:
            self.scheduler.number(ticket)  # in document order
        # the pair policies, as for a job of its own (design/scheduling.md "Job groups")
        verdict = self.scheduler.verdict_all(tickets)
        admitted = self.scheduler.apply_all(tickets, verdict, together=together)  # JobConflict
        recs = [
            self._new_record(info, spec, dom, ticket, adm, now)
            for (info, spec, dom, _), ticket, adm in zip(prepared, tickets, admitted, strict=True)
        ]
        for rec, adm in zip(recs, admitted, strict=True):
            rec.starting = adm  # verbs wait for the start meanwhile
        if on_created is not None:
            on_created(recs)
        if self._dstore is not None:  # durability: every row on disk before any starts
            try:
                with anyio.CancelScope(shield=True):
                    await self._dstore.sync()
                for rec in recs:
                    self._dstore.check_inserted(rec)
            except JobError as exc:
                for rec in recs:
                    if not isinstance(exc, StoreError):
                        rec.retention = 0.0
                    _start_finished(rec)
                    self._finish(rec, S.FAILED, errmsg=str(exc))
                raise
        preempting = [
            (rec, victims)
            for i, rec in enumerate(recs)
            if (victims := verdict.victims(i, together=together))
        ]
        if preempting:  # shielded, bounded by the start timeout, as begin's _preempt
            waiting = recs if together else [rec for rec, _ in preempting]
            with anyio.CancelScope(shield=True):
                held = await self._preempt_all(preempting, waiting)
            admitted = [adm or rec in held for rec, adm in zip(recs, admitted, strict=True)]
        for rec, adm in zip(recs, admitted, strict=True):
            if not adm and rec.spec.options.queue_timeout is not None:
                self.tg.start_soon(self._expire_queued, rec, rec.spec.options.queue_timeout)
        # a start that fails fails its member (its group's mode decides); members of one
        # domain go to the driver's start_all together, if it has one (qemu: one QMP
        # transaction), else one by one, in document order
        start_all = getattr(self.dconn, "start_all", None)
        by_domain: dict[str, list[JobRecord]] = {}
        for rec, adm in zip(recs, admitted, strict=True):
            if adm:
                by_domain.setdefault(rec.domain, []).append(rec)
        for same in by_domain.values():
            if start_all is not None and len(same) > 1:
                await self._start_together(same, start_all)
            else:
                for rec in same:
                    await self._start(rec, raise_errors=False)
        if any(admitted):
            await self.checkpoints.flush()
            if self.driver_state_durable:
                assert self._dstore is not None
                with anyio.CancelScope(shield=True):
                    await self._dstore.sync(raise_errors=False)
        return recs

    async def _prepare_all(
        self, members: Sequence[tuple[str, Any]], flags: int, path_guard: PathGuard | None
    ) -> list[tuple[JobTypeInfo, Any, DomainInfo, uuid.UUID]]:
        """Each member (domain, spec) prepared and checked as ``begin`` does, its errors
        naming the member (begin_all's and explain_all's)."""
        prepared = []
        for i, (domain, spec) in enumerate(members, 1):
            try:
                prepared.append(await self._prepare(domain, spec, flags, path_guard))
            except JobError as exc:
                raise _member_error(exc, i, domain) from exc
        if self._closed:
            raise JobError("the connection is closed")
        return prepared

    def _group_tickets(
        self, prepared: list[tuple[JobTypeInfo, Any, DomainInfo, uuid.UUID]], queue: bool
    ) -> list[Ticket]:
        """The members' tickets (unnumbered), with the group's queue choice (a member's
        own ``<policy>`` still decides for it); their UUIDs checked, and JobConflict if
        two members conflict with each other (call with no await before they are used)."""
        tickets: list[Ticket] = []
        probe = Scheduler()  # the members among themselves
        for i, (info, spec, dom, job_id) in enumerate(prepared, 1):
            self._check_new_uuid(job_id)
            if any(t.job == job_id for t in tickets):
                raise InvalidArgument(f"group member {i}: job UUID '{job_id}' is given twice")
            ticket = self._new_ticket(info, spec, dom, job_id, 0)
            ticket.queue = queue
            clash = probe.conflict(ticket)
            if clash is not None:
                raise JobConflict(
                    f"group member {i}, job '{job_id}', conflicts with member job "
                    f"'{clash.holder}' on '{clash.claim.resource}' ({clash.mode.value} "
                    f"excludes {clash.claim.mode.value}): no member was begun",
                    holder=clash.holder,
                    resource=clash.claim.resource,
                )
            probe._hold(ticket)
            tickets.append(ticket)
        return tickets

    async def explain_all(
        self,
        members: Sequence[tuple[str, Any]],
        flags: int = 0,
        *,
        queue: bool = False,
        path_guard: PathGuard | None = None,
    ) -> Explanation:
        """What ``begin_all`` would do now, changing nothing (its checks, their errors as
        it raises them, and ``Scheduler.verdict_all``): the group's decision, every
        member's claims, and every member's blockers, each rule naming the member and
        its own decision."""
        prepared = await self._prepare_all(members, flags, path_guard)
        self._purge()
        tickets = self._group_tickets(prepared, bool(queue or flags & C.JOB_BEGIN_QUEUE))
        tickets = [self.scheduler.probe(t) for t in tickets]
        verdict = self.scheduler.verdict_all(tickets, every_blocker=True)
        blockers = []
        for i, (ticket, member) in enumerate(zip(tickets, verdict.members, strict=True), 1):
            for c in member.blockers:
                rule = f"member {i} (job '{ticket.job}', {member.decision}): {c.rule}"
                blockers.append(Blocker(c.holder, c.claim.resource, rule))
        return Explanation(
            decision=verdict.decision,
            claims=tuple(ClaimView(c.resource, str(c.mode)) for t in tickets for c in t.claims),
            blockers=tuple(blockers),
            position=None,
        )

    async def _start_together(
        self, recs: list[JobRecord], start_all: Callable[[list[DriverJob]], Any]
    ) -> None:
        """``_start`` for jobs of one domain the driver starts together (``start_all``):
        shielded and bounded as one start; if it fails, every one of them fails."""
        live = [r for r in recs if not (self._closed or r.state.terminal)]
        for rec in recs:
            if rec not in live:
                _start_finished(rec)
        if not live:
            return
        jobs = []
        for rec in live:
            if rec.started is None:
                rec.started = self.clock.now()
                self._snapshot(rec)
            rec.driver_job = DriverJob(
                rec.uuid, rec.type, rec.domain, rec.spec, _Reporter(self, rec)
            )
            rec.starting = True
            jobs.append(rec.driver_job)
        error: JobError | None = None
        cause: Exception | None = None
        bound = anyio.CancelScope(shield=True, deadline=anyio.current_time() + self.start_timeout)
        try:
            with bound:
                await start_all(jobs)
            if bound.cancelled_caught:
                error = DriverError(
                    f"driver '{self.dconn.uri}' did not start jobs {[str(r.uuid) for r in live]} "
                    f"within {self.start_timeout:g} s: they failed and the driver was told to "
                    "cancel them"
                )
        except JobError as exc:
            error = exc
        except Exception as exc:  # a driver bug must not take the engine down
            job_log(live[0]).exception("driver start_all raised", driver=self.dconn.uri)
            error, cause = DriverError(f"{type(exc).__name__}: {exc}"), exc
        finally:
            for rec in live:
                _start_finished(rec)
        if error is not None and cause is not None:
            error.__cause__ = cause
        for rec, job in zip(live, jobs, strict=True):
            if error is None:
                if rec.state not in (S.FAILED, S.CANCELLED):
                    await self._checkpoint_started(rec)
                continue
            if rec.state.active:
                self._finish(rec, S.FAILED, errmsg=str(error))
            if bound.cancelled_caught:
                with anyio.CancelScope(shield=True):
                    await self._cancel_unstarted(rec, job)

    def _new_record(
        self,
        info: JobTypeInfo,
        spec: Any,
        dom: DomainInfo,
        ticket: Ticket,
        admitted: bool,
        now: float,
    ) -> JobRecord:
        """A new job's record (begin's, or a group member's), stored, its first STATE
        event emitted."""
        options = spec.options
        rec = JobRecord(
            uuid=ticket.job,
            type=info.type,
            info=info,
            domain=dom.name,
            spec=spec,
            state=S.RUNNING if admitted else S.QUEUED,
            seq=next(self._seq),
            ticket=ticket,
            retention=self.retention if options.retention is None else options.retention,
            created_wall=self.clock.wall(),
            created=now,
            started=now if admitted else None,  # in its row: it reads the same after a restart
            bandwidth=getattr(spec, "bandwidth", None),
            host=self.host,
        )
        self.store.add(rec)
        self._snapshot(rec)
        if _stdlib_log.isEnabledFor(logging.INFO):
            job_log(rec).info("job began", state=str(rec.state))
        self._emit_state(rec, None)
        return rec

    def release_completion(self, rec: JobRecord, extra: Mapping[str, int | str] | None) -> None:
        """Apply a completion a group held back (completion_gate): the job completes."""
        self.completion_gate.pop(rec.uuid, None)
        self.held_abort.pop(rec.uuid, None)
        self._report(rec, Report.COMPLETED, extra=extra)

    def end_held(self, rec: JobRecord, errmsg: str) -> None:
        """End a job whose completion a group held back and will not apply (a sibling
        failed): cancelled, as the group undid its effect (its checkpoint)."""
        self.completion_gate.pop(rec.uuid, None)
        self.held_abort.pop(rec.uuid, None)
        if rec.state.terminal:
            return
        rec.errmsg = errmsg
        if rec.state is not S.ABORTING and S.ABORTING in TRANSITIONS[rec.state]:
            self._transition(rec, S.ABORTING)
        if rec.state is S.ABORTING:
            self._transition(rec, S.CANCELLED)
        else:  # completing: it cannot be aborted any more
            self._transition(rec, S.FAILED)

    # ---- preemption (design/scheduling.md "Preemption") -------------------------------

    async def _preempt(self, rec: JobRecord, victims: tuple[uuid.UUID, ...]) -> bool:
        """Take ``rec``'s resources from ``victims`` (its ticket waits ahead of theirs):
        each is paused where its type and driver can pause it (it waits, paused, for its
        resources and is resumed once readmitted), else cancelled (and, if it asked,
        begun again as a new queued job). True once ``rec`` is admitted (RUNNING: begin
        starts it); False if it is still queued (a victim did not let go within the
        start timeout, or an earlier waiter came first)."""
        rec.admitted = admitted = anyio.Event()
        rec.extra["preempted"] = ",".join(map(str, victims))
        self._snapshot(rec)
        for victim_id in victims:
            victim = self.store.get(victim_id)
            if victim is None or victim.state.terminal or rec.state is not S.QUEUED:
                continue
            await self._take_from(rec, victim)
        if rec.state is S.QUEUED:
            with anyio.move_on_after(self.start_timeout):
                await admitted.wait()
        rec.admitted = None
        if rec.state is not S.RUNNING:
            self.scheduler.end_lead(rec.ticket)
            return False
        if self._dstore is not None:  # durability: 'running' on disk before the start
            with anyio.CancelScope(shield=True):
                await self._dstore.sync(raise_errors=False)
        return True

    async def _preempt_all(
        self, preempting: list[tuple[JobRecord, tuple[uuid.UUID, ...]]], waiting: list[JobRecord]
    ) -> set[JobRecord]:
        """A job group's ``_preempt``: each member in ``preempting`` takes its resources
        from its victims (a victim of two members once, by the first); then the members
        in ``waiting`` (an all-or-nothing group: all, admitted at once) are waited for
        until admitted, within the start timeout. The members admitted (RUNNING: begin_all
        starts them); the others stay queued and start when admitted."""
        for rec in waiting:
            rec.admitted = anyio.Event()
        taken: set[uuid.UUID] = set()
        for rec, victims in preempting:
            rec.extra["preempted"] = ",".join(map(str, victims))
            for victim_id in victims:
                victim = self.store.get(victim_id)
                if victim_id in taken or victim is None or victim.state.terminal:
                    continue
                taken.add(victim_id)
                if rec.state is S.QUEUED:
                    await self._take_from(rec, victim)
        with anyio.move_on_after(self.start_timeout):
            for rec in waiting:
                event = rec.admitted
                if rec.state is S.QUEUED and event is not None:
                    await event.wait()
        for rec in waiting:
            rec.admitted = None
            if rec.state is S.QUEUED:
                self.scheduler.end_lead(rec.ticket)
        held = {rec for rec in waiting if rec.state is S.RUNNING}
        if held and self._dstore is not None:  # durability: 'running' on disk before starts
            await self._dstore.sync(raise_errors=False)
        return held

    async def _take_from(self, rec: JobRecord, victim: JobRecord) -> None:
        victim.ticket.preempted = True
        victim.extra["preempted_by"] = str(rec.uuid)
        victim.extra["preempt"] = "pause"  # written with the pause; corrected below
        self._snapshot(victim)
        await self._started(victim)
        how = "cancel"
        # a preemptor that takes the whole domain (a migration moves it away) cancels:
        # a paused job could not follow its domain
        whole = any(c.mode is Mode.DOMAIN_EXCLUSIVE for c in rec.ticket.claims)
        if whole:
            pass
        elif victim.state in (S.PAUSED, S.STANDBY):
            how = "paused"  # the user paused it: it gives its resources up as it is
        elif Verb.PAUSE in self.job_verbs(victim) and victim.state in VERBS[Verb.PAUSE]:
            try:
                await self._verb(victim, Verb.PAUSE, "pause")
                how = "pause"
            except JobError as exc:  # the driver refused: cancel it instead
                job_log(victim).info("preemption: pause refused, cancelling", error=str(exc))
        victim.preempt = how
        victim.extra["preempt"] = how
        self._snapshot(victim)
        self._emit_preempted(victim, rec, how)
        job_log(victim).info("job preempted", by=str(rec.uuid), preempt=how)
        if victim.state.terminal:
            return
        if how == "cancel":
            victim.errmsg = f"preempted by job '{rec.uuid}'"
            self._snapshot(victim)
            try:
                await self.abort(victim)
            except JobError as exc:
                job_log(victim).warning("preemption: cancel refused", error=str(exc))
            return
        self._readmit(self.scheduler.suspend(victim.ticket))

    def _emit_preempted(self, victim: JobRecord, by: JobRecord, how: str) -> None:
        if not self.events.active:
            return
        event = attrs.evolve(
            self._event(victim, EventKind.PREEMPTED),
            stats={"preempted_by": str(by.uuid), "preempt": how},
            seq=0,
        )
        if self._dstore is not None:  # after the state changes before it are committed
            self._dstore.defer(functools.partial(self._publish, event))
        else:
            self.events.emit(event)

    def _readmit(self, tickets: list[Ticket]) -> None:
        """Act on the waiting tickets the scheduler just admitted: a queued job starts
        (a preemptor's begin starts its own), a preempted paused one is resumed."""
        for ticket in tickets:
            waiting = self.store.get(ticket.job)
            if waiting is None or waiting.state.terminal:
                continue
            if waiting.state is not S.QUEUED:  # a preempted job has its resources back
                ticket.preempted = False
                how, waiting.preempt = waiting.preempt, None
                if how == "pause" and not self._closed:
                    self.tg.start_soon(self._resume_preempted, waiting)
                continue
            if self._closed:  # a closing engine starts nothing
                self._finish(waiting, S.FAILED, errmsg=CLOSED)
            elif waiting.admitted is not None:  # its begin starts it
                self._transition(waiting, S.RUNNING)
                waiting.admitted.set()
            else:
                waiting.starting = True  # verbs wait until the driver has it
                self._transition(waiting, S.RUNNING)
                self.tg.start_soon(self._start_queued, waiting)

    async def _resume_preempted(self, rec: JobRecord) -> None:
        try:
            await self._verb(rec, Verb.RESUME, "resume")
        except JobError as exc:  # e.g. it was aborted meanwhile
            job_log(rec).info("preempted job not resumed", error=str(exc))

    def _requeue(self, rec: JobRecord) -> None:
        """A cancelled victim that asked for it begins again: a new queued job, same
        XML, a new UUID (``requeued_as`` / ``requeued_from`` in the two jobs' stats)."""
        job_id = uuid.uuid4()
        spec = attrs.evolve(
            rec.spec, uuid=job_id, options=attrs.evolve(rec.spec.options, queue=True)
        )
        old = rec.ticket
        ticket = self.scheduler.ticket(
            job_id, old.claims, old.priority, type=old.type, policy=old.policy, queue=True
        )
        admitted = self.scheduler.admit_or_enqueue(ticket)
        now = self.clock.now()
        new = JobRecord(
            uuid=job_id,
            type=rec.type,
            info=rec.info,
            domain=rec.domain,
            spec=spec,
            state=S.RUNNING if admitted else S.QUEUED,
            seq=next(self._seq),
            ticket=ticket,
            retention=rec.retention,
            created_wall=self.clock.wall(),
            created=now,
            started=now if admitted else None,
            bandwidth=rec.bandwidth,
            host=self.host,
            extra={"requeued_from": str(rec.uuid)},
        )
        rec.extra["requeued_as"] = str(job_id)
        self._snapshot(rec)
        self.store.add(new)
        self._snapshot(new)
        job_log(new).info("preempted job requeued", previous=str(rec.uuid))
        self._emit_state(new, None)
        if admitted:
            new.starting = True
            self.tg.start_soon(self._start_queued, new)

    async def _persisted(self, rec: JobRecord, admitted: bool) -> None:
        """Wait (shielded) until the new job's row is committed; if the store cannot
        write it, the job fails unstarted and begin raises the StoreError (or the
        database's refusal: a PostgreSQL store's JobConflict on a shared claim)."""
        assert self._dstore is not None
        rec.starting = admitted  # verbs wait for the start meanwhile
        try:
            with anyio.CancelScope(shield=True):
                await self._dstore.sync()
            self._dstore.check_inserted(rec)  # its job XML, or its claims, may be refused
        except JobError as exc:
            if not isinstance(exc, StoreError):  # the database refused it: not retained
                rec.retention = 0.0
            _start_finished(rec)
            self._finish(rec, S.FAILED, errmsg=str(exc))
            raise

    async def _start(self, rec: JobRecord, *, raise_errors: bool) -> None:
        if self._closed or rec.state.terminal:  # never start a job on a closing engine
            _start_finished(rec)
            return
        if rec.started is None:  # set when admitted (written with that state)
            rec.started = self.clock.now()
            self._snapshot(rec)
        rec.driver_job = job = DriverJob(
            rec.uuid, rec.type, rec.domain, rec.spec, _Reporter(self, rec)
        )
        rec.starting = True
        error: JobError | None = None
        cause: Exception | None = None
        timed_out = broke_promise = False
        inline = getattr(self.dconn, "start_inline", None)
        try:
            if inline is not None and inline(job):
                # the driver's start does not wait for anything: nothing can cancel it
                # or make it late, so it needs no shield and no bound (the cancel scope
                # costs as much as the rest of an instant job's start)
                start = self.dconn.start(job)
                if _first_step(start) is not _DONE:
                    # it waits after all, perhaps inside a cancel scope of its own that
                    # no scope of the engine's may now enclose: a driver bug, stopped here
                    start.close()
                    broke_promise = True
                    raise DriverError(
                        f"driver '{self.dconn.uri}' started job '{rec.uuid}' inline "
                        "(start_inline) but its start waited: the job failed and the "
                        "driver was told to cancel it"
                    )
            else:
                timed_out = await self._start_bounded(job)
            if timed_out:
                error = DriverError(
                    f"driver '{self.dconn.uri}' did not start job '{rec.uuid}' within "
                    f"{self.start_timeout:g} s (the hypervisor may be stopped or stuck): "
                    "the job failed and the driver was told to cancel it"
                )
        except JobError as exc:
            error = exc
        except Exception as exc:  # a driver bug must not take the engine down
            job_log(rec).exception("driver start raised", driver=self.dconn.uri)
            error, cause = DriverError(f"{type(exc).__name__}: {exc}"), exc
        finally:
            _start_finished(rec)
        if (
            error is None
            and rec.bandwidth != getattr(rec.spec, "bandwidth", None)
            and rec.state.active
        ):
            try:  # a speed set while queued, on a spec without a bandwidth field
                with anyio.CancelScope(shield=True):
                    await self.dconn.set_speed(rec.driver_job, rec.bandwidth)
            except JobError as exc:
                job_log(rec).warning("queued speed not applied", error=str(exc))
        if (
            error is None
            and rec.state not in (S.FAILED, S.CANCELLED)
            and getattr(rec.spec, "checkpoint_name", None) is not None
        ):
            await self._checkpoint_started(rec)
        if error is not None:
            if rec.state.active:
                self._finish(rec, S.FAILED, errmsg=str(error))
            if timed_out or broke_promise:  # failed first: a cancel report cannot change it
                with anyio.CancelScope(shield=True):
                    await self._cancel_unstarted(rec, job)
            if raise_errors:
                if cause is not None:
                    raise error from cause
                raise error

    async def _start_bounded(self, job: DriverJob) -> bool:
        """The driver's start, shielded and bounded; True if the bound cut it short.

        Shielded: a begin cancelled now (its client went away) would leave a job the
        driver may or may not have. The start completes and the job is tracked; the
        caller's cancellation takes effect when begin returns. Bounded all the same: the
        scope's own deadline still cancels it (one scope for both)."""
        deadline = anyio.current_time() + self.start_timeout
        bound = anyio.CancelScope(shield=True, deadline=deadline)
        with bound:
            await self.dconn.start(job)
        return bound.cancelled_caught

    async def _checkpoint_started(self, rec: JobRecord) -> None:
        """A backup that creates a checkpoint started: its record is made now."""
        if getattr(rec.spec, "checkpoint_name", None) is None:
            return
        try:
            dom = await self.dconn.lookup_domain(rec.domain)
        except JobError as exc:  # gone meanwhile: its checkpoint with it
            job_log(rec).warning("checkpoint not recorded", error=str(exc))
            return
        if rec.state in (S.FAILED, S.CANCELLED):  # it ended meanwhile: no checkpoint left
            return
        self.checkpoints.backup_started(rec.uuid, rec.spec, dom, rec.created_wall)

    async def _checkpoint_recovered(self, rec: JobRecord) -> None:
        """A recovered backup's checkpoint: killed after the driver made its bitmaps and
        before their record was committed, the record is made now (if the bitmaps are
        there: the hypervisor has the checkpoint)."""
        if getattr(rec.spec, "checkpoint_name", None) is None or rec.state in (
            S.FAILED,
            S.CANCELLED,
        ):
            return
        try:
            dom = await self.dconn.lookup_domain(rec.domain)
            await self.checkpoints.backup_recovered(rec.uuid, rec.spec, dom, rec.created_wall)
        except JobError as exc:
            job_log(rec).warning("checkpoint not recovered", error=str(exc))

    async def _cancel_unstarted(self, rec: JobRecord, job: DriverJob) -> None:
        """Tell the driver to cancel (and clean up) a job whose start timed out; the cancel
        has the same bound (called shielded, from ``_start``)."""
        try:
            with anyio.move_on_after(self.start_timeout):
                await self.dconn.cancel(job)
        except JobError as exc:  # e.g. the driver never got far enough to know the job
            job_log(rec).info("cancel after a start timeout refused", error=str(exc))
        except Exception:
            job_log(rec).exception("driver cancel raised", driver=self.dconn.uri)

    async def _expire_queued(self, rec: JobRecord, timeout: float) -> None:
        # the connection's clock, not wall time: a manual (simulated) clock expires it too
        await self.clock.wait_until(rec.created + timeout)
        if rec.state is S.QUEUED:
            self._finish(
                rec,
                S.FAILED,
                errmsg=str(QueueTimeout(f"job '{rec.uuid}' was not admitted within {timeout:g} s")),
            )

    # ---- the one transition function -------------------------------------------------

    def _transition(self, rec: JobRecord, new: JobState, *, checked: bool = True) -> None:
        """Move ``rec`` to ``new`` (``checked=False``: recovery, where the hypervisor moved
        the job while nobody watched, and the table's single steps do not apply)."""
        old = rec.state
        if checked and new not in TRANSITIONS[old]:
            raise InvalidTransition(f"job '{rec.uuid}': {old} -> {new} is not allowed")
        rec.state = new
        if new is S.RUNNING and rec.started is None:  # admitted: written with this state
            rec.started = self.clock.now()
        if new.terminal:
            rec.ended = self.clock.now()
            rec.ended_wall = self.clock.wall()
            self.store.ended(rec, rec.ended + rec.retention)
        if self._dstore is not None:  # durability: the row follows (event after commit)
            self._dstore.changed(rec)
        self._snapshot(rec)
        self._emit_state(rec, old)
        if new.terminal:
            self._ended(rec)

    def _finish(self, rec: JobRecord, state: JobState, *, errmsg: str | None = None) -> None:
        """End an active job: the engine's own ends (a failed start, a queue timeout, a
        closing connection, the abort of a queued job), straight to ``state``."""
        if rec.state.terminal:
            return
        if errmsg is not None:
            rec.errmsg = errmsg
        self._transition(rec, state)

    def _event(self, rec: JobRecord, kind: EventKind, previous: JobState | None = None) -> JobEvent:
        """An event of ``rec`` as it is now; a FINAL one carries the final stats (libvirt's
        JOB_COMPLETED)."""
        return JobEvent(
            kind,
            rec.uuid,
            rec.type,
            rec.domain,
            rec.state,
            previous,
            rec.processed,
            rec.total,
            self.clock.wall(),
            self.stats(rec) if kind is EventKind.FINAL else None,
            0,
            self._event_seq(rec, kind),
        )

    def _event_seq(self, rec: JobRecord, kind: EventKind) -> int:
        """The number of ``rec``'s event of ``kind`` as it is now (JobEvent.seq): the
        durable store numbers STATE and FINAL events; 0 otherwise."""
        if self._dstore is None or kind is EventKind.PROGRESS:
            return 0
        n = self._dstore.last_event_seq(rec.uuid) or 0
        return n - 1 if kind is EventKind.STATE and rec.state.terminal else n

    def catch_up(self, job: uuid.UUID, seen: int) -> JobEvent | None:
        """What a subscriber that last saw the job's event number ``seen`` resumes with
        (design/daemon.md, "Reconnecting"): the FINAL event if the job ended, else a STATE
        event of its current state, numbered as the job's last event, its ``lost_before``
        the numbered events in between (0 when ``seen`` is 0: nothing was seen); None if
        it saw the last one, the job is unknown, or the store does not number events."""
        rec = self.store.get(job)
        if rec is None or self._dstore is None:
            return None
        n = self._dstore.last_event_seq(job) or 0
        if n <= seen:
            return None
        kind = EventKind.FINAL if rec.state.terminal else EventKind.STATE
        return attrs.evolve(
            self._event(rec, kind), seq=n, lost_before=max(0, n - seen - 1) if seen else 0
        )

    def _ended(self, rec: JobRecord) -> None:
        self.checkpoints.backup_ended(rec.uuid, rec.spec, rec.domain, rec.state is S.COMPLETED)
        if self._dstore is not None:  # durability: final event and waiters after commit
            if self.events.active:
                self._dstore.defer(
                    functools.partial(self._final, rec, self._event(rec, EventKind.FINAL))
                )
            elif rec.done is not None:  # a wait() began before the end: woken after it
                self._dstore.defer(rec.done.set)
        elif self.events.active:
            self.events.emit(self._event(rec, EventKind.FINAL))
        if rec.done is not None and self._dstore is None:
            rec.done.set()
        rec.driver_job = None
        if rec.admitted is not None:  # a preemptor's begin waits no longer: it ended
            rec.admitted.set()
        readmitted = self.scheduler.release(rec.ticket)
        if readmitted:
            self._readmit(readmitted)
        if (
            rec.preempt == "cancel"
            and rec.state is S.CANCELLED
            and rec.spec.options.requeue
            and not self._closed
        ):
            self._requeue(rec)
        if _stdlib_log.isEnabledFor(logging.INFO):
            job_log(rec).info("job ended", state=str(rec.state), errmsg=rec.errmsg)
        member_ended = self.member_ended.pop(rec.uuid, None) if self.member_ended else None
        if member_ended is not None:  # a group member: its group decides what follows
            member_ended(rec)

    async def _start_queued(self, rec: JobRecord) -> None:
        if self._dstore is not None:  # durability: 'running' on disk before the start
            with anyio.CancelScope(shield=True):
                await self._dstore.sync(raise_errors=False)
        await self._start(rec, raise_errors=False)
        await self.checkpoints.flush()

    def _publish(self, event: JobEvent) -> None:
        """Emit an event held back until its state was committed (durable store)."""
        if self.events.active:
            self.events.emit(event)

    def _final(self, rec: JobRecord, event: JobEvent) -> None:
        self._publish(event)
        if rec.done is not None:
            rec.done.set()

    def _emit_state(self, rec: JobRecord, old: JobState | None) -> None:
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            job_log(rec).debug("state", previous=str(old), state=str(rec.state))
        if self._dstore is not None:  # durability: the event after the commit
            if self.events.active:  # (nobody subscribed: no event, nothing held back)
                self._dstore.defer(
                    functools.partial(self._publish, self._event(rec, EventKind.STATE, old))
                )
        elif self.events.active:
            self.events.emit(self._event(rec, EventKind.STATE, old))

    # ---- verbs -----------------------------------------------------------------------
    #
    # A verb changes the job's state only once the driver has accepted it: a refused
    # verb leaves no trace in the job's state or its events. Verbs on one job run one at
    # a time (a second verb waits for the first, then is checked against the state the
    # first left); driver reports may still arrive while the driver works, so the state
    # the verb moves the job to is decided after the driver call, from the state then.

    async def _started(self, rec: JobRecord) -> None:
        while rec.starting:
            if rec.start_done is None:
                rec.start_done = anyio.Event()
            await rec.start_done.wait()

    def _verb_lock(self, rec: JobRecord) -> anyio.Lock:
        if rec.verb_lock is None:
            rec.verb_lock = anyio.Lock()
        return rec.verb_lock

    async def _drive(self, rec: JobRecord, method: str, *args: Any) -> None:
        """Call the driver about ``rec``, shielded from cancellation: once asked, the
        driver's answer is awaited so the job's state follows what the driver did."""
        try:
            with anyio.CancelScope(shield=True):
                await getattr(self.dconn, method)(rec.driver_job, *args)
        except Exception as exc:
            raise _as_job_error(exc) from exc

    def job_verbs(self, rec: JobRecord) -> frozenset[Verb]:
        """The verbs ``rec`` accepts at all: its type's, narrowed by the driver's
        ``job_verbs`` (lifecycle.check_verb refuses the others before the driver is asked)."""
        return job_verbs(self.dconn, rec.type, rec.info.verbs)

    async def abort(self, rec: JobRecord) -> None:
        held = self.held_abort.get(rec.uuid)
        if held is not None:  # a group holds its completion: the driver is done with it
            held(rec)
            return
        async with self._verb_lock(rec):
            await self._started(rec)
            target = check_verb(rec.uuid, rec.state, Verb.ABORT, self.job_verbs(rec))
            if target.terminal:  # a queued job ends at once
                self._finish(rec, target)
                return
            ends_well = (
                rec.info.abort_completes is not None
                and rec.info.abort_completes(rec.spec)
                and rec.state in (S.READY, S.STANDBY)
            )
            # e.g. a pull backup: its consumer is done (as in libvirt)
            await self._drive(rec, "complete" if ends_well else "cancel")
            self._accepted(rec, Verb.ABORT)

    async def pause(self, rec: JobRecord) -> None:
        await self._verb(rec, Verb.PAUSE, "pause")

    async def resume(self, rec: JobRecord) -> None:
        if rec.preempt is not None and rec.ticket.waiting:
            raise OperationInvalid(
                f"job '{rec.uuid}' was preempted by job '{rec.extra.get('preempted_by')}': "
                "it resumes once that job ends",
                job=rec.uuid,
                state=str(rec.state),
                verb=str(Verb.RESUME),
            )
        await self._verb(rec, Verb.RESUME, "resume")

    async def complete(self, rec: JobRecord) -> None:
        await self._verb(rec, Verb.COMPLETE, "complete")

    async def _verb(self, rec: JobRecord, verb: Verb, method: str) -> None:
        async with self._verb_lock(rec):
            await self._started(rec)
            check_verb(rec.uuid, rec.state, verb, self.job_verbs(rec))
            self._refuse_if_held(rec, verb)
            await self._drive(rec, method)
            self._accepted(rec, verb)

    def _refuse_if_held(self, rec: JobRecord, verb: Verb) -> None:
        """A job whose completion a group holds back is done in the driver: only an
        abort (which undoes it) still means something."""
        if rec.uuid in self.held_abort:
            raise OperationInvalid(
                f"job '{rec.uuid}' has done its work and its completion is held until the "
                f"other members of its all-or-nothing group are done: it cannot {verb} "
                "(abort undoes it)",
                job=rec.uuid,
                state=str(rec.state),
                verb=str(verb),
            )

    def _accepted(self, rec: JobRecord, verb: Verb) -> None:
        """The driver accepted ``verb``: move the job to the verb's target from the state
        it is in now (a report may have moved it, e.g. to 'ready', meanwhile)."""
        state = rec.state
        if state.terminal:
            # the job ended while the driver worked: an abort or complete has its way
            # (the job is over); a pause or resume did not happen
            if verb in (Verb.PAUSE, Verb.RESUME):
                raise OperationInvalid(
                    f"job '{rec.uuid}' ended ('{state}') before the {verb} took effect",
                    job=rec.uuid,
                    state=str(state),
                    verb=str(verb),
                )
            return
        if state not in VERBS[verb]:  # a report moved it where the verb means nothing
            job_log(rec).warning("accepted verb left the state as it is", verb=str(verb))
            return
        target = VERB_TARGET.get((verb, state), state)
        if target is not state:
            self._transition(rec, target)

    async def set_speed(self, rec: JobRecord, bandwidth: int | None) -> None:
        if bandwidth is not None and bandwidth < 0:
            raise InvalidArgument("bandwidth must not be negative")
        if bandwidth is not None and bandwidth > MAX_INT64:
            raise InvalidArgument(
                f"bandwidth {bandwidth} bytes/s is too large: the maximum is {MAX_INT64} bytes/s"
            )
        async with self._verb_lock(rec):
            await self._started(rec)
            check_verb(rec.uuid, rec.state, Verb.SET_SPEED, self.job_verbs(rec))
            self._refuse_if_held(rec, Verb.SET_SPEED)
            if rec.state is S.QUEUED:
                _speed_into_spec(rec, bandwidth)
                # other specs get it from the driver's set_speed once started (_start)
            else:
                await self._drive(rec, "set_speed", bandwidth)
            rec.bandwidth = bandwidth
            self._snapshot(rec)
            if self._dstore is not None:  # durability: on disk when the call returns
                self._dstore.speed_changed(rec)
                with anyio.CancelScope(shield=True):
                    await self._dstore.sync(raise_errors=False)

    # ---- snapshots for readers on other threads (jobcore.snapshots) -------------------

    def _snapshot(self, rec: JobRecord) -> None:
        """Publish ``rec`` as it is now: call once wherever its visible fields changed."""
        if self.snapshots.on:
            self.snapshots.publish(rec, self.info(rec), self.store)

    def start_snapshots(self) -> None:
        """Publish snapshots from now on (on the loop thread): every active job's now,
        every later change as it happens; ``on`` is set once all are published."""
        snaps = self.snapshots
        if not snaps.on:
            snaps.start(self.store)
            for rec in self.store.active_jobs():
                snaps.publish(rec, self.info(rec), self.store)
            snaps.on = True

    def snapshot(self, rec: JobRecord) -> JobSnapshot | None:
        """``rec``'s published snapshot (on the loop thread), published now if it has
        none yet (an ended job nobody read since snapshots started); None while off."""
        if self.snapshots.on and rec.snapshot is None:
            self.snapshots.publish(rec, self.info(rec), self.store)
        snap: JobSnapshot | None = rec.snapshot
        return snap

    def publish_domain(self, domain: str) -> None:
        """Publish ``domain``'s job list from now on (on the loop thread), purged as a
        list query purges; nothing while snapshots are off or the store cannot say what
        it forgets."""
        if self.snapshots.on:
            self._purge()
            self.snapshots.publish_domain(domain, self._snapshot)

    # ---- queries ---------------------------------------------------------------------

    def _purge(self, now: float | None = None) -> None:
        self.store.purge(self.clock.now() if now is None else now)

    def lookup(self, job: uuid.UUID) -> JobRecord:
        self._purge()
        rec = self.store.get(job)
        if rec is None:
            raise NoSuchJob(f"no job with UUID '{job}'")
        return rec

    def legacy_job(self, domain: str) -> JobRecord | None:
        """The domain's legacy job: earliest-begun active domain-level job, else the most
        recently ended one still retained."""
        self._purge()
        return self.store.active_domain_job(domain) or self.store.last_ended_domain_job(domain)

    def domain_jobs(self, domain: str) -> list[JobRecord]:
        self._purge()
        return list(self.store.domain_jobs(domain))

    def domain_jobs_page(
        self, domain: str, after: int = -1, limit: int = 1000
    ) -> tuple[list[JobRecord], int | None]:
        """A page of the domain's jobs in begin order from cursor ``after`` (-1: the
        start), and the next page's cursor (None: no more). Jobs begun meanwhile come on
        later pages; none is listed twice."""
        self._purge()
        return self.store.domain_jobs_page(domain, after, limit)

    def find_jobs(self, prefix: str, limit: int) -> list[JobRecord]:
        """Up to ``limit`` jobs whose UUID's hex digits start with ``prefix``."""
        self._purge()
        return self.store.find_prefix(prefix, limit)

    def info(self, rec: JobRecord) -> JobInfo:
        return JobInfo(
            uuid=rec.uuid,
            type=rec.type,
            domain=rec.domain,
            state=rec.state,
            processed=rec.processed,
            total=rec.total,
            time_elapsed=self._elapsed_ms(rec),
            created=rec.created_wall,
            started=None if rec.started is None else rec.created_wall + (rec.started - rec.created),
            ended=rec.ended_wall,
            errmsg=rec.errmsg,
            bandwidth=rec.bandwidth,
            host=rec.host,
        )

    def _elapsed_ms(self, rec: JobRecord) -> int:
        return elapsed_ms(rec.created, rec.ended, self.clock.now())

    def stats(self, rec: JobRecord) -> dict[str, Any]:
        """libvirt-named stats (virDomainGetJobStats keys) plus 'uuid' and 'state'."""
        return job_stats(self.info(rec), rec.info.operation, rec.info.progress_keys, rec.extra)

    async def wait(self, rec: JobRecord, timeout: float | None = None) -> JobInfo:
        timeout = check_timeout(timeout)
        self._settle(rec)
        if rec.state.active:
            done = rec.done
            if done is None:
                done = rec.done = self._ended_event()
            if timeout is None:
                await done.wait()
            else:
                with anyio.fail_after(timeout):
                    await done.wait()
        if self._dstore is not None:  # the outcome is on disk before a waiter learns it
            await self._dstore.sync_job(rec.uuid, raise_errors=False)
        return self.info(rec)

    def _ended_event(self) -> anyio.Event | asyncio.Event:
        """A new event for ``rec.done``: on asyncio its own Event (what anyio's wraps, without
        the wrapper's backend dispatch at each event made: wait() makes one per job that
        has not ended), on trio anyio's."""
        make = self._make_ended
        if make is None:
            make = asyncio.Event if sniffio.current_async_library() == "asyncio" else anyio.Event
            self._make_ended = make
        return make()

    def _settle(self, rec: JobRecord) -> None:
        """What the driver would apply to ``rec`` at the loop's next step anyway (an
        instant job's end) happens now (its optional ``settle``)."""
        if rec.state.active and rec.driver_job is not None and not rec.starting:
            settle = getattr(self.dconn, "settle", None)
            if settle is not None:
                settle(rec.driver_job)

    def wait_ready(self, rec: JobRecord) -> bool:
        """``wait(rec)`` would return without suspending: the job ended (once the driver
        settled it) and its outcome is on disk (jobd serves such a wait in the client's
        read loop)."""
        self._settle(rec)
        return not rec.state.active and (self._dstore is None or self._dstore.job_synced(rec.uuid))

    def subscribe(
        self, flt: EventFilter | None = None, maxlen: int = EventHub.DEFAULT_BUFFER
    ) -> Subscription:
        return self.events.subscribe(flt, maxlen)

    # ---- driver reports (through _Reporter) ------------------------------------------

    def _report(
        self,
        rec: JobRecord,
        report: Report,
        *,
        errmsg: str | None = None,
        extra: Mapping[str, int | str] | None = None,
        progress: tuple[int, int] | None = None,
    ) -> None:
        """Apply a driver report as ``lifecycle.REPORT_TARGET`` says; a report that makes
        no sense in the job's state is logged and ignored (nothing changes, no event)."""
        if self._kept:  # the driver closing its side: the job's row stays as it was
            return
        path = REPORT_TARGET.get((report, rec.state))
        if path is None:
            # a late progress tick or a repeated 'ready' is ordinary; anything else is not
            ordinary = (report is Report.PROGRESS and rec.state.terminal) or (
                report is Report.READY and rec.state in (S.READY, S.STANDBY)
            )
            level = logging.DEBUG if ordinary else logging.WARNING
            if _stdlib_log.isEnabledFor(level):
                job_log(rec).log(
                    level, "driver report ignored", report=str(report), state=str(rec.state)
                )
            return
        gate = (  # (a UUID's hash is a Python call: not asked of an empty table)
            self.completion_gate.get(rec.uuid)
            if report is Report.COMPLETED and self.completion_gate
            else None
        )
        if gate is not None and gate(rec, extra):  # a group member: held back
            self._snapshot(rec)  # (the group may have set its progress)
            return
        if extra:
            rec.extra.update(extra)
        if progress is not None:
            rec.processed, rec.total = progress
        if report is Report.PROGRESS:
            self._snapshot(rec)
            self._progress(rec)
            return
        if report is Report.COMPLETED and rec.total:
            rec.processed = rec.total
        if errmsg is not None:
            rec.errmsg = errmsg
        elif report is Report.CANCELLED and path[-1] is S.FAILED:
            rec.errmsg = f"the hypervisor cancelled the job while it was {rec.state}"
        for state in path:
            self._transition(rec, state)

    def _progress(self, rec: JobRecord) -> None:
        if self._dstore is not None:  # written at most every PROGRESS_INTERVAL per job
            # after the writes before it, not its own: progress is no durability point
            if self.events.active:
                self._dstore.defer(
                    functools.partial(self._publish, self._event(rec, EventKind.PROGRESS))
                )
            self._dstore.progress(rec)
        elif self.events.active:
            self.events.emit(self._event(rec, EventKind.PROGRESS))

    # ---- shutdown --------------------------------------------------------------------

    def close(self, *, keep_jobs: bool = False) -> None:
        """Fail every job still active (the driver is going away) and end subscriptions.
        Queued jobs fail first, so the resources the others free admit nothing; nothing
        is started on the driver once this ran. ``keep_jobs`` (a durable store and a
        driver that recovers, design/store.md "Recovery"): active jobs stay as they are,
        in memory and in the store, for the next process to recover."""
        if self._closed:
            return
        self._closed = True
        self._kept = keep_jobs and self._dstore is not None and self.can_recover
        if not self._kept:
            active = self.store.active_jobs()
            for rec in [r for r in active if r.state is S.QUEUED] + active:
                self._finish(rec, S.FAILED, errmsg=CLOSED)
        if self._dstore is not None:  # after the events held back for a commit
            self._dstore.defer(self.events.close)
        else:
            self.events.close()

    async def drain(self) -> None:
        """After ``close``: commit what the store holds and emit what waits for it."""
        if self._dstore is not None:
            await self._dstore.drain()


class _Reporter:
    """The JobReporter a driver gets for one job."""

    __slots__ = ("_engine", "_rec")

    def __init__(self, engine: Engine, rec: JobRecord) -> None:
        self._engine = engine
        self._rec = rec

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self._engine._report(self._rec, Report.PROGRESS, extra=extra, progress=(processed, total))

    def ready(self) -> None:
        self._engine._report(self._rec, Report.READY)

    def completed(self, extra: Mapping[str, int | str] | None = None) -> None:
        self._engine._report(self._rec, Report.COMPLETED, extra=extra)

    def failed(self, errmsg: str) -> None:
        self._engine._report(self._rec, Report.FAILED, errmsg=errmsg)

    def cancelled(self) -> None:
        self._engine._report(self._rec, Report.CANCELLED)

    def domain_moved(self, uri: str) -> None:
        self._engine.domain_location[self._rec.domain] = uri


def _still_preempted(rec: JobRecord, active: set[uuid.UUID]) -> bool:
    """A recovered job a preemptor paused, waiting for it still (design/scheduling.md
    "Preemption"): paused, its preemptor among the active jobs."""
    by = rec.extra.get("preempted_by")
    return (
        rec.state in (S.PAUSED, S.STANDBY)
        and rec.extra.get("preempt") != "cancel"
        and by is not None
        and uuid.UUID(str(by)) in active
    )


def _explanation(ticket: Ticket, verdict: Verdict, position: int | None) -> Explanation:
    return Explanation(
        decision=verdict.decision,
        claims=tuple(ClaimView(c.resource, str(c.mode)) for c in ticket.claims),
        blockers=tuple(Blocker(c.holder, c.claim.resource, c.rule) for c in verdict.blockers),
        position=position,
    )


#: what _first_step returns for a coroutine that finished
_DONE = object()


def _first_step(start: Coroutine[Any, Any, None]) -> Any:
    """Run ``start`` up to where it first waits: what it yields there, or _DONE."""
    try:
        return start.send(None)
    except StopIteration:
        return _DONE


def _speed_into_spec(rec: JobRecord, bandwidth: int | None) -> None:
    """A queued job's speed goes into its spec where the spec has one (it starts at it)."""
    if hasattr(rec.spec, "bandwidth") and rec.spec.bandwidth != bandwidth:
        rec.spec = attrs.evolve(rec.spec, bandwidth=bandwidth)


def _start_finished(rec: JobRecord) -> None:
    """The driver start is over (or will not happen): verbs waiting for it may go on."""
    rec.starting = False
    if rec.start_done is not None:
        rec.start_done.set()
        rec.start_done = None


def _member_error(exc: JobError, index: int, domain: str) -> JobError:
    """``exc`` of a group member's begin, its message naming the member (same class)."""
    try:
        named = type(exc)(f"group member {index} on '{domain}': {exc}")
    except TypeError:  # a class with required fields (JobConflict): as it is
        return exc
    for key, value in vars(exc).items():
        setattr(named, key, value)
    return named


def _as_job_error(exc: BaseException) -> JobError:
    return exc if isinstance(exc, JobError) else DriverError(f"{type(exc).__name__}: {exc}")
