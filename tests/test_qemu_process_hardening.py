"""Hardening of the qemu driver's processes, images and run directory (issue 8 follow-up).

- M10: a disk source that is no regular file (a FIFO) is refused at once, every qemu-img
  run has a time limit, and a failed ``create_domain`` frees the name;
- M11: backing chains are read one layer at a time: a backing file string naming a
  network protocol is refused before anything connects; every layer is its own node;
- M12: a QEMU that stops answering holds back neither other domains' progress nor verbs;
- L1: only the driver's own marked lock file makes a run directory the driver's;
- L2: a comma in the run directory's path reaches QEMU escaped;
- L10: backing layers are opened read-only, so domains can share a base image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest
from qemu_helpers import (
    compare,
    create,
    domain_xml,
    ended_by,
    kill_and_reap,
    make_job,
    qemu_children,
    run,
    start_orphan_qemu,
    write,
)

from drivers.qemu import QemuConnection, QemuDriver, images, process
from drivers.qemu.rundir import LOCK, LOCK_MARKER
from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    BackupStore,
    DiskBackupMode,
    StoreType,
)
from jobcore.errors import DriverError
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


def push_spec(disk: str, target: Path) -> BackupJobSpec:
    store = BackupStore(str(target), "qcow2")
    d = BackupDisk(disk, True, StoreType.FILE, DiskBackupMode.FULL, None, store=store)
    return BackupJobSpec(BackupDef(mode=BackupMode.PUSH, incremental=None, disks=(d,)), None)


def qemu_img_on(path: Path) -> list[int]:
    """qemu-img processes whose command line names ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and os.fsencode(path) in argv:
            found.append(int(entry.name))
    return found


def unblock(fifo: Path) -> None:
    """Give a FIFO a writer for a moment, so a reader stuck opening it (old code) returns."""
    with suppress(OSError):  # no reader: nothing is stuck
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# ================================================ M10: FIFO sources, qemu-img timeout


async def test_a_fifo_disk_source_is_refused_at_once_and_frees_the_name(tmp_path: Path) -> None:
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.qcow2"
    link.symlink_to(fifo)
    top = tmp_path / "top.qcow2"  # a real qcow2 whose backing file is the FIFO
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(fifo), "-F", "qcow2",
        str(top), "32M")  # fmt: skip
    good = create(tmp_path / "good.qcow2")
    try:
        async with session(tmp_path / "run") as conn:
            for source, named in ((fifo, fifo), (link, link), (Path("/dev/null"), None)):
                with anyio.fail_after(10):  # before: qemu-img blocked opening the FIFO
                    with pytest.raises(DriverError) as err:
                        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": source})))
                msg = str(err.value)
                assert f"'{source}'" in msg and "must be a regular file" in msg, msg
                if named is not None:
                    assert "is a FIFO" in msg, msg
            with anyio.fail_after(10):
                with pytest.raises(DriverError) as err:
                    await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top})))
            msg = str(err.value)
            assert f"backing file '{fifo}' is a FIFO" in msg and f"image '{top}'" in msg, msg
            assert not qemu_img_on(fifo)
            # the failed creations released the name
            info = await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": good})))
            assert info.running and info.name == "vm1"
    finally:
        unblock(fifo)


