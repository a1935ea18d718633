"""Read-only clients (jobd-ro.sock is 0666: any local user) cannot starve read-write ones:
the read-only socket has subscription caps, send and receive budgets, per-uid limits and
an idle timeout of its own, and does not pin driver connections (design/daemon.md,
"Read-only and read-write fairness")."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import Jobd, RawClient, daemon_with, jobctl, ok

from jobcore.cli import ExitCode
from jobcore.daemon.config import ConfigError, load_config
from jobcore.protocol import PROTOCOL_VERSION

# jobd's defaults (spelled out, so that this file also runs, and fails, against a jobd
# without them)
MAX_RO_CLIENTS_PER_UID = 64
MAX_RO_SUBSCRIPTIONS_PER_UID = 256
PRE_HELLO_FRAME = 64 << 10

CLIENTS = 25
PULL = "<job type='blockpull'><disk name='vda'/></job>"
BIG_DESC = (
    "<job type='backup'><domainbackup><disks><disk name='vdb'/></disks></domainbackup>"
    "<domaincheckpoint><description>{}</description></domaincheckpoint></job>"
)


@pytest.fixture
def jobd(tmp_path: Path) -> Iterator[Jobd]:
    daemon = daemon_with(tmp_path)
    try:
        yield daemon
    finally:
        daemon.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_fairness_config_keys_are_checked() -> None:
    import jobcore.daemon.config as jobd_module

    assert (
        jobd_module.MAX_RO_CLIENTS_PER_UID,
        jobd_module.MAX_RO_SUBSCRIPTIONS_PER_UID,
        jobd_module.PRE_HELLO_FRAME,
    ) == (MAX_RO_CLIENTS_PER_UID, MAX_RO_SUBSCRIPTIONS_PER_UID, PRE_HELLO_FRAME)
    config = load_config(
        None,
        max_ro_clients_per_uid=8,
        ro_idle_timeout=5,
        max_ro_subscriptions=100,
        max_ro_subscriptions_per_uid=10,
        ro_max_event_buffer=16,
        ro_subscriber_lost_limit=0,
        max_ro_queued_send=16 << 20,
        max_queued_send=64 << 20,
        max_ro_receive_buffer=8 << 20,
    )
    assert (config.max_ro_clients_per_uid, config.ro_idle_timeout) == (8, 5.0)
    assert (config.max_ro_subscriptions, config.max_ro_subscriptions_per_uid) == (100, 10)
    for key, bad in (
        ("max_ro_clients_per_uid", 0),
        ("ro_max_event_buffer", 5000),
        ("max_ro_queued_send", 1024),
        ("max_ro_receive_buffer", 1),
        ("ro_idle_timeout", -1),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, **{key: bad})


# ---- M-A: subscriptions -----------------------------------------------------------------


def test_readonly_subscriptions_do_not_use_up_the_read_write_share(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "max_subscriptions = 8\n")
    try:
        rw = RawClient(daemon.sock)
        ro = RawClient(daemon.ro_sock)
        for _ in range(8):
            assert ro.call("subscribe", None, None, None, None, 16)[0] == 1
        # the read-only client's 8 do not count against the read-write socket's 8
        for _ in range(8):
            reply = rw.call("subscribe", None, None, None, None, 16)
            assert reply[0] == 1, reply
        refused = rw.call("subscribe", None, None, None, None, 16)
        assert refused[0] == 2 and "max_subscriptions" in refused[3], refused
        # jobctl events, refused, says so and never claims to be watching
        events = jobctl(daemon.uri(), "events")
        assert events.returncode == ExitCode.ERROR, events.stderr
        assert "max_subscriptions" in events.stderr
        assert "watching events" not in events.stderr
    finally:
        daemon.stop()


def test_one_uid_gets_a_bounded_share_of_readonly_subscriptions(jobd: Jobd) -> None:
    rw = RawClient(jobd.sock)
    clients = [RawClient(jobd.ro_sock) for _ in range(MAX_RO_SUBSCRIPTIONS_PER_UID // 64 + 1)]
    placed = refusals = 0
    for ro in clients:
        for _ in range(64):
            reply = ro.call("subscribe", None, None, None, None, 16)
            if reply[0] == 1:
                placed += 1
            else:
                assert "max_ro_subscriptions_per_uid" in reply[3], reply
                refusals += 1
    assert placed == MAX_RO_SUBSCRIPTIONS_PER_UID and refusals == 64
    # read-write clients are not affected
    begun = jobctl(jobd.uri(), "begin", "--wait", "vm1", str(_pull_file(jobd)))
    assert begun.returncode == 0, begun.stderr
    assert rw.call("subscribe", None, None, None, None, 16)[0] == 1


def _pull_file(jobd: Jobd) -> Path:
    path = jobd.run_dir.parent / "pull.xml"
    path.write_text(PULL)
    return path


# ---- M-B: read-only subscription buffers --------------------------------------------------


def test_readonly_subscription_buffers_are_clamped(jobd: Jobd) -> None:
    rw = RawClient(jobd.sock, "sim:///default?rate=0", timeout=60)
    job = ok(rw.call("job_begin", "vm1", BIG_DESC.format("x" * 400_000), 0))
    ro = RawClient(jobd.ro_sock, timeout=60)
    ro.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # a 400 KB reply the client does not read blocks its connection: every event waits
    # in its subscription's buffer
    big = ro.request("job_xml_desc", job[0])
    sub = ro.request("subscribe", None, None, None, None, 4096)
    time.sleep(0.3)
    for i in range(300):  # 3 events per job
        rw.call("job_begin", "vm2" if i % 2 else "vm1", PULL, 0)
    assert ok(rw.call("list_domains"))
    events = lost = early = 0
    replied = False
    ro.sock.settimeout(2)
    try:
        while True:
            msg = ro.recv()
            if msg[0] == 1 and msg[1] == big:
                replied = True
            if msg[0] == 3 and msg[1] == sub:
                events += 1
                early += not replied  # sent before the reply blocked the connection
                lost += msg[2][10]
    except TimeoutError:
        pass
    # behind the blocking reply, the read-only buffer held about 256 events (4096 were
    # asked for: the clamp is what this shows), plus the one the forwarder holds and the
    # few a lost count rides on (seen: 259); the others were counted as lost. On a loaded
    # machine the 400 KB reply can be formatted after some events went out: those come
    # before it and were never held back.
    assert replied
    assert events - early <= 256 + 8 and events + lost >= 600, (events, early, lost)


def test_never_reading_readonly_subscription_is_ended_early(tmp_path: Path) -> None:
    """ro_subscriber_lost_limit (default 1000) ends a read-only subscription that keeps
    losing events long before subscriber_lost_limit (10000) would."""
    daemon = daemon_with(tmp_path, "ro_subscriber_lost_limit = 50\n")
    try:
        rw = RawClient(daemon.sock, "sim:///default?rate=0", timeout=60)
        job = ok(rw.call("job_begin", "vm1", BIG_DESC.format("x" * 400_000), 0))
        ro = RawClient(daemon.ro_sock, timeout=60)
        ro.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ro.request("job_xml_desc", job[0])  # unread: the subscription's buffer fills
        sub = ro.request("subscribe", None, None, None, None, 8)
        watcher = RawClient(daemon.sock)
        assert watcher.call("subscribe", None, None, None, None, 8)[0] == 1  # rw: 10000
        time.sleep(0.3)
        for i in range(100):
            rw.call("job_begin", "vm2" if i % 2 else "vm1", PULL, 0)
        ro.sock.settimeout(5)
        while (msg := ro.recv())[0] != 5:
            pass
        assert msg[:2] == [5, sub] and msg[3] == "overflow" and msg[2] > 50, msg
        assert watcher.call("list_domains")[0] == 1
    finally:
        daemon.stop()


# ---- M-C: the read-only socket's send budget ------------------------------------------------


def test_never_reading_readonly_clients_pin_a_bounded_amount_of_replies(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path)  # max_ro_queued_send: 64 MiB
    try:
        rw = RawClient(daemon.sock, "sim:///default?rate=1", timeout=60)
        job = ok(rw.call("job_begin", "vm1", BIG_DESC.format("x" * 400_000), 0))
        base = rss_kib(daemon.proc.pid)
        clients = []
        for _ in range(CLIENTS):  # 8 MiB each would be 200 MiB
            ro = RawClient(daemon.ro_sock, timeout=0.2)
            ro.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(64):
                try:
                    ro.request("job_xml_desc", job[0])
                except TimeoutError:
                    break
            clients.append(ro)
        time.sleep(3)
        grown = (rss_kib(daemon.proc.pid) - base) >> 10
        print(f"{CLIENTS} never-reading read-only clients: jobd grew by {grown} MiB")
        assert grown < 110, f"jobd grew by {grown} MiB"
        # the read-write client still gets its big replies at once
        started = time.monotonic()
        for _ in range(10):
            assert len(ok(rw.call("job_xml_desc", job[0]))) > 400_000
        assert time.monotonic() - started < 5
    finally:
        daemon.stop()


# ---- M-D: receive budgets ---------------------------------------------------------------------


def test_big_frame_before_hello_is_refused(jobd: Jobd) -> None:
    for path in (jobd.ro_sock, jobd.sock):
        raw = RawClient(path, None)
        raw.sock.sendall(struct.pack(">I", PRE_HELLO_FRAME + 1))
        reply = raw.recv()
        assert reply[0] == 2 and reply[1] == 0 and "before hello" in reply[3], reply
        assert raw.closed()


def test_readonly_frames_do_not_hold_the_read_write_receive_budget(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "frame_timeout = 8\n")
    try:
        rw = RawClient(daemon.sock, timeout=30)
        attackers = []
        for _ in range(20):  # 20 x 4 MiB: more than the whole 64 MiB budget
            ro = RawClient(daemon.ro_sock)
            ro.sock.sendall(struct.pack(">I", (4 << 20) - 1) + b"\x00")
            attackers.append(ro)
        time.sleep(0.5)
        started = time.monotonic()
        reply = rw.call("lookup_domain", "x" * 100_000)  # a frame over 64 KiB
        assert reply[0] == 2 and reply[2] == "NoSuchDomain", reply
        assert time.monotonic() - started < 3
    finally:
        daemon.stop()


# ---- M-F: driver connections ------------------------------------------------------------------


def test_readonly_clients_do_not_pin_driver_connections(jobd: Jobd) -> None:
    readers = []
    for i in range(32):
        opener = RawClient(jobd.sock, f"sim:///h{i}")
        readers.append(RawClient(jobd.ro_sock, f"sim:///h{i}"))
        opener.close()
    time.sleep(0.3)
    newcomer = RawClient(jobd.sock, "sim:///newhost", timeout=20)
    assert newcomer.hello is not None and newcomer.hello[0] == 1, newcomer.hello
    # the reader of the evicted connection was told why and disconnected
    told = []
    for ro in readers:
        ro.sock.settimeout(0.05)
        try:
            msg = ro.recv()
        except TimeoutError:
            continue
        told.append(msg)
    assert len(told) == 1, told
    assert told[0][:3] == [2, 0, "DaemonUnreachable"] and "sim:///h0" in told[0][3], told


# ---- L-A: read-only slots -----------------------------------------------------------------------


def test_one_uid_cannot_hold_every_readonly_slot(jobd: Jobd) -> None:
    rw = RawClient(jobd.sock)
    held = [RawClient(jobd.ro_sock) for _ in range(MAX_RO_CLIENTS_PER_UID)]
    assert all(h.hello is not None and h.hello[0] == 1 for h in held)
    one_more = RawClient(jobd.ro_sock)
    assert one_more.hello is not None and one_more.hello[:3] == [2, 0, "DaemonBusy"]
    assert "max_ro_clients_per_uid" in one_more.hello[3]
    held.pop().close()
    time.sleep(0.2)
    assert RawClient(jobd.ro_sock).hello == ok_hello(True)
    assert rw.hello == ok_hello(False)


def ok_hello(readonly: bool) -> list[Any]:
    return [1, 1, [PROTOCOL_VERSION, readonly, "sim:///default"]]


def test_idle_readonly_clients_are_closed(tmp_path: Path) -> None:
    daemon = daemon_with(tmp_path, "ro_idle_timeout = 0.5\n")
    try:
        rw = RawClient(daemon.sock)
        idle = RawClient(daemon.ro_sock)
        watching = RawClient(daemon.ro_sock)
        assert watching.call("subscribe", None, None, None, None, 16)[0] == 1
        time.sleep(1.5)
        msg = idle.recv()
        assert msg[:3] == [2, 0, "DaemonUnreachable"] and "ro_idle_timeout" in msg[3], msg
        assert idle.closed()
        # a subscription is activity; the read-write socket has no idle timeout
        assert watching.call("list_domains")[0] == 1
        assert rw.call("list_domains")[0] == 1
    finally:
        daemon.stop()
