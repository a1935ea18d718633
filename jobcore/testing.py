"""A reusable lifecycle and scheduling test kit for any jobcore driver.

``JobLifecycleMachine`` is a hypothesis ``RuleBasedStateMachine`` that opens a blocking
connection to a driver URI, begins jobs from templates (each with a caller-chosen UUID),
and applies random abort/pause/resume/complete/set-speed verbs, time steps and injected
failures, while checking after every step:

* every observed state change is an edge of ``jobcore.lifecycle.TRANSITIONS``;
* a refused verb is refused only in a state whose verb-table row forbids it;
* terminal states are absorbing and every job gets exactly one FINAL event;
* jobs holding conflicting claims are never admitted together;
* ``LEGACY_DOMAIN_JOB_UUID`` resolves per the alias rule;
* queued jobs of equal priority contending for one resource start in FIFO order;
* no job is lost: every begun job can be looked up and, at teardown, ends;
* explain's decision is what ``JobBegin`` then does in the same state: ``admit`` begins
  it, ``queue`` queues it, ``conflict`` raises JobConflict naming one of its blockers,
  ``preempt`` takes its blockers' resources (unless a job started or ended in between,
  which a real driver's own pace may do), and an error explain raises, begin raises too.

(``EXPLAIN = False`` leaves that check out: the fleet machine's, whose members' explain
cannot see the claims the database shares among them.)

With ``PREEMPT = True`` the machine also begins jobs of priority 1000 with
``<policy conflict='preempt'/>`` (the ``preempt`` step), and checks that a preempted
job always gets its events: a PREEMPTED event naming its preemptor (also in its stats,
``preempted_by``), then its own states to exactly one FINAL; a job a preemptor paused
waits for its resources (explain says ``queue``), so it never counts as running beside
its preemptor.

With ``DURABLE = True`` the machine runs on a durable store (an SQLite file in a temporary
directory it owns and removes at teardown), and if the driver recovers jobs after a
restart (its connection has ``recover_job``) it gains a ``restart`` step: the connection
is closed leaving its jobs active (``keep_jobs``, as jobd's kill or stop does) and opened
again on the same store, and then:

* every begun job is found by UUID, in the state recovery gave it;
* a job's state moved across the restart only along ``TRANSITIONS``: the numbered events
  (``JobEvent.seq``) it missed are a path of the table from the state last seen;
* an ended job keeps its state and final stats;
* a job queued before the restart is still queued, or started in FIFO order (the
  FIFO check above spans restarts);
* on a manual sim clock, whose time stands still across a restart, only a job the
  hypervisor was finishing (aborting, completing) or a queued one changes state;
* across restarts every job gets exactly one FINAL event, ever: the new subscription is
  opened together with each job's catch-up event (``Engine.catch_up``, what a resuming
  subscriber gets), so an end recovery applied, or one released while the old connection
  closed, is counted once and none twice; with a durable store numbered events arrive
  without gaps.

A driver without ``recover_job``, or a machine on the memory store, has no restart step.

``FleetLifecycleMachine`` spreads the kit over several jobd connections (``MEMBERS``: the
members of one PostgreSQL fleet, or connections to one jobd): each template on every
host, begins through one of its host's members, verbs through any member (forwarded to
another host's job), events from one subscription per host, each job also watched from
another member; design/fleet.md "Property kit and soak".

A driver author subclasses it, sets ``URI`` and ``BACKEND`` (and ``DURABLE``), overrides
``templates()`` (and ``advance()`` if time is not a manual sim clock), and runs
``TestCase = MyMachine.TestCase``. See tests/test_lifecycle_kit.py for the sim driver.

Tests that drive a driver connection directly give it what the engine would:
``prepare_spec(spec, dom)`` / ``prepare_job(xml, dom)`` return the prepared spec of a job
on a domain (its ``DomainInfo``), every position and default resolved by its type.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import anyio
import attrs
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jobcore import constants as C
from jobcore.api import LEGACY_DOMAIN_JOB_UUID
from jobcore.driver import DomainInfo, job_verbs
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    JobConflict,
    JobError,
    NoSuchJob,
    OperationInvalid,
    Unsupported,
)
from jobcore.events import EventKind, JobEvent, Subscription
from jobcore.facade import BlockingConnection, BlockingDomain, BlockingJob, BlockingJobGroup
from jobcore.facade import JobAbort as _JobAbort
from jobcore.facade import JobBegin as _JobBegin
from jobcore.facade import JobExplain as _JobExplain
from jobcore.facade import JobGetInfo as _JobGetInfo
from jobcore.facade import JobGetStats as _JobGetStats
from jobcore.facade import JobGroupAbort as _JobGroupAbort
from jobcore.facade import JobGroupBegin as _JobGroupBegin
from jobcore.facade import JobGroupGetInfo as _JobGroupGetInfo
from jobcore.facade import JobGroupGetJobs as _JobGroupGetJobs
from jobcore.facade import JobGroupWait as _JobGroupWait
from jobcore.facade import JobLookupByUUID as _JobLookupByUUID
from jobcore.facade import open as _open
from jobcore.groups import group_state, member_kind
from jobcore.lifecycle import INITIAL, TRANSITIONS, VERB_TARGET, JobState, Verb, accepts
from jobcore.local import LocalConnection
from jobcore.registry import registry
from jobcore.store_sqlite import SQLiteJobStore


def prepare_spec(
    spec: Any, dom: DomainInfo, *, wall: float | None = None, reuse_external: bool = False
) -> Any:
    """``spec`` as the engine hands it to a driver for a job on ``dom``: with a UUID (a
    new one if it has none), REUSE_EXTERNAL as the flag sets it (backups), and prepared by
    its type against the domain (``wall``: the Unix time default names use; now)."""
    info = registry.for_spec(spec)
    if reuse_external:
        spec = attrs.evolve(spec, reuse_external=True)
    if spec.uuid is None:
        spec = attrs.evolve(spec, uuid=uuid.uuid4())
    if info.prepare is None:
        return spec
    return info.prepare(spec, dom, time.time() if wall is None else wall)


def prepare_job(xml: str, dom: DomainInfo, **kw: Any) -> Any:
    """``prepare_spec`` of a ``<job>`` document."""
    from jobcore.xml import parse_job

    return prepare_spec(parse_job(xml), dom, **kw)


@attrs.frozen
class JobTemplate:
    """A job the machine may begin: ``make(uuid, queue)`` returns the job XML.

    ``exclusive``, ``reads`` and ``chains`` describe the job for the contract's conflict
    rules, independently of the engine's own claims: a migration is exclusive; a backup
    reads its disks; a block pull or commit changes its disk's chain.
    """

    name: str
    domain: str
    domain_level: bool
    make: Callable[[uuid.UUID, bool], str]  # MakeXML
    exclusive: bool = False
    reads: frozenset[str] = frozenset()
    chains: frozenset[str] = frozenset()


def contract_conflict(a: JobTemplate, b: JobTemplate) -> bool:
    """The contract's default conflicts between two jobs (backup targets are unique in
    the kit's templates, so file conflicts never arise)."""
    if a.domain != b.domain:
        return False
    return (
        a.exclusive
        or b.exclusive
        or bool(a.chains & b.chains)
        or bool(a.reads & b.chains)
        or bool(a.chains & b.reads)
    )


