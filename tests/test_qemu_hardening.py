"""Hardening of the qemu driver (issue 8): its run directory, its processes, its errors.

- stale-file cleanup touches only files of the driver's own naming and kills only QEMU
  processes the driver can prove it started (item 4);
- the run directory must be private (item 5);
- QEMU is spawned without ``preexec_fn``, and a bad parameter never leaks the run
  directory's lock (item 22);
- a corrupt qcow2 and a locked image give errors naming the file and what to do (item 28).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from qemu_helpers import (
    alive,
    corrupt_first_cluster,
    create,
    domain_xml,
    ended_by,
    kill_and_reap,
    make_job,
    mark_driver_owned,
    qemu_children,
    start_orphan_qemu,
    write,
)

import jobcore
from drivers.qemu import QemuConnection, QemuDriver
from drivers.qemu.rundir import LOCK
from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    BackupStore,
    DiskBackupMode,
    StoreType,
)
from jobcore.errors import DriverError, InvalidArgument, Unsupported
from jobcore.types.backup import BackupJobSpec
from jobcore.uri import parse_uri
from jobcore.xml.domain import parse_domain

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
OTHER_UID = 12345


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def session(run_dir: Path, query: str = "") -> AsyncIterator[QemuConnection]:
    """A driver connection on ``run_dir``; afterwards no QEMU child of ours may survive."""
    before = qemu_children()
    try:
        async with anyio.create_task_group() as tg:
            uri = parse_uri(f"qemu:///session?dir={run_dir}{query}")
            async with QemuDriver().connect(uri, tg) as conn:
                yield conn
            tg.cancel_scope.cancel()
    finally:
        leaked = qemu_children() - before
        kill_and_reap(leaked)
        assert not leaked, f"QEMU processes survived the test: {leaked}"


async def open_fails(run_dir: Path, query: str = "") -> str:
    async with anyio.create_task_group() as tg:
        try:
            async with QemuDriver().connect(parse_uri(f"qemu:///session?dir={run_dir}{query}"), tg):
                pass
        except (DriverError, Unsupported, InvalidArgument) as exc:
            return str(exc)
    raise AssertionError(f"opening qemu:///session?dir={run_dir}{query} succeeded")


def unix_socket_file(path: Path) -> None:
    """Leave a socket file at ``path``, as a process that died would."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def spawn(*argv: str) -> subprocess.Popen[bytes]:
    """Start a process of the test's own (sync helper: starting it does not block)."""
    return subprocess.Popen(argv)


def push_spec(disk: str, target: Path) -> BackupJobSpec:
    store = BackupStore(str(target), "qcow2")
    d = BackupDisk(disk, True, StoreType.FILE, DiskBackupMode.FULL, None, store=store)
    return BackupJobSpec(BackupDef(mode=BackupMode.PUSH, incremental=None, disks=(d,)), None)


# ============================================================ item 4: stale files


async def test_cleanup_removes_only_the_drivers_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    mark_driver_owned(run)  # a driver owned it before
    sleeper = spawn("sleep", "1000")
    try:
        # other programs' files: a jobd sharing the directory, a user's notes and socket
        unix_socket_file(run / "jobd.sock")
        (run / "jobd.pid").write_text(f"{sleeper.pid}\n")
        (run / "notes.txt").write_text("mine")
        unix_socket_file(run / "something.sock")
        # the driver's own leftovers: stale sockets of each kind and a pid file whose
        # pid now belongs to an unrelated process
        stale = [run / "old.3.qmp", run / "vm1.2.mig.sock", run / "vm1.backup-1a2b3c4d.sock"]
        for path in stale:
            unix_socket_file(path)
        (run / "vm1.0.pid").write_text(f"{sleeper.pid}\n")
        # a regular file that merely looks like one of the driver's socket names
        (run / "keep.0.qmp").write_text("not a socket")
        async with session(run):
            for path in stale:
                assert not path.exists(), path
            assert not (run / "vm1.0.pid").exists()
            for kept in ("jobd.sock", "jobd.pid", "notes.txt", "something.sock", "keep.0.qmp"):
                assert (run / kept).exists(), kept
            assert (run / "notes.txt").read_text() == "mine"
            await anyio.sleep(0.3)  # a SIGKILL sent at open would have landed by now
            assert sleeper.poll() is None, "an unrelated process named by a pid file was killed"
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_a_directory_no_driver_owned_is_not_cleaned(tmp_path: Path) -> None:
    """No marked lock file: no driver ever owned it, so files of the driver's naming in it
    belong to someone else (``?dir=`` pointed at a directory of theirs)."""
    run = tmp_path / "theirs"
    run.mkdir(mode=0o700)
    unix_socket_file(run / "app.1.qmp")
    (run / "svc.1.pid").write_text("999999999\n")
    async with session(run):
        assert (run / "app.1.qmp").exists() and (run / "svc.1.pid").exists()
    async with session(run):  # now it has been ours: the same names count as ours
        assert not (run / "app.1.qmp").exists() and not (run / "svc.1.pid").exists()


