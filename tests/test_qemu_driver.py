"""The qemu driver against real QEMU processes and real qcow2 images.

Every job's data is proven with ``qemu-img compare``; after every test no QEMU process
started by it survives. These tests never skip: without QEMU they fail.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from qemu_helpers import (
    alive,
    cmdline,
    compare,
    corrupt_first_cluster,
    create,
    differs,
    domain_xml,
    ended_by,
    free_port,
    kill_and_reap,
    make_job,
    qemu_children,
    run,
    start_orphan_qemu,
    write,
)

from drivers.qemu import QemuConnection, QemuDriver
from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    BackupServer,
    BackupStore,
    CheckpointDef,
    DiskBackupMode,
    ServerTransport,
    StoreType,
)
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    NoSuchDomain,
    OperationInvalid,
    Unsupported,
    XMLError,
)
from jobcore.spec import ChainRef
from jobcore.types.backup import BackupJobSpec
from jobcore.types.chain import BlockCommitSpec, BlockPullSpec
from jobcore.types.migration import MigrationSpec
from jobcore.uri import parse_uri
from jobcore.xml.domain import parse_domain

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def session(tmp_path: Path, query: str = "") -> AsyncIterator[QemuConnection]:
    """A connection on a private run directory; afterwards no QEMU of ours may survive."""
    before = qemu_children()
    seen: set[int] = set()
    try:
        async with anyio.create_task_group() as tg:
            uri = parse_uri(f"qemu:///session?dir={tmp_path / 'run'}{query}")
            async with QemuDriver().connect(uri, tg) as conn:
                try:
                    yield conn
                finally:
                    seen.update(conn.pids())
            tg.cancel_scope.cancel()
    finally:
        leaked = (qemu_children() - before) | {p for p in seen if alive(p)}
        kill_and_reap(leaked)  # do not let one failure leak into the next test
        assert not leaked, f"QEMU processes survived the test: {leaked}"


def backup_disks(disks: dict[str, Path], incremental: str | None) -> tuple[BackupDisk, ...]:
    mode = DiskBackupMode.INCREMENTAL if incremental else DiskBackupMode.FULL
    store = {name: BackupStore(str(path), "qcow2") for name, path in disks.items()}
    return tuple(
        [
            BackupDisk(name, True, StoreType.FILE, mode, incremental, store=store[name])
            for name in disks
        ]
    )


def push_spec(
    disks: dict[str, Path], *, incremental: str | None = None, checkpoint: str | None = None
) -> BackupJobSpec:
    backup = BackupDef(
        mode=BackupMode.PUSH, incremental=incremental, disks=backup_disks(disks, incremental)
    )
    return BackupJobSpec(backup, CheckpointDef(name=checkpoint) if checkpoint else None)


def pull_spec(
    disks: dict[str, Path], socket: Path, *, incremental: str | None = None
) -> BackupJobSpec:
    server = BackupServer(ServerTransport.UNIX, socket=str(socket))
    backup = BackupDef(
        mode=BackupMode.PULL,
        incremental=incremental,
        server=server,
        disks=backup_disks(disks, incremental),
    )
    return BackupJobSpec(backup)


async def bitmaps(conn: QemuConnection, domain: str, disk: str) -> set[str]:
    node = conn.domains[domain].disks[disk].active.node
    for info in await conn.qmp(domain, "query-named-block-nodes", {"flat": True}):
        if info["node-name"] == node:
            return {b["name"] for b in info.get("dirty-bitmaps", [])}
    raise AssertionError(f"node {node} not found")


# ================================================================= domains


async def test_domain_lifecycle_chain_and_refusals(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    top = create(tmp_path / "top.qcow2", backing=base)
    other = create(tmp_path / "other.qcow2", "16M")
    async with session(tmp_path) as conn:
        info = await conn.create_domain(
            parse_domain(domain_xml("vm1", {"vda": top, "vdb": other}, 16))
        )
        assert [d.chain for d in info.disks] == [(str(top), str(base)), (str(other),)]
        assert info.disks[0].virtual_size == 32 * MiB
        pid = conn.pid("vm1")
        argv = cmdline(pid)
        assert argv[argv.index(b"-name") + 1] == b"vm1"
        assert [d.name for d in await conn.list_domains()] == ["vm1"]
        with pytest.raises(OperationInvalid):
            await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": other})))
        for bad in (
            "<domain><name>x</name>",
            "<!DOCTYPE d [<!ENTITY e 'x'>]><domain/>",
            domain_xml("x", {"vda": tmp_path / "missing.qcow2"}),
        ):
            with pytest.raises(XMLError):
                await conn.create_domain(parse_domain(bad))
        with pytest.raises(NoSuchDomain):
            await conn.lookup_domain("nope")
        # the run directory is locked while this connection owns it
        async with anyio.create_task_group() as tg:
            with pytest.raises(DriverError, match="in use"):
                async with QemuDriver().connect(
                    parse_uri(f"qemu:///session?dir={tmp_path / 'run'}"), tg
                ):
                    pass
        await conn.destroy_domain("vm1")
        assert not alive(pid)
        with pytest.raises(NoSuchDomain):
            await conn.lookup_domain("vm1")


async def test_new_owner_kills_qemu_left_by_a_dead_owner(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    orphan = start_orphan_qemu(run_dir)
    try:
        async with session(tmp_path):
            assert not (run_dir / "old.0.pid").exists()
    finally:
        status = ended_by(orphan)
    assert status == -signal.SIGKILL


async def test_trio_is_refused_clearly(tmp_path: Path) -> None:
    async def main() -> str:
        async with anyio.create_task_group() as tg:
            try:
                async with QemuDriver().connect(parse_uri("qemu:///session"), tg):
                    pass
            except Unsupported as exc:
                return str(exc)
        return "connected"

    message = await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio"))
    assert "asyncio" in message


# =============================================================== push backup


async def test_push_full_then_incremental_from_checkpoint(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x5a 0 8M", "write -P 0x17 20M 4M")
    full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        job, rep = await make_job(conn, "vm1", push_spec({"vda": full}, checkpoint="c1"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert rep.progress_calls[-1][:2] == (32 * MiB, 32 * MiB)
        assert "c1" in await bitmaps(conn, "vm1", "vda")  # the checkpoint was kept
        compare(src, full)

        await conn.guest_io("vm1", "vda", "write -P 0x77 2M 3M")
        await conn.guest_io("vm1", "vda", "write -P 0x78 30M 1M")
        assert differs(src, full)
        job, rep = await make_job(
            conn, "vm1", push_spec({"vda": inc}, incremental="c1", checkpoint="c2")
        )
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        processed, total, _ = rep.progress_calls[-1]
        assert processed == total and 4 * MiB <= total < 8 * MiB  # only the dirty clusters
        assert {"c1", "c2"} <= await bitmaps(conn, "vm1", "vda")
        # the incremental image chained on the full one equals the source
        run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc))
        compare(src, inc)


async def test_push_cancel_mid_job_removes_target_and_checkpoint(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x42 0 24M")
    target = tmp_path / "t.qcow2"
    async with session(tmp_path, "&backup_bandwidth=1048576") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        job, rep = await make_job(conn, "vm1", push_spec({"vda": target}, checkpoint="cx"))
        await conn.start(job)
        assert target.exists()
        await conn.pause(job)
        with pytest.raises(OperationInvalid):
            await conn.pause(job)
        await anyio.sleep(0.3)  # QEMU's own paused/running flips must not unpause us
        await conn.resume(job)
        with pytest.raises(OperationInvalid):
            await conn.resume(job)
        with pytest.raises(OperationInvalid):
            await conn.complete(job)
        await conn.cancel(job)
        assert await rep.wait_end() == ("cancelled", None)
        assert not target.exists()
        assert "cx" not in await bitmaps(conn, "vm1", "vda")


async def test_backup_failing_in_qemu_reports_its_error_and_cleans(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x42 0 8M")
    corrupt_first_cluster(src)
    target = tmp_path / "t.qcow2"
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        job, rep = await make_job(conn, "vm1", push_spec({"vda": target}, checkpoint="c9"))
        await conn.start(job)
        kind, msg = await rep.wait_end()
        assert kind == "failed"
        # QEMU's own text from BLOCK_JOB_COMPLETED (7.2 says "No medium found": the node is
        # taken offline once flagged corrupt), not a process death
        assert msg and "QEMU process" not in msg
        assert not target.exists()
        assert alive(conn.pid("vm1"))  # the domain lives on (its corrupt disk is ejected)


async def test_refused_backup_raises_qemu_text(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        job, rep = await make_job(
            conn, "vm1", push_spec({"vda": tmp_path / "i.qcow2"}, incremental="nosuch")
        )
        with pytest.raises(DriverError, match="nosuch"):
            await conn.start(job)
        assert not (tmp_path / "i.qcow2").exists()
        assert rep.events == []


# =============================================================== pull backup


async def test_pull_backup_exports_point_in_time_and_dirty_bitmap(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x5a 0 8M")
    sock = tmp_path / "nbd.sock"
    scratch = tmp_path / "scratch.qcow2"
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        push, prep = await make_job(
            conn, "vm1", push_spec({"vda": tmp_path / "f.qcow2"}, checkpoint="c1")
        )
        await conn.start(push)
        assert (await prep.wait_end())[0] == "completed"
        await conn.guest_io("vm1", "vda", "write -P 0x33 16M 1M")
        t0 = tmp_path / "t0.qcow2"
        run("qemu-img", "convert", "-U", "-O", "qcow2", str(src), str(t0))

        job, rep = await make_job(conn, "vm1", pull_spec({"vda": scratch}, sock, incremental="c1"))
        await conn.start(job)
        await rep.wait_for("ready")
        assert scratch.exists()
        # the guest keeps writing: the export still shows the point in time
        await conn.guest_io("vm1", "vda", "write -P 0x99 0 4M")
        uri = f"nbd+unix:///vda?socket={sock}"
        pulled = tmp_path / "pulled.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(pulled))
        compare(t0, pulled, "-F", "raw")
        assert differs(src, pulled)
        dirty = run(
            "qemu-img",
            "map",
            "--output=json",
            "--image-opts",
            f"driver=nbd,export=vda,server.type=unix,server.path={sock},"
            "x-dirty-bitmap=qemu:dirty-bitmap:backup-vda",
        )
        # x-dirty-bitmap inverts the meaning: data=false marks the dirty extents
        extents = [(e["start"], e["length"]) for e in json.loads(dirty) if not e["data"]]
        assert extents == [(16 * MiB, 1 * MiB)]
        with pytest.raises(OperationInvalid):
            await conn.pause(job)
        await anyio.sleep(0.3)
        assert rep.progress_calls and "disk_temp_used" in rep.progress_calls[-1][2]
        await conn.complete(job)
        assert (await rep.wait_end())[0] == "completed"
        assert not scratch.exists() and not sock.exists()
        assert "backup-vda" not in await bitmaps(conn, "vm1", "vda")


async def test_pull_backup_cancel_removes_scratch(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    a, b = create(tmp_path / "b.qcow2", "16M"), tmp_path / "sa.qcow2"
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src, "vdb": a})))
        spec = pull_spec({"vda": b, "vdb": tmp_path / "sb.qcow2"}, tmp_path / "s.sock")
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        await rep.wait_for("ready")
        out = run("qemu-nbd", "-L", "-k", str(tmp_path / "s.sock"))
        assert "export: 'vda'" in out and "export: 'vdb'" in out
        await conn.cancel(job)
        assert await rep.wait_end() == ("cancelled", None)
        assert not b.exists() and not (tmp_path / "sb.qcow2").exists()


# ============================================================ pull and commit


def three_layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    base = create(tmp_path / "base.qcow2")
    write(base, "write -P 0x11 0 12M")
    mid = create(tmp_path / "mid.qcow2", backing=base)
    write(mid, "write -P 0x22 8M 8M")
    top = create(tmp_path / "top.qcow2", backing=mid)
    write(top, "write -P 0x33 14M 4M")
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", str(top), str(ref))
    return base, mid, top, ref


def chain_of(path: Path) -> list[str]:
    out = run("qemu-img", "info", "-U", "--backing-chain", str(path))
    return [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("image: ")]


async def test_block_pull_with_base_and_whole_chain(tmp_path: Path) -> None:
    base, _mid, top, ref = three_layers(tmp_path)
    lone = create(tmp_path / "lone.qcow2", "16M")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top, "vdb": lone})))
        job, rep = await make_job(conn, "vm1", BlockPullSpec("vda", base=ChainRef(file=str(base))))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        info = await conn.lookup_domain("vm1")
        assert info.disks[0].chain == (str(top), str(base))
        await conn.flush("vm1")
        assert chain_of(top) == [str(top), str(base)]
        compare(top, ref, "-F", "raw")

        job, rep = await make_job(conn, "vm1", BlockPullSpec("vda"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert (await conn.lookup_domain("vm1")).disks[0].chain == (str(top),)
        await conn.flush("vm1")  # qcow2 metadata is cached until flushed
        assert chain_of(top) == [str(top)]
        compare(top, ref, "-F", "raw")

        # a disk with no backing has nothing to pull and completes at once
        job, rep = await make_job(conn, "vm1", BlockPullSpec("vdb"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"


async def test_block_commit_intermediate(tmp_path: Path) -> None:
    base, mid, top, ref = three_layers(tmp_path)
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top})))
        spec = BlockCommitSpec("vda", top=ChainRef(index=1), base=ChainRef(index=2), delete=True)
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert "ready" not in rep.kinds
        assert (await conn.lookup_domain("vm1")).disks[0].chain == (str(top), str(base))
        assert not mid.exists()  # <delete/>
        await conn.flush("vm1")
        assert chain_of(top) == [str(top), str(base)]
        compare(top, ref, "-F", "raw")


async def test_block_commit_active_ready_then_complete_or_auto_pivot(tmp_path: Path) -> None:
    base, _mid, top, ref = three_layers(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    b2, m2, t2, ref2 = three_layers(second)
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top, "vdb": t2})))
        job, rep = await make_job(conn, "vm1", BlockCommitSpec("vda"))
        await conn.start(job)
        await rep.wait_for("ready")
        await anyio.sleep(0.2)
        assert rep.terminal is None  # waits in ready for complete()
        await conn.pause(job)  # QEMU: standby; complete() must still finish the job
        await conn.complete(job)
        assert (await rep.wait_end())[0] == "completed"
        assert (await conn.lookup_domain("vm1")).disks[0].chain == (str(base),)
        await conn.guest_io("vm1", "vda", "write -P 0x44 0 1M")  # I/O now lands in base
        ref_after = tmp_path / "ref-after.raw"
        run("qemu-img", "convert", "-O", "raw", str(ref), str(ref_after))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", str(ref_after))
        compare(base, ref_after, "-F", "raw")

        job, rep = await make_job(
            conn, "vm1", BlockCommitSpec("vdb", base=ChainRef(index=1), pivot=True)
        )
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert rep.kinds == ["ready", "completed"]
        assert (await conn.lookup_domain("vm1")).disks[1].chain == (str(m2), str(b2))
        await conn.flush("vm1")
        compare(m2, ref2, "-F", "raw")


async def test_commit_without_backing_is_refused_before_the_driver(tmp_path: Path) -> None:
    """The type's prepare refuses it (the driver never re-checks the chain positions)."""
    lone = create(tmp_path / "lone.qcow2", "16M")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": lone})))
        with pytest.raises(InvalidArgument, match="no backing file to commit into"):
            await make_job(conn, "vm1", BlockCommitSpec("vda"))