#: builds a job's XML from its UUID and whether it asks to queue
MakeXML = Callable[[uuid.UUID, bool], str]


def _options(job: uuid.UUID, queue: bool) -> str:
    return f"<uuid>{job}</uuid>" + ("<queue/>" if queue else "")


def backup_job(disk: str, store_dir: str, mode: str = "push") -> MakeXML:
    """A backup of one disk into ``store_dir/<uuid>.<disk>`` (push target or pull scratch;
    a pull backup serves ``store_dir/<uuid>.sock``)."""

    def make(job: uuid.UUID, queue: bool) -> str:
        store = "scratch" if mode == "pull" else "target"
        server = (
            f"<server transport='unix' socket='{store_dir}/{job}.sock'/>" if mode == "pull" else ""
        )
        return (
            f"<job type='backup'>{_options(job, queue)}<domainbackup mode='{mode}'>"
            f"{server}<disks><disk name='{disk}' type='file'>"
            f"<{store} file='{store_dir}/{job}.{disk}'/></disk></disks></domainbackup></job>"
        )

    return make


def chain_job(kind: str, body: str) -> MakeXML:
    """A block pull or commit: ``body`` holds the type's children."""
    return lambda job, queue: f"<job type='{kind}'>{_options(job, queue)}{body}</job>"


def migration_job(destination: str, extra: str = "") -> MakeXML:
    return lambda job, queue: (
        f"<job type='migration'>{_options(job, queue)}<destination uri='{destination}'/>"
        f"{extra}</job>"
    )


def sim_templates() -> list[JobTemplate]:
    """Jobs of every type on the sim driver's ``vm1`` and ``vm2``."""
    backup, chain, migration = backup_job, chain_job, migration_job
    vda, vdb = frozenset({"vda"}), frozenset({"vdb"})
    return [
        JobTemplate("backup-vda", "vm1", True, backup("vda", "/kit"), reads=vda),
        JobTemplate("backup-vdb", "vm1", True, backup("vdb", "/kit"), reads=vdb),
        JobTemplate("pull-backup-vdb", "vm1", True, backup("vdb", "/kit", "pull"), reads=vdb),
        JobTemplate(
            "blockpull-vda", "vm1", False, chain("blockpull", "<disk name='vda'/>"), chains=vda
        ),
        JobTemplate(
            "commit-vda-active",
            "vm1",
            False,
            chain("blockcommit", "<disk name='vda'/>"),
            chains=vda,
        ),
        JobTemplate(
            "commit-vdb", "vm1", False, chain("blockcommit", "<disk name='vdb'/>"), chains=vdb
        ),
        JobTemplate("migrate-away", "vm1", True, migration("sim:///kitdest"), exclusive=True),
        JobTemplate("backup-vm2", "vm2", True, backup("vda", "/kit"), reads=vda),
    ]


@attrs.define
class _Seen:
    template: JobTemplate
    job: BlockingJob | None
    order: int
    queued_at_begin: bool = False
    states: list[JobState] = attrs.field(factory=list)
    finals: int = 0
    ended_order: int | None = None
    started_order: int | None = None
    #: the number of the job's last STATE or FINAL event seen (durable stores number them)
    seq: int = 0
    #: numbered events up to this one were covered by a catch-up after a restart
    caught_up: int = 0
    #: the preemptors named by this job's PREEMPTED events
    preempted_by: list[uuid.UUID] = attrs.field(factory=list)
    #: begun by the ``preempt`` step (priority 1000, policy preempt)
    preemptor: bool = False


#: the states a restart with time standing still may move on from (see ``restart``)
_FINISHING_OR_QUEUED = frozenset({JobState.ABORTING, JobState.COMPLETING, JobState.QUEUED})


def path_of_length(start: JobState, end: JobState, steps: int) -> bool:
    """Whether ``TRANSITIONS`` leads from ``start`` to ``end`` in exactly ``steps`` moves."""
    reach = {start}
    for _ in range(steps):
        reach = {n for s in reach for n in TRANSITIONS[s]}
    return end in reach


