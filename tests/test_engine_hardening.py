"""Engine correctness under cancellation, races and nonsense from drivers (issue 8,
items 12-15, 18 and 21): the engine's record of a job and the driver's never disagree,
and events never report what did not happen."""

from __future__ import annotations

import logging
import traceback
import uuid

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from engine_helpers import Point, Quiet, drain, gated_sim, quiet_connection

import jobcore
from jobcore import JobState
from jobcore.api import Connection, Domain
from jobcore.engine import CLOSED, _Reporter
from jobcore.events import EventKind, JobEvent
from jobcore.lifecycle import REPORT_TARGET, TRANSITIONS, Report
from jobcore.lifecycle import JobState as S
from jobcore.local import LocalJob, as_local
from jobcore.store import JobRecord

pytestmark = pytest.mark.anyio

PULL = "<job type='blockpull'>{extra}<disk name='vda'/></job>"


def pull(extra: str = "") -> str:
    return PULL.format(extra=extra)


def states(events: list[JobEvent], job: uuid.UUID) -> list[JobState]:
    return [e.state for e in events if e.job == job and e.kind is EventKind.STATE]


def finals(events: list[JobEvent], job: uuid.UUID) -> int:
    return sum(e.job == job and e.kind is EventKind.FINAL for e in events)


async def step(conn: Connection, seconds: float = 0) -> None:
    conn.driver.clock.advance(seconds)  # type: ignore[attr-defined]
    await wait_all_tasks_blocked()


def bound(log: logging.LogRecord, key: str) -> object:
    """A value bound to a structlog logger, however the record carries it."""
    if isinstance(log.msg, dict):
        return log.msg.get(key)
    return getattr(log, key, None)


def record(conn: Connection, job: uuid.UUID) -> JobRecord | None:
    return as_local(conn).engine.store.get(job)


# ---- 12: a begin cancelled at any await ------------------------------------------------


async def cancellable_begin(scope: anyio.CancelScope, dom: Domain, job_id: uuid.UUID) -> None:
    with scope:
        await dom.job_begin(pull(f"<uuid>{job_id}</uuid>"))


async def begin_points() -> list[Point]:
    """Every await of a begin: each driver call it makes, before and after the driver ran
    it (recorded from a begin that nothing disturbs)."""
    async with gated_sim() as (conn, gated, _):
        dom = await conn.lookup_domain("vm1")
        gated.calls.clear()
        await dom.job_begin(pull())
        calls = list(gated.calls)
    assert calls == ["lookup_domain", "start"], calls  # extend the test if begin changes
    return [(call, where) for call in calls for where in ("before", "after")]


async def test_a_begin_cancelled_at_any_await_leaves_no_job_behind() -> None:
    for point in await begin_points():
        async with gated_sim() as (conn, gated, sim):
            dom = await conn.lookup_domain("vm1")
            sub = conn.subscribe()
            job_id = uuid.uuid4()
            gated.hold = point
            scope = anyio.CancelScope()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancellable_begin, scope, dom, job_id)
                try:
                    await gated.reached.wait()
                    scope.cancel()  # the client went away
                    await wait_all_tasks_blocked()
                finally:
                    gated.release.set()
            await wait_all_tasks_blocked()
            rec = record(conn, job_id)
            if rec is not None and rec.state.active:
                # begun: tracked by the engine *and* known to the driver, so abortable
                assert job_id in sim._jobs, (point, rec.state)
                await LocalJob(as_local(conn), rec).abort()
                await step(conn)
                assert (await LocalJob(as_local(conn), rec).wait(5))["state"] == "cancelled", point
            # nothing holds the disk's chain now: a conflicting job is admitted
            other = await dom.job_begin(pull())
            assert other.state is JobState.RUNNING, point
            assert finals(drain(sub), job_id) == (0 if rec is None else 1), point
            sub.close()


# ---- 13: closing the connection starts nothing --------------------------------------


