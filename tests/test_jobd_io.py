"""jobd's I/O under abuse: running out of file descriptors, clients that never read their
replies, frames that never complete, SIGHUP, request ids used twice. Memory is measured
as the jobd process's VmRSS."""

from __future__ import annotations

import errno
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import Jobd, RawClient, frame

from jobcore.daemon.config import ConfigError, load_config

MiB = 1 << 20
SLOW_PULL = "<job type='blockpull'><disk name='vda'/></job>"  # runs for ages at rate=1
BIG_DESC = 400_000
BIG_BACKUP = (
    "<job type='backup'><domainbackup><disks><disk name='vdb'/></disks></domainbackup>"
    f"<domaincheckpoint><description>{'x' * BIG_DESC}</description></domaincheckpoint></job>"
)


def limited_jobd(run_dir: Path, nofile: str, *args: str) -> Jobd:
    """A jobd started through ``prlimit --nofile=SOFT:HARD``."""
    return Jobd(run_dir, *args, prefix=("prlimit", f"--nofile={nofile}", "--"))


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "jobd.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def jobd(tmp_path: Path) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def rss(pid: int) -> int:
    """The process's resident set in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def peak_rss(pid: int, seconds: float, stop_above: int) -> int:
    """The highest VmRSS seen while sampling for ``seconds`` (or until it passes
    ``stop_above``: the test has failed by then)."""
    peak = rss(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end and peak <= stop_above:
        time.sleep(0.1)
        peak = max(peak, rss(pid))
    return peak


def wait_for_log(daemon: Jobd, text: str, seconds: float = 30) -> bool:
    """Whether ``text`` appears in jobd's log before it exits or ``seconds`` pass."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if text in daemon.log():
            return True
        if daemon.proc.poll() is not None:
            return text in daemon.log()
        time.sleep(0.05)
    return False


def job_state(client: RawClient, job: bytes) -> str:
    reply = client.call("job_info", job)
    assert reply[0] == 1, reply
    state: str = reply[2][3]
    return state


# ---- H5: running out of file descriptors ----------------------------------------------------


def test_fd_exhaustion_does_not_stop_jobd(tmp_path: Path) -> None:
    """accept() failing with EMFILE is logged and retried: jobd serves on and the job it
    runs goes on (it used to exit, failing every job)."""
    config = config_file(tmp_path, "max_clients = 4\nmax_ro_clients = 4\n")
    daemon = limited_jobd(tmp_path / "run", "128:128", "--config", config).wait_ready()
    crowd: list[socket.socket] = []
    try:
        holder = RawClient.ready(daemon.sock, "sim:///fds?rate=1")
        job = holder.call("job_begin", "vm1", SLOW_PULL, 0)[2][0]
        for _ in range(300):  # far more than jobd has descriptors for
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(str(daemon.ro_sock))
            except OSError as exc:  # the listen backlog is full: enough
                assert exc.errno in (errno.EAGAIN, errno.ECONNREFUSED), exc
                s.close()
                break
            crowd.append(s)
        assert wait_for_log(daemon, "cannot accept connections"), daemon.log()
        assert daemon.proc.poll() is None, f"jobd exited: {daemon.log()[-2000:]}"
        for s in crowd:
            s.close()
        crowd.clear()
        assert job_state(holder, job) == "running"
        # served again once descriptors are free
        newcomer = RawClient.ready(daemon.sock, "sim:///fds")
        assert newcomer.call("list_domains")[0] == 1
        assert job_state(newcomer, job) == "running"
        assert daemon.proc.poll() is None
        log = daemon.log()
        assert "Too many open files" in log
        assert log.count('"cannot accept connections"') == 1, "logged once, then counted"
    finally:
        for s in crowd:
            s.close()
        daemon.stop()


def test_soft_fd_limit_raised_to_hard(tmp_path: Path) -> None:
    daemon = limited_jobd(tmp_path / "run", "600:4096").wait_ready()
    try:
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        daemon.stop()


def test_clients_beyond_the_fd_limit_are_a_config_error(tmp_path: Path) -> None:
    daemon = limited_jobd(tmp_path / "run", "256:256")  # 256 + 256 clients do not fit
    try:
        try:
            status = daemon.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("jobd started with more clients than descriptors") from None
        assert status == 2, daemon.log()
        message = daemon.log()
        for figure in ("max_clients (256)", "max_ro_clients (256)", "= 576", "(256;"):
            assert figure in message, message
    finally:
        daemon.stop()


# ---- M2: clients that never read ----------------------------------------------------------


