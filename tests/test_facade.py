"""The blocking, libvirt-flavoured facade and the legacy calls, on sim."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import jobcore
from jobcore.facade import BlockingConnection, BlockingDomain

BACKUP = (
    "<domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/vdb.qcow2'/></disk></disks></domainbackup>"
)


@pytest.fixture
def conn() -> Iterator[BlockingConnection]:
    c = jobcore.open("sim:///default?clock=manual")
    try:
        yield c
    finally:
        c.close()


def advance(conn: BlockingConnection, seconds: float) -> None:
    conn.run_sync(conn.driver.clock.advance, seconds)  # type: ignore[attr-defined]
    conn.run_sync(lambda: None)
    time.sleep(0.01)
    conn.run_sync(lambda: None)


def test_job_api_names_from_the_proposal(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    job = jobcore.JobBegin(dom, f"<job type='backup'>{BACKUP}</job>")
    assert jobcore.JobGetType(job) == jobcore.JobType.BACKUP
    assert isinstance(jobcore.JobGetUUID(job), bytes) and len(jobcore.JobGetUUID(job)) == 16
    text = jobcore.JobGetUUIDString(job)
    assert uuid.UUID(text) == job.uuid
    for key in (text, uuid.UUID(text), jobcore.JobGetUUID(job)):
        assert jobcore.JobLookupByUUID(dom, key) == job
    info = jobcore.JobGetInfo(job)
    assert info["state"] == "running" and info["type"] == "backup"
    assert info["uuid"] == text and info["domain"] == "vm1" and "progress" in info
    assert "<uuid>" + text + "</uuid>" in jobcore.JobGetXMLDesc(job)
    advance(conn, 3)
    final = jobcore.JobWait(job, timeout=5)
    assert final["state"] == "completed" and final["progress"] == 100.0
    assert jobcore.JobAbort is not None
    assert jobcore.JobFree(job) == 0
    with pytest.raises(jobcore.JobError):
        jobcore.JobGetInfo(job)


def test_job_abort_and_wait_timeout(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    job = jobcore.JobBegin(dom, f"<job type='backup'>{BACKUP}</job>")
    with pytest.raises(TimeoutError):
        jobcore.JobWait(job, timeout=0.05)
    assert jobcore.JobAbort(job) == 0
    advance(conn, 0)
    assert jobcore.JobWait(job, timeout=5)["state"] == "cancelled"


def test_legacy_domain_job_calls(conn: BlockingConnection) -> None:
    dom: BlockingDomain = conn.lookupByName("vm1")
    assert dom.jobInfo()[0] == jobcore.VIR_DOMAIN_JOB_NONE
    assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
    with pytest.raises(jobcore.OperationInvalid, match="no job is active"):
        dom.abortJob()
    assert dom.backupBegin(BACKUP, None) == 0
    info = dom.jobInfo()
    assert len(info) == 12 and info[0] == jobcore.VIR_DOMAIN_JOB_UNBOUNDED
    stats = dom.jobStats()
    assert stats["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert stats["disk_total"] == 512 << 20
    assert "<target file='/b/vdb.qcow2'/>" in dom.backupGetXMLDesc()
    # with an active job, COMPLETED stats are not available (as in libvirt)
    assert dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)["type"] == 0
    advance(conn, 3)
    assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
    flags = jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED | jobcore.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    kept = dom.jobStats(flags)
    assert kept["type"] == jobcore.VIR_DOMAIN_JOB_COMPLETED and kept["success"] is True
    once = dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert once["type"] == jobcore.VIR_DOMAIN_JOB_COMPLETED
    assert dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": jobcore.VIR_DOMAIN_JOB_NONE
    }
    # the job itself is still retained and reachable through the alias
    job = jobcore.JobLookupByUUID(dom, jobcore.LEGACY_DOMAIN_JOB_UUID)
    assert jobcore.JobGetInfo(job)["state"] == "completed"
    with pytest.raises(jobcore.NoSuchJob, match="no domain backup job"):
        dom.backupGetXMLDesc()


def test_legacy_abort_of_pull_backup_completes_it(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm2")
    pull = (
        "<domainbackup mode='pull'><server transport='unix' socket='/tmp/s'/><disks>"
        "<disk name='vdb' type='file'><scratch file='/s/vdb'/></disk></disks>"
        "</domainbackup>"
    )
    dom.backupBegin(pull)
    advance(conn, 0)
    assert dom.abortJob() == 0
    advance(conn, 0)
    stats = dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert stats["type"] == jobcore.VIR_DOMAIN_JOB_COMPLETED and stats["success"] is True


def test_legacy_block_job_calls(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    assert dom.blockJobInfo("vda") == {}
    with pytest.raises(jobcore.OperationInvalid):
        dom.blockJobAbort("vda")
    assert dom.blockPull("vda", 100) == 0
    info = dom.blockJobInfo("vda")
    assert info["type"] == jobcore.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL and info["bandwidth"] == 100
    bytes_info = dom.blockJobInfo("vda", jobcore.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
    assert bytes_info["bandwidth"] == 100 << 20 and bytes_info["end"] > bytes_info["cur"]
    with pytest.raises(jobcore.OperationInvalid, match="not ready for pivot"):
        dom.blockJobAbort("vda", jobcore.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    assert dom.blockJobAbort("vda", jobcore.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC) == 0
    advance(conn, 0)
    assert dom.blockJobInfo("vda") == {}
    # active commit needs the ACTIVE flag, then waits for a pivot
    top = "/var/lib/sim/vm1/vda.qcow2"
    with pytest.raises(jobcore.InvalidArgument):
        dom.blockCommit("vda", None, top)
    dom.blockCommit("vda", None, top, 0, jobcore.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    advance(conn, 10)
    info = dom.blockJobInfo("vda")
    assert info["type"] == jobcore.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    assert info["cur"] == info["end"]
    assert (
        dom.blockJobAbort(
            "vda",
            jobcore.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT | jobcore.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC,
        )
        == 0
    )
    advance(conn, 0)
    assert dom.blockJobInfo("vda") == {}
    assert conn.run_sync(lambda: None) is None
    # a commit of an intermediate layer by file name ends by itself
    vm2 = conn.lookupByName("vm2")
    vm2.blockCommit("vda", "/var/lib/sim/vm2/vda.2.qcow2", "/var/lib/sim/vm2/vda.1.qcow2")
    assert vm2.blockJobInfo("vda")["type"] == jobcore.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT


def test_facade_on_trio_backend() -> None:
    with jobcore.open("sim:///default?rate=0", backend="trio") as c:
        job = jobcore.JobBegin(c.lookupByName("vm1"), f"<job type='backup'>{BACKUP}</job>")
        assert jobcore.JobWait(job, timeout=10)["state"] == "completed"


def test_unclosed_connection_does_not_keep_the_process_alive() -> None:
    code = textwrap.dedent("""
        import jobcore
        conn = jobcore.open("sim:///default")
        dom = conn.lookupByName("vm1")
        jobcore.JobBegin(dom, "<job type='backup'/>")
        print("began")
    """)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "began" in out.stdout
    assert time.monotonic() - started < 30


def test_blocking_subscription_delivers_events_without_polling(conn: BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    with conn.subscribe(domain="vm1") as events:
        job = jobcore.JobBegin(dom, f"<job type='backup'>{BACKUP}</job>")
        first = events.get(timeout=5)
        assert first.job == job.uuid and first.state is jobcore.JobState.RUNNING
        with pytest.raises(TimeoutError):  # manual clock: nothing ends until we advance
            while True:
                assert events.get(timeout=0.05).kind is not jobcore.EventKind.FINAL
        advance(conn, 3)
        kinds = []
        for ev in events:
            kinds.append(ev.kind)
            if ev.kind is jobcore.EventKind.FINAL:
                assert ev.stats is not None and ev.stats["success"] is True
                break
    assert jobcore.EventKind.STATE in kinds


def test_an_unknown_backend_is_refused_at_once() -> None:
    """It used to hang forever (the loop thread died before it could say so)."""
    code = textwrap.dedent("""
        import jobcore
        try:
            jobcore.open("sim:///default", backend="nonsense")
        except jobcore.InvalidArgument as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "unknown event loop backend 'nonsense': use one of 'asyncio', 'trio'"
    )


def test_an_event_loop_that_cannot_start_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_run(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'trio'")

    monkeypatch.setattr("jobcore.facade.anyio.run", broken_run)
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            jobcore.open("sim:///default", backend="trio")
        except BaseException as exc:
            errors.append(exc)

    opener = threading.Thread(target=attempt, daemon=True)
    opener.start()
    opener.join(10)
    assert not opener.is_alive(), "open() hangs"
    assert len(errors) == 1 and isinstance(errors[0], jobcore.JobError)
    assert "cannot start the trio event loop for 'sim:///default'" in str(errors[0])
    assert isinstance(errors[0].__cause__, ModuleNotFoundError)
