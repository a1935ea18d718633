"""Backup targets and scratch files follow libvirt's rule (issue 8, items 1 and 2).

An existing file is refused at JobBegin (no job, no claims) unless the caller passes
VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL; a reused file must have the right format and size;
a refused file is never opened for writing; a failed or aborted push backup removes the
files it created and never one it reused. On sim here; on qemu in the qemu tests below.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from qemu_helpers import compare, corrupt_first_cluster, create, domain_xml, run, write

import jobcore
from drivers.qemu import QemuConnection
from drivers.sim import SimConnection
from jobcore import (
    JOB_BEGIN_QUEUE,
    VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL,
    InvalidArgument,
    JobState,
)
from jobcore.api import Domain, Job
from jobcore.local import as_local

REUSE = VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
MiB = 1 << 20
GiB = 1 << 30
VDB_SIZE = 512 * MiB  # sim's vdb


def domainbackup(disk: str, target: str | Path, fmt: str | None = None) -> str:
    driver = f"<driver type='{fmt}'/>" if fmt else ""
    return (
        f"<domainbackup><disks><disk name='{disk}' type='file'>"
        f"<target file='{target}'/>{driver}</disk></disks></domainbackup>"
    )


def push(disk: str, target: str | Path, fmt: str | None = None) -> str:
    return f"<job type='backup'>{domainbackup(disk, target, fmt)}</job>"


def pull(disk: str, scratch: str | Path, sock: str | Path = "/run/sim.sock") -> str:
    return (
        "<job type='backup'><domainbackup mode='pull'>"
        f"<server transport='unix' socket='{sock}'/><disks><disk name='{disk}' "
        f"type='file'><scratch file='{scratch}'/></disk></disks></domainbackup></job>"
    )


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = os.lstat(path)
    data = path.read_bytes() if path.is_file() else os.readlink(path).encode()
    return data, st.st_mtime_ns, st.st_size


def sim(conn: jobcore.Connection) -> SimConnection:
    driver = as_local(conn).driver
    assert isinstance(driver, SimConnection)
    return driver


async def no_job_left(dom: Domain, before: int) -> None:
    """A refused JobBegin leaves no job and no claim: a chain job on the disk a backup
    would have read is admitted at once (it conflicts with a backup's read claim)."""
    assert len(await dom.list_jobs()) == before
    probe = await dom.job_begin("<job type='blockpull'><disk name='vdb'/></job>")
    assert (await probe.wait(5)).state is JobState.COMPLETED


async def wait_state(job: Job, state: JobState) -> None:
    with job.events() as events, anyio.fail_after(5):
        if (await job.info()).state is state:
            return
        async for ev in events:
            if ev.state is state:
                return


def lexists(path: Path) -> bool:
    return os.path.lexists(path)


# ---- sim ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sim_refuses_an_existing_target_unless_reuse_external(tmp_path: Path) -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        dom = await conn.lookup_domain("vm1")
        # an earlier backup's output exists on the simulated host
        first = await dom.job_begin(push("vdb", "/b/vm1-vdb.qcow2"))
        assert (await first.wait(5)).state is JobState.COMPLETED
        with pytest.raises(InvalidArgument) as err:
            await dom.job_begin(push("vdb", "/b/vm1-vdb.qcow2"))
        text = str(err.value)
        assert "store '/b/vm1-vdb.qcow2' for backup of 'vdb' exists" in text
        assert "VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL" in text
        await no_job_left(dom, 1)
        # the legacy call refuses it the same way, and takes the flag the same way
        with pytest.raises(InvalidArgument, match="exists"):
            await dom.backup_begin(domainbackup("vdb", "/b/vm1-vdb.qcow2"))
        again = await dom.job_begin(push("vdb", "/b/vm1-vdb.qcow2"), REUSE)
        assert (await again.wait(5)).state is JobState.COMPLETED
        assert await dom.backup_begin(domainbackup("vdb", "/b/vm1-vdb.qcow2"), None, REUSE) == 0

        # a domain's disk image is never a target, not even with REUSE_EXTERNAL
        image = "/var/lib/sim/vm2/vdb.qcow2"
        for flags in (0, REUSE):
            with pytest.raises(InvalidArgument, match="is an image of disk 'vdb' of domain 'vm2'"):
                await dom.job_begin(push("vdb", image), flags)
        # a pull backup's scratch file, too
        with pytest.raises(InvalidArgument, match=r"store '/b/vm1-vdb\.qcow2' .* exists"):
            await dom.job_begin(pull("vdb", "/b/vm1-vdb.qcow2"))


@pytest.mark.anyio
async def test_sim_treats_a_real_file_as_existing_and_never_writes_it(tmp_path: Path) -> None:
    real = tmp_path / "existing.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(real), str(VDB_SIZE))
    raw = tmp_path / "small.raw"
    raw.write_bytes(b"\x5a" * 4096)
    dangling = tmp_path / "dangling.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    before = {p: snapshot(p) for p in (real, raw, dangling)}
    async with jobcore.connect("sim:///default?rate=0") as conn:
        dom = await conn.lookup_domain("vm1")
        for path in (real, raw, dangling):
            with pytest.raises(InvalidArgument, match=f"store '{path}' for backup of 'vdb' exists"):
                await dom.job_begin(push("vdb", path))
        await no_job_left(dom, 0)
        # REUSE_EXTERNAL checks format and size of what is there
        with pytest.raises(InvalidArgument, match="virtual size is 4096 bytes"):
            await dom.job_begin(push("vdb", raw, "raw"), REUSE)
        with pytest.raises(InvalidArgument, match="format is 'raw', not 'qcow2'"):
            await dom.job_begin(push("vdb", raw), REUSE)
        with pytest.raises(InvalidArgument, match="format is 'qcow2', not 'raw'"):
            await dom.job_begin(push("vdb", real, "raw"), REUSE)
        with pytest.raises(InvalidArgument, match="cannot be reused: it cannot be read"):
            await dom.job_begin(push("vdb", dangling), REUSE)
        # and refuses a file that is not there, as libvirt does
        with pytest.raises(InvalidArgument, match=r"missing store '/b/none\.qcow2'"):
            await dom.job_begin(push("vdb", "/b/none.qcow2"), REUSE)
        await no_job_left(dom, 1)
        ok = await dom.job_begin(push("vdb", real), REUSE)
        assert (await ok.wait(5)).state is JobState.COMPLETED
    assert {p: snapshot(p) for p in (real, raw, dangling)} == before  # sim never writes


@pytest.mark.anyio
async def test_sim_failed_or_aborted_push_removes_only_what_it_created() -> None:
    async with jobcore.connect(f"sim:///default?rate={GiB}") as conn:
        host = sim(conn).host
        dom = await conn.lookup_domain("vm1")
        # created, then aborted: gone (and it existed while the job ran)
        job = await dom.job_begin(push("vdb", "/b/aborted.qcow2"))
        assert "/b/aborted.qcow2" in host.files
        await job.abort()
        assert (await job.wait(5)).state is JobState.CANCELLED
        assert "/b/aborted.qcow2" not in host.files
        # created, then failed: gone
        sim(conn).inject_failure("backup", at=0.1)
        job = await dom.job_begin(push("vdb", "/b/failed.qcow2"))
        assert (await job.wait(5)).state is JobState.FAILED
        assert "/b/failed.qcow2" not in host.files
        # while a job writes a file, another backup cannot name it
        job = await dom.job_begin(push("vdb", "/b/busy.qcow2"))
        other = await conn.lookup_domain("vm2")
        with pytest.raises(InvalidArgument, match="exists"):
            await other.job_begin(push("vdb", "/b/busy.qcow2"))
        await job.abort()
        await job.wait(5)
        # completed: stays; reused, then aborted or failed: stays
        job = await dom.job_begin(push("vdb", "/b/kept.qcow2"))
        assert (await job.wait(30)).state is JobState.COMPLETED
        assert "/b/kept.qcow2" in host.files
        job = await dom.job_begin(push("vdb", "/b/kept.qcow2"), REUSE)
        await job.abort()
        assert (await job.wait(5)).state is JobState.CANCELLED
        sim(conn).inject_failure("backup", at=0.1)
        job = await dom.job_begin(push("vdb", "/b/kept.qcow2"), REUSE)
        assert (await job.wait(5)).state is JobState.FAILED
        assert "/b/kept.qcow2" in host.files
        # a pull backup's created scratch file always goes
        job = await dom.job_begin(pull("vdb", "/b/scratch.qcow2"))
        assert "/b/scratch.qcow2" in host.files
        await wait_state(job, JobState.READY)
        await job.abort()
        assert (await job.wait(5)).state is JobState.COMPLETED
        assert "/b/scratch.qcow2" not in host.files


@pytest.mark.anyio
async def test_reuse_external_flag_means_reuse_not_queue(tmp_path: Path) -> None:
    """JobBegin's libvirt flag REUSE_EXTERNAL (1) and jobcore's JOB_BEGIN_QUEUE are
    different bits; the flag reaches the driver as the prepared spec's field."""
    vda, vdb = tmp_path / "vda.qcow2", tmp_path / "vdb.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(vda), str(GiB))
    run("qemu-img", "create", "-q", "-f", "qcow2", str(vdb), str(VDB_SIZE))
    async with jobcore.connect("sim:///default?clock=manual") as conn:
        dom = await conn.lookup_domain("vm1")
        await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        # REUSE_EXTERNAL is no request to queue: a conflicting backup still fails fast
        with pytest.raises(jobcore.JobConflict):
            await dom.job_begin(push("vda", vda), REUSE)
        queued = await dom.job_begin(push("vda", tmp_path / "new.qcow2"), JOB_BEGIN_QUEUE)
        assert queued.state is JobState.QUEUED
        assert as_local(conn).engine.lookup(queued.uuid).spec.reuse_external is False
        reused = await dom.job_begin(push("vdb", vdb), REUSE)
        assert reused.state is JobState.RUNNING
        rec = as_local(conn).engine.lookup(reused.uuid)
        assert rec.spec.reuse_external is True and rec.driver_job.spec.reuse_external is True
        assert "<reuse" not in await reused.xml_desc()  # a begin flag, not in the XML
    assert JOB_BEGIN_QUEUE & REUSE == 0


# ---- through jobd -------------------------------------------------------------------


def test_jobd_refuses_an_existing_target_and_passes_reuse_external(tmp_path: Path) -> None:
    from jobd_helpers import Jobd

    image = tmp_path / "vdb.qcow2"  # a real file: jobd's sim host sees it as existing
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(VDB_SIZE))
    kept = snapshot(image)
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        conn = jobcore.open(daemon.uri("clock=manual"))
        try:
            dom = conn.lookupByName("vm1")
            with pytest.raises(InvalidArgument, match=f"store '{image}' for backup of 'vdb'"):
                dom.backupBegin(domainbackup("vdb", image))
            with pytest.raises(InvalidArgument, match="exists"):
                jobcore.JobBegin(dom, push("vdb", image))
            assert dom.listJobs() == []
            with pytest.raises(InvalidArgument, match="'blockpull' job"):
                jobcore.JobBegin(dom, "<job type='blockpull'><disk name='vda'/></job>", REUSE)
            reused = jobcore.JobBegin(dom, push("vdb", image), REUSE)
            assert jobcore.JobGetInfo(reused)["state"] == "running"
            jobcore.JobAbort(reused)
            assert jobcore.JobWait(reused, timeout=10)["state"] == "cancelled"
        finally:
            conn.close()
    finally:
        daemon.stop()
    assert snapshot(image) == kept