async def test_close_fails_queued_jobs_first_and_starts_nothing() -> None:
    async with gated_sim() as (conn, gated, sim):
        dom = await conn.lookup_domain("vm1")
        holder = await dom.job_begin(pull())
        queued = [await dom.job_begin(pull("<queue/>")) for _ in range(3)]
        sub = conn.subscribe()
        gated.calls.clear()
        as_local(conn).engine.close()
        await wait_all_tasks_blocked()
        assert "start" not in gated.calls
        assert sim.job_count() == 1  # only the holder ever reached the hypervisor
        events = drain(sub)
        for job in queued:
            info = await job.info()
            assert info["state"] == "failed" and info["errmsg"] == CLOSED
            assert states(events, job.uuid) == [S.FAILED]  # never 'running'
        assert states(events, holder.uuid) == [S.FAILED]


# ---- 14: every driver report in every state -----------------------------------------


async def job_in(conn: Connection, driver: Quiet, state: JobState) -> JobRecord:
    """A job brought into ``state`` the ordinary way (verbs and reports)."""
    dom = await conn.lookup_domain("vm1")
    if state is S.QUEUED:
        await dom.job_begin(pull())
        job = await dom.job_begin(pull("<queue/>"))
    else:
        job = await dom.job_begin(pull())
    rec = record(conn, job.uuid)
    assert rec is not None
    if state is S.QUEUED:
        assert job.state is S.QUEUED
        return rec
    reporter = driver.jobs[job.uuid].reporter
    if state in (S.PAUSED, S.STANDBY):
        if state is S.STANDBY:
            reporter.ready()
        await job.pause()
    elif state in (S.READY, S.COMPLETING):
        reporter.ready()
        if state is S.COMPLETING:
            await job.complete()
    elif state in (S.ABORTING, S.CANCELLED):
        await job.abort()
        if state is S.CANCELLED:
            reporter.cancelled()
    elif state is S.COMPLETED:
        reporter.completed()
    elif state is S.FAILED:
        reporter.failed("it broke")
    assert job.state is state
    return rec


@pytest.mark.parametrize("report", list(Report))
@pytest.mark.parametrize("state", list(JobState))
async def test_driver_report_grid(
    report: Report, state: JobState, caplog: pytest.LogCaptureFixture
) -> None:
    """Each report in each state does what lifecycle.REPORT_TARGET says (a path through
    TRANSITIONS) or is logged and ignored: no exception reaches the driver, no event."""
    async with quiet_connection() as (conn, driver):
        rec = await job_in(conn, driver, state)
        # a stale or premature reporter is what a confused driver holds
        reporter = driver.jobs[rec.uuid].reporter if rec.uuid in driver.jobs else None
        reporter = reporter or _Reporter(as_local(conn).engine, rec)
        before = (rec.processed, rec.total, rec.errmsg)
        sub = conn.subscribe(job=rec.uuid)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="jobcore.engine"):
            if report is Report.PROGRESS:
                reporter.progress(7, 9)
            elif report is Report.READY:
                reporter.ready()
            elif report is Report.COMPLETED:
                reporter.completed()
            elif report is Report.FAILED:
                reporter.failed("hypervisor says no")
            else:
                reporter.cancelled()
        events = drain(sub)
        path = REPORT_TARGET.get((report, state))
        if path is None:
            assert rec.state is state
            assert events == []
            assert (rec.processed, rec.total, rec.errmsg) == before
            ignored = [r for r in caplog.records if "driver report ignored" in r.getMessage()]
            assert len(ignored) == 1, [r.getMessage() for r in caplog.records]
            return
        # the table's path is a walk through the transition table
        for a, b in zip((state, *path), path, strict=False):
            assert b in TRANSITIONS[a]
        assert states(events, rec.uuid) == list(path)
        assert rec.state is (path[-1] if path else state)
        assert finals(events, rec.uuid) == (1 if rec.state.terminal else 0)
        if report is Report.PROGRESS:
            assert (rec.processed, rec.total) == (7, 9)
            assert [e.kind for e in events] == [EventKind.PROGRESS]
        if rec.state is S.FAILED:
            assert rec.errmsg


