"""Job groups on real QEMU: a consistent backup of two domains (two QEMU processes) as one
all-or-nothing group with a checkpoint each. Completed: each target holds its source
(qemu-img compare) and each QEMU has its bitmap. A pull member holds the push member
until its consumer is done; aborting the group instead removes both checkpoints from the
records and from QEMU. A member the driver refuses begins nothing on either domain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from qemu_helpers import compare, create, domain_xml, write
from test_checkpoints import ready

import jobcore
from drivers.qemu.process import QemuProcess, QmpRefused
from jobcore.api import Connection
from jobcore.errors import JobError
from jobcore.lifecycle import JobState
from jobcore.local import as_local

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def push(domain: str, target: Path, checkpoint: str) -> str:
    return (
        f"<job type='backup' domain='{domain}'><domainbackup><disks><disk name='vda' "
        f"type='file'><target file='{target}'/></disk><disk name='vdb' backup='no'/></disks>"
        f"</domainbackup><domaincheckpoint><name>{checkpoint}</name></domaincheckpoint></job>"
    )


def pull(domain: str, sock: Path, checkpoint: str) -> str:
    return (
        f"<job type='backup' domain='{domain}'><domainbackup mode='pull'>"
        f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' type='file'>"
        f"<scratch file='{sock}.scratch'/></disk><disk name='vdb' backup='no'/></disks>"
        f"</domainbackup><domaincheckpoint><name>{checkpoint}</name></domaincheckpoint></job>"
    )


def group(*members: str) -> str:
    return f"<jobgroup mode='all-or-nothing'>{''.join(members)}</jobgroup>"


@asynccontextmanager
async def two_domains(tmp_path: Path) -> AsyncIterator[tuple[Connection, dict[str, Path]]]:
    sources = {}
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        for name, pattern in (("vm1", "0x5a"), ("vm2", "0xa5")):
            src = create(tmp_path / f"{name}-vda.qcow2")
            write(src, f"write -P {pattern} 0 8M")
            vdb = create(tmp_path / f"{name}-vdb.qcow2", "16M")
            await conn.create_domain(domain_xml(name, {"vda": src, "vdb": vdb}))
            sources[name] = src
        yield conn, sources


async def bitmaps(conn: Connection, domain: str, disk: str = "vda") -> set[str]:
    """A disk's named bitmaps as its QEMU has them."""
    driver: Any = as_local(conn).driver
    node = driver.domains[domain].disks[disk].active.node
    nodes = await driver.qmp(domain, "query-named-block-nodes", {"flat": True})
    return {
        b["name"]
        for n in nodes
        if n["node-name"] == node
        for b in n.get("dirty-bitmaps", [])
        if "name" in b
    }


async def checkpoints(conn: Connection, domain: str) -> list[str]:
    return [c.name for c in await (await conn.lookup_domain(domain)).list_checkpoints()]


async def test_two_qemu_domains_backed_up_as_one(tmp_path: Path) -> None:
    async with two_domains(tmp_path) as (conn, sources):
        g = await conn.job_group_begin(
            group(
                push("vm1", tmp_path / "vm1.bak.qcow2", "c1"),
                push("vm2", tmp_path / "vm2.bak.qcow2", "c2"),
            )
        )
        info = await g.wait(60)
        assert info["state"] == "completed" and info["states"] == ["completed"] * 2
        for name, cp in (("vm1", "c1"), ("vm2", "c2")):
            compare(sources[name], tmp_path / f"{name}.bak.qcow2")
            assert await checkpoints(conn, name) == [cp]
            assert cp in await bitmaps(conn, name)


@pytest.mark.parametrize("end", ["consumer-done", "group-abort"])
async def test_a_pull_member_holds_the_push_member(tmp_path: Path, end: str) -> None:
    async with two_domains(tmp_path) as (conn, sources):
        g = await conn.job_group_begin(
            group(push("vm1", tmp_path / "vm1.bak.qcow2", "c1"), pull("vm2", tmp_path / "s", "c2"))
        )
        first, second = await g.jobs()
        await ready(second)
        with anyio.fail_after(60):  # the push member's work is done: it is held
            # (no event says so: a held completion changes no state)
            while (i := await first.info()).total == 0 or i.processed < i.total:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert (await first.info()).state is JobState.RUNNING
        assert "c1" in await bitmaps(conn, "vm1")  # made at its start
        if end == "consumer-done":
            await second.abort()
            info = await g.wait(60)
            assert info["states"] == ["completed", "completed"]
            assert {"c1"} <= await bitmaps(conn, "vm1") and {"c2"} <= await bitmaps(conn, "vm2")
        else:
            await g.abort()
            info = await g.wait(60)
            assert info["states"] == ["cancelled", "cancelled"], info
            for name, cp in (("vm1", "c1"), ("vm2", "c2")):
                assert await checkpoints(conn, name) == []
                assert cp not in await bitmaps(conn, name)
        compare(sources["vm1"], tmp_path / "vm1.bak.qcow2")  # what it wrote stays


async def test_a_member_qemu_refuses_begins_nothing(tmp_path: Path) -> None:
    async with two_domains(tmp_path) as (conn, _):
        existing = tmp_path / "exists.qcow2"
        existing.write_bytes(b"")
        with pytest.raises(JobError, match="group member 2"):
            await conn.job_group_begin(
                group(push("vm1", tmp_path / "vm1.bak.qcow2", "c1"), push("vm2", existing, "c2"))
            )
        for name in ("vm1", "vm2"):
            assert await (await conn.lookup_domain(name)).list_jobs() == []
            assert await checkpoints(conn, name) == []
        assert not (tmp_path / "vm1.bak.qcow2").exists()


