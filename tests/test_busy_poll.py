"""Busy-polling (design/daemon.md "Busy-poll"): the blocking client polls its socket for a
while after a request, jobd's read loop after a reply, before either sleeps. The replies
are the ones the sleeping path gets, a jobd that dies during a client's poll fails the
call as it does during a sleep, ``busy_poll_us = 0`` never polls, and the setting is
checked (exit 2)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobd_helpers import BACKUP_VDB, ROOT, Jobd, RawClient
from test_jobd_inline import BEGIN, JOB, _reads
from test_remote_blocking import _blocking_view

import jobcore
import jobcore.remote
from jobcore import protocol
from jobcore.daemon import server
from jobcore.daemon.config import MAX_BUSY_POLL_US, ConfigError, DaemonConfig, load_config
from jobcore.daemon.main import EXIT_CONFIG
from jobcore.daemon.sessions import SHARED_WINDOW, _BusyPollGate
from jobcore.errors import ConnectionLost
from jobcore.protocol import BUSY_POLL_COOL, BusyPoll


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """What every BusyPoll.poll of this process caught: 'hit', 'eof' or 'miss'."""
    seen: Counter[str] = Counter()
    poll = BusyPoll.poll

    def counted(self: BusyPoll, sock: socket.socket, size: int) -> bytes | None:
        got = poll(self, sock, size)
        seen["miss" if got is None else "hit" if got else "eof"] += 1
        return got

    monkeypatch.setattr(BusyPoll, "poll", counted)
    return seen


# ---- the policy ----------------------------------------------------------------------


def test_busy_poll_polls_while_polling_waits_less_and_cools_down_after_a_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "BUSY_POLL_EXPLORE", 4)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        spin = BusyPoll(1000)
        assert spin.budget == pytest.approx(0.001)
        assert [spin.due() for _ in range(4)] == [True, True, True, False]  # explores sleeping
        b.send(b"ping")
        assert spin.poll(a, 64) == b"ping"
        spin.waited(0.0001, polled=True)
        spin.waited(0.0002, polled=False)  # sleeping waited longer: polling is preferred
        assert [spin.due() for _ in range(4)] == [True, True, True, False]
        for _ in range(60):
            spin.waited(0.00001, polled=False)  # now sleeping waits less: it sleeps
        assert [spin.due() for _ in range(4)] == [False, False, False, True]  # explores polling
        for _ in range(30):
            spin.waited(0.009, polled=False)  # counted as at most twice the budget
        assert spin.due()
        assert spin.poll(a, 64) is None  # nothing came within 1 ms: a hiccup
        assert spin.due()
        assert spin.poll(a, 64) is None  # a second miss in a row: it cools down
        assert [spin.due() for _ in range(BUSY_POLL_COOL)] == [False] * BUSY_POLL_COOL
        assert spin.due()
        assert spin.poll(a, 64) is None  # a third: twice as long
        assert not any(spin.due() for _ in range(2 * BUSY_POLL_COOL))
        b.close()
        assert spin.poll(a, 64) == b""  # the peer closed: the end of the stream
    assert not BusyPoll(0).due()


def test_jobd_polls_only_while_one_client_is_busy() -> None:
    gate = _BusyPollGate(50)
    gate.frame(1, 100.0)
    gate.frame(1, 100.001)
    assert not gate.shared(100.002)
    gate.frame(2, 100.003)  # another client's frame right after: both are busy
    assert gate.shared(100.004)
    assert gate.shared(100.003 + SHARED_WINDOW - 0.001)
    assert not gate.shared(100.003 + SHARED_WINDOW)
    gate.frame(1, 101.0)  # long after the last one: one client again
    assert not gate.shared(101.001)
    assert not gate.open(101.001)  # outside an event loop: whether others are ready is unknown


# ---- jobd ------------------------------------------------------------------------------


def _session(path: Path) -> list[list[Any]]:
    with RawClient.ready(path, "sim:///inline?clock=manual") as raw:
        began = raw.call("job_begin", "vm1", BEGIN, 0)
        assert began[0] == 1 and began[2][0] == JOB, began
        replies = []
        for method, args in _reads() * 3:
            time.sleep(0.001)  # jobd finds the socket empty once it answered: it polls
            replies.append(raw.call(method, *args))
        return [[r[0], *r[2:]] for r in replies]  # the request ids differ


def _session_elsewhere(path: Path) -> list[list[Any]]:
    """``_session`` in a client process of its own (one in this process would share the
    daemon's GIL: its next request would always be in before the read loop looked)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, sys; from pathlib import Path; from test_busy_poll import _session; "
            "sys.stdout.write(pickle.dumps(_session(Path(sys.argv[1]))).hex())",
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
        timeout=120,
        check=True,
    )
    replies: list[list[Any]] = pickle.loads(bytes.fromhex(done.stdout))
    return replies


async def _replies(run_dir: Path, busy_poll_us: int) -> list[list[Any]]:
    config = DaemonConfig(run_dir=run_dir, store="memory:", busy_poll_us=busy_poll_us)
    daemon = server.Daemon(config)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(daemon.run, handle_signals=False))
        replies = await anyio.to_thread.run_sync(_session_elsewhere, daemon.rw_path)
        daemon.stop()
    return replies


