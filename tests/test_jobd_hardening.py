"""jobd under attack: who may open driver connections, how many, for how long, and what a
refused client is told (issue 8: items 3, 6, 7, 24 and the 5 MiB XML of 28)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from jobd_helpers import (
    BACKUP_VDB,
    Jobd,
    RawClient,
    daemon_with,
    jobctl,
    ok,
    one_line_error,
)

import jobcore
from jobcore.cli import ExitCode
from jobcore.errors import InvalidArgument, XMLError
from jobcore.protocol import PROTOCOL_VERSION, AccessDenied, DaemonBusy, DaemonUnreachable
from jobcore.remote import RemoteConnection

MiB = 1 << 20


@pytest.fixture
def jobd(tmp_path: Path) -> Iterator[Jobd]:
    daemon = daemon_with(tmp_path, "driver_idle_timeout = 0.3\n")
    try:
        yield daemon
    finally:
        daemon.stop()


def refused(reply: list[object], error: str) -> str:
    assert reply[0] == 2 and reply[2] == error, reply
    message = reply[3]
    assert isinstance(message, str)
    return message


def serves(daemon: Jobd) -> None:
    """The daemon's files are in place and it answers on both sockets."""
    for name in ("jobd.sock", "jobd-ro.sock", "jobd.pid"):
        assert (daemon.run_dir / name).exists(), f"{name} is gone: {daemon.log()}"
    assert daemon.proc.poll() is None
    listed = jobctl(daemon.uri(), "domains", "--json")
    assert listed.returncode == 0, listed.stderr
    holder = RawClient(daemon.sock, None)  # keeps sim:///default open for the read-only client
    try:
        assert ok(holder.say_hello("sim:///default"))
        assert jobctl(daemon.uri(readonly=True), "domains").returncode == 0
    finally:
        holder.close()


# ---- item 3: the read-only socket opens nothing; allowed_uris ------------------------------


def test_readonly_hello_cannot_make_qemu_delete_jobd_files(jobd: Jobd) -> None:
    ro = RawClient(jobd.ro_sock, None)
    try:
        message = refused(ro.say_hello(f"qemu:///session?dir={jobd.run_dir}"), "AccessDenied")
        assert "read-only socket can only attach" in message
        assert f"'qemu:///session?dir={jobd.run_dir.resolve()}' is not open" in message
        message = refused(ro.say_hello("qemu:///session"), "AccessDenied")
        assert "read-only socket can only attach" in message and "qemu:///session" in message
    finally:
        ro.close()
    assert "driver connection opened" not in jobd.log()
    serves(jobd)


def test_no_client_may_point_qemu_at_jobd_run_dir(tmp_path: Path) -> None:
    allow_all = "allowed_uris = ['sim:///*', 'qemu:///session*']\n"
    daemon = daemon_with(tmp_path, allow_all)
    try:
        run = daemon.run_dir
        for bad in (run, run / "sub", run / ".." / "run", run.parent):
            rw = RawClient(daemon.sock, None)
            try:
                message = refused(rw.say_hello(f"qemu:///session?dir={bad}"), "AccessDenied")
                assert "overlaps jobd's run directory" in message
                assert str(daemon.run_dir.resolve()) in message
            finally:
                rw.close()
        serves(daemon)
    finally:
        daemon.stop()


def test_readonly_attaches_only_to_open_connections(jobd: Jobd) -> None:
    ro = RawClient(jobd.ro_sock, None)
    rw = RawClient(jobd.sock, None)
    try:
        message = refused(ro.say_hello("sim:///default"), "AccessDenied")
        assert "'sim:///default' is not open" in message
        assert ok(rw.say_hello(f"sim:///default?rate={8 * MiB}")) == [
            PROTOCOL_VERSION,
            False,
            f"sim:///default?rate={8 * MiB}",
        ]
        assert ok(ro.say_hello("sim:///default")) == [
            PROTOCOL_VERSION,
            True,
            f"sim:///default?rate={8 * MiB}",
        ]
        assert ok(ro.call("lookup_domain", "vm1"))[0] == "vm1"
    finally:
        ro.close()
        rw.close()


