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
    run,
    start_orphan_qemu,
    write,
)

from drivers.qemu import QemuConnection, QemuDriver
from jobcore.driver import Concluded, DriverJob, Reattached, Vanished
from jobcore.lifecycle import JobState
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