# ===================================================== killed process, migration


async def test_killed_qemu_fails_its_job_alone(tmp_path: Path) -> None:
    a, b = create(tmp_path / "a.qcow2"), create(tmp_path / "b.qcow2")
    write(a, "write -P 1 0 16M")
    write(b, "write -P 2 0 16M")
    async with session(tmp_path, "&backup_bandwidth=1048576") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": a})))
        await conn.create_domain(parse_domain(domain_xml("vm2", {"vda": b})))
        ja, ra = await make_job(conn, "vm1", push_spec({"vda": tmp_path / "ta.qcow2"}))
        jb, rb = await make_job(conn, "vm2", push_spec({"vda": tmp_path / "tb.qcow2"}))
        await conn.start(ja)
        await conn.start(jb)
        await anyio.sleep(0.2)
        victim = conn.pid("vm1")
        os.kill(victim, signal.SIGKILL)
        kind, msg = await ra.wait_end()
        assert kind == "failed" and "exited" in msg and "vm1" in msg
        assert not (tmp_path / "ta.qcow2").exists()
        assert rb.terminal is None and alive(conn.pid("vm2"))
        await conn.set_speed(jb, None)
        assert (await rb.wait_end())[0] == "completed"
        compare(b, tmp_path / "tb.qcow2")
        assert not (await conn.lookup_domain("vm1")).running


