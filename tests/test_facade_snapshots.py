"""The blocking facade's read-only queries from published snapshots (jobcore.snapshots):
answered on the caller's thread, without the event loop, and equal to the loop's answers
in every job state and after every kind of change."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest

import jobcore
from jobcore.constants import LEGACY_DOMAIN_JOB_UUID
from jobcore.facade import BlockingConnection, BlockingDomain, BlockingJob
from jobcore.lifecycle import LEGACY_JOB_TYPE, JobState
from jobcore.scheduler import KUBEVIRT_POLICY

T = TypeVar("T")
S = JobState

#: how long a query may wait before it counts as waiting for the held loop (a hang
#: guard, not a measure: a query without a hop returns in microseconds)
HANG_GUARD = 30.0

PUSH = (
    "<domainbackup><disks><disk name='{disk}' type='file'>"
    "<target file='/b/{name}.qcow2'/></disk></disks></domainbackup>"
)
PULL = (
    "<domainbackup mode='pull'><server transport='unix' socket='/tmp/snap-{name}'/><disks>"
    "<disk name='vdb' type='file'><scratch file='/s/{name}'/></disk></disks>"
    "</domainbackup>"
)


def push_job(disk: str = "vdb") -> str:
    return f"<job type='backup'>{PUSH.format(disk=disk, name=uuid.uuid4())}</job>"


def pull_job() -> str:
    return f"<job type='backup'>{PULL.format(name=uuid.uuid4())}</job>"


@pytest.fixture
def conn() -> Iterator[BlockingConnection]:
    """A connection whose snapshots are on (its first snapshot query hops once to start
    them), so every change below is published as it happens."""
    c = jobcore.open("sim:///default?clock=manual")
    try:
        c.lookupByName("vm1").jobStats()
        yield c
    finally:
        c.close()


def settle(conn: BlockingConnection) -> None:
    """Let the loop run what the last change woke (the sim's steps)."""
    for _ in range(5):
        conn.run_sync(lambda: None)


def advance(conn: BlockingConnection, seconds: float) -> None:
    conn.run_sync(conn.driver.clock.advance, seconds)  # type: ignore[attr-defined]
    settle(conn)


@contextmanager
def loop_held(conn: BlockingConnection) -> Iterator[None]:
    """The event loop's thread is busy inside: a call that hops waits until the end."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait()

    holder = threading.Thread(target=conn.run_sync, args=(hold,), daemon=True)
    holder.start()
    entered.wait()
    try:
        yield
    finally:
        release.set()
        holder.join()


def without_loop(conn: BlockingConnection, fn: Callable[[], T]) -> T:
    """``fn()`` on another thread while the loop is held: it must finish all the same."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:
            outcome.append(("error", exc))

    with loop_held(conn):
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(HANG_GUARD)
        waited = worker.is_alive()
    worker.join()
    assert not waited, "the query waited for the event loop's thread (it hopped)"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def _block_disk(conn: BlockingConnection, job: BlockingJob) -> str | None:
    """The disk of an active block job (the disks blockJobInfo answers without the loop)."""
    spec = conn.run_sync(lambda: job.ajob._rec.spec)  # type: ignore[attr-defined]
    disk = getattr(spec, "disk", None)
    return disk if job.type in (jobcore.JobType.BLOCKPULL, jobcore.JobType.BLOCKCOMMIT) else None


def fast_answers(
    dom: BlockingDomain, job: BlockingJob, disk: str | None, active: bool, legacy: bool
) -> dict[str, Any]:
    """Every query the facade answers from snapshots, through the facade."""
    answers: dict[str, Any] = {
        "jobStats": dom.jobStats(),
        "jobInfo": dom.jobInfo(),
        "JobGetInfo": jobcore.JobGetInfo(job),
        "JobGetStats": jobcore.JobGetStats(job),
        "JobGetXMLDesc": jobcore.JobGetXMLDesc(job),
    }
    if disk is not None and active:
        answers["blockJobInfo"] = dom.blockJobInfo(disk)
        answers["blockJobInfo bytes"] = dom.blockJobInfo(
            disk, jobcore.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
        )
    if active:
        answers["JobLookupByUUID"] = jobcore.JobLookupByUUID(dom, job.uuid).uuid
    if legacy:
        answers["JobLookupByUUID legacy"] = jobcore.JobLookupByUUID(
            dom, LEGACY_DOMAIN_JOB_UUID
        ).uuid
    return answers


async def loop_answers(
    conn: BlockingConnection,
    dom: BlockingDomain,
    job: BlockingJob,
    disk: str | None,
    active: bool,
    legacy: bool,
) -> dict[str, Any]:
    """The same queries answered on the loop (the in-process API's coroutines)."""
    adom, ajob = dom.adom, job.ajob
    answers: dict[str, Any] = {
        "jobStats": await adom.job_stats(0),
        "jobInfo": await adom.job_info(),
        "JobGetInfo": await ajob.info(),
        "JobGetStats": await ajob.stats(),
        "JobGetXMLDesc": await ajob.xml_desc(),
    }
    if disk is not None and active:
        answers["blockJobInfo"] = await adom.block_job_info(disk, 0)
        answers["blockJobInfo bytes"] = await adom.block_job_info(
            disk, jobcore.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
        )
    lookup = conn.aconn.job_lookup_by_uuid
    if active:
        answers["JobLookupByUUID"] = (await lookup(adom, job.uuid)).uuid
    if legacy:
        answers["JobLookupByUUID legacy"] = (await lookup(adom, LEGACY_DOMAIN_JOB_UUID)).uuid
    return answers


def check_same(
    conn: BlockingConnection,
    dom: BlockingDomain,
    job: BlockingJob,
    action: Callable[[], Awaitable[object]] | None = None,
) -> JobState:
    """The facade's answers, given while the loop is held (so from snapshots), equal the
    loop's; returns the job's state. With ``action`` (a coroutine function), in one step
    of the loop: the action, then both answers (a state the next step leaves is seen)."""
    disk = _block_disk(conn, job)
    dom.jobStats()  # the first query of a connection hops once: the snapshots start

    async def step() -> tuple[dict[str, Any], dict[str, Any], JobState]:
        if action is not None:
            await action()
        # nothing else runs on the loop until this returns
        state = JobState((await job.ajob.info()).state)
        legacy = (await dom.adom.job_stats(0))["type"] != jobcore.VIR_DOMAIN_JOB_NONE
        loop = await loop_answers(conn, dom, job, disk, state.active, legacy)
        fast = on_thread(lambda: fast_answers(dom, job, disk, state.active, legacy))
        return fast, loop, state

    fast, loop, state = conn.run(step)
    if not getattr(
        conn.driver.clock, "manual", False
    ):  # real time passed between the two: only that differs
        fast_ms, loop_ms = _elapsed(fast), _elapsed(loop)
        assert all(f >= m for f, m in zip(fast_ms, loop_ms, strict=True)), (fast_ms, loop_ms)
        fast, loop = _without_elapsed(fast), _without_elapsed(loop)
    assert fast == loop
    assert JobState(fast["JobGetInfo"].state) is state
    return state


def _elapsed(answers: dict[str, Any]) -> list[int]:
    found = [answers["jobInfo"][1], answers["JobGetInfo"].time_elapsed]
    return found + [answers[k].get("time_elapsed", 0) for k in ("jobStats", "JobGetStats")]


def _without_elapsed(answers: dict[str, Any]) -> dict[str, Any]:
    out = dict(answers)
    out["jobInfo"] = [answers["jobInfo"][0], 0, *answers["jobInfo"][2:]]
    out["JobGetInfo"] = attrs.evolve(answers["JobGetInfo"], time_elapsed=0)
    for key in ("jobStats", "JobGetStats"):
        out[key] = {k: v for k, v in answers[key].items() if k != "time_elapsed"}
    return out


def on_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on another thread while this one (the loop's) waits: it must finish
    without the loop."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as exc:
            outcome.append(("error", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_GUARD)
    assert not worker.is_alive(), "the query waited for the event loop's thread (it hopped)"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


# ---- every state, on sim ---------------------------------------------------------------


def _queued(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    dom.blockPull("vda")  # a backup of vda waits for it
    return jobcore.JobBegin(dom, push_job("vda"), jobcore.JOB_BEGIN_QUEUE)


def _running(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = jobcore.JobBegin(dom, push_job())
    advance(conn, 0.5)
    return job


def _paused(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = _running(conn, dom)
    jobcore.JobPause(job)
    return job


def _ready(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = jobcore.JobBegin(dom, pull_job())
    advance(conn, 0)
    return job


def _standby(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = _ready(conn, dom)
    jobcore.JobPause(job)
    return job


def _cancelled(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = _running(conn, dom)
    jobcore.JobAbort(job)
    advance(conn, 0)
    jobcore.JobWait(job, timeout=10)
    return job


def _completed(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    job = _running(conn, dom)
    advance(conn, 60)
    jobcore.JobWait(job, timeout=10)
    return job


def _failed(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    conn.driver.inject_failure("backup", 0.5, "disk on fire")  # type: ignore[attr-defined]
    job = _running(conn, dom)
    advance(conn, 60)
    jobcore.JobWait(job, timeout=10)
    return job


def _pull_running(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    dom.blockPull("vda", 100)
    advance(conn, 0.5)
    return jobcore.JobLookupByUUID(dom, conn._call(dom.adom.list_jobs)[-1].uuid)


def _commit_ready(conn: BlockingConnection, dom: BlockingDomain) -> BlockingJob:
    dom.blockCommit(
        "vda", None, "/var/lib/sim/vm1/vda.qcow2", 0, jobcore.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    )
    advance(conn, 60)
    return jobcore.JobLookupByUUID(dom, conn._call(dom.adom.list_jobs)[-1].uuid)


STATES: dict[str, tuple[Callable[[BlockingConnection, BlockingDomain], BlockingJob], S]] = {
    "queued": (_queued, S.QUEUED),
    "running": (_running, S.RUNNING),
    "paused": (_paused, S.PAUSED),
    "ready": (_ready, S.READY),
    "standby": (_standby, S.STANDBY),
    "completed": (_completed, S.COMPLETED),
    "failed": (_failed, S.FAILED),
    "cancelled": (_cancelled, S.CANCELLED),
    "blockpull running": (_pull_running, S.RUNNING),
    "active commit ready": (_commit_ready, S.READY),
}


@pytest.mark.parametrize("name", list(STATES))
def test_snapshot_answers_equal_the_loops_in_every_state(
    conn: BlockingConnection, name: str
) -> None:
    make, state = STATES[name]
    dom = conn.lookupByName("vm1")
    job = make(conn, dom)
    assert check_same(conn, dom, job) is state


def test_snapshot_answers_equal_the_loops_while_aborting_and_completing(
    conn: BlockingConnection,
) -> None:
    # states the sim leaves at its next step: seen in the step of the verb
    dom = conn.lookupByName("vm1")
    running = _running(conn, dom)
    assert check_same(conn, dom, running, running.ajob.abort) is S.ABORTING
    ready = _ready(conn, dom)
    assert check_same(conn, dom, ready, ready.ajob.complete) is S.COMPLETING


def test_jobs_from_before_the_snapshots_started() -> None:
    with jobcore.open("sim:///default?clock=manual") as conn:
        dom = conn.lookupByName("vm1")
        ended = _completed(conn, dom)  # no snapshot query yet: nothing published
        running = _running(conn, dom)
        dom.jobStats()  # start: every active job is published at once
        assert running.ajob.published and not ended.ajob.published  # type: ignore[attr-defined]
        assert check_same(conn, dom, running) is S.RUNNING
        assert jobcore.JobGetInfo(ended) == conn._call(ended.ajob.info)  # one hop publishes
        assert ended.ajob.published  # type: ignore[attr-defined]
        assert check_same(conn, dom, ended) is S.COMPLETED


# ---- every kind of change shows at once (a missing publication fails here) --------------


def test_each_change_is_visible_to_the_next_query(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    first = jobcore.JobBegin(dom, push_job())
    assert check_same(conn, dom, first) is S.RUNNING
    before = dom.jobStats()
    advance(conn, 1)  # progress reports
    assert check_same(conn, dom, first) is S.RUNNING
    after = dom.jobStats()
    assert after["disk_processed"] > before["disk_processed"]
    assert after["time_elapsed"] == before["time_elapsed"] + 1000
    jobcore.JobSetSpeed(first, 1 << 20)  # bandwidth
    assert check_same(conn, dom, first) is S.RUNNING
    assert jobcore.JobGetInfo(first).bandwidth == 1 << 20
    second = jobcore.JobBegin(dom, push_job())  # the alias stays on the first
    assert check_same(conn, dom, second) is S.RUNNING
    assert dom.jobStats()["uuid"] == str(first.uuid)
    jobcore.JobPause(first)
    assert check_same(conn, dom, first) is S.PAUSED
    jobcore.JobResume(first)
    assert check_same(conn, dom, first) is S.RUNNING
    assert check_same(conn, dom, first, first.ajob.abort) is S.ABORTING
    advance(conn, 0)  # the first ends; the legacy alias moves to the second
    assert check_same(conn, dom, first) is S.CANCELLED
    assert check_same(conn, dom, second) is S.RUNNING
    assert dom.jobStats()["uuid"] == str(second.uuid)
    assert jobcore.JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID) == second
    advance(conn, 120)
    jobcore.JobWait(second, timeout=10)
    assert check_same(conn, dom, second) is S.COMPLETED
    assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}


def test_block_job_changes_are_visible_to_the_next_query(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    pull = _pull_running(conn, dom)
    assert without_loop(conn, lambda: dom.blockJobInfo("vda"))["bandwidth"] == 100
    jobcore.JobSetSpeed(pull, 7 << 20)
    assert without_loop(conn, lambda: dom.blockJobInfo("vda"))["bandwidth"] == 7
    assert check_same(conn, dom, pull) is S.RUNNING
    dom.blockJobAbort("vda")  # waits for the end
    assert dom.blockJobInfo("vda") == {} == conn._call(dom.adom.block_job_info, "vda", 0)
    assert check_same(conn, dom, pull) is S.CANCELLED


def test_retention_and_purge_are_as_on_the_loop() -> None:
    with jobcore.open("sim:///default?clock=manual", retention=5) as conn:
        dom = conn.lookupByName("vm1")
        dom.jobStats()  # snapshots on
        job = _completed(conn, dom)
        assert check_same(conn, dom, job) is S.COMPLETED
        # an ended job: the lookups ask the loop, which purges as before
        assert jobcore.JobLookupByUUID(dom, job.uuid) == job
        assert jobcore.JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID) == job
        advance(conn, 6)
        with pytest.raises(jobcore.NoSuchJob):
            jobcore.JobLookupByUUID(dom, job.uuid)
        with pytest.raises(jobcore.NoSuchJob):
            jobcore.JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID)
        # a handle still reads its job's final info, as on the loop
        assert jobcore.JobGetInfo(job) == conn._call(job.ajob.info)
        assert dom.listJobs() == []


def test_completed_stats_still_are_read_once(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    _completed(conn, dom)
    keep = jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED | jobcore.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
    assert dom.jobStats(keep)["type"] == jobcore.VIR_DOMAIN_JOB_COMPLETED
    assert dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)["success"] is True
    assert dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": jobcore.VIR_DOMAIN_JOB_NONE
    }


def test_bad_flags_and_closed_connections_fail_as_before(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    job = jobcore.JobBegin(dom, push_job())
    dom.jobStats()  # snapshots on
    with pytest.raises(jobcore.InvalidArgument, match="unsupported flags"):
        without_loop(conn, lambda: dom.jobStats(1 << 40))
    with pytest.raises(jobcore.InvalidArgument, match="unsupported flags"):
        without_loop(conn, lambda: dom.blockJobInfo("vda", 1 << 40))
    jobcore.JobFree(job)
    with pytest.raises(jobcore.JobError, match="freed"):
        jobcore.JobGetInfo(job)
    conn.close()
    for query in (dom.jobStats, dom.jobInfo, lambda: dom.blockJobInfo("vda")):
        with pytest.raises(jobcore.JobError, match="closed"):
            query()


# ---- a reader thread hammering while jobs begin, end and are purged ---------------------


class Reader:
    """Reads without a pause and checks each answer on its own and against the last
    answer about the same job (time never goes back; an end is final)."""

    def __init__(self, dom: BlockingDomain, jobs: list[BlockingJob]) -> None:
        self.dom, self.jobs = dom, jobs
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.seen: dict[uuid.UUID, Any] = {}
        self.active_reads = 0
        self.reads = 0
        self.listed = 0

    def check_stats(self, st: dict[str, Any]) -> None:
        state = JobState(st["state"])
        assert st["type"] == LEGACY_JOB_TYPE[state]
        assert st["disk_remaining"] == max(0, st["disk_total"] - st["disk_processed"])
        assert ("success" in st) is state.terminal
        if state.terminal:
            assert st["success"] is (state is S.COMPLETED)

    def check_list(self, listed: list[BlockingJob]) -> None:
        """Jobs this test began, each once, in the order they began (retention=0: at
        most the active one and those that ended since the last purge)."""
        order = {job.uuid: i for i, job in enumerate(list(self.jobs))}
        places = [order.get(job.uuid, len(order)) for job in listed]  # (begun, not yet appended)
        assert places == sorted(set(places)), places
        self.listed += len(listed)

    def check_order(self, info: Any) -> None:
        last = self.seen.get(info.uuid)
        if last is not None:
            assert info.time_elapsed >= last.time_elapsed
            assert info.processed >= last.processed
            if last.state.terminal:
                assert info == last  # the final info, for good
        self.seen[info.uuid] = info

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                st = self.dom.jobStats()
                if st != {"type": jobcore.VIR_DOMAIN_JOB_NONE}:
                    self.check_stats(st)
                    assert JobState(st["state"]).active  # jobStats(0): the active job only
                    self.active_reads += 1
                numbers = self.dom.jobInfo()
                assert len(numbers) == 12
                if numbers[0] == jobcore.VIR_DOMAIN_JOB_NONE:
                    assert numbers[1:] == [0] * 11
                else:
                    assert numbers[0] == jobcore.VIR_DOMAIN_JOB_UNBOUNDED
                self.check_list(self.dom.listJobs())
                if self.jobs:
                    job = self.jobs[-1]
                    with contextlib.suppress(jobcore.NoSuchJob):  # (purged already)
                        assert jobcore.JobLookupByUUID(self.dom, job.uuid) == job
                    info = jobcore.JobGetInfo(job)
                    self.check_order(info)
                    stats = jobcore.JobGetStats(job)
                    self.check_stats(stats)
                    assert stats["uuid"] == str(job.uuid)
                self.reads += 1
        except BaseException as exc:
            self.errors.append(exc)


def test_readers_hammering_while_jobs_begin_end_and_are_purged() -> None:
    # real clock, jobs of a few milliseconds, nothing retained: purges all the time
    with jobcore.open("sim:///default?rate=200000000000", retention=0) as conn:
        dom = conn.lookupByName("vm1")
        jobs: list[BlockingJob] = []
        dom.jobStats()  # snapshots on
        readers = [Reader(dom, jobs) for _ in range(2)]
        threads = [threading.Thread(target=r.run) for r in readers]
        for t in threads:
            t.start()
        try:
            for i in range(60):
                job = jobcore.JobBegin(dom, push_job())
                jobs.append(job)
                conn._call(job.ajob.info)  # a hop: the readers read meanwhile
                if i % 3 == 0:
                    with contextlib.suppress(jobcore.OperationInvalid):  # (ended already)
                        jobcore.JobAbort(job)
                jobcore.JobWait(job, timeout=30)
                dom.listJobs()  # purges the ended ones
                dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)
        finally:
            for r in readers:
                r.stop.set()
            for t in threads:
                t.join()
        for r in readers:
            assert not r.errors, r.errors
            assert r.reads > 0 and r.active_reads > 0 and r.listed > 0
        assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
        assert dom.listJobs() == []
        assert jobcore.JobGetInfo(jobs[-1]) == conn._call(jobs[-1].ajob.info)


# ---- preemption, requeue and groups publish what they change ------------------------------


def test_preemption_and_requeue_are_published(conn: BlockingConnection) -> None:
    def kubevirt() -> None:
        conn.aconn.engine.scheduler.policy = KUBEVIRT_POLICY  # type: ignore[attr-defined]

    conn.run_sync(kubevirt)
    dom = conn.lookupByName("vm1")
    victim = jobcore.JobBegin(dom, push_job("vda").replace("<domainbackup", _REQUEUE, 1))
    advance(conn, 1)
    mig = jobcore.JobBegin(
        dom, "<job type='migration'><priority>10</priority><destination uri='sim:///other'/></job>"
    )
    settle(conn)
    assert check_same(conn, dom, mig) is S.RUNNING
    jobcore.JobWait(victim, timeout=10)
    assert check_same(conn, dom, victim) is S.CANCELLED
    stats = jobcore.JobGetStats(victim)
    assert stats["preempted_by"] == str(mig.uuid) and stats["preempt"] == "cancel"
    again = jobcore.JobLookupByUUID(dom, stats["requeued_as"])
    assert check_same(conn, dom, again) is S.QUEUED
    assert jobcore.JobGetStats(again)["requeued_from"] == str(victim.uuid)


_REQUEUE = "<policy requeue='yes'/><domainbackup"


def test_a_held_group_member_is_published(conn: BlockingConnection, tmp_path: Path) -> None:
    conn.close()
    with jobcore.open("sim:///default?rate=1073741824&clock=manual") as conn:
        conn.driver.inject_failure("backup", 1.0)  # type: ignore[attr-defined]
        conn.lookupByName("vm1").jobStats()  # snapshots on

        def member(domain: str, vdb: bool) -> str:
            second = (
                f"<disk name='vdb' type='file'><target file='{tmp_path}/{domain}.vdb'/></disk>"
                if vdb
                else "<disk name='vdb' backup='no'/>"
            )
            return (
                f"<job type='backup' domain='{domain}'><domainbackup><disks><disk name='vda' "
                f"type='file'><target file='{tmp_path}/{domain}'/></disk>{second}</disks>"
                "</domainbackup></job>"
            )

        group = jobcore.JobGroupBegin(
            conn,
            f"<jobgroup mode='all-or-nothing'>{member('vm1', True)}{member('vm2', False)}"
            "</jobgroup>",
        )
        vm2 = jobcore.JobGroupGetJobs(group)[1]
        advance(conn, 1.0)  # vm2's disk is done: its completion is held
        assert check_same(conn, conn.lookupByName("vm2"), vm2) is S.RUNNING
        held = jobcore.JobGetInfo(vm2)
        assert held.processed == held.total > 0
        advance(conn, 100.0)
        jobcore.JobGroupWait(group, timeout=30)
        assert check_same(conn, conn.lookupByName("vm2"), vm2) is S.CANCELLED


# ---- on qemu: the same answers for what a real QEMU job shows ------------------------------


@pytest.mark.qemu
def test_snapshot_answers_equal_the_loops_on_qemu(tmp_path: Path) -> None:
    from qemu_helpers import create, domain_xml, write

    base = create(tmp_path / "base.qcow2")
    write(base, "write -P 0x11 0 8M")
    top = create(tmp_path / "top.qcow2", backing=base)
    with jobcore.open(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = conn.createXML(domain_xml("vm1", {"vda": top}))
        dom.jobStats()  # snapshots on
        dom.blockPull("vda", 1)  # 1 MiB/s: running for seconds
        pull = jobcore.JobLookupByUUID(dom, dom.listJobs()[0].uuid)
        assert check_same(conn, dom, pull) is S.RUNNING
        assert without_loop(conn, lambda: dom.blockJobInfo("vda"))["bandwidth"] == 1
        jobcore.JobSetSpeed(pull, 0)
        check_same(conn, dom, pull)  # running or done by now: the same either way
        assert jobcore.JobWait(pull, timeout=30)["state"] == "completed"
        assert check_same(conn, dom, pull) is S.COMPLETED
        target = tmp_path / "backup.qcow2"
        dom.backupBegin(
            "<domainbackup><disks><disk name='vda' type='file'>"
            f"<target file='{target}'/></disk></disks></domainbackup>"
        )
        backup = jobcore.JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID)
        check_same(conn, dom, backup)
        assert jobcore.JobWait(backup, timeout=30)["state"] == "completed"
        assert check_same(conn, dom, backup) is S.COMPLETED
        dom.destroy()


# ---- lists and lookups: the domain's published jobs, purged as the loop purges ------------


def _with_retention(job_xml: str, seconds: float) -> str:
    return job_xml.replace(
        "<job type='backup'>", f"<job type='backup'><retention seconds='{seconds}'/>", 1
    )


def check_lists_same(
    conn: BlockingConnection,
    doms: list[BlockingDomain],
    jobs: list[BlockingJob],
    advance_by: float = 0.0,
) -> list[list[uuid.UUID]]:
    """In one step of the loop: the manual clock moves on by ``advance_by`` (nothing is
    purged yet: the published lists still hold what expired), the facade's listJobs and
    JobLookupByUUID answer on another thread, then the loop answers the same queries (and
    purges); both equal. Returns the listed UUIDs per domain."""
    for dom in doms:
        dom.listJobs()  # the first list query of a domain publishes its list (one hop)

    def fast() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dom in doms:
            out[f"{dom.name()} list"] = [j.uuid for j in dom.listJobs()]
            for job in jobs:
                out[f"{dom.name()} {job.uuid}"] = _fast_lookup(dom, job.uuid)
            out[f"{dom.name()} legacy"] = _fast_lookup(dom, LEGACY_DOMAIN_JOB_UUID)
        return out

    async def step() -> tuple[dict[str, Any], dict[str, Any]]:
        conn.driver.clock.advance(advance_by)  # type: ignore[attr-defined]
        got = on_thread(fast)
        lookup = conn.aconn.job_lookup_by_uuid
        loop: dict[str, Any] = {}
        for dom in doms:
            loop[f"{dom.name()} list"] = [j.uuid for j in await dom.adom.list_jobs()]
            for job in [*jobs, None]:
                job_id = LEGACY_DOMAIN_JOB_UUID if job is None else job.uuid
                try:
                    found: Any = (await lookup(dom.adom, job_id)).uuid
                except jobcore.NoSuchJob:
                    found = "NoSuchJob"
                loop[f"{dom.name()} {'legacy' if job is None else job.uuid}"] = found
        return got, loop

    got, loop = conn.run(step)
    settle(conn)
    # where the snapshots cannot answer, the facade asks the loop: nothing to compare
    asked = {k for k, v in got.items() if v == "ask the loop"}
    assert {k: v for k, v in got.items() if k not in asked} == {
        k: v for k, v in loop.items() if k not in asked
    }
    assert all(not k.endswith(" list") for k in asked)  # lists always answer
    return [got[f"{dom.name()} list"] for dom in doms]


def _fast_lookup(dom: BlockingDomain, job_id: uuid.UUID) -> Any:
    """JobLookupByUUID from the snapshots only (the loop may be busy: a hop would hang)."""
    local = dom._published()
    assert local is not None
    found = jobcore.facade._lookup_now(local, job_id)
    return "ask the loop" if found is None else found.uuid


def test_lists_and_lookups_equal_the_loops_through_retention_and_purge() -> None:
    with jobcore.open("sim:///default?clock=manual", retention=1000) as conn:
        vm1, vm2 = conn.lookupByName("vm1"), conn.lookupByName("vm2")
        vm1.jobStats()  # snapshots on
        failed = _failed(conn, vm2)
        done = _completed(conn, vm1)
        short = jobcore.JobBegin(vm1, _with_retention(push_job(), 5))
        advance(conn, 60)
        jobcore.JobWait(short, timeout=10)  # its deadline: 5 s after its end
        running = _running(conn, vm2)
        queued = _queued(conn, vm2)
        jobs = [short, done, failed, running, queued]
        lists = check_lists_same(conn, [vm1, vm2], jobs)
        assert lists[0] == [done.uuid, short.uuid]
        assert lists[1][0] == failed.uuid and running.uuid in lists[1] and queued.uuid in lists[1]
        assert _fast_lookup(vm1, LEGACY_DOMAIN_JOB_UUID) == short.uuid  # the last ended
        assert _fast_lookup(vm1, done.uuid) == done.uuid  # an ended job, from snapshots
        assert _fast_lookup(vm2, failed.uuid) == failed.uuid
        assert _fast_lookup(vm2, done.uuid) == "ask the loop"  # another domain's
        with pytest.raises(jobcore.NoSuchJob):
            jobcore.JobLookupByUUID(vm2, done.uuid)
        # the clock passes the short job's deadline: answered as the loop's purge would
        # (the store still holds it when the snapshots answer)
        lists = check_lists_same(conn, [vm1, vm2], jobs, advance_by=10.0)
        assert lists[0] == [done.uuid]
        assert _fast_lookup(vm1, short.uuid) == "ask the loop"  # (it raises NoSuchJob)
        with pytest.raises(jobcore.NoSuchJob):
            jobcore.JobLookupByUUID(vm1, short.uuid)
        # the last ended job is gone: whether an earlier one is kept, the loop says
        assert jobcore.JobLookupByUUID(vm1, LEGACY_DOMAIN_JOB_UUID) == done
        later = jobcore.JobBegin(vm1, push_job())  # a new job shows at once
        assert check_lists_same(conn, [vm1, vm2], [*jobs, later])[0] == [done.uuid, later.uuid]
        assert _fast_lookup(vm1, LEGACY_DOMAIN_JOB_UUID) == later.uuid  # the active one
        jobcore.JobAbort(later)
        jobcore.JobWait(later, timeout=10)
        # every ended job's deadline passes: the lists empty out, the alias fails
        lists = check_lists_same(conn, [vm1, vm2], [*jobs, later], advance_by=2000.0)
        assert lists[0] == [] and failed.uuid not in lists[1] and queued.uuid in lists[1]
        assert vm1.listJobs() == [] and conn._call(vm1.adom.list_jobs) == []


def test_lists_follow_the_stores_caps() -> None:
    # a cap evicts the oldest ended job when another ends: the published list follows
    with jobcore.open("sim:///default?clock=manual") as conn:
        vm1, vm2 = conn.lookupByName("vm1"), conn.lookupByName("vm2")
        vm1.jobStats()  # snapshots on

        def caps() -> None:
            conn.aconn.engine.store.max_retained_per_domain = 2  # type: ignore[attr-defined]
            conn.aconn.engine.store.max_retained = 3  # type: ignore[attr-defined]

        conn.run_sync(caps)
        jobs = [_completed(conn, vm1), _completed(conn, vm1)]
        assert check_lists_same(conn, [vm1, vm2], jobs)[0] == [j.uuid for j in jobs]
        jobs.append(_completed(conn, vm1))  # evicts vm1's first
        assert check_lists_same(conn, [vm1, vm2], jobs)[0] == [j.uuid for j in jobs[1:]]
        jobs += [_completed(conn, vm2), _completed(conn, vm2)]  # evicts vm1's oldest
        lists = check_lists_same(conn, [vm1, vm2], jobs)
        assert lists == [[jobs[2].uuid], [jobs[3].uuid, jobs[4].uuid]]


def test_lists_of_jobs_from_before_the_snapshots_started() -> None:
    with jobcore.open("sim:///default?clock=manual") as conn:
        vm1 = conn.lookupByName("vm1")
        ended = _completed(conn, vm1)  # no snapshot query yet: nothing published
        running = _running(conn, vm1)
        vm1.jobStats()  # start: the active job is published, the ended one is not
        assert not ended.ajob.published  # type: ignore[attr-defined]
        lists = check_lists_same(conn, [vm1], [ended, running])  # its list: all of them
        assert lists == [[ended.uuid, running.uuid]]
        assert ended.ajob.published  # type: ignore[attr-defined]


def test_elapsed_time_is_live_between_publications(conn: BlockingConnection) -> None:
    # a paused job publishes nothing while the clock runs: its elapsed time still moves
    dom = conn.lookupByName("vm1")
    job = _paused(conn, dom)
    before = without_loop(conn, dom.jobStats)["time_elapsed"]
    conn.run_sync(conn.driver.clock.advance, 7)  # type: ignore[attr-defined]
    assert without_loop(conn, dom.jobStats)["time_elapsed"] == before + 7000
    assert without_loop(conn, lambda: jobcore.JobGetInfo(job)).time_elapsed == before + 7000
    assert without_loop(conn, dom.jobInfo)[1] == before + 7000
    assert check_same(conn, dom, job) is S.PAUSED


def test_a_job_the_store_forgot_before_it_was_published_is_not_found() -> None:
    with jobcore.open("sim:///default?clock=manual") as conn:
        vm1 = conn.lookupByName("vm1")

        def cap() -> None:
            conn.aconn.engine.store.max_retained_per_domain = 1  # type: ignore[attr-defined]

        conn.run_sync(cap)
        first = _completed(conn, vm1)  # snapshots off: nothing published
        second = _completed(conn, vm1)  # evicts the first
        vm1.jobStats()  # snapshots on
        jobcore.JobGetInfo(first)  # the handle's final info: published now, one hop
        assert first.ajob.published  # type: ignore[attr-defined]
        assert _fast_lookup(vm1, first.uuid) == "ask the loop"
        with pytest.raises(jobcore.NoSuchJob):
            jobcore.JobLookupByUUID(vm1, first.uuid)
        assert check_lists_same(conn, [vm1], [first, second]) == [[second.uuid]]


def test_lists_of_jobs_a_durable_store_recovered(tmp_path: Path) -> None:
    # a recovered job's deadline is the store's (its wall-clock deadline on the new
    # connection's clock), not its end plus its retention
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    with jobcore.open("sim:///default?clock=manual", retention=100, store=store) as conn:
        first = _completed(conn, conn.lookupByName("vm1"))
    with jobcore.open("sim:///default?clock=manual", retention=100, store=store) as conn:
        vm1 = conn.lookupByName("vm1")
        vm1.jobStats()  # snapshots on
        again = jobcore.JobLookupByUUID(vm1, first.uuid)  # (a hop: not published yet)
        assert check_lists_same(conn, [vm1], [again]) == [[first.uuid]]
        assert _fast_lookup(vm1, first.uuid) == first.uuid
        assert check_lists_same(conn, [vm1], [again], advance_by=90) == [[first.uuid]]
        assert check_lists_same(conn, [vm1], [again], advance_by=20) == [[]]


def test_readers_listing_while_jobs_end_expire_and_are_evicted() -> None:
    # real clock, retention of 200 ms and a cap of 3 per domain: the published lists
    # change by deadlines passing, purges and evictions while two threads read them (a
    # retention long enough that a loaded machine still lists ended jobs beside others)
    with jobcore.open("sim:///default?rate=200000000000", retention=0.2) as conn:
        dom = conn.lookupByName("vm1")

        def cap() -> None:
            conn.aconn.engine.store.max_retained_per_domain = 3  # type: ignore[attr-defined]

        conn.run_sync(cap)
        jobs: list[BlockingJob] = []
        dom.jobStats()  # snapshots on
        dom.listJobs()  # its list published
        readers = [Reader(dom, jobs) for _ in range(2)]
        longest: list[int] = []

        def run(reader: Reader) -> None:
            try:
                while not reader.stop.is_set():
                    listed = dom.listJobs()
                    reader.check_list(listed)
                    longest.append(len(listed))
                    assert len(listed) <= 3 + 1  # the cap, and the one active job
                    for job in listed:
                        with contextlib.suppress(jobcore.NoSuchJob):  # (expired since)
                            assert jobcore.JobLookupByUUID(dom, job.uuid) == job
            except BaseException as exc:
                reader.errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        try:
            for _ in range(60):
                job = jobcore.JobBegin(dom, push_job())
                jobs.append(job)
                jobcore.JobWait(job, timeout=30)
                if len(jobs) % 10 == 0:
                    conn._call(dom.adom.list_jobs)  # a purge on the loop now and then
        finally:
            for r in readers:
                r.stop.set()
            for t in threads:
                t.join()
        for r in readers:
            assert not r.errors, r.errors
            assert r.listed > 0
        assert max(longest) > 1  # ended jobs were listed beside others
        loop = [j.uuid for j in conn._call(dom.adom.list_jobs)]
        fast = [j.uuid for j in dom.listJobs()]  # later: jobs may have expired since
        assert fast == [u for u in loop if u in fast] and set(fast) <= set(jobs_uuids(jobs))


def jobs_uuids(jobs: list[BlockingJob]) -> list[uuid.UUID]:
    return [j.uuid for j in jobs]