def test_never_reading_clients_pin_bounded_memory(jobd: Jobd) -> None:
    """Tiny requests for a 400 KB reply from clients that never read: jobd holds at most
    its per-client send budget for each (it used to hold 256 encoded replies each)."""
    rw = RawClient.ready(jobd.sock, "sim:///big?rate=1")
    job = rw.call("job_begin", "vm1", BIG_BACKUP, 0)[2][0]
    assert len(rw.call("job_xml_desc", job)[2]) > BIG_DESC
    base = rss(jobd.proc.pid)
    stalled = []
    for _ in range(4):
        client = RawClient.ready(jobd.ro_sock, "sim:///big")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sock.sendall(
            b"".join(
                frame(msgpack.packb([0, 10 + i, "job_xml_desc", [job]], use_bin_type=True))
                for i in range(256)
            )
        )
        stalled.append(client)
    limit = 160 * MiB  # 4 x 8 MiB of queued frames, plus a few being encoded
    peak = peak_rss(jobd.proc.pid, 5, base + limit)
    assert peak - base < limit, f"jobd grew by {(peak - base) // MiB} MiB"
    assert rw.call("list_domains")[0] == 1  # others are served meanwhile
    assert job_state(rw, job) == "running"
    for client in stalled:
        client.close()


def test_slow_reader_gets_every_reply(jobd: Jobd) -> None:
    """Replies held back by the send budget are all delivered once the client reads."""
    rw = RawClient.ready(jobd.sock, "sim:///big?rate=1")
    job = rw.call("job_begin", "vm1", BIG_BACKUP, 0)[2][0]
    rw.sock.sendall(
        b"".join(
            frame(msgpack.packb([0, 100 + i, "job_xml_desc", [job]], use_bin_type=True))
            for i in range(64)
        )
    )
    time.sleep(0.5)  # let jobd fill its budget for this client
    ids = set()
    for _ in range(64):
        msg = rw.recv()
        assert msg[0] == 1 and len(msg[2]) > BIG_DESC, msg[:4]
        ids.add(msg[1])
    assert ids == set(range(100, 164))


# ---- M3: frames that never complete ---------------------------------------------------------


def pump(data: dict[socket.socket, bytes], patience: float = 1.5) -> dict[socket.socket, int]:
    """Send each socket its data without blocking, until all is sent or nothing moved for
    ``patience`` seconds (the daemon stopped reading); the bytes sent per socket."""
    sent = dict.fromkeys(data, 0)
    for sock in data:
        sock.setblocking(False)
    still = time.monotonic()
    while any(sent[s] < len(d) for s, d in data.items()):
        moved = False
        for sock, chunk in data.items():
            try:
                n = sock.send(chunk[sent[sock] : sent[sock] + (1 << 20)])
            except BlockingIOError:
                continue
            sent[sock] += n
            moved = moved or n > 0
        if moved:
            still = time.monotonic()
        elif time.monotonic() - still > patience:
            break
        else:
            time.sleep(0.01)
    for sock in data:
        sock.settimeout(10)
    return sent


def test_stalled_frames_hold_bounded_memory(jobd: Jobd) -> None:
    """48 clients each send all but the last byte of a 4 MiB frame and stall: jobd reads
    them into at most max_receive_buffer (64 MiB) in all (it used to buffer every one)."""
    body = b"\x00" * ((4 << 20) - 1)
    holder = RawClient.ready(jobd.sock)  # opens sim:///default for the read-only clients
    base = rss(jobd.proc.pid)
    stalled = [RawClient.ready(jobd.ro_sock) for _ in range(48)]
    sent = pump({c.sock: struct.pack(">I", 4 << 20) + body for c in stalled})
    assert all(n > 4 for n in sent.values())
    limit = 110 * MiB
    peak = peak_rss(jobd.proc.pid, 3, base + limit)
    assert peak - base < limit, f"jobd grew by {(peak - base) // MiB} MiB"
    assert holder.call("list_domains")[0] == 1  # small frames are read meanwhile
    for client in stalled:
        client.close()


def test_stalled_frame_is_closed_after_frame_timeout(tmp_path: Path) -> None:
    config = config_file(tmp_path, "frame_timeout = 0.5\n")
    daemon = Jobd(tmp_path / "run", "--config", config).wait_ready()
    try:
        holder = RawClient.ready(daemon.sock)
        client = RawClient.ready(daemon.ro_sock)
        client.sock.sendall(struct.pack(">I", 1000) + b"\x93\x00\x07")  # 3 of 1000 bytes
        error = client.recv()
        assert error[:3] == [2, 0, "ProtocolError"], error
        assert "frame of 1000 bytes" in error[3] and "frame_timeout" in error[3], error
        assert client.sock.recv(10) == b""  # then closed
        assert holder.call("list_domains")[0] == 1
    finally:
        daemon.stop()