async def test_a_qemu_img_that_hangs_is_killed_at_the_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the file check misses (a file swapped for a FIFO, a storage that stopped
    answering), qemu-img runs at most QEMU_IMG_TIMEOUT seconds: killed, a DriverError."""
    monkeypatch.setattr(images, "QEMU_IMG_TIMEOUT", 1.0, raising=False)
    fifo = tmp_path / "swapped.qcow2"
    os.mkfifo(fifo)
    try:
        with anyio.fail_after(10):  # before: no limit, qemu-img blocks for ever
            with pytest.raises(DriverError) as err:
                await images._run("info", "-U", "--output=json", str(fifo))
        assert "did not finish within 1 s and was killed" in str(err.value)
        assert str(fifo) in str(err.value)
        assert not qemu_img_on(fifo), "the timed-out qemu-img is still running"
    finally:
        unblock(fifo)


# ============================================= M11: backing files never reach the net


@asynccontextmanager
async def listener() -> AsyncIterator[tuple[int, list[object]]]:
    """A TCP listener on loopback that counts the connections it accepts."""
    hits: list[object] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = int(srv.getsockname()[1])

    async def accept() -> None:
        while True:
            await anyio.wait_readable(srv)
            try:
                conn, addr = srv.accept()
            except BlockingIOError:
                continue
            hits.append(addr)
            conn.close()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            yield port, hits
            await anyio.sleep(0.2)  # a connection under way lands by now
            tg.cancel_scope.cancel()
    finally:
        srv.close()


async def test_backing_file_protocol_names_never_make_the_driver_connect(tmp_path: Path) -> None:
    async with listener() as (port, hits):
        nbd_url = f"nbd://127.0.0.1:{port}/x"
        json_name = "json:" + json.dumps(
            {
                "driver": "raw",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                    "export": "x",
                },
            }
        )
        evil = []
        for i, name in enumerate((nbd_url, json_name, f"nbd:127.0.0.1:{port}")):
            path = tmp_path / f"evil{i}.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw",
                str(path), "32M")  # fmt: skip
            evil.append((path, name))
        # deeper in the chain: a local layer whose own backing file is the network
        mid = tmp_path / "mid.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", nbd_url, "-F", "raw",
            str(mid), "32M")  # fmt: skip
        top = tmp_path / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(mid), "-F", "qcow2",
            str(top), "32M")  # fmt: skip
        evil.append((top, nbd_url))
        # a qcow2 whose header names an external data file (QEMU opens it with the layer)
        data_file = tmp_path / "datafile.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"data_file={tmp_path / 'data.raw'}", str(data_file), "32M")  # fmt: skip
        run("qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={nbd_url}", str(data_file))
        async with session(tmp_path / "run") as conn:
            for path, name in evil:
                with pytest.raises(DriverError) as err:
                    await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": path})))
                msg = str(err.value)
                assert f"names backing file '{name}', a protocol name" in msg, msg
            with pytest.raises(DriverError, match=f"external file \\('{nbd_url}'\\)"):
                await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": data_file})))
            assert not conn.domains
    assert hits == [], f"the driver connected to 127.0.0.1:{port} {len(hits)} times"


async def test_chains_are_read_layer_by_layer_relative_names_loops_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    base = create(images_dir / "base.qcow2")
    write(base, "write -P 0x11 0 1M")
    # a relative backing name is resolved against the image's directory, not the cwd
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        str(images_dir / "mid.qcow2"), "32M")  # fmt: skip
    top = create(images_dir / "top.qcow2", backing=images_dir / "mid.qcow2")
    # a loop: a -> b -> a
    loop_a, loop_b = tmp_path / "loop-a.qcow2", tmp_path / "loop-b.qcow2"
    for path, below in ((loop_a, loop_b), (loop_b, loop_a)):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(below), "-F", "qcow2",
            str(path), "32M")  # fmt: skip
    async with session(tmp_path / "run") as conn:
        info = await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": top})))
        (disk,) = info.disks
        assert disk.chain == (str(top), str(images_dir / "mid.qcow2"), str(base))
        # every layer is its own node, each linked to the node below by the driver: QEMU
        # never opens a backing file from an image header
        graph = await conn.qmp("vm1", "x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        backing = {
            names[e["parent"]]: names[e["child"]] for e in graph["edges"] if e["name"] == "backing"
        }
        layers = [layer.node for layer in conn.domains["vm1"].disks["vda"].layers]
        assert backing == {layers[0]: layers[1], layers[1]: layers[2]}
        with pytest.raises(DriverError, match="loops at"):
            await conn.create_domain(parse_domain(domain_xml("vm2", {"vda": loop_a})))
        monkeypatch.setattr(images, "MAX_CHAIN", 2)
        with pytest.raises(DriverError, match="longer than 2 layers"):
            await conn.create_domain(parse_domain(domain_xml("vm2", {"vda": top})))


# ==================================================== M12: a QEMU that stops answering


async def test_a_stopped_qemu_stalls_neither_others_progress_nor_verbs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "QMP_TIMEOUT", 1.0, raising=False)
    a = create(tmp_path / "a.qcow2", "256M")
    b = create(tmp_path / "b.qcow2", "256M")
    async with session(tmp_path / "run", "&backup_bandwidth=8388608") as conn:
        await conn.create_domain(parse_domain(domain_xml("A", {"vda": a})))
        await conn.create_domain(parse_domain(domain_xml("B", {"vda": b})))
        job_a, rep_a = await make_job(conn, "A", push_spec("vda", tmp_path / "a.t"))
        job_b, rep_b = await make_job(conn, "B", push_spec("vda", tmp_path / "b.t"))
        await conn.start(job_a)
        await conn.start(job_b)

        def b_done() -> int:
            return max((p for p, _t, _e in rep_b.progress_calls), default=0)

        with anyio.fail_after(10):
            while b_done() == 0:  # noqa: ASYNC110 (the reporter has no event for progress)
                await anyio.sleep(0.05)
        pid_a = conn.pid("A")
        os.kill(pid_a, signal.SIGSTOP)
        try:
            before = b_done()
            await anyio.sleep(2.5)
            after = b_done()
            # 8 MiB/s: B's progress keeps flowing (before: the poller waited on A for ever)
            assert after - before >= 8 * MiB, (before, after)
            with anyio.fail_after(5):  # before: no answer, no limit
                with pytest.raises(DriverError) as err:
                    await conn.cancel(job_a)
            assert "QEMU for domain 'A' did not answer QMP 'job-cancel' within 1 s" in str(
                err.value
            )
            assert rep_a.terminal is None  # a timeout fails nothing
            # verbs on the other domain are not held up either
            with anyio.fail_after(2):
                await conn.set_speed(job_b, 16 * MiB)
        finally:
            os.kill(pid_a, signal.SIGCONT)
        # QEMU reads the job-cancel it was sent once it runs again
        assert await rep_a.wait_end(10) == ("cancelled", None)
        await conn.cancel(job_b)
        assert await rep_b.wait_end(10) == ("cancelled", None)
        assert not (tmp_path / "a.t").exists() and not (tmp_path / "b.t").exists()


# =========================================================== L1: the run dir's lock


async def test_only_the_drivers_marked_lock_makes_a_directory_the_drivers(tmp_path: Path) -> None:
    theirs = tmp_path / "app"
    theirs.mkdir(mode=0o700)
    (theirs / "lock").write_text("held by some other tool\n")
    (theirs / "worker.1.pid").write_text(f"{os.getpid()}\n")  # another program's pid file
    (theirs / "nightly.2024.pid").write_text("12345\n")
    async with session(theirs):
        pass
    assert sorted(os.listdir(theirs)) == [LOCK, "lock", "nightly.2024.pid", "worker.1.pid"]
    assert (theirs / "lock").read_text() == "held by some other tool\n"
    assert (theirs / LOCK).read_text() == LOCK_MARKER

    # a file of the driver's lock name without the marker is not a sign of ownership
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / LOCK).write_text("something else\n")
    (other / "svc.3.pid").write_text("999999999\n")
    async with session(other):
        assert (other / "svc.3.pid").exists()
    # from now on it is the driver's: its names are cleaned
    async with session(other):
        assert not (other / "svc.3.pid").exists()
    assert (other / LOCK).read_text() == LOCK_MARKER


# ============================================================ L2: commas in the path


async def test_a_run_directory_with_commas_works(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2")
    write(src, "write -P 0x5a 0 4M")
    run_dir = tmp_path / "run,wait=on,x"
    async with session(run_dir) as conn:
        await conn.create_domain(parse_domain(domain_xml("vm1", {"vda": src}, memory_mib=16)))
        job, rep = await make_job(conn, "vm1", push_spec("vda", tmp_path / "t.qcow2"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        compare(src, tmp_path / "t.qcow2")
        # the migration socket is in the run directory too
        job, rep = await make_job(conn, "vm1", MigrationSpec(f"qemu:///session?dir={run_dir}"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        assert conn.domains["vm1"].process.alive
        await conn.guest_io("vm1", "vda", "write -P 0x6b 0 1M")
    # a QEMU left behind in such a directory is still recognised as the driver's
    orphan = start_orphan_qemu(run_dir)
    try:
        async with session(run_dir):
            assert not (run_dir / "old.0.pid").exists()
    finally:
        status = ended_by(orphan)
    assert status == -signal.SIGKILL


# ====================================================== L10: a shared base image


async def test_two_domains_share_a_base_image(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    write(base, "write -P 0xaa 0 4M")
    a = create(tmp_path / "a.qcow2", backing=base)
    write(a, "write -P 0xbb 4M 4M")
    b = create(tmp_path / "b.qcow2", backing=base)
    expected = tmp_path / "a-expected.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(a), str(expected))
    async with session(tmp_path / "run") as conn:
        await conn.create_domain(parse_domain(domain_xml("A", {"vda": a})))
        await conn.create_domain(
            parse_domain(domain_xml("B", {"vda": b}))
        )  # before: write lock refused
        for dom in ("A", "B"):
            nodes = await conn.qmp(dom, "query-named-block-nodes", {"flat": True})
            ro = {n["node-name"]: n["ro"] for n in nodes}
            active, below = conn.domains[dom].disks["vda"].layers
            assert ro[active.node] is False and ro[below.node] is True, ro
        # committing into the base both read would change B's disk under it: refused
        job, _ = await make_job(conn, "A", BlockCommitSpec("vda"))
        with pytest.raises(DriverError, match=f"image '{base}' is in use by another process"):
            await conn.start(job)
        # pulling the base into A's overlay only reads it
        job, rep = await make_job(conn, "A", BlockPullSpec("vda"))
        await conn.start(job)
        assert (await rep.wait_end())[0] == "completed"
        await conn.flush("A")
        assert [layer.file for layer in conn.domains["A"].disks["vda"].layers] == [str(a)]
        compare(a, expected)
        compare(b, base)
        await conn.guest_io("B", "vda", "write -P 0xcc 0 1M")  # B still works on its own
    compare(a, expected)
    assert "backing file" not in run("qemu-img", "info", "-U", str(a))


async def test_a_qmp_timeout_crosses_the_wire_as_driver_error() -> None:
    """jobd sends an error by its jobcore class: the driver's own subclasses of DriverError
    (QmpTimeout, qemu-img failures) must arrive as DriverError, not as a bare JobError."""
    from jobcore.protocol import error_reply, raise_error

    exc = process.QmpTimeout("QEMU for domain 'A' did not answer QMP 'job-cancel' within 1 s")
    reply = error_reply(7, exc)
    assert reply.error == "DriverError"
    back = raise_error(reply)
    assert type(back) is DriverError and str(back) == str(exc)
    assert error_reply(8, images.QemuImgFailed("create", "boom")).error == "DriverError"
    assert error_reply(9, ValueError("x")).error == "JobError"
