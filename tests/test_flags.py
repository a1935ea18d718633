"""Unknown flag bits are refused everywhere, as libvirt's virCheckFlags (issue 8, item 10).

Every public call taking ``flags`` — the async API, the blocking facade, and both through
jobd — refuses a bit it does not accept with ``InvalidArgument`` naming the bits, and a
negative or wider-than-64-bit value too; nothing is begun. ``blockJobInfo`` on a disk the
domain does not have raises instead of returning {}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import Jobd

import jobcore
from jobcore import (
    JOB_BEGIN_QUEUE,
    VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL,
    InvalidArgument,
)
from jobcore.facade import BlockingDomain, BlockingJob
from jobcore.methods import Method
from jobcore.remote import RemoteConnection

BACKUP = (
    "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/flags-{n}.qcow2'/></disk></disks></domainbackup></job>"
)
DOMAINBACKUP = (
    "<domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/flags-legacy.qcow2'/></disk></disks></domainbackup>"
)
PULL = "<job type='blockpull'><disk name='vda'/></job>"
UNKNOWN = 1 << 40
#: bad values for any call: an unknown bit, all 64 bits, negative, wider than 64 bits
BAD = (UNKNOWN, 2**64 - 1, -1, 2**64)


def refused(call: Callable[..., Any], *args: Any, flags: int, name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        call(*args, flags)
    text = str(err.value)
    assert name in text, text
    if 0 <= flags < 2**64:
        assert "unsupported flags (0x" in text, text


def facade_calls(dom: BlockingDomain, job: BlockingJob) -> list[tuple[str, Callable[..., Any]]]:
    """(name in the message, a call taking flags last) for every facade call with flags."""
    conn = dom.connect()
    return [
        ("JobBegin", lambda f: jobcore.JobBegin(dom, BACKUP.format(n="x"), f)),
        ("JobGetXMLDesc", lambda f: jobcore.JobGetXMLDesc(job, f)),
        ("JobGetStats", lambda f: jobcore.JobGetStats(job, f)),
        ("JobAbort", lambda f: jobcore.JobAbort(job, f)),
        ("JobPause", lambda f: jobcore.JobPause(job, f)),
        ("JobResume", lambda f: jobcore.JobResume(job, f)),
        ("JobComplete", lambda f: jobcore.JobComplete(job, f)),
        ("JobSetSpeed", lambda f: jobcore.JobSetSpeed(job, 1 << 20, f)),
        ("jobStats", lambda f: dom.jobStats(f)),
        ("backupBegin", lambda f: dom.backupBegin(DOMAINBACKUP, None, f)),
        ("backupGetXMLDesc", lambda f: dom.backupGetXMLDesc(f)),
        ("blockJobInfo", lambda f: dom.blockJobInfo("vda", f)),
        ("blockJobAbort", lambda f: dom.blockJobAbort("vda", f)),
        ("blockPull", lambda f: dom.blockPull("vda", 0, f)),
        ("blockCommit", lambda f: dom.blockCommit("vda", None, None, 0, f)),
        ("listAllDomains", lambda f: conn.listAllDomains(f)),
        ("createXML", lambda f: conn.createXML("<domain/>", f)),
    ]


def check_facade(conn: jobcore.BlockingConnection) -> None:
    dom = conn.lookupByName("vm1")
    job = jobcore.JobBegin(dom, BACKUP.format(n="held"))
    before = len(dom.listJobs())
    for name, call in facade_calls(dom, job):
        for flags in BAD:
            refused(call, flags=flags, name=name)
    assert len(dom.listJobs()) == before  # nothing begun
    assert jobcore.JobGetInfo(job)["state"] == "running"  # nothing aborted, paused, …
    # JobBegin: REUSE_EXTERNAL is a backup's flag; a block pull refuses it
    with pytest.raises(InvalidArgument, match=r"unsupported flags \(0x1\) .*'blockpull' job"):
        jobcore.JobBegin(dom, PULL, VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    # the accepted bits still work
    pull_vdb = "<job type='blockpull'><disk name='vdb'/></job>"
    queued = jobcore.JobBegin(dom, pull_vdb, JOB_BEGIN_QUEUE)  # behind the backup's read
    assert jobcore.JobGetInfo(queued)["state"] == "queued"
    assert jobcore.JobAbort(queued, 0) == 0
    jobcore.JobAbort(job)


def check_unknown_disk(conn: jobcore.BlockingConnection) -> None:
    """A disk the domain does not have is an error; a known disk without a job is {}."""
    dom = conn.lookupByName("vm1")
    with pytest.raises(InvalidArgument, match="disk 'vdz' not found in domain 'vm1'"):
        dom.blockJobInfo("vdz")
    assert dom.blockJobInfo("vdb") == {}
    with pytest.raises(InvalidArgument, match="disk 'vdz' not found in domain 'vm1'"):
        dom.blockJobAbort("vdz")


def test_facade_refuses_unknown_flags() -> None:
    conn = jobcore.open("sim:///default?clock=manual")
    try:
        check_facade(conn)
    finally:
        conn.close()


def test_block_job_info_of_an_unknown_disk_raises() -> None:
    conn = jobcore.open("sim:///default?clock=manual")
    try:
        check_unknown_disk(conn)
    finally:
        conn.close()


@pytest.mark.anyio
async def test_async_api_refuses_unknown_flags() -> None:
    async with jobcore.connect("sim:///default?clock=manual") as conn:
        dom = await conn.lookup_domain("vm1")
        for flags in BAD:
            for name, call in (
                ("JobBegin", lambda f: dom.job_begin(BACKUP.format(n="a"), f)),
                ("JobBegin", lambda f: dom.job_begin_spec(jobcore.BackupJobSpec(), f)),
                ("jobStats", dom.job_stats),
                ("backupBegin", lambda f: dom.backup_begin(DOMAINBACKUP, None, f)),
                ("backupGetXMLDesc", dom.backup_get_xml_desc),
                ("blockJobInfo", lambda f: dom.block_job_info("vda", f)),
                ("blockJobAbort", lambda f: dom.block_job_abort("vda", f)),
                ("blockPull", lambda f: dom.block_pull("vda", 0, f)),
                ("blockCommit", lambda f: dom.block_commit("vda", None, None, 0, f)),
            ):
                with pytest.raises(InvalidArgument, match=name):
                    await call(flags)
        assert await dom.list_jobs() == []
        with pytest.raises(InvalidArgument, match="'blockpull' job"):
            await dom.job_begin(PULL, VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        assert await dom.list_jobs() == []


@pytest.mark.anyio
async def test_async_block_job_info_of_an_unknown_disk_raises() -> None:
    async with jobcore.connect("sim:///default") as conn:
        dom = await conn.lookup_domain("vm1")
        with pytest.raises(InvalidArgument, match="disk 'vdz' not found in domain 'vm1'"):
            await dom.block_job_info("vdz")
        assert await dom.block_job_info("vdb") == {}


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("flags") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_facade_over_jobd_refuses_unknown_flags(jobd: Jobd) -> None:
    conn = jobcore.open(jobd.uri("clock=manual"))
    try:
        check_facade(conn)
    finally:
        conn.close()


def test_block_job_info_of_an_unknown_disk_raises_over_jobd(jobd: Jobd) -> None:
    conn = jobcore.open(jobd.uri("clock=manual"))
    try:
        check_unknown_disk(conn)
    finally:
        conn.close()


@pytest.mark.anyio
async def test_jobd_itself_refuses_unknown_flags(jobd: Jobd, tmp_path: Path) -> None:
    """The daemon checks too: raw requests that skip the client's check are refused."""
    async with jobcore.connect(jobd.uri("clock=manual")) as conn:
        assert isinstance(conn, RemoteConnection)
        session = conn._session
        dom = await conn.lookup_domain("vm2")
        before = len(await dom.list_jobs())
        for flags in (UNKNOWN, 2**64 - 1, -1):
            for method, args in (
                (Method.JOB_BEGIN, ("vm2", BACKUP.format(n="raw"), flags)),
                (Method.BACKUP_BEGIN, ("vm2", DOMAINBACKUP, None, flags)),
                (Method.BLOCK_PULL, ("vm2", "vda", 0, flags)),
                (Method.BLOCK_JOB_INFO, ("vm2", "vda", flags)),
                (Method.LEGACY_JOB_STATS, ("vm2", flags)),
            ):
                with pytest.raises(InvalidArgument, match="flags"):
                    await session.call(method, *args)
        with pytest.raises(InvalidArgument, match="'blockpull' job"):
            await session.call(
                Method.JOB_BEGIN, "vm2", PULL, VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
            )
        assert len(await dom.list_jobs()) == before