def test_big_frame_waits_for_the_receive_budget(tmp_path: Path) -> None:
    """A big frame arriving while stalled ones hold all of max_receive_buffer is read once
    they are expelled (within its own frame_timeout), not refused."""
    config = config_file(tmp_path, f"frame_timeout = 2\nmax_receive_buffer = {4 * MiB}\n")
    daemon = Jobd(tmp_path / "run", "--config", config).wait_ready()
    try:
        holder = RawClient.ready(daemon.sock)
        hog = RawClient.ready(daemon.ro_sock)
        pump({hog.sock: struct.pack(">I", 4 << 20) + b"\x00" * (1 << 20)}, patience=0.2)
        time.sleep(1)  # the hog's deadline comes a second before the next frame's
        name = "x" * 100_000
        late = RawClient.ready(daemon.ro_sock)
        late.send([0, 7, "lookup_domain", [name]])
        reply = late.recv()
        assert reply[:3] == [2, 7, "NoSuchDomain"], reply[:4]
        expelled = hog.recv()
        assert expelled[:3] == [2, 0, "ProtocolError"] and "frame_timeout" in expelled[3]
        assert holder.call("list_domains")[0] == 1
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("frame_timeout", float("nan")),
        ("frame_timeout", 0),
        ("frame_timeout", True),
        ("max_receive_buffer", (4 << 20) - 1),
        ("max_receive_buffer", 1.5e8),
    ],
)
def test_io_config_values_checked(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, **{key: value})


def test_io_config_values_taken() -> None:
    config = load_config(None, frame_timeout=2, max_receive_buffer=8 << 20)
    assert (config.frame_timeout, config.max_receive_buffer) == (2.0, 8 << 20)


# ---- M13: SIGHUP ----------------------------------------------------------------------------


def test_sighup_reopens_the_log_and_keeps_serving(tmp_path: Path) -> None:
    log_file = tmp_path / "jobd.log"
    daemon = Jobd(tmp_path / "run", "--log-file", str(log_file)).wait_ready()
    try:
        client = RawClient.ready(daemon.sock, "sim:///hup?rate=1")
        job = client.call("job_begin", "vm1", SLOW_PULL, 0)[2][0]
        log_file.rename(tmp_path / "jobd.log.1")  # logrotate, then its postrotate
        daemon.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 15
        while not (log_file.exists() and "SIGHUP" in log_file.read_text()):
            assert daemon.proc.poll() is None, f"jobd died of SIGHUP: {daemon.proc.returncode}"
            assert time.monotonic() < end, "no SIGHUP line in the reopened log file"
            time.sleep(0.05)
        assert daemon.proc.poll() is None
        assert job_state(client, job) == "running"
        assert RawClient.ready(daemon.sock).call("list_domains")[0] == 1
        assert daemon.stop() == 0
        assert not (daemon.run_dir / "jobd.pid").exists()
    finally:
        daemon.stop()


# ---- L5: a request id used twice ------------------------------------------------------------


def test_request_id_in_flight_is_refused(jobd: Jobd) -> None:
    client = RawClient.ready(jobd.sock, "sim:///ids?rate=1", timeout=5)
    job = client.call("job_begin", "vm1", SLOW_PULL, 0)[2][0]
    client.send([0, 50, "job_wait", [job, None]])
    client.send([0, 50, "job_wait", [job, None]])
    refused = client.recv()  # the first wait blocks: this answers the second
    assert refused[:3] == [2, 50, "BadRequest"], refused
    assert "request id 50 is already in flight" in refused[3], refused
    client.send([4, 50])  # cancels the one wait there is
    seen: list[list[Any]] = []

    def until(rid: int) -> list[Any]:
        while True:
            seen.append(msg := client.recv())
            if msg[1] == rid:
                return msg

    client.send([0, 51, "job_abort", [job]])
    until(51)
    client.send([0, 52, "job_wait", [job, 10.0]])
    ended = until(52)
    client.send([0, 53, "list_domains", []])
    until(53)
    # the cancelled wait sends nothing (one left uncancellable replied once the job ended)
    assert [m[:2] for m in seen] == [[1, 51], [1, 52], [1, 53]], seen
    assert ended[2][3] == "cancelled", ended
    client.close()