def test_allowed_uris(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "allowed_uris = ['sim:///lab-*']\n")
    try:
        rw = RawClient(daemon.sock, None)
        try:
            message = refused(rw.say_hello("sim:///default"), "AccessDenied")
            assert "not in allowed_uris" in message and "sim:///lab-*" in message
            assert ok(rw.say_hello("sim:///lab-1"))
        finally:
            rw.close()
    finally:
        daemon.stop()
    by_option = Jobd(tmp_path / "run2", "--allow-uri", "sim:///x*", "--allow-uri", "sim:///y")
    try:
        by_option.wait_ready()
        rw = RawClient(by_option.sock, None)
        try:
            assert "not in allowed_uris" in refused(rw.say_hello("sim:///default"), "AccessDenied")
            assert ok(rw.say_hello("sim:///y"))
        finally:
            rw.close()
    finally:
        by_option.stop()


def test_default_allow_list_refuses_other_qemu_dirs(jobd: Jobd, tmp_path: Path) -> None:
    rw = RawClient(jobd.sock, None)
    try:
        message = refused(rw.say_hello(f"qemu:///session?dir={tmp_path / 'q'}"), "AccessDenied")
        assert "allowed_uris" in message
    finally:
        rw.close()
    assert not (tmp_path / "q").exists()


# ---- item 6: URI parameters, one host per name, idle driver connections ----------------


@pytest.mark.anyio
async def test_unknown_uri_parameters_refused_in_process(tmp_path: Path) -> None:
    for uri, name in (
        ("sim:///default?nosuchparam=1", "nosuchparam"),
        ("sim:///default?rate=1&Rate=2", "Rate"),
        ("sim:///default?socket=/tmp/x", "socket"),
        (f"qemu:///session?dir={tmp_path / 'q'}&bogus=1", "bogus"),
    ):
        with pytest.raises(InvalidArgument, match=f"'{name}'"):
            async with jobcore.connect(uri):
                pass
    with pytest.raises(InvalidArgument, match="more than once"):
        async with jobcore.connect("sim:///default?rate=1&rate=2"):
            pass
    assert not (tmp_path / "q").exists()
    async with jobcore.connect("sim:///default?rate=0&clock=manual&fail_at=0.5") as conn:
        assert [d.name for d in await conn.list_domains()] == ["vm1", "vm2"]


def test_unknown_uri_parameter_refused_through_jobd(jobd: Jobd) -> None:
    rw = RawClient(jobd.sock, None)
    try:
        message = refused(rw.say_hello("sim:///default?nosuchparam=1"), "InvalidArgument")
        assert "'nosuchparam'" in message
        message = refused(rw.say_hello("qemu:///session?dir=%00"), "InvalidArgument")
        assert "null byte" in message
        assert ok(rw.say_hello("sim:///default"))  # the session went on
    finally:
        rw.close()
    proc = jobctl(jobd.uri("nosuchparam=1"), "domains")
    assert proc.returncode == ExitCode.ERROR and "nosuchparam" in one_line_error(proc)


def test_one_sim_host_per_name_whatever_the_query(jobd: Jobd, tmp_path: Path) -> None:
    first = RawClient(jobd.sock, None)
    try:
        assert ok(first.say_hello("sim:///default?rate=1000"))
        job = ok(first.call("job_begin", "vm1", BACKUP_VDB.format(tag="one"), 0))
        others = []
        for i in range(1, 40):  # 40 hellos with distinct query strings
            other = RawClient(jobd.sock, None)
            others.append(other)
            message = refused(other.say_hello(f"sim:///default?rate={1000 + i}"), "InvalidArgument")
            assert f"rate={1000 + i}" in message and "rate=1000" in message
        for same in ("sim:///default", "sim:///default?rate=1000", "sim:///default?clock=real"):
            other = RawClient(jobd.sock, None)
            others.append(other)
            assert ok(other.say_hello(same))[2] == "sim:///default?rate=1000"
            # the same host: its job is there, not in a second host with the same domains
            jobs = ok(other.call("list_jobs", "vm1"))
            assert [j[0] for j in jobs] == [job[0]]
        for other in others:
            other.close()
        # everyone else can still open driver connections
        assert jobctl(jobd.uri(host="after"), "domains").returncode == 0
    finally:
        first.close()


