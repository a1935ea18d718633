"""Recovery on open (design/store.md "Recovery"): the prepared spec kept in the store, the
recover_job hook's outcomes applied by the engine, queued jobs requeued in order, the
closing rule of durable connections, a v2 store migrated, one FINAL event per job."""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from jobd_helpers import BACKUP_VDB
from recovery_helpers import use_plain_sim, use_recovering_sim
from store_helpers import rows, url

import jobcore
from jobcore import constants as C
from jobcore.driver import Concluded, Reattached, Vanished
from jobcore.engine import CLOSED, Engine
from jobcore.events import EventHub, EventKind, JobEvent
from jobcore.lifecycle import JobState
from jobcore.local import as_local
from jobcore.spec import JobOptions
from jobcore.store_sqlite import NO_PREPARED_SPEC, SCHEMA_VERSION, spec_from_json, spec_to_json
from jobcore.xml import parse_job

pytestmark = pytest.mark.anyio
MiB = 1 << 20
DATA = Path(__file__).parent / "data"
S = JobState
SLOW = f"sim:///default?rate={MiB}"  # a 512 MiB backup runs for minutes
FAST = f"sim:///default?rate={4096 * MiB}"
PULL = "<job type='blockpull'><disk name='vda'/></job>"
CANNOT = f"the driver of {SLOW} cannot re-attach jobs after a restart"


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[JobEvent]]:
    """Every STATE/FINAL/PROGRESS event a durable engine releases, in order (whether or
    not anyone subscribed: recovery runs before anyone can; an engine builds no event
    nobody listens to, so the hub says someone does)."""
    seen: list[JobEvent] = []
    original = Engine._publish

    def publish(self: Engine, event: JobEvent) -> None:
        seen.append(event)
        original(self, event)

    monkeypatch.setattr(Engine, "_publish", publish)
    monkeypatch.setattr(EventHub, "active", property(lambda self: True))
    yield seen


def finals(events: list[JobEvent], job: uuid.UUID) -> list[JobEvent]:
    return [e for e in events if e.job == job and e.kind is EventKind.FINAL]


def states(events: list[JobEvent], job: uuid.UUID) -> list[JobState]:
    return [e.state for e in events if e.job == job and e.kind is EventKind.STATE]


# ---- the prepared spec ----------------------------------------------------------------------


async def test_the_prepared_spec_is_kept_exactly(tmp_path: Path) -> None:
    """A reload hands back the prepared spec the driver got (type and every field, with
    REUSE_EXTERNAL), not the spec parsed from the job XML."""
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        push = await dom.job_begin(BACKUP_VDB.format(tag="p"))
        pull = await dom.job_begin(
            "<job type='blockpull'><disk name='vda'/><bandwidth>1048576</bandwidth></job>"
        )
        before = {j.uuid: as_local(conn).engine.lookup(j.uuid).spec for j in (push, pull)}
        for job in (push, pull):
            await job.abort()
            await job.wait()
    assert type(before[push.uuid]).__name__ == "PreparedBackup"
    assert type(before[pull.uuid]).__name__ == "PreparedPull"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        for job_id, spec in before.items():
            again = as_local(conn).engine.lookup(job_id).spec
            assert type(again) is type(spec) and again == spec
    # REUSE_EXTERNAL is not in the job XML: only the prepared spec keeps it
    reused = attrs.evolve(before[push.uuid], reuse_external=True)
    assert spec_from_json(spec_to_json(reused)) == reused


def test_spec_json_keeps_every_kind_of_value() -> None:
    value = {
        "t": (1, "a", None, 2.5),
        "s": frozenset({"x"}),
        "u": uuid.UUID(int=7),
        "e": S.PAUSED,
        "o": JobOptions(queue=True, priority=3),
        "l": [True, {"@": "not a tag"}],
    }
    back = spec_from_json(spec_to_json(value))
    assert back == value and isinstance(back["t"], tuple) and back["e"] is S.PAUSED


# ---- schema v2 (main's store) ---------------------------------------------------------------

#: tests/data/store-v2.sqlite: written by jobcore 4aae1b1 (schema 2): a cancelled backup,
#: and one still running when its process ended with os._exit
V2_DONE = "308b1726-6ece-4ae6-a132-7b0fc176316a"
V2_RUNNING = "a4dde2cf-ab71-4f87-b6a8-03420105d9ac"


