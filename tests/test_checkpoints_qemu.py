"""Checkpoints on real QEMU (jobcore.checkpoints over the qemu driver's bitmaps): created
on their own or with a backup, sizes from QEMU's bitmap counts, deletion merging into the
parent (an incremental from the parent still holds the deleted child's changes: checked
with qemu-img compare), a second full backup re-creating a deleted checkpoint's name, the
in-use refusal, METADATA_ONLY and REDEFINE(_VALIDATE) against QEMU's bitmaps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import compare, create, differs, domain_xml, run, write
from test_checkpoints import ready

import jobcore
from jobcore import constants as C
from jobcore.api import Domain
from jobcore.errors import InvalidArgument, NoSuchCheckpoint, OperationInvalid
from jobcore.lifecycle import JobState
from jobcore.local import as_local

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cp_xml(name: str, extra: str = "") -> str:
    return f"<domaincheckpoint><name>{name}</name>{extra}</domaincheckpoint>"


def push(target: Path, *, inc: str | None = None, checkpoint: str | None = None) -> str:
    incremental = f"<incremental>{inc}</incremental>" if inc else ""
    return (
        f"<job type='backup'><domainbackup>{incremental}<disks><disk name='vda' type='file'>"
        f"<target file='{target}'/></disk><disk name='vdb' backup='no'/></disks>"
        "</domainbackup>" + (cp_xml(checkpoint) if checkpoint else "") + "</job>"
    )


@asynccontextmanager
async def domain(tmp_path: Path) -> AsyncIterator[tuple[Domain, Path]]:
    src = create(tmp_path / "vda.qcow2")
    write(src, "write -P 0x5a 0 8M")
    vdb = create(tmp_path / "vdb.qcow2", "16M")
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        yield await conn.create_domain(domain_xml("vm1", {"vda": src, "vdb": vdb})), src


async def qemu_bitmaps(dom: Domain) -> dict[str, dict[str, Any]]:
    """vda's bitmaps as QEMU has them: name -> its query-named-block-nodes entry."""
    driver: Any = as_local(dom.conn).driver
    node = driver.domains[dom.name].disks["vda"].active.node
    nodes = await driver.qmp(dom.name, "query-named-block-nodes", {"flat": True})
    return {
        b["name"]: b
        for n in nodes
        if n["node-name"] == node
        for b in n.get("dirty-bitmaps", [])
        if "name" in b  # a running backup's own copy bitmap has none
    }


async def guest_write(dom: Domain, command: str) -> None:
    driver: Any = as_local(dom.conn).driver
    await driver.guest_io(dom.name, "vda", command)
    await driver.flush(dom.name)


async def backup(dom: Domain, job_xml: str) -> None:
    job = await dom.job_begin(job_xml)
    assert (await job.wait(60)).state is JobState.COMPLETED


def size_of(xml: str, disk: str = "vda") -> int:
    tail = xml.split(f"<disk name='{disk}'")[1]
    return int(tail.split("size='")[1].split("'")[0])


async def test_create_describe_sizes_and_delete_merging_into_the_parent(tmp_path: Path) -> None:
    async with domain(tmp_path) as (dom, src):
        f0 = tmp_path / "f0.qcow2"
        await backup(dom, push(f0, checkpoint="c1"))  # c1: the state f0 holds
        await guest_write(dom, "write -P 0x11 1M 1M")
        c2 = await dom.checkpoint_create(cp_xml("c2", "<description>on its own</description>"))
        assert {"c1", "c2"} <= set(await qemu_bitmaps(dom))
        assert (await qemu_bitmaps(dom))["c2"]["persistent"] is True
        parent = await c2.parent()
        assert parent is not None and parent.name == "c1"
        xml = await c2.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        assert size_of(xml) == 0 and size_of(xml, "vdb") == 0
        assert "<description>on its own</description>" in xml
        await guest_write(dom, "write -P 0x22 4M 2M")
        c1 = await dom.checkpoint_lookup("c1")
        assert size_of(await c2.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)) == 2 * MiB
        assert size_of(await c1.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)) == 3 * MiB
        c3 = await dom.checkpoint_create(cp_xml("c3"))  # a child of c2
        await guest_write(dom, "write -P 0x33 12M 1M")
        await c2.delete()  # merged into c1 (QEMU: merge + remove in one transaction)
        have = await qemu_bitmaps(dom)
        assert "c2" not in have and {"c1", "c3"} <= set(have)
        assert have["c1"]["count"] == 4 * MiB
        assert (await c3.parent()) == c1
        # an incremental from c1 holds every change since c1, the deleted c2's included
        inc = tmp_path / "inc.qcow2"
        await backup(dom, push(inc, inc="c1", checkpoint="c4"))
        run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(f0), "-F", "qcow2", str(inc))
        assert differs(src, f0)
        compare(src, inc)
        assert [c.name for c in await dom.list_checkpoints()] == ["c1", "c3", "c4"]
        assert (await (await dom.checkpoint_lookup("c4")).parent()) == c3


