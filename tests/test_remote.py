"""The async API and the blocking facade over ``sim+unix://`` (a real jobd process)."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator

import anyio
import pytest
from jobd_helpers import BACKUP_VDA, BACKUP_VDB, PULL_VDA, Jobd

import jobcore
from jobcore import LEGACY_DOMAIN_JOB_UUID, JobState, JobType
from jobcore.api import Connection, Domain, Job, JobGroup
from jobcore.events import EventKind, JobEvent
from jobcore.info import JobInfo
from jobcore.local import LocalConnection, LocalDomain, LocalJob, LocalJobGroup
from jobcore.protocol import AccessDenied, DaemonUnreachable
from jobcore.remote import RemoteConnection, RemoteDomain, RemoteJob, RemoteJobGroup

MiB = 1 << 20


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("remote") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("interface", "impls"),
    [
        (Connection, (LocalConnection, RemoteConnection)),
        (Domain, (LocalDomain, RemoteDomain)),
        (Job, (LocalJob, RemoteJob)),
        (JobGroup, (LocalJobGroup, RemoteJobGroup)),
    ],
)
def test_both_implementations_define_every_method(interface: type, impls: tuple[type, ...]) -> None:
    """Each implementation defines every method of the interface itself, with its
    parameters (mypy checks the types: jobcore.api's assignments); neither inherits."""
    for impl in impls:
        assert impl.__mro__ == (impl, object), f"{impl.__name__} subclasses something"
        for name, member in vars(interface).items():
            if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            if isinstance(member, property):
                continue  # an attribute or a property: mypy checks it is there
            assert name in vars(impl), f"{impl.__name__} does not define {name}"
            want = list(inspect.signature(member).parameters)
            assert list(inspect.signature(vars(impl)[name]).parameters) == want, name


@pytest.mark.anyio
async def test_async_api_over_jobd(jobd: Jobd, anyio_backend: str) -> None:
    uri = jobd.uri(f"rate={8 * MiB}")
    async with jobcore.connect(uri) as conn:
        assert isinstance(conn, RemoteConnection) and isinstance(conn, jobcore.Connection)
        assert not conn.readonly and conn.driver_uri == f"sim:///default?rate={8 * MiB}"
        dom = await conn.lookup_domain("vm1")
        assert [d.name for d in await conn.list_domains()] == ["vm1", "vm2"]
        assert len((await dom.info()).disk("vda").chain) == 3  # type: ignore[union-attr]
        with conn.subscribe(domain="vm1", kinds=[EventKind.STATE, EventKind.FINAL]) as events:
            job = await dom.job_begin(BACKUP_VDA.format(tag=anyio_backend))
            assert job.type == JobType.BACKUP and isinstance(job.uuid, uuid.UUID)
            assert job.domain == "vm1" and job.state is JobState.RUNNING
            info = await job.info()
            assert isinstance(info, JobInfo) and info.state is JobState.RUNNING
            assert info["uuid"] == str(job.uuid) and info.total == 1 << 30
            stats = await job.stats()
            assert stats["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_BACKUP
            with pytest.raises(jobcore.JobConflict) as conflict:
                await dom.job_begin(PULL_VDA)
            assert conflict.value.holder == job.uuid and "vda" in conflict.value.resource
            with pytest.raises(jobcore.OperationInvalid) as refused:
                await job.complete()
            assert refused.value.job == job.uuid and refused.value.verb == "complete"
            with pytest.raises(TimeoutError):
                await job.wait(timeout=0.05)
            assert await conn.job_lookup_by_uuid(dom, job.uuid) == job
            assert (await conn.job_lookup_by_uuid(dom, LEGACY_DOMAIN_JOB_UUID)).uuid == job.uuid
            assert await conn.lookup_job(str(job.uuid)) == job
            legacy = await dom.job_info()
            assert len(legacy) == 12 and legacy[0] == jobcore.VIR_DOMAIN_JOB_UNBOUNDED
            await job.abort()
            final = await job.wait(timeout=10)
            assert final.state is JobState.CANCELLED
            assert str(job.state) == "cancelled"  # the handle saw it (no round trip)
            seen: list[JobEvent] = []
            with anyio.fail_after(5):
                async for ev in events:
                    if ev.job == job.uuid:
                        seen.append(ev)
                    if ev.kind is EventKind.FINAL and ev.job == job.uuid:
                        break
        assert [(e.kind, e.state) for e in seen] == [
            (EventKind.STATE, JobState.RUNNING),
            (EventKind.STATE, JobState.ABORTING),
            (EventKind.STATE, JobState.CANCELLED),
            (EventKind.FINAL, JobState.CANCELLED),
        ]
        assert seen[-1].stats is not None and seen[-1].stats["success"] is False
        assert f"<uuid>{job.uuid}</uuid>" in await job.xml_desc()
        assert job in await dom.list_jobs()
        with pytest.raises(jobcore.NoSuchDomain):
            await conn.lookup_domain("nope")
        with pytest.raises(jobcore.XMLError):
            await dom.job_begin("<job type='backup'>")
        with pytest.raises(jobcore.NoSuchJob):
            await conn.lookup_job(uuid.uuid4())


@pytest.mark.anyio
async def test_read_only_connection(jobd: Jobd, anyio_backend: str) -> None:
    async with (
        jobcore.connect(jobd.uri(f"rate={8 * MiB}")) as rw,
        jobcore.connect(jobd.uri(f"rate={8 * MiB}", readonly=True)) as ro,
    ):
        assert isinstance(ro, RemoteConnection) and ro.readonly
        job = await (await rw.lookup_domain("vm2")).job_begin(BACKUP_VDB.format(tag="ro"))
        dom = await ro.lookup_domain("vm2")
        with pytest.raises(AccessDenied, match="read-only"):
            await dom.job_begin(BACKUP_VDB.format(tag="ro2"))
        seen = await ro.lookup_job(job.uuid)
        assert (await seen.stats())["uuid"] == str(job.uuid)
        with pytest.raises(AccessDenied):
            await seen.abort()
        with pytest.raises(AccessDenied):
            await dom.abort_job()
        await job.abort()
        assert (await seen.wait(timeout=10)).state is JobState.CANCELLED


@pytest.mark.anyio
async def test_slow_subscriber_loses_events_not_the_final_one(
    jobd: Jobd, anyio_backend: str
) -> None:
    async with jobcore.connect(jobd.uri(f"rate={1024 * MiB}", host="r1g")) as conn:
        dom = await conn.lookup_domain("vm1")
        with conn.subscribe(domain="vm1", maxlen=2) as events:
            job = await dom.job_begin(BACKUP_VDA.format(tag=f"slow-{anyio_backend}"))
            await job.wait(timeout=10)
            await anyio.sleep(0.3)
            got = []
            while (ev := events.get_nowait()) is not None:
                got.append(ev)
        assert got[-1].kind is EventKind.FINAL and got[-1].job == job.uuid
        assert events.lost > 0 and sum(e.lost_before for e in got) > 0


@pytest.mark.anyio
async def test_unreachable_daemon(
    tmp_path_factory: pytest.TempPathFactory, anyio_backend: str
) -> None:
    path = tmp_path_factory.mktemp("none") / "jobd.sock"
    with pytest.raises(DaemonUnreachable, match="cannot reach jobd"):
        async with jobcore.connect(f"sim+unix:///default?socket={path}"):
            pass


def test_blocking_facade_over_jobd(jobd: Jobd) -> None:
    conn = jobcore.open(jobd.uri(f"rate={8 * MiB}&clock=real"))
    try:
        dom = conn.lookupByName("vm2")
        assert dom.jobInfo()[0] == jobcore.VIR_DOMAIN_JOB_NONE
        assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
        backup = (
            "<domainbackup><disks><disk name='vda' type='file'>"
            "<target file='/b/facade-vda.qcow2'/></disk></disks></domainbackup>"
        )
        assert dom.backupBegin(backup, None) == 0
        job = jobcore.JobLookupByUUID(dom, LEGACY_DOMAIN_JOB_UUID)
        assert jobcore.JobGetType(job) == JobType.BACKUP
        assert len(jobcore.JobGetUUID(job)) == 16
        assert jobcore.JobLookupByUUID(dom, jobcore.JobGetUUID(job)) == job
        assert jobcore.JobGetInfo(job)["state"] == "running"
        assert dom.jobStats()["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_BACKUP
        assert "<domainbackup" in dom.backupGetXMLDesc()
        with pytest.raises(jobcore.JobConflict):
            dom.blockPull("vda")
        with pytest.raises(jobcore.JobConflict):
            jobcore.JobBegin(dom, PULL_VDA)
        assert dom.blockJobInfo("vda") == {}
        assert dom.abortJob() == 0
        assert jobcore.JobWait(job, timeout=10)["state"] == "cancelled"
        done = dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED)
        assert done["type"] == jobcore.VIR_DOMAIN_JOB_CANCELLED and done["success"] is False
        assert dom.jobStats(jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
            "type": jobcore.VIR_DOMAIN_JOB_NONE
        }
        assert dom.blockPull("vdb") == 0  # no backing file: completes at once
        pulled = jobcore.JobBegin(dom, "<job type='blockpull'><disk name='vda'/></job>")
        assert dom.blockJobInfo("vda")["type"] == jobcore.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
        assert jobcore.JobAbort(pulled) == 0
        assert jobcore.JobWait(pulled, timeout=10)["state"] == "cancelled"
    finally:
        conn.close()