async def test_a_version_2_store_migrates_and_its_active_job_fails_clearly(
    tmp_path: Path, published: list[JobEvent]
) -> None:
    path = tmp_path / "jobs.sqlite"
    shutil.copy(DATA / "store-v2.sqlite", path)
    with sqlite3.connect(path) as db:  # its retention ran out long ago: keep it today
        db.execute("UPDATE jobs SET expires = ? WHERE uuid = ?", (time.time() + 600, V2_DONE))
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        done = await (await conn.lookup_job(V2_DONE)).info()
        assert done.state is S.CANCELLED and done.total == 512 * MiB
        running = await (await conn.lookup_job(V2_RUNNING)).info()
        assert running.state is S.FAILED and running.errmsg == NO_PREPARED_SPEC
        dom = await conn.lookup_domain("vm1")
        new = await dom.job_begin(BACKUP_VDB.format(tag="after-v2"))
        await new.abort()
        await new.wait()
    assert [e.job for e in published if e.kind is EventKind.FINAL] == [
        uuid.UUID(V2_RUNNING),
        new.uuid,
    ]  # the ended v2 job is not announced again
    on_disk = rows(path)
    assert on_disk[V2_RUNNING]["state"] == "failed" and on_disk[V2_DONE]["spec"] is None
    assert on_disk[str(new.uuid)]["spec"] is not None
    conn2 = sqlite3.connect(path)
    assert conn2.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn2.close()


# ---- a driver without recover_job -----------------------------------------------------------