async def test_cleanup_kills_only_qemu_it_can_prove_it_started(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    orphan = start_orphan_qemu(run)  # as the driver starts them: -name old, old.0.*
    # a user's own QEMU that mentions the run directory, named by a stale pid file (its
    # pid was reused): not started by the driver, so it must live
    theirs = spawn(
        "qemu-system-x86_64", "-name", "users-vm", "-machine", "none", "-nodefaults",
        "-display", "none", "-chardev", f"file,id=c0,path={run}/console.txt",
    )  # fmt: skip
    try:
        (run / "stale.0.pid").write_text(f"{theirs.pid}\n")
        deadline = time.monotonic() + 10
        while not (run / "console.txt").exists():
            assert time.monotonic() < deadline and theirs.poll() is None
            await anyio.sleep(0.02)
        async with session(run):
            assert not (run / "old.0.pid").exists() and not (run / "stale.0.pid").exists()
            await anyio.sleep(0.3)  # a SIGKILL sent at open would have landed by now
            assert alive(theirs.pid), "a QEMU the driver did not start was killed"
    finally:
        orphan_status = ended_by(orphan)
        theirs.kill()
        theirs.wait()
    assert orphan_status == -signal.SIGKILL


async def test_every_socket_the_driver_makes_is_one_cleanup_knows(tmp_path: Path) -> None:
    """Names are built in one place: a pull backup's default NBD socket and the QMP sockets
    are all recognised, so a crash cannot leave sockets cleanup would keep."""
    from drivers.qemu.rundir import is_driver_socket

    src = create(tmp_path / "src.qcow2")
    run = tmp_path / "run"
    async with session(run) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        scratch = tmp_path / "scratch.qcow2"
        store = BackupStore(str(scratch), "qcow2")
        disk = BackupDisk("vda", True, StoreType.FILE, DiskBackupMode.FULL, None, store=store)
        spec = BackupJobSpec(BackupDef(mode=BackupMode.PULL, incremental=None, disks=(disk,)))
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        await rep.wait_for("ready")
        sockets = [p.name for p in run.iterdir() if p.is_socket()]
        assert any(".backup-" in name for name in sockets), sockets
        assert all(is_driver_socket(name) for name in sockets), sockets
        await conn.cancel(job)
        await rep.wait_end()


# ======================================================= item 5: private run dir


async def test_unsafe_run_directories_are_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    msg = await open_fails(open_dir)
    assert "writable by group and others" in msg and f"chmod 700 {open_dir}" in msg
    assert not (open_dir / LOCK).exists()

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    msg = await open_fails(tmp_path / "link")
    assert "symbolic link" in msg
    assert not (real / LOCK).exists()

    if os.getuid() == 0:  # CI runs as root: a directory made by "another user"
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, OTHER_UID, OTHER_UID)
        msg = await open_fails(theirs)
        assert f"owned by uid {OTHER_UID}, not by you" in msg

    # a missing one is created private
    async with session(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run").stat().st_mode & 0o777 == 0o700


async def test_tmp_fallback_pre_created_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fallback = tmp_path / f"jobcore-qemu-{os.getuid()}"
    fallback.mkdir()
    fallback.chmod(0o777)
    async with anyio.create_task_group() as tg:
        with pytest.raises(DriverError, match=f"{fallback} is writable by group and others"):
            async with QemuDriver().connect(parse_uri("qemu:///session"), tg):
                pass


# ===================================================== item 22: spawn, lock leak


async def test_qemu_is_spawned_without_preexec_fn_in_its_own_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real = asyncio.create_subprocess_exec

    async def spy(*argv: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        calls.append(kwargs)
        return await real(*argv, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    src = create(tmp_path / "src.qcow2")
    async with session(tmp_path / "run") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        pid = conn.pid("vm1")
        assert os.getsid(pid) == pid  # a session of its own: a terminal's ^C is not its
        assert os.getpgid(pid) != os.getpgid(0)
    assert calls and all(kw.get("preexec_fn") is None for kw in calls), calls


async def test_bad_parameter_does_not_leak_the_run_dir_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    msg = await open_fails(run, "&backup_bandwidth=fast")
    assert "backup_bandwidth" in msg
    async with session(run, "&backup_bandwidth=1048576") as conn:  # before: "in use"
        assert conn.backup_bandwidth == 1048576


# ================================================ item 28: errors naming the file


async def test_random_bytes_named_qcow2_is_not_a_valid_qcow2(tmp_path: Path) -> None:
    bogus = tmp_path / "random.qcow2"
    bogus.write_bytes(os.urandom(1 << 20))
    conn = await anyio.to_thread.run_sync(jobcore.open, f"qemu:///session?dir={tmp_path / 'run'}")
    try:
        with pytest.raises(DriverError) as err:
            await anyio.to_thread.run_sync(conn.createXML, domain_xml("vm1", {"vda": bogus}))
    finally:
        await anyio.to_thread.run_sync(conn.close)
    msg = str(err.value)
    assert f"image '{bogus}' is not a valid qcow2 image" in msg
    assert f"qemu-img check -f qcow2 {bogus}" in msg


async def test_missing_backing_file_is_named_as_such(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    top = create(tmp_path / "top.qcow2", backing=base)
    base.unlink()
    async with session(tmp_path / "run") as conn:
        with pytest.raises(DriverError) as err:
            await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top})))
    msg = str(err.value)
    assert f"the backing chain of image '{top}' cannot be opened" in msg
    assert str(base) in msg and "No such file" in msg


