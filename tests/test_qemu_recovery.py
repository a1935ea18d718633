"""Guests outlive their owner, and a new owner re-adopts them and recovers their jobs.

A child process opens a keep-guests connection (``?keep_guests=yes``), creates a domain
and starts a job, then is killed with SIGKILL; its QEMU runs on. A new connection on the
same run directory re-adopts the domain (rebuilt from QEMU's block graph) and
``recover_job`` reconciles the job with QEMU: real QEMU, real qcow2, data checked with
``qemu-img compare``. No QEMU is left running afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from qemu.qmp import QMPClient
from qemu_helpers import (
    RecordingReporter,
    alive,
    compare,
    create,
    domain_xml,
    ended_by,
    make_job,
    run,
    start_orphan_qemu,
    write,
)

import drivers.qemu.connection as qconn
from drivers.qemu import QemuConnection, QemuDriver, rundir
from drivers.qemu.rundir import job_record, read_record, write_record
from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    BackupStore,
    DiskBackupMode,
    StoreType,
)
from jobcore.driver import Concluded, DriverJob, NotStarted, Reattached, Vanished
from jobcore.lifecycle import JobState
from jobcore.types.backup import BackupJobSpec
from jobcore.types.migration import MigrationSpec
from jobcore.uri import parse_uri
from jobcore.xml.domain import parse_domain

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
MiB = 1 << 20
TESTS = Path(__file__).parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def guests() -> Iterator[set[int]]:
    """Pids of QEMUs a test left running on purpose: all dead at the end, whatever
    happened (they are not children of the test process)."""
    pids: set[int] = set()
    try:
        yield pids
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            for _ in range(100):
                if not alive(pid):
                    break
                time.sleep(0.02)
        assert not {p for p in pids if alive(p)}, "a QEMU survived the test"


def owner(run_dir: Path, xml: str, job: str, query: str = "", **opts: Any) -> dict[str, Any]:
    """Run an owner child until its job is under way, SIGKILL it; its output line."""
    args = {
        "uri": f"qemu:///session?dir={run_dir}&keep_guests=yes{query}",
        "xml": xml,
        "job": job,
        **opts,
    }
    code = "import qemu_helpers; qemu_helpers.owner_main()"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=TESTS,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
    finally:
        child.kill()
        child.wait()
    assert line, "the owner child ended before its job was under way"
    out: dict[str, Any] = json.loads(line)
    return out


def push_owner(
    run_dir: Path, src: Path, target: Path, pids: set[int], bandwidth: int
) -> dict[str, Any]:
    """An owner of domain vm1 (disk ``src``) killed while its throttled push backup to
    ``target`` copies; its guest's pid joins ``pids``."""
    out = owner(
        run_dir, domain_xml("vm1", {"vda": src}), "push",
        f"&backup_bandwidth={bandwidth}", store=str(target),
    )  # fmt: skip
    pids.add(out["pid"])
    return out


@asynccontextmanager
async def reopen(run_dir: Path, keep: bool = False) -> AsyncIterator[QemuConnection]:
    async with anyio.create_task_group() as tg:
        uri = parse_uri(f"qemu:///session?dir={run_dir}&keep_guests=yes")
        async with QemuDriver().connect(uri, tg) as conn:
            conn.keep_guests = keep
            yield conn
        tg.cancel_scope.cancel()


def driver_job(out: dict[str, Any]) -> tuple[DriverJob, RecordingReporter]:
    spec = pickle.loads(bytes.fromhex(out["spec"]))
    rep = RecordingReporter()
    return DriverJob(spec.uuid, spec.TYPE, "vm1", spec, rep), rep


def disk(tmp_path: Path, data: str = "write -P 0x5a 0 8M") -> Path:
    path = create(tmp_path / "vda.qcow2", "16M")
    write(path, data)
    return path


