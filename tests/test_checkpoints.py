"""Checkpoints as first-class objects on sim (jobcore.checkpoints): created with a backup
or on their own, REDEFINE, listing filters, the XML description, parents, deletion with
its flags, the in-use refusal, persistence in the store, and the blocking facade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import jobcore
from jobcore import constants as C
from jobcore.api import Checkpoint, Domain, Job
from jobcore.errors import (
    InvalidArgument,
    NoSuchCheckpoint,
    NoSuchDomain,
    OperationInvalid,
    Unsupported,
)
from jobcore.lifecycle import JobState
from jobcore.local import as_local

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def cp_xml(name: str, extra: str = "") -> str:
    return f"<domaincheckpoint><name>{name}</name>{extra}</domaincheckpoint>"


def push(target: str, *, inc: str | None = None, checkpoint: str | None = None) -> str:
    incremental = f"<incremental>{inc}</incremental>" if inc else ""
    return (
        f"<job type='backup'><domainbackup>{incremental}<disks><disk name='vda' type='file'>"
        f"<target file='{target}'/></disk><disk name='vdb' backup='no'/></disks>"
        "</domainbackup>" + (cp_xml(checkpoint) if checkpoint else "") + "</job>"
    )


def pull(sock: str, *, inc: str | None = None, checkpoint: str | None = None) -> str:
    incremental = f"<incremental>{inc}</incremental>" if inc else ""
    return (
        f"<job type='backup'><domainbackup mode='pull'>{incremental}"
        f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' type='file'>"
        "<scratch file='/s/vda.scratch'/></disk></disks></domainbackup>"
        + (cp_xml(checkpoint) if checkpoint else "")
        + "</job>"
    )


@asynccontextmanager
async def sim(uri: str = "sim:///ck?rate=0", **kw: str) -> AsyncIterator[Domain]:
    async with jobcore.connect(uri, **kw) as conn:  # type: ignore[arg-type]
        yield await conn.lookup_domain("vm1")


async def ready(job: Job) -> None:
    """Until the pull backup serves its export (state 'ready')."""
    with job.events() as events, anyio.fail_after(30):
        if (await job.info()).state is JobState.READY:
            return
        async for ev in events:
            if ev.state is JobState.READY:
                return


async def names(dom: Domain, flags: int = 0) -> list[str]:
    return [c.name for c in await dom.list_checkpoints(flags)]


def bitmaps(dom: Domain) -> dict[str, tuple[str, ...]]:
    conn = as_local(dom.conn)
    return dict(conn.driver.world.domain(dom.name).checkpoints)  # type: ignore[attr-defined]


async def test_create_lookup_describe_in_libvirts_shape() -> None:
    async with sim() as dom:
        assert await dom.list_checkpoints() == []
        made = await dom.checkpoint_create(
            cp_xml("c1", "<description>first</description><disks><disk name='vda'/></disks>")
        )
        assert isinstance(made, Checkpoint) and made.name == "c1" and made.domain == "vm1"
        cp = await dom.checkpoint_lookup("c1")
        assert cp == made
        xml = await cp.xml_desc()
        when = xml.split("<creationTime>")[1].split("<")[0]
        assert xml == (
            "<domaincheckpoint>\n  <name>c1</name>\n  <description>first</description>\n"
            f"  <creationTime>{when}</creationTime>\n  <disks>\n"
            "    <disk name='vda' checkpoint='bitmap' bitmap='c1'/>\n"
            "    <disk name='vdb' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n"
        )
        sized = await cp.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        # sim: a bitmap's dirty bytes are what an incremental from it copies (1/8 GiB)
        assert "bitmap='c1' size='134217728'/>" in sized
        assert await cp.parent() is None
        assert bitmaps(dom) == {"c1": ("vda",)}
        # no name: the creation time, as libvirt
        auto = await dom.checkpoint_create("<domaincheckpoint/>")
        assert auto.name.isdigit() and (await auto.parent()) == cp
        with pytest.raises(NoSuchCheckpoint, match="no domain checkpoint with matching name"):
            await dom.checkpoint_lookup("nope")


async def test_a_backups_checkpoint_exists_once_begin_returns_and_has_the_current_parent() -> None:
    async with sim() as dom:
        await dom.checkpoint_create(cp_xml("c0"))
        job = await dom.job_begin(pull("/s/n.sock", inc="c0", checkpoint="c1"))
        cp = await dom.checkpoint_lookup("c1")  # visible at once (virtnbdbackup needs it)
        parent = await cp.parent()
        assert parent is not None and parent.name == "c0"
        assert "c1" in bitmaps(dom)
        await ready(job)
        await job.abort()  # a pull backup's consumer is done: completed, checkpoint kept
        assert (await job.wait()).state is JobState.COMPLETED
        assert await names(dom) == ["c0", "c1"]


async def test_a_failed_backup_leaves_no_checkpoint() -> None:
    async with sim("sim:///ck?rate=1073741824") as dom:
        as_local(dom.conn).driver.inject_failure("backup", 0.5)  # type: ignore[attr-defined]
        await dom.checkpoint_create(cp_xml("c0"))
        job = await dom.job_begin(push("/b/f.qcow2", checkpoint="c1"))
        assert await names(dom) == ["c0", "c1"]
        assert (await job.wait()).state is JobState.FAILED
        assert await names(dom) == ["c0"]
        assert "c1" not in bitmaps(dom)
        # and the name is free again
        job = await dom.job_begin(push("/b/g.qcow2", checkpoint="c1"))
        assert (await job.wait()).state is JobState.COMPLETED
        assert await names(dom) == ["c0", "c1"]


async def test_a_backup_the_driver_refuses_to_start_leaves_no_checkpoint() -> None:
    async with sim() as dom:
        driver = as_local(dom.conn).driver
        driver.crash()  # type: ignore[attr-defined]
        with pytest.raises(jobcore.DriverError, match="not running"):
            await dom.job_begin(push("/b/f.qcow2", checkpoint="c1"))
        assert await dom.list_checkpoints() == [] and bitmaps(dom) == {}
        driver.restart()  # type: ignore[attr-defined]
        job = await dom.job_begin(push("/b/f.qcow2", checkpoint="c1"))
        assert (await job.wait()).state is JobState.COMPLETED
        assert await names(dom) == ["c1"]


async def test_incremental_from_a_missing_checkpoint_fails_at_begin() -> None:
    async with sim() as dom:
        with pytest.raises(NoSuchCheckpoint, match="Checkpoint 'gone' for incremental backup"):
            await dom.job_begin(push("/b/i.qcow2", inc="gone"))
        assert await dom.list_jobs() == []
        await dom.checkpoint_create(cp_xml("only-vdb", "<disks><disk name='vdb'/></disks>"))
        with pytest.raises(InvalidArgument, match="does not cover it"):
            await dom.job_begin(push("/b/i.qcow2", inc="only-vdb"))
        await dom.checkpoint_create(cp_xml("c1"))
        with pytest.raises(OperationInvalid, match="already has checkpoint 'c1'"):
            await dom.job_begin(push("/b/i.qcow2", checkpoint="c1"))
        with pytest.raises(OperationInvalid, match="already has checkpoint 'c1'"):
            await dom.checkpoint_create(cp_xml("c1"))


async def test_deleting_the_base_of_a_running_incremental_is_refused() -> None:
    async with sim() as dom:
        base = await dom.checkpoint_create(cp_xml("base"))
        job = await dom.job_begin(pull("/s/n.sock", inc="base"))
        await ready(job)
        for flags in (0, C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY):
            with pytest.raises(OperationInvalid, match="base of the running incremental"):
                await base.delete(flags)
        await dom.checkpoint_create(cp_xml("later"))
        with pytest.raises(OperationInvalid, match="'base'"):
            await base.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
        await base.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY)  # 'later' is free
        assert await names(dom) == ["base"]
        await job.abort()
        await job.wait()
        await base.delete()
        assert await names(dom) == [] and bitmaps(dom) == {}


async def tree(dom: Domain) -> dict[str, str | None]:
    found = {}
    for cp in await dom.list_checkpoints():
        parent = await cp.parent()
        found[cp.name] = None if parent is None else parent.name
    return found


async def test_delete_reparents_children_and_honours_its_flags() -> None:
    async with sim() as dom:
        for name in ("a", "b", "c"):
            await dom.checkpoint_create(cp_xml(name))
        assert await tree(dom) == {"a": None, "b": "a", "c": "b"}
        await (await dom.checkpoint_lookup("b")).delete()
        assert await tree(dom) == {"a": None, "c": "a"}
        assert set(bitmaps(dom)) == {"a", "c"}
        d = await dom.checkpoint_create(cp_xml("d"))  # the current one is still 'c'
        assert (await d.parent()) == await dom.checkpoint_lookup("c")
        a = await dom.checkpoint_lookup("a")
        with pytest.raises(InvalidArgument, match="mutually exclusive"):
            await a.delete(
                C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                | C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY
            )
        await a.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY)
        assert await tree(dom) == {"a": None}
        e = await dom.checkpoint_create(cp_xml("e"))  # current fell back to 'a'
        assert (await e.parent()) == a
        await a.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
        assert await tree(dom) == {} and bitmaps(dom) == {}
        with pytest.raises(NoSuchCheckpoint):
            await a.xml_desc()
        with pytest.raises(InvalidArgument, match=r"unsupported flags \(0x8\)"):
            await e.delete(8)


async def test_metadata_only_delete_keeps_the_bitmap_and_redefine_brings_it_back() -> None:
    async with sim() as dom:
        await dom.checkpoint_create(cp_xml("p"))
        cp = await dom.checkpoint_create(cp_xml("c1", "<description>kept</description>"))
        saved = await cp.xml_desc()
        await cp.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        assert await names(dom) == ["p"] and "c1" in bitmaps(dom)
        with pytest.raises(jobcore.DriverError, match="already exists"):
            await dom.checkpoint_create(cp_xml("c1"))  # its bitmap is still there
        back = await dom.checkpoint_create(saved, C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        assert await back.xml_desc() == saved  # the same checkpoint, parent and time
        assert (await back.parent()) == await dom.checkpoint_lookup("p")
        # the redefined, newest one is current: a new checkpoint is its child
        nxt = await dom.checkpoint_create(cp_xml("c2"))
        assert (await nxt.parent()) == back
        job = await dom.job_begin(push("/b/i.qcow2", inc="c1"))
        assert (await job.wait()).state is JobState.COMPLETED


async def test_redefine_checks_its_document_and_the_bitmaps() -> None:
    async with sim() as dom:
        redefine = C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        with pytest.raises(InvalidArgument, match="missing creationTime"):
            await dom.checkpoint_create(cp_xml("x"), redefine)
        timed = "<creationTime>1553648510</creationTime>"
        with pytest.raises(InvalidArgument, match="missing or broken bitmap 'x' for disk"):
            await dom.checkpoint_create(cp_xml("x", timed), redefine)
        with pytest.raises(InvalidArgument, match="parent 'nope' for checkpoint 'x' not found"):
            await dom.checkpoint_create(
                cp_xml("x", f"<parent><name>nope</name></parent>{timed}"), redefine
            )
        with pytest.raises(InvalidArgument, match="requires VIR_DOMAIN_CHECKPOINT_CREATE_REDEF"):
            await dom.checkpoint_create(
                cp_xml("x", timed), C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
            )
        with pytest.raises(Unsupported, match="guest agent is not configured"):
            await dom.checkpoint_create(cp_xml("x"), C.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)
        with pytest.raises(InvalidArgument, match=r"unsupported flags \(0x8\)"):
            await dom.checkpoint_create(cp_xml("x"), 8)
        with pytest.raises(InvalidArgument, match="no disk named 'vdz'"):
            await dom.checkpoint_create(cp_xml("x", "<disks><disk name='vdz'/></disks>"))
        with pytest.raises(Unsupported, match="must match checkpoint name"):
            await dom.checkpoint_create(cp_xml("x", "<disks><disk name='vda' bitmap='b'/></disks>"))
        with pytest.raises(jobcore.XMLError):
            await dom.checkpoint_create("<domaincheckpoint><bogus/></domaincheckpoint>")
        assert await dom.list_checkpoints() == [] and bitmaps(dom) == {}
        # a libvirt document with its <domain> (ignored) and REDEFINE_VALIDATE
        cp = await dom.checkpoint_create(cp_xml("v"))
        text = (await cp.xml_desc()).replace(
            "</domaincheckpoint>", "<domain type='kvm'><name>vm1</name></domain></domaincheckpoint>"
        )
        both = redefine | C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        again = await dom.checkpoint_create(text, both)
        assert "<domain " not in await again.xml_desc()
        assert await names(dom) == ["v"]


async def test_list_filters() -> None:
    async with sim() as dom:
        for name in ("a", "b"):
            await dom.checkpoint_create(cp_xml(name))
        await (await dom.checkpoint_lookup("b")).delete(
            C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        )
        await dom.checkpoint_create(cp_xml("c"))  # a child of 'a'
        # 'b' again, redefined as a second root created earlier than 'a'
        await dom.checkpoint_create(
            cp_xml("b", "<creationTime>1</creationTime>"), C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        )
        assert await names(dom) == ["a", "c", "b"]
        assert await names(dom, C.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS) == ["a", "b"]
        assert await names(dom, C.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES) == ["c", "b"]
        assert await names(dom, C.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES) == ["a"]
        both = C.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES | C.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES
        assert await names(dom, both) == ["a", "c", "b"]
        e = await dom.checkpoint_create(cp_xml("e"))  # current: 'c' (b is older)
        assert (await e.parent()) == await dom.checkpoint_lookup("c")
        await (await dom.checkpoint_lookup("a")).delete()  # c and e: now under no one
        await dom.checkpoint_create(cp_xml("f"))  # child of e
        # reparent 'c' under 'b' by redefinition: creation order is no longer topological
        c_xml = (await (await dom.checkpoint_lookup("c")).xml_desc()).replace(
            "<creationTime>", "<parent><name>b</name></parent><creationTime>"
        )
        await dom.checkpoint_create(c_xml, C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        assert await names(dom) == ["c", "b", "e", "f"]
        topo = await names(dom, C.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        assert topo == ["b", "c", "e", "f"]
        with pytest.raises(InvalidArgument, match=r"unsupported flags \(0x10\)"):
            await dom.list_checkpoints(16)


async def test_calls_on_a_missing_domain() -> None:
    async with jobcore.connect("sim:///ck") as conn:
        dom = await conn.lookup_domain("vm2")
        await dom.destroy()
        with pytest.raises(NoSuchDomain):
            await dom.list_checkpoints()
        with pytest.raises(NoSuchDomain):
            await dom.checkpoint_create(cp_xml("x"))


async def test_checkpoints_persist_in_the_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    async with sim(store=store) as dom:
        await dom.checkpoint_create(cp_xml("c1", "<description>one</description>"))
        job = await dom.job_begin(push("/b/f.qcow2", inc="c1", checkpoint="c2"))
        await job.wait()
        saved = {c.name: await c.xml_desc() for c in await dom.list_checkpoints()}
    async with sim(store=store) as dom:
        assert {c.name: await c.xml_desc() for c in await dom.list_checkpoints()} == saved
        cp = await dom.checkpoint_lookup("c2")
        assert (await cp.parent()) == await dom.checkpoint_lookup("c1")
        await (await dom.checkpoint_lookup("c1")).delete()
    async with sim(store=store) as dom:
        assert await tree(dom) == {"c2": None}


def test_blocking_facade() -> None:
    assert jobcore.NoSuchCheckpoint is NoSuchCheckpoint and "NoSuchCheckpoint" in jobcore.__all__
    assert jobcore.BlockingCheckpoint.__module__ == "jobcore.facade"
    conn = jobcore.open("sim:///ckf?rate=0")
    try:
        dom = conn.lookupByName("vm1")
        cp = dom.checkpointCreateXML(cp_xml("c1"))
        assert cp.getName() == "c1"
        assert [c.getName() for c in dom.listAllCheckpoints()] == ["c1"]
        assert dom.checkpointLookupByName("c1") == cp
        with pytest.raises(NoSuchCheckpoint, match="does not have a parent"):
            cp.getParent()
        child = dom.checkpointCreateXML(cp_xml("c2"))
        assert child.getParent() == cp
        assert "size='" in child.getXMLDesc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        assert "size='" not in child.getXMLDesc()
        with pytest.raises(InvalidArgument, match="unsupported flags"):
            dom.checkpointLookupByName("c1", 1)
        with pytest.raises(InvalidArgument, match="unsupported flags"):
            cp.getParent(1)
        assert cp.delete() == 0
        assert [c.getName() for c in dom.listAllCheckpoints()] == ["c2"]
        with pytest.raises(NoSuchCheckpoint):
            dom.checkpointLookupByName("c1")
    finally:
        conn.close()


async def test_second_full_backup_reuses_a_deleted_checkpoints_name() -> None:
    async with sim() as dom:
        for n in range(2):
            for cp in await dom.list_checkpoints():
                await cp.delete()
            job = await dom.job_begin(pull(f"/s/{n}.sock", checkpoint="virtnbdbackup.0"))
            await ready(job)
            await job.abort()
            assert (await job.wait()).state is JobState.COMPLETED
        assert await names(dom) == ["virtnbdbackup.0"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_trio_too() -> None:
    async def body() -> None:
        async with sim() as dom:
            cp = await dom.checkpoint_create(cp_xml("t"))
            assert await cp.xml_desc()

    await anyio.to_thread.run_sync(lambda: anyio.run(body, backend="trio"))


CORPUS = Path(__file__).parent.parent / ".." / "shared" / "corpus" / "libvirt"


async def test_redefine_accepts_libvirts_own_output() -> None:
    """libvirt's qemudomaincheckpointxml2xmlout/sample.xml (a child checkpoint with its
    description, parent and time), redefined over existing bitmaps, describes itself back
    byte for byte."""
    text = (CORPUS / "qemudomaincheckpointxml2xmlout" / "sample.xml").read_text()
    async with sim() as dom:
        for name in ("1525111885", "1525889631"):  # the bitmaps, then metadata-only delete
            made = await dom.checkpoint_create(cp_xml(name, "<disks><disk name='vda'/></disks>"))
            await made.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        redefine = C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        await dom.checkpoint_create(
            cp_xml("1525111885", "<creationTime>1525111885</creationTime>"
                   "<disks><disk name='vda'/><disk name='vdb' checkpoint='no'/></disks>"),
            redefine,
        )  # fmt: skip
        cp = await dom.checkpoint_create(text, redefine)
        assert await cp.xml_desc() == text
        assert await tree(dom) == {"1525111885": None, "1525889631": "1525111885"}