async def test_a_driver_that_cannot_recover_fails_active_jobs_once(
    tmp_path: Path, published: list[JobEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a durable connection to a driver without recover_job fails its jobs as
    before (CLOSED); a job left active by a crash fails at the next open, written, with
    one FINAL event; a third open announces nothing."""
    use_plain_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        closed = await dom.job_begin(BACKUP_VDB.format(tag="c"))
    assert (await _info(path, closed.uuid)).errmsg == CLOSED
    # a crash: the row stays 'running'
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET state='running', ended=NULL, expires=NULL, errmsg=NULL")
    published.clear()
    info = await _info(path, closed.uuid)
    assert info.state is S.FAILED and info.errmsg == CANNOT
    assert len(finals(published, closed.uuid)) == 1
    assert rows(path)[str(closed.uuid)]["state"] == "failed"
    published.clear()
    assert (await _info(path, closed.uuid)).errmsg == CANNOT
    assert published == []


async def _info(path: Path, job: uuid.UUID, uri: str = SLOW) -> Any:
    async with jobcore.connect(uri, store=url(path)) as conn:
        return await (await conn.lookup_job(job)).info()


# ---- the recover_job outcomes ---------------------------------------------------------------


async def test_recover_job_outcomes_are_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: list[JobEvent]
) -> None:
    answers: dict[uuid.UUID, Any] = {}
    sim = use_recovering_sim(monkeypatch.setattr, answers)
    path = tmp_path / "jobs.sqlite"
    pull = "<job type='blockpull'><disk name='vda'/></job>"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        vm1, vm2 = await conn.lookup_domain("vm1"), await conn.lookup_domain("vm2")
        jobs = [
            await vm1.job_begin(BACKUP_VDB.format(tag="kept")),
            await vm2.job_begin(BACKUP_VDB.format(tag="concluded")),
            await vm1.job_begin(pull),
        ]
        await jobs[2].pause()
        jobs.append(await vm2.job_begin(pull))
    # the driver recovers: closing left them active (in memory and on disk)
    assert {r["state"] for r in rows(path).values()} == {"running", "paused"}
    assert not finals(published, jobs[0].uuid)
    kept, concluded, paused, vanished = (j.uuid for j in jobs)
    answers[concluded] = Concluded(S.COMPLETED, extra={"disk_bytes": 42})
    answers[vanished] = Vanished("QEMU of domain 'vm2' (pid 123) is gone")
    published.clear()
    async with jobcore.connect(FAST, store=url(path)) as conn:
        engine = as_local(conn).engine
        assert sim.connections[-1].recovered == [
            (kept, S.RUNNING),
            (concluded, S.RUNNING),
            (paused, S.PAUSED),
            (vanished, S.RUNNING),
        ]  # begin order, with the state last written
        c = engine.lookup(concluded)
        assert c.state is S.COMPLETED and engine.stats(c)["disk_bytes"] == 42
        assert engine.lookup(vanished).errmsg == "QEMU of domain 'vm2' (pid 123) is gone"
        # reattached: reports flow, verbs work
        p = await conn.lookup_job(paused)
        assert p.state is S.PAUSED
        await p.resume()
        assert (await p.wait()).state is S.COMPLETED
        assert (await (await conn.lookup_job(kept)).wait()).state is S.COMPLETED
    for job in (kept, concluded, vanished, paused):
        assert len(finals(published, job)) == 1, job
    assert states(published, kept) == [S.COMPLETED]  # reattached as it was: no event
    assert states(published, paused) == [S.RUNNING, S.COMPLETED]
    assert finals(published, concluded)[0].stats is not None
    assert {u: r["state"] for u, r in rows(path).items()} == {
        str(kept): "completed",
        str(concluded): "completed",
        str(vanished): "failed",
        str(paused): "completed",
    }
    published.clear()
    async with jobcore.connect(FAST, store=url(path)):
        assert len(sim.connections[-1].recovered) == 0  # ended rows are never handed over
    assert published == []


async def test_a_recover_job_that_raises_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: list[JobEvent]
) -> None:
    answers: dict[uuid.UUID, Any] = {}
    use_recovering_sim(monkeypatch.setattr, answers)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="r"))
    answers[job.uuid] = RuntimeError("the socket is gone")
    info = await _info(path, job.uuid)
    assert (info.state, info.errmsg) == (S.FAILED, "the socket is gone")
    assert len(finals(published, job.uuid)) == 1
    assert rows(path)[str(job.uuid)]["state"] == "failed"


async def test_reattached_in_another_state_is_one_transition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: list[JobEvent]
) -> None:
    answers: dict[uuid.UUID, Any] = {}
    use_recovering_sim(monkeypatch.setattr, answers)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="m"))

    async def moved(inner: Any, djob: Any) -> Reattached:
        await inner.start(djob)
        await inner.pause(djob)
        return Reattached(S.PAUSED, processed=5, total=10)

    answers[job.uuid] = moved
    published.clear()
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        info = await (await conn.lookup_job(job.uuid)).info()
        assert info.state is S.PAUSED and (info.processed, info.total) == (5, 10)
        assert states(published, job.uuid) == [S.PAUSED]
        handle = await conn.lookup_job(job.uuid)
        await handle.abort()
        assert (await handle.wait()).state is S.CANCELLED
    assert rows(path)[str(job.uuid)]["state"] == "cancelled"


async def test_queued_jobs_are_requeued_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: list[JobEvent]
) -> None:
    """Queued jobs come back queued, in their ticket order (priority, then FIFO), behind
    the recovered job holding their resource, with their queue claims."""
    sim = use_recovering_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    base = parse_job(PULL)

    def queued(tag: str, priority: int) -> Any:
        return attrs.evolve(base, options=JobOptions(queue=True, priority=priority))

    async with jobcore.connect(SLOW, store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        holder = await dom.job_begin_spec(base)
        low = await dom.job_begin_spec(queued("low", 0))
        high = await dom.job_begin_spec(queued("high", 5))
        last = await dom.job_begin_spec(queued("last", 0))
        assert {j.state for j in (low, high, last)} == {S.QUEUED}
    published.clear()
    async with jobcore.connect(FAST, store=url(path)) as conn:
        engine = as_local(conn).engine
        assert [u for u, _ in sim.connections[-1].recovered] == [holder.uuid]
        for job in (low, high, last):
            assert engine.lookup(job.uuid).state is S.QUEUED
        for job in (holder, low, high, last):
            assert (await (await conn.lookup_job(job.uuid)).wait()).state is S.COMPLETED
    started = [e.job for e in published if e.kind is EventKind.STATE and e.state is S.RUNNING]
    assert started == [high.uuid, low.uuid, last.uuid]
    for job in (holder, low, high, last):
        assert len(finals(published, job.uuid)) == 1


async def test_reports_after_a_keeping_close_are_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver closing its side may report its jobs failed: a kept job's row stays as
    it was, for the next process to recover."""
    use_recovering_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="k"))
        engine = as_local(conn).engine
        rec = engine.lookup(job.uuid)
    rec.driver_job.reporter.failed("the driver went away")
    assert rec.state is S.RUNNING
    assert rows(path)[str(job.uuid)]["state"] == "running"