async def qmp(run_dir: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """A QMP command on vm1's QEMU while no driver holds its socket."""
    client = QMPClient("test")
    await client.connect(str(run_dir / "vm1.0.qmp"))
    try:
        return await client.execute(cmd, args)
    finally:
        await client.disconnect()


async def until_concluded(run_dir: Path) -> None:
    """Wait until vm1's only QEMU job has ended (auto-dismiss off: it stays listed)."""
    for _ in range(400):
        if (await qmp(run_dir, "query-jobs"))[0]["status"] == "concluded":
            return
        await anyio.sleep(0.05)
    raise AssertionError("the QEMU job did not end within 20 s")


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


async def test_in_process_keep_guests_close_leaves_the_guest_and_reopen_adopts_it(
    tmp_path: Path,
) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        async with reopen(run_dir, keep=True) as conn:
            await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src}, memory_mib=64)))
            pid = conn.pid("vm1")
            pids.add(pid)
            before = await conn.lookup_domain("vm1")
        assert alive(pid), "closing a keep-guests connection stopped its guest"
        async with reopen(run_dir) as conn:  # closes stopping the guests
            assert conn.pid("vm1") == pid
            after = await conn.lookup_domain("vm1")
            assert after == before  # name, uuid, memory, chain, size: from QEMU itself
            await conn.guest_io("vm1", "vda", "write -P 0x11 0 1M")  # QMP works again
        assert not alive(pid)


async def test_a_connection_without_keep_guests_still_stops_its_guests(tmp_path: Path) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    async with anyio.create_task_group() as tg:
        uri = parse_uri(f"qemu:///session?dir={run_dir}")
        async with QemuDriver().connect(uri, tg) as conn:
            assert not conn.keep_guests
            await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
            pid = conn.pid("vm1")
        tg.cancel_scope.cancel()
    assert not alive(pid)


async def test_push_backup_survives_a_killed_owner_and_completes(tmp_path: Path) -> None:
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = push_owner(run_dir, src, target, pids, bandwidth=2097152)
        assert alive(out["pid"]), "the guest died with its owner"
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            assert [d.name for d in await conn.list_domains()] == ["vm1"]
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, Reattached) and got.state is JobState.RUNNING, got
            assert 0 < got.processed < got.total
            await conn.set_speed(job, None)  # verbs work on a recovered job
            assert await rep.wait_end() == ("completed", {})
        compare(src, target)
        assert not list(run_dir.glob("*.job-*.json"))


def push_spec(target: Path) -> Any:
    disk = BackupDisk(
        "vda", True, StoreType.FILE, DiskBackupMode.FULL, None,
        store=BackupStore(str(target), "qcow2"),
    )  # fmt: skip
    return BackupJobSpec(BackupDef(mode=BackupMode.PUSH, disks=(disk,)))


async def test_a_job_ended_before_its_end_was_written_is_concluded_with_its_outcome(
    tmp_path: Path,
) -> None:
    """An owner whose runner saw the job end (and dismissed its QEMU job, so QEMU no
    longer says how it ended) dies before the engine has written the end: the next owner
    still concludes it with its real outcome (found by the kill soak: a pivoted commit
    came back failed, "QEMU job … is gone"), the push backup's target kept."""
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        job, rep = driver_job(push_owner(run_dir, src, target, pids, bandwidth=1048576))
        async with reopen(run_dir, keep=True) as conn:  # the owner that dies after the end
            assert isinstance(await conn.recover_job(job, JobState.RUNNING), Reattached)
            await conn.set_speed(job, None)
            assert await rep.wait_end() == ("completed", {})
            assert await conn.qmp("vm1", "query-jobs") == []  # dismissed
        async with reopen(run_dir) as conn:
            got = await conn.recover_job(job, JobState.RUNNING)
            assert got == Concluded(JobState.COMPLETED), got
            assert not list(run_dir.glob("*.job-*.json"))
        compare(src, target)


async def test_a_noted_outcome_nobody_asks_for_goes_at_the_first_start(tmp_path: Path) -> None:
    """A keep-guests owner keeps an ended job's record, with its outcome, after the job
    ends; the next owner's first start removes it when no recover_job read it (the engine
    had written the end)."""
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        job, rep = driver_job(push_owner(run_dir, src, tmp_path / "t.qcow2", pids, 1048576))
        async with reopen(run_dir, keep=True) as conn:
            assert isinstance(await conn.recover_job(job, JobState.RUNNING), Reattached)
            await conn.set_speed(job, None)
            assert await rep.wait_end() == ("completed", {})
        (record,) = run_dir.glob("*.job-*.json")
        assert json.loads(record.read_text())["ended"]["outcome"] == "completed"
        async with reopen(run_dir) as conn:
            again, rep = await make_job(conn, "vm1", push_spec(tmp_path / "again.qcow2"))
            await conn.start(again)
            assert not record.exists()
            assert (await rep.wait_end())[0] == "completed"