async def test_migration_moves_domain_and_data_still_served(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x61 0 6M")
    run_dir = tmp_path / "run"
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src}, memory_mib=32)))
        full = tmp_path / "full.qcow2"
        job, rep = await make_job(conn, "vm1", push_spec({"vda": full}, checkpoint="c1"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        old_pid = conn.pid("vm1")
        dest = f"qemu:///session?dir={run_dir}"
        spec = MigrationSpec(dest, live=False, bandwidth=2 * 1024 * MiB, downtime_limit=300)
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        kind, extra = await rep.wait_end()
        assert kind == "completed", extra
        assert rep.kinds == ["domain_moved", "completed"]
        assert rep.events[0][1] == dest
        assert extra["memory_total"] >= 32 * MiB and "downtime" in extra
        assert conn.pid("vm1") != old_pid and not alive(old_pid)
        assert (await conn.lookup_domain("vm1")).running
        params = await conn.qmp("vm1", "query-status")
        assert params["status"] == "running"
        # the migrated domain still serves its disk, and its checkpoint came along:
        # an incremental backup from c1 chained on the full one equals the source
        assert "c1" in await bitmaps(conn, "vm1", "vda")
        await conn.guest_io("vm1", "vda", "write -P 0x62 8M 1M")
        inc = tmp_path / "inc.qcow2"
        job, rep = await make_job(conn, "vm1", push_spec({"vda": inc}, incremental="c1"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc))
        compare(src, inc)


async def test_migration_cancel_keeps_source_and_reaps_destination(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src}, memory_mib=64)))
        pid = conn.pid("vm1")
        spec = MigrationSpec(f"qemu:///session?dir={tmp_path / 'run'}", bandwidth=16 * 1024)
        job, rep = await make_job(conn, "vm1", spec)
        before = qemu_children()
        await conn.start(job)
        (dest_pid,) = qemu_children() - before
        # not <live/>: the source is paused while it migrates, and resumed after the cancel
        assert (await conn.qmp("vm1", "query-status"))["status"] in ("paused", "finish-migrate")
        with pytest.raises(Unsupported):
            await conn.pause(job)
        await anyio.sleep(0.5)
        await conn.cancel(job)
        assert await rep.wait_end() == ("cancelled", None)
        assert not alive(dest_pid)
        assert conn.pid("vm1") == pid
        assert (await conn.qmp("vm1", "query-status"))["status"] == "running"
        with pytest.raises(Unsupported):
            bad, _ = await make_job(conn, "vm1", MigrationSpec("sim:///other"))
            await conn.start(bad)