async def test_corrupt_qcow2_found_during_a_job_is_named(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x42 0 8M")
    corrupt_first_cluster(src)
    async with session(tmp_path / "run") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src})))
        job, rep = await make_job(conn, "vm1", push_spec("vda", tmp_path / "t.qcow2"))
        await conn.start(job)
        kind, msg = await rep.wait_end()
        assert kind == "failed"
        # QEMU says only "No medium found" (it took the flagged node offline)
        assert f"image '{src}' is not a valid qcow2 image" in msg, msg
        assert f"qemu-img check {src}" in msg and "No medium found" in msg
    # QEMU flagged it corrupt in its header: the next open is refused, and says why
    async with session(tmp_path / "run") as conn:
        with pytest.raises(DriverError) as err:
            await conn.create_domain(parse_domain(domain_xml("vm2", {"vda": src})))
        assert f"image '{src}' is not a valid qcow2 image" in str(err.value)
        assert "Image is corrupt" in str(err.value)


async def test_image_locked_by_another_process_is_named(tmp_path: Path) -> None:
    shared = create(tmp_path / "shared.qcow2")
    other = create(tmp_path / "other.qcow2")
    async with session(tmp_path / "run") as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": shared})))
        with pytest.raises(DriverError) as err:  # a second QEMU process wants it too
            await conn.create_domain(parse_domain(domain_xml("vm2", {"vdb": other, "vda": shared})))
        msg = str(err.value)
        assert f"image '{shared}' is in use by another process" in msg
        assert 'Failed to get "write" lock' in msg
        # held by something else than a domain: qemu-nbd serving it
        nbd = spawn("qemu-nbd", "-k", str(tmp_path / "nbd.sock"), "-f", "qcow2", str(other))
        try:
            deadline = time.monotonic() + 10
            while not (tmp_path / "nbd.sock").exists():
                assert time.monotonic() < deadline and nbd.poll() is None
                await anyio.sleep(0.02)
            with pytest.raises(DriverError, match=f"image '{other}' is in use by another"):
                await conn.create_domain(parse_domain(domain_xml("vm3", {"vda": other})))
        finally:
            nbd.kill()
            nbd.wait()