async def test_a_commit_pivoted_before_its_end_was_written_is_concluded(tmp_path: Path) -> None:
    base = disk(tmp_path, "write -P 0x11 0 4M")
    top = create(tmp_path / "top.qcow2", "16M", backing=base)
    write(top, "write -P 0x22 1M 2M")
    ref = tmp_path / "ref.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(top), str(ref))
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(run_dir, domain_xml("vm1", {"vda": top}), "commit", wait="ready")
        pids.add(out["pid"])
        job, rep = driver_job(out)
        async with reopen(run_dir, keep=True) as conn:
            assert isinstance(await conn.recover_job(job, JobState.READY), Reattached)
            await conn.complete(job)
            assert (await rep.wait_end())[0] == "completed"
        async with reopen(run_dir) as conn:
            assert (await conn.lookup_domain("vm1")).disks[0].chain == (str(base),)
            got = await conn.recover_job(job, JobState.COMPLETING)
            assert got == Concluded(JobState.COMPLETED), got
            await conn.flush("vm1")
        compare(base, ref)


async def test_job_that_ended_while_nobody_watched_is_concluded(tmp_path: Path) -> None:
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = push_owner(run_dir, src, target, pids, bandwidth=1048576)
        job, rep = driver_job(out)
        qemu_id = f"backup-{job.uuid.hex}-vda"
        await qmp(run_dir, "block-job-set-speed", {"device": qemu_id, "speed": 0})
        await until_concluded(run_dir)
        async with reopen(run_dir) as conn:
            got = await conn.recover_job(job, JobState.RUNNING)
            assert got == Concluded(JobState.COMPLETED), got
            assert await conn.qmp("vm1", "query-jobs") == []  # read, then dismissed
            files = {n["file"] for n in await conn.qmp("vm1", "query-named-block-nodes")}
            assert str(target) not in files  # the target is closed
        compare(src, target)
        assert rep.events == []  # the outcome is the return value, not a report


@pytest.mark.parametrize("command", ["O_EXCL", "qemu-img", "blockdev-add", "transaction"])
async def test_an_owner_killed_inside_start_leaves_nothing_behind(
    tmp_path: Path, command: str
) -> None:
    """An owner killed while it starts a push backup (the kill soak's in-flight JobBegin):
    its record says QEMU never started the job, so the next owner's recovery removes the
    target it created and its node and answers NotStarted; the job then starts afresh."""
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(
            run_dir, domain_xml("vm1", {"vda": src}), "push", store=str(target), die_at=command
        )
        pids.add(out["pid"])
        job, rep = driver_job(out)
        assert target.exists()  # created before it died
        async with reopen(run_dir) as conn:
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, NotStarted), got
            files = {n["file"] for n in await conn.qmp("vm1", "query-named-block-nodes")}
            assert str(target) not in files
            assert await conn.qmp("vm1", "query-jobs") == []
            assert not target.exists(), "the target the dying owner created was left behind"
            assert not list(run_dir.glob("*.job-*.json"))
            await conn.start(job)  # as the engine does for NotStarted
            assert await rep.wait_end() == ("completed", {})
        compare(src, target)


async def test_killed_qemu_gives_vanished_and_its_target_is_removed(tmp_path: Path) -> None:
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = push_owner(run_dir, src, target, pids, bandwidth=1048576)
        os.kill(out["pid"], signal.SIGKILL)
        job, _ = driver_job(out)
        async with reopen(run_dir) as conn:
            assert await conn.list_domains() == []
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, Vanished) and "domain 'vm1'" in got.reason, got
        assert not target.exists(), "the target the job created was left behind"
        assert not list(run_dir.glob("*.job-*.json"))


