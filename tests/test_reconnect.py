"""The remote client across a dying and restarting jobd (design/daemon.md, "Reconnecting"):
a call in flight raises ConnectionLost at once, the client reconnects by itself, its
subscriptions resume from the last event seq they saw (a job's FINAL event exactly once),
and ``jobctl wait`` / ``jobctl events`` carry on across the restart."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import anyio
import attrs
import pytest
from jobd_helpers import BACKUP_VDB, ROOT, Jobd, jobctl, write

import jobcore
from jobcore.errors import ConnectionLost, DaemonUnreachable, InvalidArgument, JobError
from jobcore.events import EventFilter, EventKind, JobEvent, Subscription
from jobcore.lifecycle import JobState
from jobcore.remote import _RemoteHub

SLOW = "rate=1048576"  # vdb (512 MiB) takes ~8 minutes: still running when jobd dies
FAST = "rate=0"  # instant


def store_args(run_dir: Path) -> tuple[str, ...]:
    return ("--store", f"sqlite:///{run_dir.parent / 'jobs.sqlite'}")


def start(run_dir: Path, *args: str) -> Jobd:
    return Jobd(run_dir, *args).wait_ready()


def kill(daemon: Jobd) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.stop()  # closes its log


async def next_event(sub: Subscription, timeout: float = 20) -> JobEvent:
    with anyio.fail_after(timeout):
        return await sub.get()


async def next_state(sub: Subscription, timeout: float = 20) -> JobEvent:
    """The next STATE event (progress reports may come between)."""
    while True:
        ev = await next_event(sub, timeout)
        if ev.kind is EventKind.STATE:
            return ev


async def next_final(sub: Subscription, timeout: float = 20) -> JobEvent:
    """The next FINAL event (a driver that recovers jobs may report states first)."""
    while True:
        ev = await next_event(sub, timeout)
        if ev.kind is EventKind.FINAL:
            return ev


async def no_event(sub: Subscription, within: float = 1.0) -> None:
    with anyio.move_on_after(within):
        ev = await sub.get()
        raise AssertionError(f"unexpected event {ev}")


# ---- a call in flight when jobd dies ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_wait_in_flight_raises_connection_lost_at_once(tmp_path: Path) -> None:
    daemon = start(tmp_path / "run")
    try:
        async with jobcore.connect(daemon.uri(SLOW, host="slow")) as conn:
            dom = await conn.lookup_domain("vm1")
            job = await dom.job_begin(BACKUP_VDB.format(tag="lost"))
            caught: list[BaseException] = []
            failed = anyio.Event()

            async def waiter() -> None:
                try:
                    await job.wait()
                except JobError as exc:
                    caught.append(exc)
                    failed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.3)  # the wait is on the wire
                killed = time.monotonic()
                daemon.proc.send_signal(signal.SIGKILL)
                with anyio.fail_after(5):  # a hang fails here
                    await failed.wait()
            assert time.monotonic() - killed < 2
            assert isinstance(caught[0], ConnectionLost), caught
            assert isinstance(caught[0], DaemonUnreachable)  # jobctl exits 6 on it
            assert "lost" in str(caught[0])
    finally:
        daemon.stop()


@pytest.mark.anyio
async def test_a_slow_call_raises_connection_lost_at_once(tmp_path: Path) -> None:
    """A stopped jobd makes every call slow; killed, the call in flight fails at once."""
    daemon = start(tmp_path / "run")
    try:
        async with jobcore.connect(daemon.uri("reconnect=0")) as conn:
            dom = await conn.lookup_domain("vm1")
            daemon.proc.send_signal(signal.SIGSTOP)
            caught: list[BaseException] = []
            failed = anyio.Event()

            async def slow_call() -> None:
                try:
                    await dom.info()
                except JobError as exc:
                    caught.append(exc)
                    failed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_call)
                await anyio.sleep(0.5)
                assert not caught  # jobd is stopped: the call waits
                daemon.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                with anyio.fail_after(5):
                    await failed.wait()
            assert time.monotonic() - killed < 2
            assert isinstance(caught[0], ConnectionLost), caught
            # reconnect=0: no reconnection, the next call fails at once too
            with anyio.fail_after(2), pytest.raises(DaemonUnreachable):
                await dom.info()
    finally:
        daemon.stop()


def test_the_reconnect_parameter_is_checked() -> None:
    for bad in ("x", "-1", "nan", "inf"):
        with pytest.raises(InvalidArgument, match="'reconnect'"):
            jobcore.open(f"sim+unix:///default?socket=/nonexistent&reconnect={bad}")


# ---- reconnecting, resubscribing, resuming ---------------------------------------------------


@pytest.mark.anyio
async def test_reconnect_resubscribes_and_resumes_with_one_final_event(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = start(run_dir, *store_args(run_dir))
    try:
        async with (
            jobcore.connect(daemon.uri(FAST, host="fast")) as fast,
            jobcore.connect(daemon.uri(SLOW, host="slow")) as slow,
        ):
            done = await (await fast.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="d"))
            assert (await done.wait()).state is JobState.COMPLETED
            dom = await slow.lookup_domain("vm1")
            sub = slow.subscribe(domain="vm1", kinds=[EventKind.STATE, EventKind.FINAL])
            fast_sub = fast.subscribe(job=done.uuid)  # saw nothing of it yet
            job = await dom.job_begin(BACKUP_VDB.format(tag="r"))
            began = await next_event(sub)
            assert (began.job, began.kind, began.seq) == (job.uuid, EventKind.STATE, 1)

            kill(daemon)
            with anyio.fail_after(2), pytest.raises(ConnectionLost):
                await job.info()  # in flight or not: the socket is gone
            # subscribed while jobd is away: sent once it is back
            late = fast.subscribe(job=done.uuid)
            daemon = start(run_dir, *store_args(run_dir))

            # the same handles work again once the client has reconnected by itself
            with anyio.fail_after(20):
                info = await job.info()
            assert info.uuid == job.uuid
            if info.state.active:  # a driver that recovers jobs: end it to see its final
                await job.abort()
                info = await job.wait()
            final = await next_final(sub)
            assert (final.job, final.kind, final.state) == (job.uuid, EventKind.FINAL, info.state)
            assert final.stats is not None and final.stats["state"] == str(info.state)
            await no_event(sub)  # exactly one final event, whatever was replayed

            # the job that had ended before: its final event once, to the subscriptions
            # that had not seen it, none to the one that had
            for s in (fast_sub, late):
                ev = await next_event(s)
                assert (ev.job, ev.kind, ev.state) == (done.uuid, EventKind.FINAL, info_state(ev))
                assert ev.seq == 3 and ev.lost_before == 0
                await no_event(s, 0.3)
            assert (await (await fast.lookup_domain("vm1")).info()).name == "vm1"
    finally:
        daemon.stop()


def info_state(ev: JobEvent) -> JobState:
    assert ev.stats is not None
    return JobState(ev.stats["state"])


@pytest.mark.anyio
async def test_a_resumed_subscription_is_told_what_it_missed(tmp_path: Path) -> None:
    """A job whose begin the subscriber saw and that ended while jobd was away comes back
    as its FINAL event, counting the terminal STATE event it skipped as lost."""
    run_dir = tmp_path / "run"
    daemon = start(run_dir, *store_args(run_dir))
    try:
        async with jobcore.connect(daemon.uri(SLOW, host="slow")) as conn:
            job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="m"))
            with conn.subscribe(job=job.uuid) as sub:
                await job.info()  # the subscription is in place
                await job.pause()
                paused = await next_state(sub)
                assert (paused.state, paused.seq) == (JobState.PAUSED, 2)
                kill(daemon)
                await anyio.sleep(0.3)  # the client notices (start() below blocks the loop)
                daemon = start(run_dir, *store_args(run_dir))
                with anyio.fail_after(20):
                    info = await job.info()
                ended_while_away = info.state.terminal  # a driver that recovers jobs:
                if not ended_while_away:  # it may still run; it ends now
                    await job.abort()
                    info = await job.wait()
                ev = await next_final(sub)
                assert ev.state is info.state
                if ended_while_away:  # the catch-up: its terminal STATE event was skipped
                    assert (ev.seq, ev.lost_before) == (paused.seq + 2, 1)
                    assert sub.lost == 1
                await no_event(sub, 0.5)
    finally:
        daemon.stop()


@pytest.mark.anyio
async def test_the_client_gives_up_after_its_reconnect_limit(tmp_path: Path) -> None:
    daemon = start(tmp_path / "run")
    try:
        async with jobcore.connect(daemon.uri("reconnect=1")) as conn:
            sub = conn.subscribe()
            await conn.list_domains()
            kill(daemon)
            started = time.monotonic()
            await anyio.sleep(0.3)  # the client notices the loss (kill() blocked the loop)
            with anyio.fail_after(10), pytest.raises(DaemonUnreachable, match="did not come back"):
                await conn.list_domains()
            assert 0.5 < time.monotonic() - started < 5
            with anyio.fail_after(2), pytest.raises(anyio.EndOfStream):
                await sub.get()  # its subscriptions end with it
    finally:
        daemon.stop()


# ---- jobctl across a restart -----------------------------------------------------------------


class _Lines:
    """A subprocess's stdout lines, read by a thread (select() cannot see the lines a
    text stream already buffered)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no line in time") from None