def test_report_table_covers_what_the_transition_table_allows() -> None:
    """Computed from TRANSITIONS, not copied: every end a driver may report is handled in
    every state the driver has the job in."""
    driver_states = [s for s in JobState if s.active and s is not S.QUEUED]
    for state in driver_states:
        assert REPORT_TARGET[(Report.PROGRESS, state)] == ()
        for report, end in ((Report.COMPLETED, S.COMPLETED), (Report.FAILED, S.FAILED)):
            if end in TRANSITIONS[state]:
                assert REPORT_TARGET[(report, state)] == (end,)
        # a cancel ends every job the driver has, one way or another
        assert REPORT_TARGET[(Report.CANCELLED, state)][-1].terminal
    for report in Report:
        for other in JobState:
            if other.terminal or other is S.QUEUED:
                assert (report, other) not in REPORT_TARGET


# ---- 15: a verb changes the state only once the driver accepted it -------------------


@pytest.mark.parametrize("verb", ["pause", "abort", "complete", "resume"])
async def test_a_refused_verb_leaves_no_trace(verb: str) -> None:
    async with gated_sim() as (conn, gated, _):
        dom = await conn.lookup_domain("vm1")
        xml = "<job type='blockcommit'><disk name='vda'/><top index='0'/></job>"
        job = await dom.job_begin(xml if verb == "complete" else pull())
        if verb == "complete":
            await step(conn, 100)  # an active commit converges to 'ready'
        if verb == "resume":
            await job.pause()
        before = job.state
        gated.refuse.add("cancel" if verb == "abort" else verb)
        sub = conn.subscribe(job=job.uuid)
        with pytest.raises(jobcore.DriverError, match="refused"):
            await getattr(job, verb)()
        await wait_all_tasks_blocked()
        assert job.state is before
        assert [e for e in drain(sub) if e.kind is not EventKind.PROGRESS] == []


async def test_a_verb_is_not_visible_before_the_driver_accepted_it() -> None:
    async with gated_sim() as (conn, gated, _):
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(pull())
        sub = conn.subscribe(job=job.uuid)
        for verb, driver_call, after in (
            ("pause", "pause", S.PAUSED),
            ("resume", "resume", S.RUNNING),
            ("abort", "cancel", S.ABORTING),
        ):
            gated.hold, gated.reached, gated.release = (driver_call, "before"), *new_events()
            before = job.state
            async with anyio.create_task_group() as tg:
                tg.start_soon(getattr(job, verb))
                try:
                    with anyio.fail_after(5):
                        await gated.reached.wait()
                    assert job.state is before  # the driver has not answered yet
                finally:
                    gated.release.set()  # a shielded driver call waits for it
            # (the sim may already have carried out the cancel)
            assert job.state is after or after in TRANSITIONS[job.state] or job.state.terminal
        await step(conn)
        assert job.state is S.CANCELLED
        assert states(drain(sub), job.uuid) == [S.PAUSED, S.RUNNING, S.ABORTING, S.CANCELLED]


def new_events() -> tuple[anyio.Event, anyio.Event]:
    return anyio.Event(), anyio.Event()


async def test_concurrent_verbs_run_one_at_a_time() -> None:
    async with gated_sim() as (conn, gated, _):
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(pull())
        sub = conn.subscribe(job=job.uuid)
        gated.hold = ("pause", "before")
        errors: list[Exception] = []

        async def pause() -> None:
            try:
                await job.pause()
            except jobcore.OperationInvalid as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pause)
            try:
                await gated.reached.wait()
                tg.start_soon(pause)  # waits for the first, then finds the job paused
                await wait_all_tasks_blocked()
                assert gated.calls.count("pause") == 1
            finally:
                gated.release.set()
        assert job.state is S.PAUSED
        assert gated.calls.count("pause") == 1
        assert len(errors) == 1 and "'paused' cannot accept verb 'pause'" in str(errors[0])
        assert states(drain(sub), job.uuid) == [S.PAUSED]