async def test_pull_backup_export_serves_across_the_restart(tmp_path: Path) -> None:
    src = disk(tmp_path)
    scratch = tmp_path / "scratch.qcow2"
    sock = tmp_path / "nbd.sock"
    run_dir = tmp_path / "run"
    nbd = f"nbd+unix:///vda?socket={sock}"
    with guests() as pids:
        out = owner(
            run_dir, domain_xml("vm1", {"vda": src}), "pull",
            store=str(scratch), socket=str(sock), wait="ready",
        )  # fmt: skip
        pids.add(out["pid"])
        compare(nbd, src)  # nobody owns the guest: the export serves on
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            got = await conn.recover_job(job, JobState.READY)
            assert isinstance(got, Reattached) and got.state is JobState.READY, got
            compare(nbd, src)
            await conn.complete(job)
            assert await rep.wait_end() == ("completed", {})
            assert "ready" not in rep.kinds  # already ready: not reported twice
        assert not sock.exists() and not scratch.exists()


async def test_active_commit_ready_before_the_restart_pivots_after_it(tmp_path: Path) -> None:
    base = disk(tmp_path, "write -P 0x11 0 4M")
    top = create(tmp_path / "top.qcow2", "16M", backing=base)
    write(top, "write -P 0x22 1M 2M")
    ref = tmp_path / "ref.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(top), str(ref))
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(run_dir, domain_xml("vm1", {"vda": top}), "commit", wait="ready")
        pids.add(out["pid"])
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            info = await conn.lookup_domain("vm1")
            assert info.disks[0].chain == (str(top), str(base))
            got = await conn.recover_job(job, JobState.READY)
            assert isinstance(got, Reattached) and got.state is JobState.READY, got
            await conn.complete(job)
            assert (await rep.wait_end())[0] == "completed"
            info = await conn.lookup_domain("vm1")
            assert info.disks[0].chain == (str(base),)
            await conn.flush("vm1")
        compare(base, ref)


async def test_intermediate_commit_that_ended_unwatched_updates_the_chain(tmp_path: Path) -> None:
    base = disk(tmp_path, "write -P 0x11 0 4M")
    mid = create(tmp_path / "mid.qcow2", "16M", backing=base)
    write(mid, "write -P 0x22 0 8M")
    top = create(tmp_path / "top.qcow2", "16M", backing=mid)
    write(top, "write -P 0x33 6M 1M")
    ref = tmp_path / "ref.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(top), str(ref))
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(run_dir, domain_xml("vm1", {"vda": top}), "commit", top=1, bandwidth=1 << 20)
        pids.add(out["pid"])
        job, _ = driver_job(out)
        qemu_id = f"commit-{job.uuid.hex}-vda"
        await qmp(run_dir, "block-job-set-speed", {"device": qemu_id, "speed": 0})
        await until_concluded(run_dir)
        async with reopen(run_dir) as conn:
            # QEMU's graph already has top over base; mid's node is still there
            assert (await conn.lookup_domain("vm1")).disks[0].chain == (str(top), str(base))
            got = await conn.recover_job(job, JobState.RUNNING)
            assert got == Concluded(JobState.COMPLETED), got
            files = {n["file"] for n in await conn.qmp("vm1", "query-named-block-nodes")}
            assert str(mid) not in files  # the committed layer's node is deleted
            await conn.flush("vm1")
            compare(top, ref)  # the guest's view did not change
        compare(top, ref)