class JobLifecycleMachine(RuleBasedStateMachine):
    URI: ClassVar[str] = "sim:///default?clock=manual"
    BACKEND: ClassVar[str] = "asyncio"
    #: seconds an ended job is retained; long, so the alias model needs no expiry
    RETENTION: ClassVar[float] = 1e9
    #: run on a durable store (an SQLite file in a temporary directory the machine owns):
    #: with a driver that recovers jobs, the machine gains the ``restart`` step
    DURABLE: ClassVar[bool] = False
    #: also begin preempting jobs (the ``preempt`` step; see the module docstring)
    PREEMPT: ClassVar[bool] = False
    #: check each begin against the explain made just before it
    EXPLAIN: ClassVar[bool] = True

    def templates(self) -> list[JobTemplate]:
        return sim_templates()

    def advance(self, seconds: float) -> None:
        """Let time pass: a manual sim clock is advanced, other drivers really wait."""
        clock = getattr(self.conn.driver, "clock", None)
        if clock is not None and getattr(clock, "manual", False):
            self.conn.run_sync(clock.advance, seconds)
        else:
            time.sleep(min(seconds, 0.2) / 10)

    def inject_failure(self, at: float) -> bool:
        inject = getattr(self.conn.driver, "inject_failure", None)
        if inject is None:
            return False
        self.conn.run_sync(inject, None, at, "kit-injected failure")
        return True

    # ---- setup and bookkeeping -------------------------------------------------------

    def __init__(self) -> None:
        super().__init__()
        self._store_dir = tempfile.mkdtemp(prefix="jobcore-kit-store-") if self.DURABLE else None
        try:
            self.conn: BlockingConnection = self._connect()
        except BaseException:
            self._remove_store()
            raise
        self.sub: Subscription = self.conn.run_sync(
            lambda: self.conn.aconn.subscribe(maxlen=1 << 20)
        )
        self.domains: dict[str, BlockingDomain] = {}
        self.seen: dict[uuid.UUID, _Seen] = {}
        self._order = 0
        self._ends = 0
        self._starts = 0
        self.tmpl = self.templates()
        #: restarts this machine made (the restart step's precondition: can_restart)
        self.restarts = 0
        aconn = self.conn.aconn
        self.can_restart = (
            self._store_dir is not None
            and isinstance(aconn, LocalConnection)
            and aconn.engine.can_recover
        )

    def _connect(self) -> BlockingConnection:
        store = None if self._store_dir is None else f"sqlite://{self._store_dir}/jobs.sqlite"
        return _open(self.URI, backend=self.BACKEND, retention=self.RETENTION, store=store)

    def _remove_store(self) -> None:
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)

    def _domain(self, name: str) -> BlockingDomain:
        """The handle of the domain a template names (``JobTemplate.domain``)."""
        return self.conn.lookupByName(name)

    def _begin_domain(self, data: st.DataObject, tmpl: JobTemplate) -> BlockingDomain:
        """The domain handle a begin of ``tmpl`` goes through."""
        return self.domains[tmpl.domain]

    def _verb_handle(self, data: st.DataObject, seen: _Seen) -> BlockingJob:
        """The job handle a verb on ``seen`` goes through."""
        assert seen.job is not None
        return seen.job

    @initialize()
    def _lookup_domains(self) -> None:
        for t in self.tmpl:
            if t.domain not in self.domains:
                self.domains[t.domain] = self._domain(t.domain)

    def teardown(self) -> None:
        try:
            self._drain_all()
        finally:
            try:
                self.conn.close()
            finally:
                self._remove_store()

    def _drain_events(self) -> None:
        if self._store_dir is not None:
            self.conn.run(self._settle)
        self._absorb(self.conn.run_sync(self._take_events))

    async def _settle(self) -> None:
        """A durable store releases events once their writes are committed on its writer
        thread: wait until it has nothing left to commit or release (and the loop has run
        what that woke), so each step sees the same events whatever the thread's timing."""
        aconn = self.conn.aconn
        store = aconn.engine.store if isinstance(aconn, LocalConnection) else None
        if not isinstance(store, SQLiteJobStore):
            return
        for _ in range(1000):
            await store.sync(raise_errors=False)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            if store.settled:
                return

    def _absorb(self, events: list[JobEvent]) -> None:
        for ev in events:
            seen = self.seen.get(ev.job)
            assert seen is not None, f"event for a job never begun: {ev}"
            assert ev.lost_before == 0, "the kit's subscription must not lose events"
            if ev.seq:  # numbered (a durable store): in order, without gaps
                if ev.seq <= seen.caught_up:
                    continue  # released after a restart's catch-up, which counted it
                assert ev.seq == seen.seq + 1, f"event #{ev.seq} after #{seen.seq}: {ev}"
                seen.seq = ev.seq
            if ev.kind is EventKind.STATE:
                last = seen.states[-1] if seen.states else None
                assert ev.previous == last, (ev, seen.states)
                if last is None:
                    assert ev.state in INITIAL, ev
                else:
                    assert ev.state in TRANSITIONS[last], f"{last} -> {ev.state} not allowed"
                seen.states.append(ev.state)
                if ev.state is JobState.RUNNING and seen.started_order is None:
                    self._starts += 1
                    seen.started_order = self._starts
            elif ev.kind is EventKind.PREEMPTED:
                assert seen.finals == 0, "PREEMPTED after the job's FINAL event"
                by = uuid.UUID(str((ev.stats or {})["preempted_by"]))
                assert by in self.seen, f"preempted by a job never begun: {ev}"
                seen.preempted_by.append(by)
            elif ev.kind is EventKind.FINAL:
                assert seen.states and seen.states[-1].terminal, "FINAL before terminal state"
                assert ev.stats is not None and ev.stats["state"] == str(seen.states[-1])
                seen.finals += 1
                assert seen.finals == 1, "more than one FINAL event"
                self._ends += 1
                seen.ended_order = self._ends

    def _take_events(self) -> list[JobEvent]:
        out = []
        while (ev := self.sub.get_nowait()) is not None:
            out.append(ev)
        return out

    def _state(self, seen: _Seen) -> JobState | None:
        return seen.states[-1] if seen.states else None

    def _live(self) -> list[_Seen]:
        return [
            s
            for s in self.seen.values()
            if s.job is not None and (self._state(s) or JobState.RUNNING).active
        ]

    # ---- rules -----------------------------------------------------------------------

    @rule(data=st.data(), queue=st.booleans())
    def begin(self, data: st.DataObject, queue: bool) -> None:
        tmpl = data.draw(st.sampled_from(self.tmpl), label="template")
        job_id = uuid.uuid4()
        self._order += 1
        seen = _Seen(tmpl, None, self._order)
        self.seen[job_id] = seen
        dom = self._begin_domain(data, tmpl)
        xml = tmpl.make(job_id, queue)
        self._drain_events()
        moves_before = (self._ends, self._starts)
        explained, refusal = self._explain(dom, xml)
        ends_before = self._ends  # a holder may end on its own right after the refusal
        try:
            job = self._begin_as_explained(dom, xml, explained, refusal, moves_before)
        except JobConflict as exc:
            assert not queue, "a queueing begin must not fail with JobConflict"
            holder = self.seen.get(exc.holder)
            assert holder is not None and holder.job is not None, "holder must be a known job"
            self._drain_events()
            holder_state = self._state(holder)
            assert holder_state is not None, "the holder's state must be known"
            assert holder_state.active or (
                holder.ended_order is not None and holder.ended_order > ends_before
            ), f"conflict named a job that was already {holder_state} before the begin"
            del self.seen[job_id]
            return
        except InvalidArgument:
            del self.seen[job_id]  # refused before admission: no job was created
            return
        except DriverError:
            # refused by the hypervisor at start: the job exists and ended failed
            job = _JobLookupByUUID(dom, job_id)
        assert job.uuid == job_id
        seen.job = job
        self._drain_events()
        state = self._state(seen)
        assert state is not None
        seen.queued_at_begin = state is JobState.QUEUED
        if state is JobState.QUEUED:
            assert queue, "only a caller asking to queue sees 'queued'"
        if explained is not None and self._moves() == moves_before:
            want = {"admit": "admitted", "queue": "queued"}.get(explained["decision"])
            got = "queued" if state is JobState.QUEUED else "admitted"
            assert want is None or want == got, f"explain said {explained['decision']}: {got}"

    # ---- explain, then begin ------------------------------------------------------------

    def _moves(self) -> tuple[int, int]:
        """Jobs ended and started so far (drained): what may make a begin differ from
        the explain just before it on a driver whose jobs move on their own."""
        self._drain_events()
        return (self._ends, self._starts)

    def _explain(self, dom: BlockingDomain, xml: str) -> tuple[Any, type[JobError] | None]:
        """JobExplain's answer for ``xml`` now, or the class of the error it raised
        (nothing without ``EXPLAIN``)."""
        if not self.EXPLAIN:
            return None, None
        try:
            return _JobExplain(dom, xml), None
        except JobError as exc:
            return None, type(exc)

    def _begin_as_explained(
        self,
        dom: BlockingDomain,
        xml: str,
        explained: Any,
        refusal: type[JobError] | None,
        moves_before: tuple[int, int],
    ) -> BlockingJob:
        """JobBegin, checked against the explain made just before it."""
        try:
            job = _JobBegin(dom, xml)
        except JobError as exc:
            if refusal is not None:
                assert isinstance(exc, refusal), f"explain raised {refusal}, begin {exc!r}"
            elif (
                explained is not None
                and isinstance(exc, JobConflict)
                and self._moves() == moves_before
            ):
                assert explained["decision"] == "conflict", f"explain said {explained}"
                assert str(exc.holder) in {b["uuid"] for b in explained["blockers"]}
            raise
        if refusal is not None and refusal is not DriverError:
            assert self._moves() != moves_before, f"explain raised {refusal}, begin did not"
        elif explained is not None and self._moves() == moves_before:
            assert explained["decision"] != "conflict", "explain said conflict, begin admitted"
        return job

    @precondition(lambda self: self.PREEMPT and bool(self._live()))
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        """Begin a job of priority 1000 whose policy preempts; explain's blockers then
        are its victims: each gets a PREEMPTED event naming it. A template in conflict
        with a live job is drawn when there is one."""
        live = [s.template for s in self._live()]
        rivals = [t for t in self.tmpl if any(contract_conflict(t, o) for o in live)]
        tmpl = data.draw(st.sampled_from(rivals or self.tmpl), label="template")
        job_id = uuid.uuid4()
        xml = tmpl.make(job_id, False).replace(
            "</uuid>", "</uuid><priority>1000</priority><policy conflict='preempt'/>", 1
        )
        dom = self._begin_domain(data, tmpl)
        self._order += 1
        seen = _Seen(tmpl, None, self._order, preemptor=True)
        self.seen[job_id] = seen
        self._drain_events()
        explained, refusal = self._explain(dom, xml)
        try:
            job = _JobBegin(dom, xml)
        except (JobConflict, InvalidArgument) as exc:
            if refusal is not None:
                assert isinstance(exc, refusal), f"explain raised {refusal}, begin {exc!r}"
            del self.seen[job_id]
            return
        except DriverError:
            job = _JobLookupByUUID(dom, job_id)
        seen.job = job
        self._drain_events()
        if explained is not None and explained["decision"] == "preempt":
            for b in explained["blockers"]:
                victim = self.seen.get(uuid.UUID(b["uuid"]))
                assert victim is not None, f"explain named a job never begun: {b}"
                assert job_id in victim.preempted_by or (
                    victim.states and victim.states[-1].terminal
                ), f"{victim.template.name} was not told it was preempted"

    def _verb(self, data: st.DataObject, verb: Verb, call: Callable[[BlockingJob], Any]) -> None:
        live = self._live()
        if not live:
            return
        seen = data.draw(st.sampled_from(live), label="job")
        assert seen.job is not None
        try:
            call(self._verb_handle(data, seen))
        except OperationInvalid as exc:
            if verb is Verb.RESUME and self._waits_preempted(seen):
                pass  # paused by a preemptor: it resumes when that one ends, not before
            elif exc.state is not None and exc.verb == str(verb):
                assert not accepts(JobState(exc.state), verb, self._job_verbs(seen)), (
                    f"{verb} refused in {exc.state}, which accepts it"
                )
        except (DriverError, Unsupported):
            pass  # the hypervisor refused: the engine rolled back or failed the job
        self._drain_events()

    def _job_verbs(self, seen: _Seen) -> frozenset[Verb]:
        """The verbs the job accepts at all: its type's, narrowed by the driver's."""
        assert seen.job is not None
        job_type = seen.job.type
        return job_verbs(self.conn.driver, job_type, registry.get(job_type).verbs)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        from jobcore.facade import JobAbort

        self._verb(data, Verb.ABORT, JobAbort)

    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        from jobcore.facade import JobPause

        self._verb(data, Verb.PAUSE, JobPause)

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        from jobcore.facade import JobResume

        self._verb(data, Verb.RESUME, JobResume)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        from jobcore.facade import JobComplete

        self._verb(data, Verb.COMPLETE, JobComplete)

    @rule(data=st.data(), speed=st.sampled_from([0, 1 << 20, 1 << 30]))
    def set_speed(self, data: st.DataObject, speed: int) -> None:
        from jobcore.facade import JobSetSpeed

        self._verb(data, Verb.SET_SPEED, lambda j: JobSetSpeed(j, speed))

    @rule(seconds=st.sampled_from([0.0, 0.5, 2.0, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)
        self.conn.run_sync(lambda: None)  # let the loop run once
        self._drain_events()

    @precondition(lambda self: bool(self._live()))
    @rule(at=st.sampled_from([0.0, 0.3, 0.9]))
    def failure(self, at: float) -> None:
        self.inject_failure(at)

    @precondition(lambda self: self.can_restart)
    @rule()
    def restart(self) -> None:
        """Close the connection leaving its jobs (as jobd's kill or stop does) and open it
        again on the same store; then check what recovery made of every job."""
        self._drain_events()
        before = {
            job_id: (self._state(s), self.conn.run(s.job.ajob.stats) if s.finals else None)
            for job_id, s in self.seen.items()
            if s.job is not None
        }
        self.conn.close()  # a durable store and a driver that recovers: keep_jobs
        self._absorb(self._take_events())  # what the close's drain released
        self.restarts += 1
        self.conn = self._connect()
        self.domains = {name: self._domain(name) for name in self.domains}
        caught: dict[uuid.UUID, JobEvent | None] = self.conn.run_sync(
            self._resubscribe, list(before)
        )
        for job_id, (state, stats) in before.items():
            self._recovered(job_id, state, stats, caught[job_id])

    def _resubscribe(self, jobs: list[uuid.UUID]) -> dict[uuid.UUID, JobEvent | None]:
        """Subscribe and take each job's catch-up event in one step on the loop, so every
        numbered event after the catch-up reaches the new subscription."""
        aconn = self.conn.aconn
        assert isinstance(aconn, LocalConnection)
        self.sub = aconn.subscribe(maxlen=1 << 20)
        return {job: aconn.engine.catch_up(job, 0) for job in jobs}

    def _recovered(
        self,
        job_id: uuid.UUID,
        state: JobState | None,
        stats: dict[str, Any] | None,
        ev: JobEvent | None,
    ) -> None:
        seen = self.seen[job_id]
        assert ev is not None, f"job {job_id} ({state}) was lost across the restart"
        assert state is not None
        seen.job = _JobLookupByUUID(self.domains[seen.template.domain], job_id)
        if seen.finals:  # ended before the restart: as it was, stats and all
            assert ev.kind is EventKind.FINAL and ev.state is state and ev.seq == seen.seq, (
                f"ended job {job_id} ({state}, #{seen.seq}) came back as {ev}"
            )
            got = self.conn.run(seen.job.ajob.stats)
            assert got == stats, f"ended job {job_id} lost its stats: {stats} -> {got}"
            return
        moves = ev.seq - seen.seq - (1 if ev.kind is EventKind.FINAL else 0)
        assert moves >= 0, f"job {job_id}: event #{ev.seq} after #{seen.seq} was seen"
        assert path_of_length(state, ev.state, moves), (
            f"job {job_id}: {state} -> {ev.state} in {moves} moves across a restart "
            "is no path of the lifecycle table"
        )
        if self._manual() and state not in _FINISHING_OR_QUEUED:
            # no time passes across the restart of a manual clock: only what the
            # hypervisor was already finishing ends, only queued jobs may start
            assert moves == 0, (
                f"job {job_id}: {state} -> {ev.state} across a restart, with time standing still"
            )
        if state is JobState.QUEUED and (moves >= 2 or ev.state.active) and moves:
            assert seen.started_order is None
            self._starts += 1  # started at recovery: in begin (= ticket) order
            seen.started_order = self._starts
        if moves:
            seen.states.append(ev.state)
        if ev.kind is EventKind.FINAL:
            assert ev.stats is not None and ev.stats["state"] == str(ev.state)
            seen.finals += 1
            assert seen.finals == 1, f"job {job_id}: more than one FINAL event"
            self._ends += 1
            seen.ended_order = self._ends
        seen.seq = seen.caught_up = ev.seq

    # ---- invariants ------------------------------------------------------------------

    @invariant()
    def no_conflicting_jobs_are_admitted_together(self) -> None:
        if not hasattr(self, "conn"):
            return
        self._drain_events()
        admitted = [
            s
            for s in self.seen.values()
            if s.job is not None
            and self._state(s) not in (None, JobState.QUEUED)
            and (self._state(s) or JobState.RUNNING).active
            and not self._waits_preempted(s)
        ]
        for i, a in enumerate(admitted):
            for b in admitted[i + 1 :]:
                assert not contract_conflict(a.template, b.template), (
                    f"{a.template.name} and {b.template.name} run together"
                )

    def _waits_preempted(self, seen: _Seen) -> bool:
        """A preempted job paused and waiting for its resources again (explain: queue)."""
        if not seen.preempted_by or seen.job is None:
            return False
        from jobcore.facade import JobExplain

        try:
            return bool(JobExplain(seen.job)["decision"] == "queue")
        except OperationInvalid:  # it ended meanwhile
            return False

    @invariant()
    def legacy_alias_follows_the_rule(self) -> None:
        if not hasattr(self, "conn"):
            return
        for name, dom in self.domains.items():
            mine = [
                s
                for s in self.seen.values()
                if s.template.domain == name and s.template.domain_level and s.job is not None
            ]
            active = [s for s in mine if (self._state(s) or JobState.RUNNING).active]
            ended = [s for s in mine if s.ended_order is not None]
            if active:
                expected = min(active, key=lambda s: s.order)
            elif ended:
                expected = max(ended, key=lambda s: s.ended_order or 0)
            else:
                try:
                    got = _JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID)
                except NoSuchJob:
                    continue
                # a job may have ended between our event drain and the lookup
                raise AssertionError(f"alias resolved to {got.uuid} with no domain job")
            got = _JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID)
            self._drain_events()
            if got.uuid != (expected.job.uuid if expected.job else None):
                # events may have moved on between the model and the call: recompute once
                active = [s for s in mine if (self._state(s) or JobState.RUNNING).active]
                assert active or ended
                assert got.uuid in {s.job.uuid for s in mine if s.job is not None}
                expected = (
                    min(active, key=lambda s: s.order)
                    if active
                    else max(ended, key=lambda s: s.ended_order or 0)
                )
                assert expected.job is not None and got.uuid == expected.job.uuid

    @invariant()
    def queued_jobs_start_in_fifo_order(self) -> None:
        if not hasattr(self, "conn"):
            return
        queued = [s for s in self.seen.values() if s.queued_at_begin and s.job is not None]
        for a in queued:
            for b in queued:
                if a.order >= b.order or a.started_order is None or b.started_order is None:
                    continue
                if any(p.preemptor and p.order > a.order for p in self.seen.values()):
                    continue  # a higher priority overtook them: aging may reorder them
                if contract_conflict(a.template, b.template):
                    assert a.started_order < b.started_order, (
                        f"{b.template.name} #{b.order} started before earlier queued "
                        f"{a.template.name} #{a.order}"
                    )

    # ---- teardown: nothing is lost ---------------------------------------------------

    def _drain_all(self) -> None:
        from jobcore.facade import JobAbort, JobGetInfo, JobWait

        for _ in range(50):
            self._drain_events()
            live = self._live()
            if not live:
                break
            for seen in live:
                assert seen.job is not None
                with contextlib.suppress(OperationInvalid, DriverError, Unsupported):
                    JobAbort(seen.job)
            self.advance(30.0)
            for seen in live:
                assert seen.job is not None
                with contextlib.suppress(TimeoutError):
                    JobWait(seen.job, timeout=5.0 if not self._manual() else 0.5)
        self._drain_events()
        for job_id, seen in self.seen.items():
            assert seen.job is not None
            info = JobGetInfo(seen.job)
            assert JobState(info["state"]).terminal, f"job {job_id} never ended: {info['state']}"
            assert seen.finals == 1, f"job {job_id} got {seen.finals} FINAL events"
            stats = seen.job.conn.run(seen.job.ajob.stats)
            if seen.preempted_by:  # a preempted job's stats say who preempted it
                assert stats.get("preempted_by") == str(seen.preempted_by[-1]), stats
            assert stats["type"] in (
                C.VIR_DOMAIN_JOB_COMPLETED,
                C.VIR_DOMAIN_JOB_FAILED,
                C.VIR_DOMAIN_JOB_CANCELLED,
            )

    def _manual(self) -> bool:
        clock = getattr(self.conn.driver, "clock", None)
        return bool(getattr(clock, "manual", False))


