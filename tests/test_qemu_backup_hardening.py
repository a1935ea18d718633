"""Pull backups and backup claims under attack (issue 8 follow-up, red-team findings).

- H1/H2: a pull backup's NBD socket never replaces a file: an existing path is refused (not
  even REUSE_EXTERNAL reuses it), the driver binds the socket itself (QEMU, given a path,
  unlinks whatever is there), removes only the socket it created, refuses paths inside run
  directories, and claims the socket so two jobs cannot share it;
- H3: QEMU job ids carry the whole job UUID: UUIDs sharing a prefix cannot steal each
  other's QEMU jobs;
- H4: a refused pull backup never removes a bitmap it did not create;
- H7: TLS and non-loopback NBD servers are refused at begin, before anything starts;
- M1: a dangling symlink as push target is never written through;
- M6: claims (and the prepared spec) use one spelling per file.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from jobd_helpers import Jobd, jobctl
from jobd_helpers import write as write_file
from qemu_helpers import create, domain_xml, free_port, make_job, write

import jobcore
from drivers.qemu import QemuConnection
from drivers.qemu.process import SubJob
from drivers.qemu.runners.backup import BackupRunner
from jobcore import JOB_BEGIN_QUEUE, VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, JobState
from jobcore.api import Domain, Job
from jobcore.backup import BackupDef, BackupDisk
from jobcore.cli import ExitCode
from jobcore.errors import DriverError, InvalidArgument, JobConflict, Unsupported
from jobcore.local import as_local
from jobcore.types.backup import BackupJobSpec, backup_claims
from jobcore.xml import parse_job

REUSE = VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
MiB = 1 << 20


def pull(disk: str, scratch: Path | str, sock: Path | str, extra: str = "") -> str:
    return (
        "<job type='backup'><domainbackup mode='pull'>"
        f"{extra}<server transport='unix' socket='{sock}'/><disks><disk name='{disk}' "
        f"type='file'><scratch file='{scratch}'/></disk></disks></domainbackup></job>"
    )


def push(disk: str, target: Path | str, extra: str = "", job_uuid: str = "") -> str:
    uid = f"<uuid>{job_uuid}</uuid>" if job_uuid else ""
    return (
        f"<job type='backup'>{uid}<domainbackup>{extra}<disks><disk name='{disk}' "
        f"type='file'><target file='{target}'/></disk></disks></domainbackup></job>"
    )


def nbd_read(sock: Path, export: str = "vda") -> str:
    """The first 16 bytes of the export, as qemu-io dumps them."""
    res = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", "-c", "read -v 0 16", f"nbd+unix:///{export}?socket={sock}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (res.stdout + res.stderr).splitlines()[0]


def lexists(path: Path | str) -> bool:
    return os.path.lexists(path)


async def wait_state(job: Job, state: JobState) -> None:
    with job.events() as events, anyio.fail_after(30):
        if (await job.info()).state is state:
            return
        async for ev in events:
            if ev.state is state:
                return


def snapshot(path: Path) -> tuple[int, int, bytes]:
    st = os.lstat(path)
    return st.st_ino, st.st_mode, path.read_bytes() if path.is_file() else b""


@asynccontextmanager
async def qemu(tmp_path: Path, query: str = "") -> AsyncIterator[jobcore.api.Connection]:
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}{query}") as conn:
        yield conn


async def domain(conn: jobcore.api.Connection, tmp_path: Path, name: str, pattern: str) -> Domain:
    image = create(tmp_path / f"{name}.qcow2")
    write(image, f"write -P {pattern} 0 1M")
    return await conn.create_domain(domain_xml(name, {"vda": image}))


def driver_of(conn: jobcore.api.Connection) -> QemuConnection:
    dconn = as_local(conn).engine.dconn
    assert isinstance(dconn, QemuConnection)
    return dconn


# ================================================================= H1: socket path


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pull_socket_over_an_existing_file_is_refused_and_the_file_kept(
    tmp_path: Path, anyio_backend: str
) -> None:
    image = create(tmp_path / "victim.qcow2")
    text = tmp_path / "victim.txt"
    text.write_text("precious\n")
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "nowhere")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    victims = (image, text, dangling, stale)
    before = {p: snapshot(p) for p in victims}
    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        for victim in victims:
            for flags in (0, REUSE):  # a socket is not a reusable file
                with pytest.raises(InvalidArgument) as err:
                    await dom.job_begin(pull("vda", tmp_path / "s.qcow2", victim), flags)
                assert f"NBD socket '{victim}' of the pull backup exists" in str(err.value)
        assert await dom.list_jobs() == []  # refused at begin: no job, no claim
        assert not (tmp_path / "s.qcow2").exists()
    assert {p: snapshot(p) for p in victims} == before


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pull_removes_only_the_socket_it_created(tmp_path: Path, anyio_backend: str) -> None:
    """The socket is replaced by a regular file while the job runs (as whoever can write
    the directory could): ending the job leaves that file alone."""
    sock = tmp_path / "nbd.sock"
    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        job = await dom.job_begin(pull("vda", tmp_path / "s.qcow2", sock))
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert "41 41 41 41" in await anyio.to_thread.run_sync(nbd_read, sock)
        sock.unlink()
        sock.write_text("not the job's\n")
        await job.abort()
        assert (await job.wait(30)).state is JobState.COMPLETED
        assert sock.read_text() == "not the job's\n"
        # and the normal case: the job's own socket goes with the job
        sock2 = tmp_path / "nbd2.sock"
        job = await dom.job_begin(pull("vda", tmp_path / "s2.qcow2", sock2))
        assert stat.S_ISSOCK(os.lstat(sock2).st_mode)
        await job.abort()
        await job.wait(30)
        assert not lexists(sock2)


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_refused_second_server_leaves_no_socket_and_keeps_the_first(
    tmp_path: Path, anyio_backend: str
) -> None:
    """QEMU runs one NBD server: a second pull backup of the domain fails in
    nbd-server-start; it removes only its own socket, the first keeps serving."""
    first, second = tmp_path / "one.sock", tmp_path / "two.sock"
    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        job = await dom.job_begin(pull("vda", tmp_path / "s1.qcow2", first))
        with pytest.raises(DriverError, match="NBD server already running"):
            await dom.job_begin(pull("vda", tmp_path / "s2.qcow2", second))
        assert not lexists(second)
        assert not (tmp_path / "s2.qcow2").exists()
        assert "41 41 41 41" in await anyio.to_thread.run_sync(nbd_read, first)
        await job.abort()
        assert (await job.wait(30)).state is JobState.COMPLETED


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pull_socket_inside_a_run_directory_is_refused(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Its own run directory, and any a jobd (or another connection) of the process holds."""
    other_run = tmp_path / "jobd-run"
    other_run.mkdir(mode=0o700)
    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        run = (tmp_path / "run").resolve()
        for sock in (run / "x.sock", run / "vm1.backup-00000000.sock"):
            with pytest.raises(InvalidArgument, match="inside the run directory"):
                await dom.job_begin(pull("vda", tmp_path / "s.qcow2", sock))
            assert not lexists(sock)
        # target and scratch files neither
        with pytest.raises(InvalidArgument, match="inside the run directory"):
            await dom.job_begin(push("vda", run / "vm1.0.pid"))
        from jobcore.rundir import reserve_dir, unreserve_dir

        reserve_dir(other_run)  # as jobd does with its run directory
        try:
            with pytest.raises(InvalidArgument, match=f"inside the run directory '{other_run}'"):
                await dom.job_begin(pull("vda", tmp_path / "s.qcow2", other_run / "a.sock"))
        finally:
            unreserve_dir(other_run)
        assert await dom.list_jobs() == []