def _popen_jobctl(uri: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "JOBCORE_URI": uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "jobcore.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


EXIT_OF = {"completed": 0, "failed": 3, "cancelled": 4}


def test_jobctl_wait_waits_across_a_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = start(run_dir, *store_args(run_dir))
    uri = daemon.uri(SLOW)
    try:
        begun = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDB.format(tag="w")))
        assert begun.returncode == 0, begun.stderr
        job = begun.stdout.strip()
        waiter = _popen_jobctl(uri, "wait", job)
        time.sleep(1.5)  # waiting on the wire
        assert waiter.poll() is None
        kill(daemon)
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting: reconnecting
        daemon = start(run_dir, *store_args(run_dir))
        state = json.loads(jobctl(uri, "info", job, "--json").stdout)["state"]
        if state not in EXIT_OF:  # a driver that recovers jobs: end it
            assert jobctl(uri, "abort", job).returncode == 0
        _, err = waiter.communicate(timeout=60)
        final = json.loads(jobctl(uri, "info", job, "--json").stdout)["state"]
        assert waiter.returncode == EXIT_OF[final], err
        assert "Traceback" not in err
    finally:
        daemon.stop()


def test_jobctl_wait_after_a_restart_reports_a_retained_success(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = start(run_dir, *store_args(run_dir))
    uri = daemon.uri(FAST)
    try:
        xml = write(tmp_path, "b.xml", BACKUP_VDB.format(tag="ok"))
        begun = jobctl(uri, "begin", "vm1", xml, "--wait")
        assert begun.returncode == 0, begun.stderr
        job = begun.stdout.strip()
        kill(daemon)
        daemon = start(run_dir, *store_args(run_dir))
        waited = jobctl(uri, "wait", job, "--json")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["state"] == "completed"
    finally:
        daemon.stop()


def test_jobctl_events_keeps_following_across_a_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    daemon = start(run_dir, *store_args(run_dir))
    uri = daemon.uri(FAST)
    xml = write(tmp_path, "b.xml", BACKUP_VDB.format(tag="e"))
    follower = _popen_jobctl(uri, "events", "--no-progress", "--json")
    lines = _Lines(follower)
    try:
        assert follower.stderr is not None
        assert "watching events" in follower.stderr.readline()

        def finals(n: int) -> list[dict[str, object]]:
            seen: list[dict[str, object]] = []
            while len(seen) < n:
                ev = json.loads(lines.next(30))
                if ev["kind"] == "final":
                    seen.append(ev)
            return seen

        first = jobctl(uri, "begin", "vm1", xml, "--wait").stdout.strip()
        assert finals(1)[0]["uuid"] == first
        kill(daemon)
        daemon = start(run_dir, *store_args(run_dir))
        time.sleep(1.0)  # jobctl events reconnects (its backoff is short)
        xml2 = write(tmp_path, "b2.xml", BACKUP_VDB.format(tag="e2"))
        second = jobctl(uri, "begin", "vm1", xml2, "--wait")
        assert second.returncode == 0, second.stderr
        assert finals(1)[0]["uuid"] == second.stdout.strip()
        assert follower.poll() is None
    finally:
        follower.kill()
        follower.wait()
        daemon.stop()


def test_a_numbered_event_is_delivered_once() -> None:
    """A resume's catch-up event and the live event it anticipated: the client delivers a
    job's numbered event only if it is newer than the last one it delivered."""
    hub = _RemoteHub(cast(Any, None), 1, EventFilter(), 16)
    sub = hub.subscribe(EventFilter(), 16)
    job = uuid.uuid4()
    final = JobEvent(EventKind.FINAL, job, "backup", "vm1", JobState.COMPLETED, seq=3)
    hub.deliver(final)  # the catch-up
    hub.deliver(attrs.evolve(final, kind=EventKind.STATE, seq=2))  # the live ones, late
    hub.deliver(final)
    hub.deliver(attrs.evolve(final, kind=EventKind.PROGRESS, seq=0))  # never numbered
    assert [ev.kind for ev in iter(sub.get_nowait, None)] == [EventKind.FINAL, EventKind.PROGRESS]
    assert hub.resumed() == [(job, 3)]
