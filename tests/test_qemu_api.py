"""jobcore's public API (async and blocking, legacy calls) on ``qemu:///session``.

The driver-level tests prove the data; these prove the wiring: job XML in, libvirt-named
stats out, legacy calls resolving to real QEMU jobs.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from qemu_helpers import alive, compare, create, domain_xml, qemu_children, run, write

import jobcore
from drivers.qemu import QemuConnection
from jobcore import JobState
from jobcore.events import EventKind

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_async_api_backup_pull_migration_stats(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x3c 0 6M")
    before = qemu_children()
    run_dir = tmp_path / "run"
    async with jobcore.connect(f"qemu:///session?dir={run_dir}") as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src}, memory_mib=16))
        full = tmp_path / "full.qcow2"
        job = await dom.job_begin(
            "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
            f"<target file='{full}'/></disk></disks></domainbackup>"
            "<domaincheckpoint><name>c1</name></domaincheckpoint></job>"
        )
        info = await job.wait()
        assert info.state is JobState.COMPLETED
        stats = await job.stats()
        assert stats["disk_total"] == stats["disk_processed"] == 32 * MiB
        assert stats["disk_remaining"] == 0 and stats["success"] is True
        compare(src, full)

        sock = tmp_path / "nbd.sock"
        scratch = tmp_path / "scratch.qcow2"
        with conn.subscribe(domain="vm1", kinds=[EventKind.STATE]) as events:
            job = await dom.job_begin(
                "<job type='backup'><domainbackup mode='pull'>"
                f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' "
                f"type='file'><scratch file='{scratch}'/></disk></disks></domainbackup></job>"
            )
            with anyio.fail_after(10):
                async for ev in events:
                    if ev.job == job.uuid and ev.state is JobState.READY:
                        break
        await anyio.sleep(0.3)  # one progress poll
        stats = await job.stats()
        assert stats["disk_temp_total"] == 32 * MiB and "disk_temp_used" in stats
        compare(f"nbd+unix:///vda?socket={sock}", src, "-f", "raw")
        await job.abort()  # a pull backup's consumer is done: it ends completed
        assert (await job.wait()).state is JobState.COMPLETED
        assert not scratch.exists()

        job = await dom.job_begin(
            f"<job type='migration'><destination uri='qemu:///session?dir={run_dir}'/>"
            "<live/><bandwidth unit='MiB/s'>1024</bandwidth>"
            "<downtime-limit unit='ms'>300</downtime-limit></job>"
        )
        assert (await job.wait()).state is JobState.COMPLETED
        stats = await job.stats()
        for key in (
            "memory_total",
            "memory_processed",
            "memory_remaining",
            "downtime",
            "data_total",
            "data_processed",
            "data_remaining",
        ):
            assert key in stats, key
        assert stats["memory_total"] == 16 * MiB
        assert (await dom.info()).running
    assert not (qemu_children() - before)


def test_blocking_facade_and_legacy_calls(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    write(base, "write -P 0x11 0 4M")
    top = create(tmp_path / "top.qcow2", backing=base)
    write(top, "write -P 0x22 2M 4M")
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", str(top), str(ref))
    before = qemu_children()
    conn = jobcore.open(f"qemu:///session?dir={tmp_path / 'run'}")
    try:
        dom = conn.createXML(domain_xml("vm1", {"vda": top}))
        pids = qemu_children() - before
        assert dom.blockPull("vda") == 0
        job = jobcore.JobLookupByUUID(dom, jobcore.JobGetUUID(dom.listJobs()[0]))
        final = jobcore.JobWait(job, timeout=30)
        assert final["state"] == "completed"
        assert conn.run(dom.adom.info).disks[0].chain == (str(top),)
        driver = conn.driver
        assert isinstance(driver, QemuConnection)
        conn.run(driver.flush, "vm1")
        compare(top, ref, "-F", "raw")
        dom.destroy()
        assert not any(alive(p) for p in pids)
    finally:
        conn.close()
    assert not (qemu_children() - before)