@pytest.mark.qemu
def test_jobd_refuses_a_pull_socket_over_its_own_sockets(tmp_path: Path) -> None:
    """p30: through jobd, a pull backup whose socket is jobd.sock (or any name in jobd's run
    directory) is refused, and jobd stays reachable."""
    qemu_dir = tmp_path / "qemu"
    daemon = Jobd(tmp_path / "run", "--allow-uri", f"qemu:///session?dir={qemu_dir}").wait_ready()
    try:
        uri = f"qemu+unix:///session?socket={daemon.sock}&dir={qemu_dir}"
        disk = create(tmp_path / "vda.qcow2")
        made = jobctl(
            uri, "domain", "create", write_file(tmp_path, "d.xml", domain_xml("A", {"vda": disk}))
        )
        assert made.returncode == 0, made.stderr
        run = daemon.run_dir.resolve()
        for sock in (run / "jobd.sock", run / "new.sock"):
            job = write_file(tmp_path, "j.xml", pull("vda", tmp_path / "s.qcow2", sock))
            begun = jobctl(uri, "begin", "A", job)
            assert begun.returncode == ExitCode.ERROR, (begun.stdout, begun.stderr)
            assert "inside the run directory" in begun.stderr and str(sock) in begun.stderr
            assert not (run / "new.sock").exists()
        assert stat.S_ISSOCK(os.lstat(daemon.sock).st_mode)
        listed = jobctl(uri, "domains", "--json")
        assert listed.returncode == 0 and '"A"' in listed.stdout
        jobctl(uri, "domain", "destroy", "A", timeout=60)
    finally:
        daemon.stop()