def test_concurrent_hellos_share_one_host(jobd: Jobd) -> None:
    uri = jobd.uri("rate=1000", host="fresh")
    seen: list[str] = []

    async def client(i: int) -> None:
        async with jobcore.connect(uri) as conn:
            assert isinstance(conn, RemoteConnection)
            seen.append(conn.driver_uri)
            if i == 0:
                job = await (await conn.lookup_domain("vm1")).job_begin(
                    BACKUP_VDB.format(tag="fresh")
                )
                seen.append(str(job.uuid))
            await anyio.sleep(0.3)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(client, i)

    anyio.run(main)
    assert seen.count("sim:///fresh?rate=1000") == 12
    jobs = jobctl(jobd.uri(host="fresh"), "list", "--json")
    assert [j["uuid"] for j in json.loads(jobs.stdout)] == [s for s in seen if "sim" not in s]


def test_idle_driver_connections_are_closed(jobd: Jobd) -> None:
    for i in range(40):  # more names than driver connection slots
        rw = RawClient(jobd.sock, None)
        try:
            assert ok(rw.say_hello(f"sim:///host{i}?rate={1000 + i}"))
        finally:
            rw.close()
    # host0 was closed for idleness (or evicted): opening it anew takes a new rate
    time.sleep(0.8)
    rw = RawClient(jobd.sock, None)
    try:
        assert ok(rw.say_hello("sim:///host0?rate=5"))[2] == "sim:///host0?rate=5"
    finally:
        rw.close()
    assert "driver connection idle" in jobd.log()


def test_driver_connection_with_a_job_outlives_its_clients(jobd: Jobd) -> None:
    rw = RawClient(jobd.sock, None)
    try:
        assert ok(rw.say_hello("sim:///busy?rate=1000"))  # a 512 MiB backup: days
        job = ok(rw.call("job_begin", "vm1", BACKUP_VDB.format(tag="busy"), 0))
    finally:
        rw.close()
    time.sleep(1.0)  # past driver_idle_timeout (0.3 s)
    again = RawClient(jobd.sock, None)
    try:
        assert ok(again.say_hello("sim:///busy"))[2] == "sim:///busy?rate=1000"
        ref = ok(again.call("lookup_job", job[0]))
        assert ref[3] == "running"
        assert ok(again.call("job_abort", job[0])) is None
    finally:
        again.close()


# ---- item 7: hello and idle timeouts, per-socket limits, busy exit status --------------


def test_silent_connection_closed_after_hello_timeout(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "hello_timeout = 0.5\n")
    try:
        silent = RawClient(daemon.ro_sock, None)
        started = time.monotonic()
        try:
            reply = silent.recv()
            elapsed = time.monotonic() - started
            message = refused(reply, "ProtocolError")
            assert "no successful hello within 0.5 s" in message
            assert silent.sock.recv(1) == b""
        finally:
            silent.close()
        assert 0.4 < elapsed < 3.0, elapsed
        serves(daemon)
    finally:
        daemon.stop()


def test_idle_timeout(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "idle_timeout = 0.5\n")
    try:
        idle, watching = RawClient(daemon.sock, None), RawClient(daemon.sock, None)
        try:
            assert ok(idle.say_hello("sim:///default"))
            assert ok(watching.say_hello("sim:///default"))
            assert ok(watching.call("subscribe", None, None, None, None, 16)) is None
            message = refused(idle.recv(), "DaemonUnreachable")
            assert "idle_timeout" in message
            assert idle.sock.recv(1) == b""
            time.sleep(0.5)  # a subscription is not idleness
            assert ok(watching.call("list_domains"))
        finally:
            idle.close()
            watching.close()
    finally:
        daemon.stop()


def test_silent_readonly_crowd_does_not_lock_out_writers(jobd: Jobd) -> None:
    crowd = [RawClient(jobd.ro_sock, None) for _ in range(300)]  # never say hello
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until jobd has accepted the whole crowd
            lines = [json.loads(x) for x in jobd.log().splitlines() if x.startswith("{")]
            if sum(e["event"] == "client connected" and e["socket"] == "ro" for e in lines) >= 300:
                break
            time.sleep(0.05)
        listed = jobctl(jobd.uri(), "domains")
        assert listed.returncode == 0, listed.stderr
        busy = jobctl(jobd.uri(readonly=True), "domains")
        assert busy.returncode == ExitCode.UNREACHABLE, busy.stderr
        assert "busy" in one_line_error(busy) and "jobd-ro.sock" in busy.stderr
    finally:
        for sock in crowd:
            sock.close()