async def test_closing_with_keep_jobs_false_ends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process rule when asked (jobd --stop-guests): closing ends the jobs."""
    from jobcore.local import connect_local

    use_recovering_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    async with connect_local(SLOW, store=url(path), keep_jobs=False) as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="s"))
    row = rows(path)[str(job.uuid)]
    assert (row["state"], row["errmsg"]) == ("failed", CLOSED)


async def test_the_memory_store_keeps_todays_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    use_recovering_sim(monkeypatch.setattr)
    async with jobcore.connect(SLOW) as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="m"))
        engine = as_local(conn).engine
    rec = engine.lookup(job.uuid)
    assert (rec.state, rec.errmsg) == (S.FAILED, CLOSED)


async def test_queue_flag_survives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job queued with JobBegin's QUEUE flag (not its options) is requeued too."""
    use_recovering_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        first = await dom.job_begin(PULL)
        second = await dom.job_begin(PULL, C.JOB_BEGIN_QUEUE)
        assert second.state is S.QUEUED
    async with jobcore.connect(FAST, store=url(path)) as conn:
        assert as_local(conn).engine.lookup(second.uuid).state is S.QUEUED
        for job in (first, second):
            with anyio.fail_after(30):
                assert (await (await conn.lookup_job(job.uuid)).wait()).state is S.COMPLETED


def test_retained_jobs_come_back_in_the_order_they_ended(tmp_path: Path) -> None:
    """The legacy alias names the domain's last ended job after a reopen too: rows are
    retained again in the order their jobs ended (not begun), ties included (a manual
    clock ends both at one instant)."""
    store = url(tmp_path / "jobs.sqlite")
    vdb = BACKUP_VDB.format(tag="second")
    vda = BACKUP_VDB.format(tag="first").replace("vdb", "vda")
    with jobcore.open("sim:///default?clock=manual", store=store, retention=1e9) as conn:
        dom = conn.lookupByName("vm1")
        first = jobcore.JobBegin(dom, vda)
        second = jobcore.JobBegin(dom, vdb)
        jobcore.JobAbort(second)  # ends first, at the same clock reading as the other
        jobcore.JobWait(second, timeout=10)
        jobcore.JobAbort(first)
        jobcore.JobWait(first, timeout=10)
        alias = jobcore.JobLookupByUUID(dom, C.LEGACY_DOMAIN_JOB_UUID)
        assert alias.uuid == first.uuid
    with jobcore.open("sim:///default?clock=manual", store=store, retention=1e9) as conn:
        dom = conn.lookupByName("vm1")
        alias = jobcore.JobLookupByUUID(dom, C.LEGACY_DOMAIN_JOB_UUID)
        assert alias.uuid == first.uuid


async def test_a_speed_set_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_speed is on disk when it returns: a running job and a queued one come back with
    the speed last set, and the queued one starts at it."""
    use_recovering_sim(monkeypatch.setattr)
    path = tmp_path / "jobs.sqlite"
    base = parse_job(PULL)
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        holder = await dom.job_begin_spec(base)
        queued = await dom.job_begin_spec(attrs.evolve(base, options=JobOptions(queue=True)))
        assert (await queued.info()).state is S.QUEUED
        await holder.set_speed(7 * MiB)
        await queued.set_speed(3 * MiB)
    async with jobcore.connect(SLOW, store=url(path)) as conn:
        again = await conn.lookup_job(holder.uuid)
        waiting = await conn.lookup_job(queued.uuid)
        assert (await again.info()).bandwidth == 7 * MiB
        info = await waiting.info()
        assert info.state is S.QUEUED and info.bandwidth == 3 * MiB
        await again.abort()
        await again.wait()
        await anyio.wait_all_tasks_blocked()  # admitted as the holder let go, and started
        info = await waiting.info()
        assert info.state is S.RUNNING and info.bandwidth == 3 * MiB
        engine = as_local(conn).engine
        assert engine.lookup(queued.uuid).spec.bandwidth == 3 * MiB  # it started at it
        await waiting.abort()