# ============================================================ H2: one socket, one job


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_pull_backups_cannot_share_a_socket(tmp_path: Path, anyio_backend: str) -> None:
    sock = tmp_path / "backup.sock"
    async with qemu(tmp_path) as conn:
        a = await domain(conn, tmp_path, "A", "0x41")
        b = await domain(conn, tmp_path, "B", "0x42")
        job_a = await a.job_begin(pull("vda", tmp_path / "a.scratch", sock))
        assert "41 41 41 41" in await anyio.to_thread.run_sync(nbd_read, sock)
        for spelling in (sock, f"{tmp_path}//backup.sock", f"{tmp_path}/./backup.sock"):
            with pytest.raises(InvalidArgument, match="exists"):
                await b.job_begin(pull("vda", tmp_path / "b.scratch", spelling))
            with pytest.raises(InvalidArgument, match="exists"):  # queueing does not help
                await b.job_begin(pull("vda", tmp_path / "b.scratch", spelling), JOB_BEGIN_QUEUE)
        assert await b.list_jobs() == []
        # A's consumer still reads A's disk, from A's socket
        assert "41 41 41 41" in await anyio.to_thread.run_sync(nbd_read, sock)
        await job_a.abort()
        assert (await job_a.wait(30)).state is JobState.COMPLETED
        assert not lexists(sock)