async def test_keep_guests_adopts_proven_qemus_and_never_kills_others(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    orphan = start_orphan_qemu(run_dir)  # a QEMU the driver started: proof holds
    other = sleeper()  # not a QEMU: its pid file is just stale
    (run_dir / "vm2.0.pid").write_text(f"{other.pid}\n")
    try:
        async with reopen(run_dir) as conn:
            assert [d.name for d in await conn.list_domains()] == ["old"]
            assert conn.pid("old") == orphan.pid
            assert other.poll() is None and not (run_dir / "vm2.0.pid").exists()
        assert ended_by(orphan) == 0  # the adopted one stopped as this connection's own
        assert other.poll() is None  # never killed
    finally:
        other.kill()
        other.wait()
        ended_by(orphan)


async def test_a_migration_from_a_former_destination_recovers(tmp_path: Path) -> None:
    """Killed while it migrates from generation 9 to 10 (its source was itself a
    migration's destination, so both command lines say ``-incoming``): the next owner still
    takes the older process for the source (the kill soak's 10th migration came back
    "the destination did not start": survivors were taken in the order of their names,
    where vm1.10 comes before vm1.9)."""
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(
            run_dir, domain_xml("vm1", {"vda": src}, memory_mib=32), "migrate",
            destination=f"qemu:///session?dir={run_dir}", migrations_before=9,
        )  # fmt: skip
        pids.add(out["pid"])
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            assert conn.pid("vm1") == out["pid"]  # the source, vm1.9
            pids.add(conn.incoming["vm1"].pid)
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, Reattached) and got.state is JobState.RUNNING, got
            await conn.set_speed(job, None)
            assert (await rep.wait_end())[0] == "completed"
            assert (await conn.qmp("vm1", "query-status"))["status"] == "running"
            assert not alive(out["pid"])


async def test_migration_under_way_at_the_kill_completes_after_recovery(tmp_path: Path) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        out = owner(
            run_dir, domain_xml("vm1", {"vda": src}, memory_mib=64), "migrate",
            destination=f"qemu:///session?dir={run_dir}",
        )  # fmt: skip
        pids.add(out["pid"])
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            assert set(conn.incoming) == {"vm1"}  # the -incoming destination, re-adopted
            pids.add(conn.incoming["vm1"].pid)
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, Reattached) and got.state is JobState.RUNNING, got
            await conn.set_speed(job, None)
            kind, extra = await rep.wait_end()
            assert kind == "completed" and extra["memory_total"] >= 32 * MiB, extra
            assert conn.pid("vm1") != out["pid"] and not alive(out["pid"])
            assert (await conn.qmp("vm1", "query-status"))["status"] == "running"
            await conn.guest_io("vm1", "vda", "write -P 0x44 0 1M")  # the disks came along
            # and it migrates again: the next QEMU is not named after the running one (the
            # kill soak found "Cannot lock pid file": the re-adopted domain kept the
            # source's generation)
            pids.add(conn.pid("vm1"))
            again, rep = await make_job(
                conn, "vm1", MigrationSpec(f"qemu:///session?dir={run_dir}")
            )
            await conn.start(again)
            assert (await rep.wait_end())[0] == "completed"