def disk_push(domain: str, disk: str, target: Path, checkpoint: str) -> str:
    """A backup of one of the domain's two disks (vda or vdb), the other left out."""
    other = "vdb" if disk == "vda" else "vda"
    return (
        f"<job type='backup' domain='{domain}'><domainbackup><disks><disk name='{disk}' "
        f"type='file'><target file='{target}'/></disk><disk name='{other}' backup='no'/>"
        f"</disks></domainbackup><domaincheckpoint><name>{checkpoint}</name>"
        f"<disks><disk name='{disk}' checkpoint='bitmap'/><disk name='{other}' "
        "checkpoint='no'/></disks></domaincheckpoint></job>"
    )


class Transactions:
    """Records the QMP transactions a domain's QEMU is given (``fail``: refuse them)."""

    def __init__(
        self, conn: Connection, domain: str, monkeypatch: pytest.MonkeyPatch, fail: bool = False
    ) -> None:
        proc = as_local(conn).driver.domains[domain].process  # type: ignore[attr-defined]
        real = QemuProcess.execute
        self.seen: list[list[str]] = []

        async def execute(
            self_: QemuProcess, cmd: str, args: dict[str, Any] | None = None, **kw: Any
        ) -> Any:
            if self_ is proc and cmd == "transaction":
                assert args is not None
                self.seen.append([a["type"] for a in args["actions"]])
                if fail:
                    raise QmpRefused("refused by the test", error={"class": "GenericError"})
            return await real(self_, cmd, args, **kw)

        monkeypatch.setattr(QemuProcess, "execute", execute)


async def test_members_on_one_qemu_start_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_domains(tmp_path) as (conn, sources):
        qmp = Transactions(conn, "vm1", monkeypatch)
        g = await conn.job_group_begin(
            group(
                disk_push("vm1", "vda", tmp_path / "vda.bak.qcow2", "ca"),
                disk_push("vm1", "vdb", tmp_path / "vdb.bak.qcow2", "cb"),
                push("vm2", tmp_path / "vm2.bak.qcow2", "c2"),
            )
        )
        # both of vm1's members: their bitmaps and backups in one transaction
        assert len(qmp.seen) == 1
        assert sorted(qmp.seen[0]) == sorted(["block-dirty-bitmap-add", "blockdev-backup"] * 2), (
            qmp.seen
        )
        info = await g.wait(60)
        assert info["states"] == ["completed"] * 3, info
        compare(sources["vm1"], tmp_path / "vda.bak.qcow2")
        assert {"ca", "cb"} <= await bitmaps(conn, "vm1") | await bitmaps(conn, "vm1", "vdb")


async def test_a_refused_transaction_fails_every_member_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_domains(tmp_path) as (conn, _):
        Transactions(conn, "vm1", monkeypatch, fail=True)
        g = await conn.job_group_begin(
            group(
                disk_push("vm1", "vda", tmp_path / "vda.bak.qcow2", "ca"),
                disk_push("vm1", "vdb", tmp_path / "vdb.bak.qcow2", "cb"),
            )
        )
        info = await g.wait(60)
        assert info["states"] == ["failed", "failed"] and info["state"] == "failed"
        assert await checkpoints(conn, "vm1") == []
        assert not {"ca", "cb"} & (await bitmaps(conn, "vm1") | await bitmaps(conn, "vm1", "vdb"))
        assert as_local(conn).driver.runners == {}  # type: ignore[attr-defined]
        assert not (tmp_path / "vda.bak.qcow2").exists()


async def test_a_group_of_pulls_preempts_two_domains_backups(tmp_path: Path) -> None:
    """Two QEMU processes each run a slow backup; an all-or-nothing group of block pulls
    at a higher priority with ``<policy conflict='preempt'/>`` pauses both (QEMU pauses
    the backup jobs), runs, and once it completed the backups are resumed and finish as
    correct point-in-time copies."""
    uri = f"qemu:///session?dir={tmp_path / 'run'}&backup_bandwidth=65536"  # slow backups
    bases = {}
    async with jobcore.connect(uri) as conn:
        victims = {}
        for name, pattern in (("vm1", "0x3c"), ("vm2", "0xc3")):
            base = create(tmp_path / f"{name}-base.qcow2")
            write(base, f"write -P {pattern} 0 8M")
            top = create(tmp_path / f"{name}-top.qcow2", backing=base)
            dom = await conn.create_domain(domain_xml(name, {"vda": top}, memory_mib=16))
            bases[name] = base
            victims[name] = await dom.job_begin(
                "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
                f"<target file='{tmp_path / name}.full.qcow2'/></disk></disks></domainbackup>"
                "</job>"
            )
        boss = "<priority>5</priority><policy conflict='preempt'/><disk name='vda'/>"
        g = await conn.job_group_begin(
            "<jobgroup mode='all-or-nothing'>"
            + "".join(f"<job type='blockpull' domain='{n}'>{boss}</job>" for n in ("vm1", "vm2"))
            + "</jobgroup>"
        )
        members = await g.jobs()
        assert (await g.info())["states"] == ["running", "running"]
        for victim, member in zip(victims.values(), members, strict=True):
            assert victim.state is JobState.PAUSED  # QEMU paused it
            assert (await victim.stats())["preempted_by"] == str(member.uuid)
        assert (await g.wait(60))["state"] == "completed"
        for name, victim in victims.items():
            with anyio.fail_after(30):
                while (await victim.info()).state is JobState.PAUSED:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # until the engine resumed it
            await victim.set_speed(None)  # now let it finish
            with anyio.fail_after(60):
                assert (await victim.wait()).state is JobState.COMPLETED
            compare(bases[name], tmp_path / f"{name}.full.qcow2")  # the pull changed no data
