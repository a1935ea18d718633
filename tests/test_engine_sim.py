"""End-to-end behaviour of the engine on the sim driver, through the async API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

import jobcore
from jobcore import JobState
from jobcore.api import Connection
from jobcore.events import EventKind, JobEvent

pytestmark = pytest.mark.anyio

MANUAL = "sim:///default?clock=manual"


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    async with jobcore.connect(MANUAL) as c:
        yield c


async def step(conn: Connection, seconds: float) -> None:
    conn.driver.clock.advance(seconds)  # type: ignore[attr-defined]
    for _ in range(3):
        await anyio.lowlevel.checkpoint()


def backup_xml(
    disk: str = "vda", target: str | None = None, mode: str = "push", extra: str = ""
) -> str:
    store = "scratch" if mode == "pull" else "target"
    target = target or f"/backups/{uuid.uuid4()}.qcow2"
    return (
        f"<job type='backup'>{extra}<domainbackup mode='{mode}'><disks>"
        f"<disk name='{disk}' type='file'><{store} file='{target}'/></disk>"
        f"</disks></domainbackup></job>"
    )


PULL_VDA = "<job type='blockpull'><disk name='vda'/></job>"


async def test_backup_runs_to_completion_with_progress_and_stats(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    with conn.subscribe(domain="vm1") as sub:
        job = await dom.job_begin(backup_xml("vda"))
        assert job.type == jobcore.JobType.BACKUP and job.type == "backup"
        assert (await job.info())["state"] == "running"
        await step(conn, 2.0)  # 256 MiB/s: half of 1 GiB
        stats = await job.stats()
        assert stats["disk_total"] == 1 << 30
        assert 0 < stats["disk_processed"] < stats["disk_total"]
        assert stats["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_BACKUP
        assert stats["type"] == jobcore.VIR_DOMAIN_JOB_UNBOUNDED
        assert stats["time_elapsed"] == 2000
        await step(conn, 2.5)
        info = await job.wait(timeout=5)
        assert info["state"] == "completed" and info.state == JobState.COMPLETED
        final = await job.stats()
        assert final["success"] is True and final["disk_remaining"] == 0
        assert final["type"] == jobcore.VIR_DOMAIN_JOB_COMPLETED
        events = drain(sub)
    kinds = [(e.kind, e.state) for e in events if e.job == job.uuid]
    assert kinds[0] == (EventKind.STATE, JobState.RUNNING)
    assert (EventKind.PROGRESS, JobState.RUNNING) in kinds
    finals = [e for e in events if e.kind is EventKind.FINAL]
    assert len(finals) == 1 and finals[0].stats is not None
    assert finals[0].stats["success"] is True


def st(job: jobcore.Job) -> JobState:
    """The job's state (a call, so that type checkers do not narrow it)."""
    return job.state


def drain(sub: jobcore.Subscription) -> list[JobEvent]:
    out = []
    while (ev := sub.get_nowait()) is not None:
        out.append(ev)
    return out