@pytest.mark.anyio
async def test_sim_claims_a_pull_socket_however_it_is_spelled(tmp_path: Path) -> None:
    """The socket is a claimed file: a second job naming it (any spelling, another domain)
    conflicts with the holder, or queues behind it."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d-link").symlink_to(tmp_path / "d")
    sock = tmp_path / "d" / "nbd.sock"
    async with jobcore.connect("sim:///default?rate=1000") as conn:
        vm1, vm2 = await conn.lookup_domain("vm1"), await conn.lookup_domain("vm2")
        holder = await vm1.job_begin(pull("vdb", tmp_path / "s1.qcow2", sock))
        spellings: list[Path | str] = [
            sock,
            f"{tmp_path}/d//nbd.sock",
            f"{tmp_path}/d/./nbd.sock",
            tmp_path / "d-link" / "nbd.sock",
        ]
        for i, spelling in enumerate(spellings):
            with pytest.raises(JobConflict) as err:
                await vm2.job_begin(pull("vdb", tmp_path / f"s2-{i}.qcow2", spelling))
            assert err.value.resource == f"file:{sock}"
            assert str(holder.uuid) in str(err.value)
        # and a push target named like the socket is the same file
        with pytest.raises(JobConflict, match=f"file:{sock}"):
            await vm2.job_begin(push("vdb", tmp_path / "d-link" / "nbd.sock"))
        queued = await vm2.job_begin(pull("vdb", tmp_path / "s3.qcow2", sock), JOB_BEGIN_QUEUE)
        assert (await queued.info()).state is JobState.QUEUED
        await holder.abort()
        await wait_state(queued, JobState.RUNNING)
        await queued.abort()


# ========================================================== H3: QEMU job ids are unique


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uuids_sharing_a_prefix_both_run_to_the_end(
    tmp_path: Path, anyio_backend: str
) -> None:
    async with qemu(tmp_path, f"&backup_bandwidth={32 * MiB}") as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        first = await dom.job_begin(
            push("vda", tmp_path / "t1.qcow2", job_uuid="aaaaaaaa-0000-4000-8000-000000000001")
        )
        second = await dom.job_begin(
            push("vda", tmp_path / "t2.qcow2", job_uuid="aaaaaaaa-0000-4000-8000-000000000002")
        )
        assert (await first.wait(30)).state is JobState.COMPLETED
        assert (await second.wait(30)).state is JobState.COMPLETED
        assert driver_of(conn).domains["vm1"].process.subjobs == {}


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_runner_never_takes_over_or_drops_another_jobs_qemu_job(
    tmp_path: Path, anyio_backend: str
) -> None:
    async with qemu(tmp_path) as conn:
        await domain(conn, tmp_path, "vm1", "0x41")
        dconn = driver_of(conn)
        d = dconn.domains["vm1"]
        spec = BackupJobSpec(BackupDef(disks=(BackupDisk("vda"),)))
        runners = []
        for _ in range(2):
            job, _rep = await make_job(dconn, "vm1", spec)
            runners.append(BackupRunner(conn=dconn, job=job, domain=d, proc=d.process))
        one, two = runners
        assert one.job_id("backup", "vda") != two.job_id("backup", "vda")
        assert one.job.uuid.hex in one.job_id("backup", "vda")
        mine = one.track("backup-shared-vda")
        with pytest.raises(DriverError, match="'backup-shared-vda' is in use by another job"):
            two.track("backup-shared-vda")
        two.subjobs.append(SubJob("backup-shared-vda"))  # as if it had registered it too
        two.untrack()
        assert d.process.subjobs["backup-shared-vda"] is mine
        one.untrack()
        assert "backup-shared-vda" not in d.process.subjobs


# ============================================================== H4: bitmaps of others


async def bitmaps(conn: jobcore.api.Connection, dom: str = "vm1") -> set[str]:
    node = driver_of(conn).domains[dom].disks["vda"].active.node
    nodes = await driver_of(conn).qmp(dom, "query-named-block-nodes", {"flat": True})
    return {b["name"] for n in nodes if n["node-name"] == node for b in n.get("dirty-bitmaps", [])}


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_refused_pull_keeps_the_checkpoint_bitmaps(
    tmp_path: Path, anyio_backend: str
) -> None:
    def checkpoint(name: str) -> str:
        return f"<domaincheckpoint><name>{name}</name></domaincheckpoint>"

    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        for name in ("c0", "backup-vda"):  # the second is named like the default bitmap
            job_xml = push("vda", tmp_path / f"{name}.qcow2").replace(
                "</job>", checkpoint(name) + "</job>"
            )
            assert (await (await dom.job_begin(job_xml)).wait(60)).state is JobState.COMPLETED
        assert await bitmaps(conn) == {"c0", "backup-vda"}
        inc = "<incremental>c0</incremental>"
        cases = [
            (
                "c0",
                pull("vda", tmp_path / "s.qcow2", tmp_path / "n.sock", inc).replace(
                    "type='file'>", "type='file' exportbitmap='c0'>"
                ),
            ),
            ("backup-vda", pull("vda", tmp_path / "s.qcow2", tmp_path / "n.sock", inc)),
        ]
        for bitmap, job_xml in cases:
            with pytest.raises(InvalidArgument) as err:
                await dom.job_begin(job_xml)
            assert f"export bitmap '{bitmap}' of the pull backup already exists" in str(err.value)
            assert "exportbitmap=" in str(err.value)
        assert len(await dom.list_jobs()) == 2  # the two backups above, no refused job
        # and through the driver directly (a queued job starts without the begin check)
        spec = parse_job(cases[0][1])
        assert isinstance(spec, BackupJobSpec)
        job, _rep = await make_job(driver_of(conn), "vm1", spec)
        with pytest.raises(InvalidArgument, match="export bitmap 'c0'"):
            await driver_of(conn).start(job)
        assert await bitmaps(conn) == {"c0", "backup-vda"}
        assert not lexists(tmp_path / "n.sock")
        for name in ("c0", "backup-vda"):  # both checkpoints still work
            job_xml = push(
                "vda", tmp_path / f"i-{name}.qcow2", f"<incremental>{name}</incremental>"
            )
            assert (await (await dom.job_begin(job_xml)).wait(60)).state is JobState.COMPLETED


# ===================================================== H7: TLS and exposed addresses


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_tls_and_non_loopback_servers_are_refused_at_begin(
    tmp_path: Path, anyio_backend: str
) -> None:
    port = free_port()

    def tcp(host: str, tls: str = "") -> str:
        return (
            "<job type='backup'><domainbackup mode='pull'>"
            f"<server transport='tcp' name='{host}' port='{port}'{tls}/><disks>"
            f"<disk name='vda' type='file'><scratch file='{tmp_path / 's.qcow2'}'/></disk>"
            "</disks></domainbackup></job>"
        )

    async with qemu(tmp_path) as conn:
        dom = await domain(conn, tmp_path, "vm1", "0x41")
        with pytest.raises(Unsupported) as err:
            await dom.job_begin(tcp("localhost", " tls='yes'"))
        assert "disk 'vda'" in str(err.value) and "tls='yes'" in str(err.value)
        with pytest.raises(Unsupported, match=r"disk 'vda'.*tls='yes'"):
            await dom.job_begin(
                pull("vda", tmp_path / "s.qcow2", tmp_path / "n.sock").replace(
                    "transport='unix'", "transport='unix' tls='yes'"
                )
            )
        for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
            with pytest.raises(Unsupported, match=f"loopback only .* not on '{host}'"):
                await dom.job_begin(tcp(host))
        assert await dom.list_jobs() == []  # refused before the job existed
        assert not (tmp_path / "s.qcow2").exists()
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))  # nothing was ever served
        job = await dom.job_begin(tcp("localhost", " tls='no'"))  # loopback, no TLS: served
        await job.abort()
        assert (await job.wait(30)).state is JobState.COMPLETED


# ================================================== M1: dangling symlink as a target


@pytest.mark.qemu
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dangling_symlink_planted_while_queued_is_not_written_through(
    tmp_path: Path, anyio_backend: str
) -> None:
    """p05, and its race: the link appears after begin, while the job waits in the queue
    (behind an active commit holding the disk's chain); the job fails at start and the
    link's target is never created."""
    elsewhere = tmp_path / "home" / "hook"
    elsewhere.parent.mkdir()
    target = tmp_path / "backups" / "vm.qcow2"
    target.parent.mkdir()
    base = create(tmp_path / "base.qcow2")
    top = create(tmp_path / "top.qcow2", backing=base)
    write(top, "write -P 0x41 0 1M")
    async with qemu(tmp_path) as conn:
        dom = await conn.create_domain(domain_xml("vm1", {"vda": top}))
        blocker = await dom.job_begin("<job type='blockcommit'><disk name='vda'/></job>")
        await wait_state(blocker, JobState.READY)
        queued = await dom.job_begin(push("vda", target), JOB_BEGIN_QUEUE)
        assert (await queued.info()).state is JobState.QUEUED
        target.symlink_to(elsewhere)
        await blocker.abort()
        info = await queued.wait(30)
        assert info.state is JobState.FAILED
        assert f"store '{target}' for backup of 'vda' exists" in (info.errmsg or "")
        assert not elsewhere.exists() and target.is_symlink()
        dangling = tmp_path / "dangling.qcow2"  # and at begin
        dangling.symlink_to(elsewhere)
        with pytest.raises(InvalidArgument, match="exists"):
            await dom.job_begin(push("vda", dangling))
        assert not elsewhere.exists()


# ============================================================ M6: one spelling per file


def test_claims_use_one_spelling_per_file(tmp_path: Path) -> None:
    from jobcore.driver import DiskInfo, DomainInfo
    from jobcore.testing import prepare_spec

    real = tmp_path / "d"
    real.mkdir()
    (tmp_path / "d-link").symlink_to(real)
    (real / "sub").mkdir()
    spec = parse_job(pull("vda", f"{tmp_path}/d-link//s.qcow2", f"{real}/./nbd.sock"))
    assert isinstance(spec, BackupJobSpec)
    dom = DomainInfo("vm1", uuid.uuid4(), (DiskInfo("vda", ("/x.qcow2",), "qcow2", MiB),), MiB)
    # the claims of the prepared spec (the engine's): prepare spelt each file once
    prepared = prepare_spec(spec, dom)
    files = {c.resource for c in backup_claims(prepared, dom) if c.resource.startswith("file:")}
    assert files == {f"file:{real}/s.qcow2", f"file:{real}/nbd.sock"}
    from jobcore.scheduler import normalize_path

    expected = str(real / "t.qcow2")
    for spelling in (
        expected,
        f"{real}//t.qcow2",
        f"{real}/./t.qcow2",
        f"{real}/sub/../t.qcow2",
        f"{tmp_path}/d-link/t.qcow2",
    ):
        assert normalize_path(spelling) == expected, spelling
    # the last component is kept as written: a symlink there is refused by the drivers
    (real / "link.qcow2").symlink_to(tmp_path / "nowhere")
    assert normalize_path(f"{tmp_path}/d-link/link.qcow2") == str(real / "link.qcow2")


@pytest.mark.anyio
async def test_sim_admits_one_writer_per_file_however_it_is_spelled(tmp_path: Path) -> None:
    """p04: '/d/t', '/d//t', '/d/./t' and a symlinked directory are one file: one job at a
    time writes it; the job's XML names the file in its one spelling."""
    real = tmp_path / "d"
    real.mkdir()
    (tmp_path / "d-link").symlink_to(real)
    path = real / "t.qcow2"
    async with jobcore.connect("sim:///default?rate=1000") as conn:
        vm1, vm2 = await conn.lookup_domain("vm1"), await conn.lookup_domain("vm2")
        holder = await vm1.job_begin(push("vdb", path))
        for spelling in (f"{real}//t.qcow2", f"{real}/./t.qcow2", f"{tmp_path}/d-link/t.qcow2"):
            with pytest.raises((JobConflict, InvalidArgument)) as err:
                await vm2.job_begin(push("vdb", spelling))
            assert str(path) in str(err.value)
            assert (await holder.info()).state is JobState.RUNNING
        assert len(await vm2.list_jobs()) == 0
        await holder.abort()
        await holder.wait(10)
        # a job spelled another way records the file it writes
        job = await vm2.job_begin(push("vdb", f"{tmp_path}/d-link//u.qcow2"))
        assert f"file='{real / 'u.qcow2'}'" in await job.xml_desc()
        await job.abort()