async def test_reports_during_a_verb_decide_where_it_lands() -> None:
    async with quiet_connection() as (conn, driver):
        dom = await conn.lookup_domain("vm1")
        gate = anyio.Event()
        reached = anyio.Event()
        real_pause = driver.pause

        async def slow_pause(job: object) -> None:
            reached.set()
            await gate.wait()

        driver.pause = slow_pause  # type: ignore[method-assign]
        # the job converges while its pause is under way: paused while ready is 'standby'
        job = await dom.job_begin(pull())
        reporter = driver.jobs[job.uuid].reporter
        sub = conn.subscribe(job=job.uuid)
        async with anyio.create_task_group() as tg:
            tg.start_soon(job.pause)
            try:
                await reached.wait()
                reporter.ready()
            finally:
                gate.set()
        assert job.state is S.STANDBY
        assert states(drain(sub), job.uuid) == [S.READY, S.STANDBY]
        await job.abort()
        reporter.cancelled()
        # the job ends while its pause is under way: it ends as reported, the pause says so
        gate, reached = anyio.Event(), anyio.Event()
        job = await dom.job_begin(pull())
        reporter = driver.jobs[job.uuid].reporter
        sub = conn.subscribe(job=job.uuid)
        errors: list[Exception] = []

        async def pause() -> None:
            try:
                await job.pause()
            except jobcore.OperationInvalid as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pause)
            try:
                await reached.wait()
                reporter.completed()
            finally:
                gate.set()
        assert len(errors) == 1
        assert "ended ('completed') before the pause took effect" in str(errors[0])
        assert job.state is S.COMPLETED
        assert states(drain(sub), job.uuid) == [S.COMPLETED]
        driver.pause = real_pause  # type: ignore[method-assign]


# ---- 18: the queue timeout runs on the connection's clock ----------------------------


async def test_queue_timeout_follows_a_manual_clock() -> None:
    async with jobcore.connect("sim:///default?clock=manual&rate=1") as conn:
        dom = await conn.lookup_domain("vm1")
        holder = await dom.job_begin(pull())
        queued = await dom.job_begin(pull("<queue timeout='5'/>"))
        await step(conn, 4.9)
        await anyio.sleep(0.1)  # wall time does not count
        assert queued.state is S.QUEUED
        await step(conn, 0.2)
        info = await queued.wait(1)
        assert info["state"] == "failed" and "within 5 s" in (info["errmsg"] or "")
        assert holder.state.active


async def test_queue_timeout_on_real_time() -> None:
    async with jobcore.connect("sim:///default?rate=1") as conn:
        dom = await conn.lookup_domain("vm1")
        await dom.job_begin(pull())
        queued = await dom.job_begin(pull("<queue timeout='0.05'/>"))
        with anyio.fail_after(5):
            info = await queued.wait()
        assert info["state"] == "failed"


# ---- 21: a driver's start that raises keeps its traceback ----------------------------


async def test_a_driver_start_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with gated_sim() as (conn, gated, _):
        dom = await conn.lookup_domain("vm1")
        gated.raise_in_start = RuntimeError("driver bug")
        job_id = uuid.uuid4()
        with (
            caplog.at_level(logging.ERROR, logger="jobcore.engine"),
            pytest.raises(jobcore.DriverError, match="RuntimeError: driver bug") as err,
        ):
            await dom.job_begin(pull(f"<uuid>{job_id}</uuid>"))
        assert isinstance(err.value.__cause__, RuntimeError)
        logged = [r for r in caplog.records if r.exc_info is not None]
        assert len(logged) == 1
        text = "".join(traceback.format_exception(*logged[0].exc_info))  # type: ignore[misc]
        assert "_driver_bug" in text and "RuntimeError: driver bug" in text
        assert bound(logged[0], "job") == str(job_id)
        rec = record(conn, job_id)
        assert rec is not None and rec.state is S.FAILED