async def test_parallel_backup_and_pull_and_refused_conflict(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    backup = await dom.job_begin(backup_xml("vdb"))
    pull = await dom.job_begin(PULL_VDA)
    assert st(backup) is JobState.RUNNING and st(pull) is JobState.RUNNING
    with pytest.raises(jobcore.JobConflict) as err:
        await dom.job_begin(backup_xml("vda"))
    assert err.value.holder == pull.uuid and err.value.resource == "disk:vm1/vda"
    assert str(pull.uuid) in str(err.value)
    await step(conn, 10)
    assert (await backup.wait(1))["state"] == "completed"
    assert (await pull.wait(1))["state"] == "completed"
    info = await dom.info()
    assert len(info.disk("vda").chain) == 1  # type: ignore[union-attr]


async def test_migration_excludes_everything_and_moves_the_domain(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    mig = await dom.job_begin(
        "<job type='migration'><destination uri='sim:///other'/>"
        "<downtime-limit unit='ms'>20</downtime-limit></job>"
    )
    with pytest.raises(jobcore.JobConflict) as err:
        await dom.job_begin(PULL_VDA)
    assert err.value.holder == mig.uuid and err.value.resource == "domain:vm1"
    await step(conn, 3)
    info = await mig.wait(1)
    assert info["state"] == "completed"
    stats = await mig.stats()
    assert stats["memory_total"] == 512 << 20 and stats["memory_remaining"] == 0
    assert stats["data_processed"] == stats["data_total"] and stats["downtime"] == 20
    assert dom.uri == "sim:///other"
    assert "vm1" not in [d.name for d in await conn.list_domains()]
    # the handle follows the domain: jobs still run on it
    job = await dom.job_begin(PULL_VDA)
    await step(conn, 10)
    assert (await job.wait(1))["state"] == "completed"


async def test_active_commit_waits_in_ready_then_pivots(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm2")
    job = await dom.job_begin("<job type='blockcommit'><disk name='vda'/></job>")
    await step(conn, 10)
    assert st(job) is JobState.READY
    with pytest.raises(jobcore.OperationInvalid):
        await job.resume()
    await job.pause()
    assert st(job) is JobState.STANDBY
    await job.resume()
    assert st(job) is JobState.READY
    await job.complete()
    await step(conn, 0)
    assert (await job.wait(1))["state"] == "completed"
    disk = (await dom.info()).disk("vda")
    assert disk is not None and disk.chain == ("/var/lib/sim/vm2/vda.2.qcow2",)


async def test_commit_with_pivot_completes_by_itself(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    job = await dom.job_begin("<job type='blockcommit'><disk name='vda'/><pivot/></job>")
    await step(conn, 10)
    await step(conn, 0)
    assert (await job.wait(1))["state"] == "completed"


async def test_pause_resume_abort_and_refused_verbs(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    job = await dom.job_begin(backup_xml("vda"))
    await step(conn, 1)
    await job.pause()
    assert st(job) is JobState.PAUSED
    with pytest.raises(jobcore.OperationInvalid) as err:
        await job.pause()
    assert str(job.uuid) in str(err.value) and "'paused'" in str(err.value)
    assert "'pause'" in str(err.value)
    done = (await job.stats())["disk_processed"]
    await step(conn, 5)
    assert (await job.stats())["disk_processed"] == done  # paused: no progress
    await job.resume()
    await job.abort()
    assert st(job) is JobState.ABORTING
    await step(conn, 0)
    info = await job.wait(1)
    assert info["state"] == "cancelled"
    with pytest.raises(jobcore.OperationInvalid):
        await job.abort()  # terminal states are absorbing


async def test_failure_injection_and_crash_fail_jobs_alone(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    conn.driver.inject_failure("backup", 0.5, "disk on fire")  # type: ignore[attr-defined]
    failing = await dom.job_begin(backup_xml("vda"))
    other = await dom.job_begin(backup_xml("vdb"))
    await step(conn, 2.5)
    info = await failing.wait(1)
    assert info["state"] == "failed" and "disk on fire" in (info["errmsg"] or "")
    stats = await failing.stats()
    assert stats["success"] is False and "disk on fire" in stats["errmsg"]
    assert st(other) is JobState.COMPLETED  # 512 MiB at 256 MiB/s: done at 2 s
    vm2 = await conn.lookup_domain("vm2")
    running = await vm2.job_begin(backup_xml("vda"))
    conn.driver.crash()  # type: ignore[attr-defined]
    info = await running.wait(1)
    assert info["state"] == "failed" and "crash" in (info["errmsg"] or "")
    with pytest.raises(jobcore.DriverError):
        await vm2.job_begin(backup_xml("vda"))
    # the failed start is still a job, findable, failed
    assert all(j.state.terminal for j in await vm2.list_jobs())


async def test_queueing_is_fifo_with_timeout(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    holder = await dom.job_begin(PULL_VDA)
    q1 = await dom.job_begin(backup_xml("vda", extra="<queue/>"))
    q2 = await dom.job_begin(
        "<job type='blockcommit'><queue/><disk name='vda'/><top index='1'/></job>"
    )
    q3 = await dom.job_begin(backup_xml("vda", extra="<queue timeout='0.05'/>"))
    assert [q.state for q in (q1, q2, q3)] == [JobState.QUEUED] * 3
    await step(conn, 0.05)  # the timeout runs on the connection's (manual) clock
    info = await q3.wait(timeout=5)
    assert info["state"] == "failed" and "not admitted" in (info["errmsg"] or "")
    with pytest.raises(jobcore.JobConflict) as err:  # no overtaking the queue
        await dom.job_begin(backup_xml("vda"))
    assert err.value.holder in (holder.uuid, q1.uuid)
    await step(conn, 10)
    await step(conn, 0)
    assert st(holder) is JobState.COMPLETED
    assert st(q1) is JobState.RUNNING and st(q2) is JobState.QUEUED
    await step(conn, 10)
    await step(conn, 0)
    assert st(q1) is JobState.COMPLETED and st(q2) is JobState.RUNNING
    await q2.abort()
    await step(conn, 0)
    assert (await q2.wait(1))["state"] == "cancelled"


async def test_abort_of_a_queued_job_cancels_it_at_once(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    await dom.job_begin(PULL_VDA)
    queued = await dom.job_begin(backup_xml("vda"), flags=jobcore.JOB_BEGIN_QUEUE)
    assert st(queued) is JobState.QUEUED
    await queued.abort()
    assert st(queued) is JobState.CANCELLED


async def test_caller_chosen_uuid_lookup_and_duplicate(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    chosen = uuid.uuid4()
    job = await dom.job_begin(backup_xml("vdb", extra=f"<uuid>{chosen}</uuid>"))
    assert job.uuid == chosen
    for key in (chosen, str(chosen), chosen.bytes):
        assert (await conn.job_lookup_by_uuid(dom, key)).uuid == chosen
    with pytest.raises(jobcore.InvalidArgument, match="already exists"):
        await dom.job_begin(backup_xml("vdb", extra=f"<uuid>{chosen}</uuid>"))
    with pytest.raises(jobcore.NoSuchJob):
        await conn.job_lookup_by_uuid(dom, uuid.uuid4())
    reserved = jobcore.LEGACY_DOMAIN_JOB_UUID
    with pytest.raises(jobcore.InvalidArgument, match="reserved"):
        await dom.job_begin(backup_xml("vdb", extra=f"<uuid>{reserved}</uuid>"))
    vm2 = await conn.lookup_domain("vm2")
    with pytest.raises(jobcore.NoSuchJob):
        await conn.job_lookup_by_uuid(vm2, chosen)


async def test_retention_keeps_ended_jobs_then_forgets(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    short = await dom.job_begin(backup_xml("vdb", extra="<retention seconds='5'/>"))
    longer = await dom.job_begin(backup_xml("vda", extra="<retention seconds='60'/>"))
    await step(conn, 4.5)
    await step(conn, 0)
    assert short.state.terminal and longer.state.terminal
    assert (await conn.job_lookup_by_uuid(dom, short.uuid)).uuid == short.uuid
    await step(conn, 10)
    with pytest.raises(jobcore.NoSuchJob):
        await conn.job_lookup_by_uuid(dom, short.uuid)
    assert (await conn.job_lookup_by_uuid(dom, longer.uuid)).uuid == longer.uuid
    assert [j.uuid for j in await dom.list_jobs()] == [longer.uuid]


async def test_legacy_alias_resolution(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    legacy = jobcore.LEGACY_DOMAIN_JOB_UUID
    with pytest.raises(jobcore.NoSuchJob):
        await conn.job_lookup_by_uuid(dom, legacy)
    pull = await dom.job_begin(PULL_VDA)  # not domain-level
    with pytest.raises(jobcore.NoSuchJob):
        await conn.job_lookup_by_uuid(dom, legacy)
    first = await dom.job_begin(backup_xml("vdb"))
    await step(conn, 0.5)
    second = await dom.job_begin(backup_xml("vdb"))
    handle = await conn.job_lookup_by_uuid(dom, legacy)
    assert handle.uuid == first.uuid
    await step(conn, 1.8)  # first ends, second still runs
    assert st(first) is JobState.COMPLETED and st(second) is JobState.RUNNING
    assert (await conn.job_lookup_by_uuid(dom, legacy)).uuid == second.uuid
    assert handle.uuid == first.uuid  # a handle never re-points
    await step(conn, 10)
    assert (await conn.job_lookup_by_uuid(dom, legacy)).uuid == second.uuid
    assert st(pull) is JobState.COMPLETED


async def test_bad_input_is_refused_and_loses_nothing(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    running = await dom.job_begin(backup_xml("vdb"))
    bad = [
        ("<job type='blockpull'><disk name='vdz'/></job>", jobcore.InvalidArgument),
        (
            "<job type='blockpull'><disk name='vda'/><base index='7'/></job>",
            jobcore.InvalidArgument,
        ),
        ("<job type='blockcommit'><disk name='vdb'/></job>", jobcore.InvalidArgument),
        (
            "<job type='blockpull'><disk name='vda'/><base index='0'/><top index='1'/></job>",
            jobcore.InvalidArgument,
        ),
        ("<job type='nonsense'/>", jobcore.XMLError),
        ("<job", jobcore.XMLError),
        (backup_xml("vdq"), jobcore.JobError),
        ("<job type='migration'><destination uri='::'/></job>", jobcore.JobError),
    ]
    for xml, error in bad:
        with pytest.raises(error):
            await dom.job_begin(xml)
    with pytest.raises(jobcore.NoSuchDomain):
        await conn.lookup_domain("nope")
    assert st(running) is JobState.RUNNING
    await step(conn, 3)
    assert (await running.wait(1))["state"] == "completed"


async def test_pull_backup_runs_until_its_consumer_is_done(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    job = await dom.job_begin(backup_xml("vdb", mode="pull"))
    await step(conn, 0)
    assert st(job) is JobState.READY
    stats = await job.stats()
    assert stats["disk_temp_total"] == 512 << 20 and "disk_temp_used" in stats
    await step(conn, 100)
    assert st(job) is JobState.READY  # still exporting
    await job.complete()
    await step(conn, 0)
    assert (await job.wait(1))["state"] == "completed"
    # as in libvirt, aborting a pull backup that serves its export ends it successfully
    again = await dom.job_begin(backup_xml("vdb", mode="pull"))
    await step(conn, 0)
    await again.abort()
    assert st(again) is JobState.ABORTING
    await step(conn, 0)
    assert (await again.wait(1))["state"] == "completed"
    assert (await again.stats())["success"] is True


async def test_xml_desc_has_uuid_and_effective_values(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    job = await dom.job_begin("<job type='backup'/>")
    desc = await job.xml_desc()
    assert str(job.uuid) in desc
    assert "/var/lib/sim/vm1/vda.qcow2." in desc and "backup='yes'" in desc
    assert "<state>running</state>" in desc
    parsed = jobcore.xml.parse_job(desc)
    assert parsed.uuid == job.uuid


async def test_slow_subscriber_loses_progress_first_and_never_stalls(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    with conn.subscribe(maxlen=4) as sub:
        jobs = [await dom.job_begin(backup_xml("vdb")) for _ in range(3)]
        for _ in range(30):
            await step(conn, 0.1)
        await step(conn, 5)
        for j in jobs:
            assert (await j.wait(1))["state"] == "completed"
        events = drain(sub)
    assert len(events) == 4 and sub.lost > 0
    assert events[0].lost_before == sub.lost
    assert sum(e.kind is EventKind.FINAL for e in events) >= 3


async def test_closing_the_connection_fails_active_jobs() -> None:
    async with jobcore.connect(MANUAL) as c:
        dom = await c.lookup_domain("vm1")
        job = await dom.job_begin(backup_xml("vda"))
    assert st(job) is JobState.FAILED
    assert "closed" in ((await job.info())["errmsg"] or "")


async def test_job_logs_carry_uuid_type_and_domain(
    conn: Connection, caplog: pytest.LogCaptureFixture
) -> None:
    dom = await conn.lookup_domain("vm1")
    with caplog.at_level("INFO", logger="jobcore"):
        job = await dom.job_begin(backup_xml("vdb"))
        await step(conn, 3)
        await job.wait(1)
    entries = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    mine = [e for e in entries if e.get("job") == str(job.uuid)]
    assert {e["event"] for e in mine} >= {"job began", "job ended"}
    assert all(e["type"] == "backup" and e["domain"] == "vm1" for e in mine)


async def test_errors_in_the_connection_block_come_out_unwrapped() -> None:
    with pytest.raises(jobcore.NoSuchDomain):
        async with jobcore.connect(MANUAL) as c:
            await c.lookup_domain("nope")


async def test_verbs_on_a_job_just_admitted_from_the_queue_wait_for_its_start(
    conn: Connection,
) -> None:
    dom = await conn.lookup_domain("vm1")
    holder = await dom.job_begin(PULL_VDA)
    queued = await dom.job_begin(backup_xml("vda", extra="<queue/>"))
    conn.driver.crash()  # type: ignore[attr-defined]  # the holder fails synchronously
    conn.driver.restart()  # type: ignore[attr-defined]
    assert holder.state.terminal and st(queued) is JobState.RUNNING
    # admitted: the driver start runs in a task; a verb right now must wait for it
    await queued.pause()
    assert st(queued) is JobState.PAUSED
    await queued.resume()
    await queued.abort()
    await step(conn, 0)
    assert (await queued.wait(1))["state"] == "cancelled"


async def test_shallow_commit_defaults_base_to_the_tops_backing_file(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    job = await dom.job_begin(
        "<job type='blockcommit'><disk name='vda'/><top index='1'/><shallow/></job>"
    )
    assert "<base index='2'/>" in await job.xml_desc()
    await step(conn, 10)
    assert (await job.wait(1))["state"] == "completed"
    # the contract's example, all elements at once: the base given wins over shallow
    vm2 = await conn.lookup_domain("vm2")
    full = await vm2.job_begin(
        "<job type='blockcommit'><disk name='vda'/><top index='0'/><base index='2'/>"
        "<pivot/><delete/><shallow/><bandwidth unit='MiB/s'>100</bandwidth></job>"
    )
    await step(conn, 10)
    await step(conn, 0)
    assert (await full.wait(1))["state"] == "completed"
    disk = (await vm2.info()).disk("vda")
    assert disk is not None and len(disk.chain) == 1