@pytest.mark.anyio
async def test_jobd_replies_the_same_polling_or_not(
    tmp_path: Path, polls: Counter[str], monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    """The same requests get the same replies from a jobd that polls (up to 10 ms, a
    miss not cooling it down: the client's next request, 1 ms later, is read by a poll)
    as from one with busy_poll_us = 0, which never polls."""
    monkeypatch.setattr(protocol, "BUSY_POLL_COOL", 0)
    monkeypatch.setattr(protocol, "BUSY_POLL_EXPLORE", 1 << 30)  # polls every time
    plain = await _replies(tmp_path / "plain", 0)
    assert not polls
    polled = await _replies(tmp_path / "polled", MAX_BUSY_POLL_US)
    assert polls["hit"] > polls["miss"], polls  # the polls read the requests
    assert polled == plain
    assert {reply[0] for reply in plain} == {1, 2}  # replies and errors both compared


# ---- the blocking client -------------------------------------------------------------


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("busy") / "run", "--busy-poll-us", "0").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_the_client_gets_the_same_replies_polling_or_not(
    jobd: Jobd, polls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every query of the blocking facade, with a job running and one ended (a manual
    clock: nothing moves), gives the same results with BUSY_POLL_US 0 (never polls) and
    100 ms (every reply is caught by a poll)."""
    monkeypatch.setattr(protocol, "BUSY_POLL_COOL", 0)
    monkeypatch.setattr(protocol, "BUSY_POLL_EXPLORE", 1 << 30)  # polls every time
    uri = jobd.uri("clock=manual", host="polling")
    with jobcore.open(uri) as conn:
        dom = conn.lookupByName("vm1")
        ended = jobcore.JobBegin(dom, "<job type='blockpull'><disk name='vdb'/></job>")
        assert jobcore.JobWait(ended, timeout=10).state is jobcore.JobState.COMPLETED
        job = jobcore.JobBegin(dom, BACKUP_VDB.format(tag="polling"))
    views = []
    polls.clear()
    for budget_us in (0, 100_000):
        monkeypatch.setattr(jobcore.remote, "BUSY_POLL_US", budget_us)
        with jobcore.open(uri) as conn:
            views.append([_blocking_view(conn, "vm1", j.uuid) for j in (job, ended)])
        if not budget_us:
            assert not polls
    assert polls["hit"] > polls["miss"], polls  # the polls read the replies
    assert views[0] == views[1]
    with jobcore.open(uri) as conn:
        jobcore.JobAbort(jobcore.JobLookupByUUID(conn.lookupByName("vm1"), job.uuid))


def _lost_during_a_wait(run_dir: Path, budget_us: int) -> tuple[str, str]:
    """The error of a JobWait whose jobd is killed while the call waits for its reply."""
    daemon = Jobd(run_dir).wait_ready()
    try:
        jobcore.remote.BUSY_POLL_US = budget_us
        with jobcore.open(daemon.uri("rate=1&reconnect=0", host="lost")) as conn:
            job = jobcore.JobBegin(conn.lookupByName("vm1"), BACKUP_VDB.format(tag="lost"))
            threading.Timer(0.5, daemon.proc.send_signal, (signal.SIGKILL,)).start()
            with pytest.raises(ConnectionLost) as lost:
                jobcore.JobWait(job, timeout=30)
        return type(lost.value).__name__, str(lost.value).replace(str(run_dir), "RUN")
    finally:
        daemon.stop()


def test_a_jobd_that_dies_during_a_poll_fails_the_call_as_during_a_sleep(
    tmp_path: Path, polls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobcore.remote, "BUSY_POLL_US", 0)  # restored after the test
    monkeypatch.setattr(protocol, "BUSY_POLL_EXPLORE", 1 << 30)  # polls every time
    slept = _lost_during_a_wait(tmp_path / "slept", 0)
    assert not polls
    polled = _lost_during_a_wait(tmp_path / "polled", 20_000_000)  # polls for 20 s
    assert polls["eof"] == 1  # the poll saw the socket close
    assert polled == slept


# ---- the setting ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", str(MAX_BUSY_POLL_US + 1), '"50"', "true", "1.5"])
def test_busy_poll_us_is_checked(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"busy_poll_us = {value}\n")
    with pytest.raises(ConfigError, match="busy_poll_us"):
        load_config(config)
    assert load_config(None, busy_poll_us=0).busy_poll_us == 0
    assert DaemonConfig().busy_poll_us > 0
    for args in (["--config", str(config)], ["--busy-poll-us", "-5"], ["--busy-poll-us", "x"]):
        run = subprocess.run(
            [sys.executable, "-m", "jobcore.daemon", "--run-dir", str(tmp_path / "r"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert run.returncode == EXIT_CONFIG, run.stderr
        assert "busy_poll_us" in run.stderr or "--busy-poll-us" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "r" / "jobd.sock").exists()