def test_busy_is_daemon_busy(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "max_clients = 1\n")

    async def connect() -> None:
        async with jobcore.connect(daemon.uri()):
            pass

    try:
        for _ in range(50):  # wait_ready's probe may still hold the one place
            holder = RawClient(daemon.sock, None)
            if holder.say_hello("sim:///default")[0] == 1:
                break
            holder.close()
            time.sleep(0.1)
        try:
            with pytest.raises(DaemonBusy, match="jobd is busy: 1 clients are connected"):
                anyio.run(connect)
            busy = jobctl(daemon.uri(), "domains")
            assert busy.returncode == ExitCode.UNREACHABLE and "busy" in one_line_error(busy)
        finally:
            holder.close()
    finally:
        daemon.stop()


# ---- item 24: a refused client always learns why ------------------------------------------


@pytest.mark.anyio
async def test_denial_is_always_delivered(tmp_path: Path, anyio_backend: str) -> None:
    daemon = daemon_with(tmp_path, f"allowed_uids = [{os.getuid() + 4242}]\n")
    try:
        outcomes: list[str] = []

        async def attempt() -> None:
            try:
                async with jobcore.connect(daemon.uri()):
                    outcomes.append("connected")
            except AccessDenied as exc:
                outcomes.append("denied" if "not allowed" in str(exc) else str(exc))
            except DaemonUnreachable as exc:
                outcomes.append(f"unreachable: {exc}")

        for _ in range(10):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(attempt)
        assert outcomes == ["denied"] * 50
    finally:
        daemon.stop()


# ---- item 28: an oversized XML is an XML error ----------------------------------------------


@pytest.mark.anyio
async def test_five_mib_xml_gets_the_xml_limit(jobd: Jobd, anyio_backend: str) -> None:
    huge = "<job type='backup'>" + "<!-- padding -->" * (5 * MiB // 16) + "</job>"
    async with jobcore.connect(jobd.uri()) as conn:
        dom = await conn.lookup_domain("vm1")
        for doc in (huge, huge.encode(), "<job type='backup'>" + "é" * (MiB // 2 + 1) + "</job>"):
            with pytest.raises(XMLError, match=r"limit is 1048576 bytes \(1 MiB\)"):
                await dom.job_begin(doc)
        with pytest.raises(XMLError, match="1 MiB"):
            await dom.backup_begin(huge)
        assert await conn.list_domains()  # the connection goes on
    # jobd checks too: a 2 MiB document sent by hand (under the 4 MiB frame limit)
    rw = RawClient(jobd.sock, None)
    try:
        assert ok(rw.say_hello("sim:///default"))
        message = refused(rw.call("job_begin", "vm1", huge[: 2 * MiB], 0), "XMLError")
        assert "1 MiB" in message
    finally:
        rw.close()


# ---- clients talk only to a daemon of their own user (or root) ------------------------


def fake_daemon_as(uid: int, path: Path) -> int:
    """A forked child, running as ``uid``, listening on ``path`` and never answering (the
    peer credentials a client sees are the listener's at listen())."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: socket calls only, then _exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.listen(8)
            os.write(ready_w, b"R")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"R"
    os.close(ready_r)
    return pid


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another uid needs root")
def test_client_refuses_a_daemon_of_another_user() -> None:
    import shutil
    import signal
    import tempfile

    other = 12345
    base = Path(tempfile.mkdtemp(prefix="jobcore-other-"))  # pytest's tmp is root-only
    os.chmod(base, 0o711)
    run_dir = base / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, other, other)
    sock = run_dir / "jobd.sock"
    fake = fake_daemon_as(other, sock)
    try:
        with pytest.raises(AccessDenied, match=f"runs as uid {other}.*refusing to talk to it"):
            jobcore.open(f"sim+unix:///default?socket={sock}")
        denied = jobctl(f"sim+unix:///default?socket={sock}", "domains")
        assert denied.returncode == ExitCode.DENIED
        assert f"runs as uid {other}" in one_line_error(denied)
    finally:
        os.kill(fake, signal.SIGKILL)
        os.waitpid(fake, 0)
        shutil.rmtree(base)