async def test_job_record_is_written_off_the_loop_and_on_disk_before_start_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's write and fsync run on a worker thread: the write below runs a call
    on the event loop and waits for it (``anyio.from_thread``), which only a worker thread
    of that loop can do (on the loop's own thread it raises and the start fails); and
    ``start`` returns only once the record is on disk."""
    loop_ran: list[bool] = []
    real_write = rundir.write_record

    def write_record(path: Path, data: dict[str, Any]) -> None:
        anyio.from_thread.run_sync(loop_ran.append, True)
        real_write(path, data)

    monkeypatch.setattr(qconn, "write_record", write_record)
    src = disk(tmp_path)
    target = tmp_path / "backup.qcow2"
    run_dir = tmp_path / "run"
    with guests() as pids:
        async with reopen(run_dir) as conn:
            conn.keep_guests = True  # records are kept in keep-guests mode only
            await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
            pids.add(conn.pid("vm1"))
            bd = BackupDisk(
                "vda", True, StoreType.FILE, DiskBackupMode.FULL, None,
                store=BackupStore(str(target), "qcow2"),
            )  # fmt: skip
            job, rep = await make_job(conn, "vm1", BackupJobSpec(BackupDef(disks=(bd,))))
            await conn.start(job)
            record = run_dir / f"vm1.job-{job.uuid.hex}.json"
            assert json.loads(record.read_text())  # on disk once start returned
            # every write of the start (before the name claim, once claimed, before QEMU's
            # transaction, after the start) ran on a worker thread
            assert len(loop_ran) >= 3, loop_ran
            assert (await rep.wait_end())[0] == "completed"
            conn.keep_guests = False
        # the record outlives the job, holding its noted outcome, until the next owner's
        # first start (the engine may not have written the end)
        assert json.loads(record.read_text())["ended"]["outcome"] == "completed"


def migrate_owner(run_dir: Path, src: Path, pids: set[int]) -> tuple[dict[str, Any], int]:
    """An owner of vm1 killed while vm1 migrates (16 KiB/s) into a destination QEMU in
    the same run dir; the source's and the destination's pids join ``pids``."""
    out = owner(
        run_dir, domain_xml("vm1", {"vda": src}, memory_mib=64), "migrate",
        destination=f"qemu:///session?dir={run_dir}",
    )  # fmt: skip
    pids.add(out["pid"])
    dest = int((run_dir / "vm1.1.pid").read_text())
    pids.add(dest)
    return out, dest


async def until_migration(run_dir: Path, *statuses: str) -> dict[str, Any]:
    """Wait until the source's migration reaches one of ``statuses`` (no driver runs)."""
    for _ in range(600):
        info: dict[str, Any] = await qmp(run_dir, "query-migrate")
        if info.get("status") in statuses:
            return info
        await anyio.sleep(0.05)
    raise AssertionError(f"the migration did not reach {statuses} within 30 s")


async def test_migration_that_completed_while_nobody_watched_is_concluded(
    tmp_path: Path,
) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        out, dest = migrate_owner(run_dir, src, pids)
        await qmp(run_dir, "migrate-set-parameters", {"max-bandwidth": 1 << 30})
        await until_migration(run_dir, "completed")
        job, rep = driver_job(out)
        async with reopen(run_dir) as conn:
            assert conn.incoming["vm1"].pid == dest
            got = await conn.recover_job(job, JobState.RUNNING)
            assert isinstance(got, Concluded) and got.state is JobState.COMPLETED, got
            assert got.extra is not None and int(got.extra["memory_total"]) >= 32 * MiB
            assert conn.pid("vm1") == dest and not alive(out["pid"])  # the source quit
            assert (await conn.qmp("vm1", "query-status"))["status"] == "running"
            await conn.guest_io("vm1", "vda", "write -P 0x44 0 1M")  # the disks came along
            assert rep.kinds == ["domain_moved"]
        assert not list(run_dir.glob("*.job-*.json"))


async def test_migration_that_failed_while_nobody_watched_fails_with_qemus_reason(
    tmp_path: Path,
) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        out, dest = migrate_owner(run_dir, src, pids)
        os.kill(dest, signal.SIGKILL)  # the destination dies: the source's migration fails
        info = await until_migration(run_dir, "failed")
        job, _ = driver_job(out)
        async with reopen(run_dir) as conn:
            assert "vm1" not in conn.incoming
            got = await conn.recover_job(job, JobState.RUNNING)
            assert got == Concluded(JobState.FAILED, info["error-desc"]), got
            assert conn.pid("vm1") == out["pid"]  # the guest stays on the source
            assert (await conn.qmp("vm1", "query-status"))["status"] == "running"


async def test_migration_cancelled_while_nobody_watched_is_cancelled(tmp_path: Path) -> None:
    src = disk(tmp_path)
    run_dir = tmp_path / "run"
    with guests() as pids:
        out, dest = migrate_owner(run_dir, src, pids)
        await qmp(run_dir, "migrate_cancel")
        await until_migration(run_dir, "cancelled")
        job, _ = driver_job(out)
        async with reopen(run_dir) as conn:
            got = await conn.recover_job(job, JobState.RUNNING)
            assert got == Concluded(JobState.CANCELLED), got
            assert conn.pid("vm1") == out["pid"] and not alive(dest)  # destination stopped
            assert (await conn.qmp("vm1", "query-status"))["status"] == "running"


def test_a_record_whose_writer_died_before_the_rename_is_read(tmp_path: Path) -> None:
    """A writer killed during write_record's fsync left the whole record under the
    temporary name (the kill soak's in-flight begins met it): it is the record."""
    path = job_record(tmp_path, "vm1", uuid.uuid4())
    write_record(path, {"disks": []})
    path.rename(path.with_name(f".{path.name}.tmp"))  # as the rename had not happened
    assert read_record(path) == {"disks": []}
    assert path.exists()
    path.with_name(f".{path.name}.tmp").write_text('{"disks": [')  # a torn write: none
    path.unlink()
    assert read_record(path) is None