async def test_a_second_full_backup_reuses_a_deleted_checkpoints_name(tmp_path: Path) -> None:
    async with domain(tmp_path) as (dom, src):
        for n in range(3):  # virtnbdbackup's "full" each time: delete all, begin with .0
            for cp in await dom.list_checkpoints():
                await cp.delete()
            assert "virtnbdbackup.0" not in await qemu_bitmaps(dom)
            await backup(dom, push(tmp_path / f"full{n}.qcow2", checkpoint="virtnbdbackup.0"))
            await backup(
                dom,
                push(
                    tmp_path / f"inc{n}.qcow2", inc="virtnbdbackup.0", checkpoint="virtnbdbackup.1"
                ),
            )
            assert [c.name for c in await dom.list_checkpoints()] == [
                "virtnbdbackup.0",
                "virtnbdbackup.1",
            ]
        compare(src, tmp_path / "full2.qcow2")


async def test_refusals_and_redefine_against_qemus_bitmaps(tmp_path: Path) -> None:
    async with domain(tmp_path) as (dom, _src):
        with pytest.raises(NoSuchCheckpoint, match="Checkpoint 'c0' for incremental backup"):
            await dom.job_begin(push(tmp_path / "i.qcow2", inc="c0"))
        assert not (tmp_path / "i.qcow2").exists() and await dom.list_jobs() == []
        c1 = await dom.checkpoint_create(cp_xml("c1"))
        sock, scratch = tmp_path / "n.sock", tmp_path / "s.qcow2"
        job = await dom.job_begin(
            "<job type='backup'><domainbackup mode='pull'><incremental>c1</incremental>"
            f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' type='file'>"
            f"<scratch file='{scratch}'/></disk></disks></domainbackup></job>"
        )
        await ready(job)
        with pytest.raises(OperationInvalid, match="base of the running incremental"):
            await c1.delete()
        await job.abort()
        await job.wait(30)
        # METADATA_ONLY keeps QEMU's bitmap; REDEFINE(_VALIDATE) takes it back
        saved = await c1.xml_desc()
        await c1.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        assert "c1" in await qemu_bitmaps(dom) and await dom.list_checkpoints() == []
        with pytest.raises(jobcore.DriverError, match="already exists"):
            await dom.checkpoint_create(cp_xml("c1"))
        both = (
            C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        )
        back = await dom.checkpoint_create(saved, both)
        assert await back.xml_desc() == saved
        await guest_write(dom, "write -P 0x44 0 1M")
        job = await dom.job_begin(push(tmp_path / "i.qcow2", inc="c1"))
        assert (await job.wait(60)).state is JobState.COMPLETED
        assert (await job.stats())["disk_total"] == 1 * MiB  # the redefined bitmap's changes
        # a bitmap QEMU does not have cannot be redefined
        ghost = saved.replace("c1", "ghost")
        with pytest.raises(InvalidArgument, match="missing or broken bitmap 'ghost'"):
            await dom.checkpoint_create(ghost, C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        assert [c.name for c in await dom.list_checkpoints()] == ["c1"]
        # delete removes the QEMU bitmap
        await back.delete()
        assert "c1" not in await qemu_bitmaps(dom)


async def test_deleting_a_child_of_a_running_incrementals_base(tmp_path: Path) -> None:
    """The base's bitmap is busy in QEMU while a push incremental reads it: the child's
    bitmap is removed without a merge into it (it holds the child's changes already)."""
    src = create(tmp_path / "vda.qcow2")
    write(src, "write -P 0x5a 0 8M")
    run_dir = tmp_path / "run"
    async with jobcore.connect(f"qemu:///session?dir={run_dir}&backup_bandwidth={MiB}") as conn:
        vdb = create(tmp_path / "vdb.qcow2", "16M")
        dom = await conn.create_domain(domain_xml("vm1", {"vda": src, "vdb": vdb}))
        c1 = await dom.checkpoint_create(cp_xml("c1"))
        await guest_write(dom, "write -P 0x66 0 6M")
        c2 = await dom.checkpoint_create(cp_xml("c2"))
        job = await dom.job_begin(push(tmp_path / "i.qcow2", inc="c1"))
        assert (await job.info()).state is JobState.RUNNING  # 6 MiB at 1 MiB/s
        assert (await qemu_bitmaps(dom))["c1"]["busy"] is True
        await c2.delete()
        assert "c2" not in await qemu_bitmaps(dom)
        assert [c.name for c in await dom.list_checkpoints()] == ["c1"]
        with pytest.raises(OperationInvalid, match="base of the running incremental"):
            await c1.delete()
        await job.abort()
        assert (await job.wait(30)).state is JobState.CANCELLED
        await c1.delete()
        assert await qemu_bitmaps(dom) == {}