async def test_migration_fails_with_qemu_text_when_destination_dies(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src}, memory_mib=64)))
        pid = conn.pid("vm1")
        spec = MigrationSpec(f"qemu:///session?dir={tmp_path / 'run'}", bandwidth=16 * 1024)
        job, rep = await make_job(conn, "vm1", spec)
        before = qemu_children()
        await conn.start(job)
        (dest_pid,) = qemu_children() - before
        await anyio.sleep(0.3)
        os.kill(dest_pid, signal.SIGKILL)
        kind, msg = await rep.wait_end()
        assert kind == "failed" and msg  # QEMU's own error text
        assert "domain_moved" not in rep.kinds
        assert conn.pid("vm1") == pid
        assert (await conn.qmp("vm1", "query-status"))["status"] == "running"


async def test_closing_the_connection_mid_job_reaps_and_cleans(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x42 0 16M")
    target = tmp_path / "t.qcow2"
    async with session(tmp_path, "&backup_bandwidth=1048576") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        pid = conn.pid("vm1")
        job, rep = await make_job(conn, "vm1", push_spec({"vda": target}))
        await conn.start(job)
        assert target.exists()
    assert not alive(pid)
    assert not target.exists()
    assert rep.terminal is None or rep.terminal[0] == "failed"
    # the run directory is free again, and holds no stale pid files
    assert not list((tmp_path / "run").glob("*.pid"))
    async with session(tmp_path) as conn:
        assert await conn.list_domains() == []


async def test_pull_backup_over_tcp_loopback(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x5c 1M 3M")
    port = free_port()
    async with session(tmp_path) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        server = BackupServer(ServerTransport.TCP, name="127.0.0.1", port=port)
        disk = BackupDisk(
            "vda",
            True,
            StoreType.FILE,
            DiskBackupMode.FULL,
            exportname="disk0",
            store=BackupStore(str(tmp_path / "sc.qcow2")),
        )
        spec = BackupJobSpec(BackupDef(mode=BackupMode.PULL, server=server, disks=(disk,)))
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        await rep.wait_for("ready")
        compare(f"nbd://127.0.0.1:{port}/disk0", src, "-f", "raw")
        await conn.complete(job)
        assert (await rep.wait_end())[0] == "completed"
        assert not (tmp_path / "sc.qcow2").exists()