# ---- qemu ---------------------------------------------------------------------------


def qemu_img_info(path: Path) -> str:
    return run("qemu-img", "info", "-U", str(path))


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the qemu driver runs on asyncio
async def test_qemu_existing_target_refused_unless_reuse(
    tmp_path: Path, anyio_backend: str
) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x3c 0 4M")
    other = create(tmp_path / "other.qcow2")  # 32M, like src: a stopped VM's disk
    write(other, "write -P 0x77 0 1M")
    small = create(tmp_path / "small.qcow2", size="16M")
    raw = tmp_path / "image.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(raw), "32M")
    dangling = tmp_path / "dangling.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    kept = {p: snapshot(p) for p in (other, small, raw, dangling)}
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src}))
        for path in (other, raw, dangling):
            with pytest.raises(InvalidArgument) as err:
                await dom.job_begin(push("vda", path))
            assert f"store '{path}' for backup of 'vda' exists" in str(err.value)
            assert "VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL" in str(err.value)
        with pytest.raises(InvalidArgument, match="exists"):
            await dom.backup_begin(domainbackup("vda", other))
        with pytest.raises(InvalidArgument, match="exists"):  # a pull's scratch file
            await dom.job_begin(pull("vda", other, tmp_path / "nbd.sock"))
        assert await dom.list_jobs() == []
        # with the flag: what is there must fit
        with pytest.raises(InvalidArgument, match="virtual size is 16777216 bytes"):
            await dom.job_begin(push("vda", small), REUSE)
        with pytest.raises(InvalidArgument, match="format is 'raw', not 'qcow2'"):
            await dom.job_begin(push("vda", raw), REUSE)
        with pytest.raises(InvalidArgument, match="cannot be reused: it cannot be read"):
            await dom.job_begin(push("vda", dangling), REUSE)
        with pytest.raises(InvalidArgument, match="missing store"):
            await dom.job_begin(push("vda", tmp_path / "absent.qcow2"), REUSE)
        with pytest.raises(InvalidArgument, match="is an image of disk 'vda' of domain 'vm1'"):
            await dom.job_begin(push("vda", src), REUSE)
        assert await dom.list_jobs() == []
        assert {p: snapshot(p) for p in kept} == kept  # never opened for writing
        assert not (tmp_path / "absent.qcow2").exists()
        # reused for real: a raw target of the right size, and the qcow2 'other'
        job = await dom.job_begin(push("vda", raw, "raw"), REUSE)
        assert (await job.wait(30)).state is JobState.COMPLETED
        compare(src, raw, "-F", "raw")
        job = await dom.job_begin(push("vda", other), REUSE)
        assert (await job.wait(30)).state is JobState.COMPLETED
        compare(src, other)


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the qemu driver runs on asyncio
async def test_qemu_failed_or_aborted_push_removes_created_target(
    tmp_path: Path, anyio_backend: str
) -> None:
    src = create(tmp_path / "src.qcow2", size="256M")
    write(src, "write -P 0x3c 0 200M")
    bad = create(tmp_path / "bad.qcow2")
    write(bad, "write -P 0x11 0 1M")
    corrupt_first_cluster(bad)
    reused = tmp_path / "reused.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(reused), "256M")
    async with jobcore.connect(
        f"qemu:///session?dir={tmp_path / 'run'}&backup_bandwidth={4 * MiB}"
    ) as conn:
        assert isinstance(as_local(conn).driver, QemuConnection)
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src, "vdb": bad}))
        # aborted: the target it created is gone
        target = tmp_path / "aborted.qcow2"
        job = await dom.job_begin(push("vda", target))
        assert target.exists() and "file format: qcow2" in qemu_img_info(target)
        await anyio.sleep(0.3)
        await job.abort()
        assert (await job.wait(30)).state is JobState.CANCELLED
        assert not lexists(target)
        # failed (QEMU hits EIO reading the source): the target it created is gone
        target = tmp_path / "failed.qcow2"
        job = await dom.job_begin(push("vdb", target))
        assert (await job.wait(30)).state is JobState.FAILED
        assert not lexists(target)
        # reused and aborted: the caller's file stays, a valid image
        job = await dom.job_begin(push("vda", reused), REUSE)
        await anyio.sleep(0.3)
        await job.abort()
        assert (await job.wait(30)).state is JobState.CANCELLED
        assert reused.exists()
        run("qemu-img", "check", "-q", str(reused))
        # a pull backup's reused scratch file stays too (a created one goes: test_qemu_api)
        scratch = tmp_path / "scratch.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(scratch), "256M")
        job = await dom.job_begin(pull("vda", scratch, tmp_path / "nbd.sock"), REUSE)
        await wait_state(job, JobState.READY)
        await job.abort()
        assert (await job.wait(30)).state is JobState.COMPLETED
        assert scratch.exists()
        run("qemu-img", "check", "-q", str(scratch))