# ---- the kit over several connections (a fleet's members) ------------------------------


@attrs.frozen
class Member:
    """One connection of a ``FleetLifecycleMachine``: ``uri`` reaches a jobd serving
    ``host`` (its ``--host``: every job begun there says so, on every member). Members
    naming one host are connections to one jobd."""

    host: str
    uri: str


@attrs.define
class _Mirror:
    """A per-job subscription on a member that is not the job's own connection."""

    sub: Subscription
    #: the job was active once the subscription was registered: its end must reach it
    expect_final: bool
    events: list[JobEvent] = attrs.field(factory=list)


class FleetLifecycleMachine(JobLifecycleMachine):
    """The kit with its jobs spread over several connections (``MEMBERS``), e.g. the
    members of one PostgreSQL fleet: each template is instantiated on every host (its
    domain key ``HOST/NAME``), a begin goes through one of the host's members, a verb
    through any member (to another host's job it is forwarded to the owner). Every
    invariant of the kit holds, with these additions:

    * events come from one subscription per host, on its first member; each step waits
      until they agree with what the job's owner says of it (``EVENT_WAIT`` seconds at
      most), so an event that never reaches its subscriber fails the step;
    * each job is also watched by a per-job subscription on a member other than the one
      it was begun on (another host's when there is one): what that watch sees is the
      owner's numbered events (same number, same state), in order, at most one FINAL,
      and its FINAL if the job was still active when the watch began (another host's
      job is looked up through that member first, then subscribed to: jobd starts the
      watch from the row the lookup read).

    Each example creates domains of its own on every host (``domain_xml``: the
    templates' domain names with a suffix of the example's), on one driver URI per
    member for all examples (jobd keeps a driver connection while it retains jobs, and
    serves a bounded number of them).

    Time is the members' real clock (``TIME_SCALE``: real seconds per step second); there
    is no failure injection and no restart step (jobd's kill is the soak's business).
    """

    MEMBERS: ClassVar[tuple[Member, ...]] = ()
    #: explain sees one member's claims, not the shared claims the database arbitrates
    EXPLAIN = False
    #: seconds a step waits for events to agree with the owner's answer
    EVENT_WAIT: ClassVar[float] = 10.0
    TIME_SCALE: ClassVar[float] = 0.02
    #: the driver's ``DriverConnection.job_verbs`` (jobd's connection is out of reach)
    JOB_VERBS: ClassVar[dict[str, frozenset[Verb]]] = {}

    def host_templates(self) -> list[JobTemplate]:
        """The jobs of one host (each is begun on every host)."""
        return sim_templates()

    def domain_xml(self, name: str, template_domain: str) -> str:
        """The XML of the domain ``name`` each example creates on every host for the
        templates' ``template_domain``: a sim domain like the sim's seeded ones (a
        three-layer ``vda``, a plain ``vdb``) on images of the example's own."""
        base = f"/kit/{name}"

        def disk(dev: str, layers: int) -> str:
            chain = "<backingStore/>"
            for i in range(layers - 1):
                source = f"{base}/{dev}.{i}.qcow2" if i else f"{base}/{dev}.qcow2"
                chain = (
                    f"<backingStore type='file'><format type='qcow2'/>"
                    f"<source file='{source}'/>{chain}</backingStore>"
                )
            top = f"{base}/{dev}.{layers - 1}.qcow2" if layers > 1 else f"{base}/{dev}.qcow2"
            return (
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{top}'/>{chain}<target dev='{dev}'/></disk>"
            )

        return (
            f"<domain><name>{name}</name><memory unit='MiB'>512</memory><devices>"
            f"{disk('vda', 3)}{disk('vdb', 1)}</devices></domain>"
        )

    def templates(self) -> list[JobTemplate]:
        return [
            attrs.evolve(t, name=f"{t.name}@{host}", domain=f"{host}/{t.domain}")
            for host in self.hosts
            for t in self.host_templates()
        ]

    def __init__(self) -> None:
        if len(self.MEMBERS) < 2:
            raise InvalidArgument("a FleetLifecycleMachine needs at least two MEMBERS")
        #: this example's domains are named ``NAME-TAG`` (on one sim host for all
        #: examples: jobd keeps a driver connection while it retains jobs)
        self.tag = uuid.uuid4().hex[:12]
        self.hosts = list(dict.fromkeys(m.host for m in self.MEMBERS))
        self.members: list[BlockingConnection] = []
        self.mirrors: dict[uuid.UUID, _Mirror] = {}
        #: each job's owner events by number: (kind, state)
        self.numbered: dict[uuid.UUID, dict[int, tuple[EventKind, JobState]]] = {}
        self._handles: dict[tuple[int, uuid.UUID], BlockingJob] = {}
        self._doms: dict[tuple[int, str], BlockingDomain] = {}
        #: verbs sent through a member of another host than the job's (forwarded)
        self.forwarded = 0
        super().__init__()
        try:
            for host in self.hosts:
                for name in dict.fromkeys(t.domain for t in self.host_templates()):
                    conn = self.members[self._primary(host)]
                    conn.createXML(self.domain_xml(f"{name}-{self.tag}", name))
            self.subs: dict[str, Subscription] = {self.MEMBERS[0].host: self.sub}
            for host in self.hosts[1:]:
                conn = self.members[self._primary(host)]
                self.subs[host] = conn.run_sync(lambda c=conn: c.aconn.subscribe(maxlen=1 << 20))
        except BaseException:
            self._close_members()
            raise

    def _connect(self) -> BlockingConnection:
        try:
            for m in self.MEMBERS:
                self.members.append(_open(m.uri, backend=self.BACKEND, retention=self.RETENTION))
        except BaseException:
            self._close_members()
            raise
        return self.members[0]

    def _close_members(self) -> None:
        for conn in self.members:
            with contextlib.suppress(Exception):
                conn.close()

    def _primary(self, host: str) -> int:
        return next(i for i, m in enumerate(self.MEMBERS) if m.host == host)

    def _host_of(self, seen: _Seen) -> str:
        return seen.template.domain.split("/", 1)[0]

    def _member_domain(self, i: int, name: str) -> BlockingDomain:
        dom = self._doms.get((i, name))
        if dom is None:
            dom = self._doms[(i, name)] = self.members[i].lookupByName(name)
        return dom

    def _domain(self, name: str) -> BlockingDomain:
        host, dom = name.split("/", 1)
        return self._member_domain(self._primary(host), f"{dom}-{self.tag}")

    def _begin_domain(self, data: st.DataObject, tmpl: JobTemplate) -> BlockingDomain:
        host, dom = tmpl.domain.split("/", 1)
        serving = [i for i, m in enumerate(self.MEMBERS) if m.host == host]
        i = serving[0] if len(serving) == 1 else data.draw(st.sampled_from(serving), "member")
        return self._member_domain(i, f"{dom}-{self.tag}")

    def _verb_handle(self, data: st.DataObject, seen: _Seen) -> BlockingJob:
        assert seen.job is not None
        i = data.draw(st.sampled_from(range(len(self.MEMBERS))), label="member")
        conn = self.members[i]
        if seen.job.conn is conn:
            return seen.job
        if self.MEMBERS[i].host != self._host_of(seen):
            self.forwarded += 1
        key = (i, seen.job.uuid)
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = BlockingJob(
                conn, conn.run(conn.aconn.lookup_job, seen.job.uuid)
            )
        return handle

    @rule(data=st.data(), queue=st.booleans())
    def begin(self, data: st.DataObject, queue: bool) -> None:
        known = set(self.seen)
        super().begin(data, queue)
        for job_id in set(self.seen) - known:
            self._watch(job_id)

    def _watch(self, job_id: uuid.UUID) -> None:
        """A per-job subscription on a member of another host (or another connection)."""
        seen = self.seen[job_id]
        assert seen.job is not None
        host = self._host_of(seen)
        others = [i for i, m in enumerate(self.MEMBERS) if m.host != host] or [
            i for i, c in enumerate(self.members) if c is not seen.job.conn
        ]
        conn = self.members[others[0]]

        def subscribe() -> Subscription:
            return conn.run_sync(lambda: conn.aconn.subscribe(job=job_id, maxlen=1 << 16))

        if self.MEMBERS[others[0]].host != host:
            # another host's job: looked up first, so the watch starts from the row the
            # lookup read (jobd's session knows the handle), and every change after it
            # reaches the subscription
            there = conn.run(conn.aconn.lookup_job, job_id)
            active = there.state.active
            sub = subscribe()
        else:  # the round trip after the subscribe request: jobd has registered it
            sub = subscribe()
            there = conn.run(conn.aconn.lookup_job, job_id)
            active = JobState(_JobGetInfo(seen.job)["state"]).active
        info = _JobGetInfo(seen.job)
        assert info["host"] == host, f"job {job_id} begun on {host} says host {info['host']}"
        elsewhere = conn.run(there.info)
        assert elsewhere.host == host and not elsewhere.host_lost, (
            f"job {job_id} of {host} through {conn.uri}: {elsewhere}"
        )
        self.mirrors[job_id] = _Mirror(sub, active)

    def _verb(self, data: st.DataObject, verb: Verb, call: Callable[[BlockingJob], Any]) -> None:
        """The kit's verb step; a verb that answered without an error (through whichever
        member) moved its job to the verb's target state (``VERB_TARGET``)."""
        answered: list[BlockingJob] = []
        marks = {job_id: len(s.states) for job_id, s in self.seen.items()}

        def tracked(job: BlockingJob) -> None:
            call(job)
            answered.append(job)

        super()._verb(data, verb, tracked)
        targets = {target for (v, _), target in VERB_TARGET.items() if v is verb}
        if answered and targets:
            job_id = answered[0].uuid
            moved = self.seen[job_id].states[marks[job_id] :]
            assert targets & set(moved), (
                f"{verb} of job {job_id} through {answered[0].conn.uri} answered, but the "
                f"job moved {moved}, to none of {sorted(targets)}"
            )

    # ---- events ----------------------------------------------------------------------

    def _drain_events(self) -> None:
        deadline = time.monotonic() + self.EVENT_WAIT
        while True:
            self._take_all()
            behind = self._behind()
            if behind is None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the events of job {behind[0]} did not reach its host's subscriber "
                    f"within {self.EVENT_WAIT} s: its owner says {behind[1]}, the events "
                    f"{self.seen[behind[0]].states} ({self.seen[behind[0]].finals} FINAL)"
                )
            time.sleep(0.005)

    def _take_all(self) -> None:
        for host, sub in self.subs.items():
            events = []
            while (ev := sub.get_nowait()) is not None:
                seen = self.seen.get(ev.job)
                if seen is not None and self._host_of(seen) != host:
                    continue  # another host's job: its own host's subscription has it
                if ev.seq and ev.kind in (EventKind.STATE, EventKind.FINAL):
                    self.numbered.setdefault(ev.job, {})[ev.seq] = (ev.kind, ev.state)
                events.append(ev)
            self._absorb(events)
        for mirror in self.mirrors.values():
            while (ev := mirror.sub.get_nowait()) is not None:
                if ev.kind in (EventKind.STATE, EventKind.FINAL):
                    mirror.events.append(ev)
            self._check_mirror(mirror, final=False)

    def _behind(self) -> tuple[uuid.UUID, JobState] | None:
        """A job whose events lag behind its owner's answer, if any."""
        for job_id, seen in self.seen.items():
            if seen.job is None or seen.finals:
                continue
            state = JobState(_JobGetInfo(seen.job)["state"])
            if self._state(seen) is not state or (state.terminal and not seen.finals):
                return job_id, state
        return None

    def _check_mirror(self, mirror: _Mirror, *, final: bool) -> None:
        events = mirror.events
        if not events:
            assert not (final and mirror.expect_final), "a watch got no event of an active job"
            return
        job_id = events[0].job
        finals = [ev for ev in events if ev.kind is EventKind.FINAL]
        assert len(finals) <= 1, f"job {job_id}: its watch got {len(finals)} FINAL events"
        assert not finals or finals[0] is events[-1], f"job {job_id}: events after its FINAL"
        numbers = [ev.seq for ev in events if ev.seq]
        assert numbers == sorted(set(numbers)), f"job {job_id}: its watch got #{numbers}"
        owner = self.numbered.get(job_id, {})
        for ev in events:
            assert ev.job == job_id, f"a watch of job {job_id} got {ev}"
            if ev.seq and ev.seq in owner:
                assert owner[ev.seq] == (ev.kind, ev.state), (
                    f"job {job_id}: its watch's #{ev.seq} is {ev.kind} {ev.state}, "
                    f"its owner's {owner[ev.seq]}"
                )
        if final:
            seen = self.seen[job_id]
            states = iter(seen.states)  # the watch's states: a subsequence of the owner's
            assert all(ev.state in states for ev in events if ev.kind is EventKind.STATE), (
                f"job {job_id}: its watch saw {[ev.state for ev in events]}, "
                f"its owner {seen.states}"
            )
            if mirror.expect_final:
                assert finals and finals[0].state is self._state(seen), (
                    f"job {job_id} ended {self._state(seen)}: its watch got {finals}"
                )

    # ---- the members' real time --------------------------------------------------------

    def advance(self, seconds: float) -> None:
        time.sleep(seconds * self.TIME_SCALE)

    def inject_failure(self, at: float) -> bool:
        return False

    def _manual(self) -> bool:
        return False

    def _job_verbs(self, seen: _Seen) -> frozenset[Verb]:
        assert seen.job is not None
        job_type = seen.job.type
        narrowed = self.JOB_VERBS.get(job_type)
        verbs = registry.get(job_type).verbs
        return verbs if narrowed is None else verbs & narrowed

    def teardown(self) -> None:
        try:
            self._drain_all()
            deadline = time.monotonic() + self.EVENT_WAIT
            for mirror in self.mirrors.values():
                # its FINAL may still be on its way (another member's notification)
                while (
                    mirror.expect_final
                    and not any(ev.kind is EventKind.FINAL for ev in mirror.events)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                    self._take_all()
                self._check_mirror(mirror, final=True)
        finally:
            self._close_members()


# ---- groups -----------------------------------------------------------------------------


#: a member of a group the machine begins: its domain, and its ``<job type='…'
#: domain='…'>`` text for a unique tag (target files, the checkpoint it creates)
GroupMemberTemplate = tuple[str, Callable[[str], str]]


def sim_group_members(store_dir: str) -> list[GroupMemberTemplate]:
    """Backups of vm1's and vm2's vda, and of vm1's vda and vdb, each creating a
    checkpoint named by its tag (the sim's default domains), writing under ``store_dir``."""

    def member(domain: str, both: bool = False) -> Callable[[str], str]:
        def make(tag: str) -> str:
            vdb = (
                f"<disk name='vdb' type='file'><target file='{store_dir}/{tag}.vdb'/></disk>"
                if both
                else "<disk name='vdb' backup='no'/>"
            )
            return (
                f"<job type='backup' domain='{domain}'><domainbackup><disks>"
                f"<disk name='vda' type='file'><target file='{store_dir}/{tag}.qcow2'/></disk>"
                f"{vdb}</disks></domainbackup>"
                f"<domaincheckpoint><name>{tag}</name></domaincheckpoint></job>"
            )

        return make

    # two sizes of work: a member may be done while another still runs (and fails)
    return [("vm1", member("vm1")), ("vm2", member("vm2")), ("vm1", member("vm1", both=True))]


def sim_preempting_members() -> list[GroupMemberTemplate]:
    """Block pulls of vm1's and vm2's vda at priority 5 that preempt what is in their
    way (the backups of ``sim_group_members``: paused, or cancelled where they cannot)."""

    def member(domain: str) -> Callable[[str], str]:
        def make(tag: str) -> str:
            return (
                f"<job type='blockpull' domain='{domain}'><priority>5</priority>"
                "<policy conflict='preempt'/><disk name='vda'/></job>"
            )

        return make

    return [("vm1", member("vm1")), ("vm2", member("vm2"))]


@attrs.define
class _Group:
    handle: BlockingJobGroup
    mode: str
    #: (domain, tag) of each member: the tag names the checkpoint it creates
    members: list[tuple[str, str]]


class JobGroupMachine(RuleBasedStateMachine):
    """The kit's job group checks (design/scheduling.md "Job groups"): groups of members
    from ``members()`` are begun, all-or-nothing or independent, queued or not, while
    time passes, failures are injected and groups or single members are aborted; after
    every step:

    * a group's state is ``jobcore.groups.group_state`` of its members' kinds of state
      (``aborting`` while an abort it took is under way);
    * an all-or-nothing group never ends with some members completed and others failed
      or cancelled; the checkpoints its members create exist once it ended only if every
      member completed;
    * a refused group begin left no job on any domain;
    * a group of ``preempting_members()`` (higher priority, ``<policy
      conflict='preempt'/>``) that was begun took resources only from victims that name
      one of its members (``preempted_by``); the groups it preempted still follow the
      rules above (a cancelled member cancels its all-or-nothing siblings).

    At teardown every group ends. Subclass it like JobLifecycleMachine (``URI``,
    ``BACKEND``, ``members()`` whose jobs each create the checkpoint named by the tag,
    ``advance()``)."""

    URI: ClassVar[str] = "sim:///groups?clock=manual"
    BACKEND: ClassVar[str] = "asyncio"

    def members(self) -> list[GroupMemberTemplate]:
        return sim_group_members(self.dir)

    def preempting_members(self) -> list[GroupMemberTemplate]:
        """Members that preempt the backups of ``members()`` (a higher priority and
        ``<policy conflict='preempt'/>``): block pulls of vm1's and vm2's vda on the sim;
        none (the rule does nothing) for a driver that has no such job."""
        return sim_preempting_members()

    def advance(self, seconds: float) -> None:
        clock = getattr(self.conn.driver, "clock", None)
        if clock is not None and getattr(clock, "manual", False):
            self.conn.run_sync(clock.advance, seconds)
        else:
            time.sleep(min(seconds, 0.2) / 10)

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="jobcore-kit-groups-")
        self.conn: BlockingConnection = _open(self.URI, backend=self.BACKEND, retention=1e9)
        self.groups: list[_Group] = []
        self._tags = 0

    def teardown(self) -> None:
        try:
            for g in self.groups:
                _JobGroupAbort(g.handle)
            for g in self.groups:
                info = _JobGroupWait(g.handle, 30)
                assert all(JobState(s).terminal for s in info["states"]), info
            self.groups_follow_their_rules()
        finally:
            try:
                self.conn.close()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _jobs_per_domain(self) -> dict[str, int]:
        return {d: len(self.conn.lookupByName(d).listJobs()) for d, _ in self.members()}

    @rule(
        data=st.data(),
        mode=st.sampled_from(["all-or-nothing", "independent"]),
        queue=st.booleans(),
        fail_first=st.sampled_from([None, 0.3, 0.9, 1.0]),
    )
    def begin_group(
        self, data: st.DataObject, mode: str, queue: bool, fail_first: float | None
    ) -> None:
        """``fail_first``: the first member the driver starts fails at that fraction."""
        if fail_first is not None:
            self.failure(fail_first)
        picks = data.draw(
            st.lists(st.sampled_from(self.members()), min_size=1, max_size=3), label="members"
        )
        members = []
        for domain, _ in picks:
            self._tags += 1
            members.append((domain, f"k{self._tags}x{uuid.uuid4().hex[:8]}"))
        body = "".join(make(tag) for (_, make), (_, tag) in zip(picks, members, strict=True))
        doc = f"<jobgroup mode='{mode}'>{'<queue/>' if queue else ''}{body}</jobgroup>"
        before = self._jobs_per_domain()
        try:
            handle = _JobGroupBegin(self.conn, doc)
        except JobConflict:  # refused whole: nothing begun anywhere
            assert self._jobs_per_domain() == before
            return
        self.groups.append(_Group(handle, mode, members))

    @rule(
        data=st.data(),
        mode=st.sampled_from(["all-or-nothing", "independent"]),
        queue=st.booleans(),
    )
    def begin_preempting_group(self, data: st.DataObject, mode: str, queue: bool) -> None:
        """A group whose members preempt (design/scheduling.md "Job groups"): begun, or
        refused whole; each victim it took resources from names the member that did."""
        templates = self.preempting_members()
        if not templates:
            return
        picks = data.draw(
            st.lists(st.sampled_from(templates), min_size=1, max_size=2, unique_by=lambda t: t[0]),
            label="preempting members",
        )
        body = "".join(make("") for _, make in picks)
        doc = f"<jobgroup mode='{mode}'>{'<queue/>' if queue else ''}{body}</jobgroup>"
        before = self._jobs_per_domain()
        try:
            handle = _JobGroupBegin(self.conn, doc)
        except (JobConflict, InvalidArgument):  # refused whole (or a chain too short to pull)
            assert self._jobs_per_domain() == before
            return
        self.groups.append(_Group(handle, mode, []))  # they create no checkpoint
        jobs = _JobGroupGetJobs(handle)
        mine = {str(j.uuid) for j in jobs}
        for job, (domain, _) in zip(jobs, picks, strict=True):
            victims = _JobGetStats(job).get("preempted", "")
            if victims:
                event("a preempting group member took resources")
            for victim in filter(None, str(victims).split(",")):
                dom = self.conn.lookupByName(domain)  # the victims hold its disk
                stats = _JobGetStats(_JobLookupByUUID(dom, victim))
                assert stats.get("preempted_by") in mine, (victim, stats)

    @rule(data=st.data())
    def abort_group(self, data: st.DataObject) -> None:
        if self.groups:
            g = data.draw(st.sampled_from(self.groups), label="group")
            _JobGroupAbort(g.handle)

    @rule(data=st.data())
    def abort_member(self, data: st.DataObject) -> None:
        if self.groups:
            g = data.draw(st.sampled_from(self.groups), label="group")
            job = data.draw(st.sampled_from(_JobGroupGetJobs(g.handle)), label="member")
            with contextlib.suppress(OperationInvalid):  # it ended already
                _JobAbort(job)

    @rule(seconds=st.sampled_from([0.0, 0.5, 2.0, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)

    @rule(at=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    def failure(self, at: float) -> None:
        inject = getattr(self.conn.driver, "inject_failure", None)
        if inject is not None:
            self.conn.run_sync(inject, None, at, "kit-injected failure")

    @invariant()
    def groups_follow_their_rules(self) -> None:
        for g in self.groups:
            info = _JobGroupGetInfo(g.handle)
            states = [JobState(s) for s in info["states"]]
            ended = all(s.terminal for s in states)
            if info["state"] != "aborting" or ended:
                want = group_state({member_kind(s) for s in states})
                assert info["state"] == str(want), info
            if g.mode != "all-or-nothing" or not ended:
                continue
            assert set(states) == {JobState.COMPLETED} or JobState.COMPLETED not in states, (
                f"an all-or-nothing group ended mixed: {info}"
            )
            complete = info["state"] == "completed"
            for domain, tag in g.members:
                names = {c.getName() for c in self.conn.lookupByName(domain).listAllCheckpoints()}
                assert (tag in names) is complete, (info, domain, tag, sorted(names))
