"""The blocking facade on a jobd URI: calls on the caller's thread over a blocking socket
(jobcore.remote.connect_blocking), no event loop until events need one; the same results
and typed errors as the async client; threads sharing one connection with their requests
in flight together; jobd's reads served in the read loop; reconnects, keepalive, timeouts."""

from __future__ import annotations

import os
import re
import resource
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import BACKUP_VDA, BACKUP_VDB, Jobd, RawClient, frame
from test_client_timeouts import SHORT, FakeDaemon

import jobcore
import jobcore.remote
from jobcore.errors import ConnectionLost, InvalidArgument, JobConflict, NoSuchDomain, XMLError
from jobcore.protocol import AccessDenied, DaemonUnreachable
from jobcore.remote import RemoteConnection

MANUAL = "clock=manual"  # nothing moves: both clients see the same values


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("blocking") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def _loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("jobcore ")]


def test_a_jobd_connection_starts_no_event_loop_until_events(jobd: Jobd) -> None:
    """Calls run on the caller's thread; subscribe starts the loop (a second socket) and
    returns once jobd has the subscription: the events of a job begun next arrive. Before:
    every jobd connection ran an event loop thread from open on, each call hopping there."""
    uri = jobd.uri("rate=0", host="noloop")
    before = _loop_threads()
    with jobcore.open(uri) as conn:
        dom = conn.lookupByName("vm1")
        assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
        assert [d.name() for d in conn.listAllDomains()] == ["vm1", "vm2"]
        job = jobcore.JobBegin(dom, BACKUP_VDB.format(tag="noloop-1"))
        assert jobcore.JobWait(job, timeout=10).state is jobcore.JobState.COMPLETED
        assert _loop_threads() == before
        with conn.subscribe(domain="vm1") as sub:
            assert len(_loop_threads()) == len(before) + 1
            second = jobcore.JobBegin(dom, BACKUP_VDB.format(tag="noloop-2"))
            assert sub.get(timeout=10).job == second.uuid
        jobcore.JobWait(second, timeout=10)
    assert _loop_threads() == before


def _blocking_view(conn: Any, dom_name: str, job_id: uuid.UUID) -> dict[str, Any]:
    dom = conn.lookupByName(dom_name)
    job = jobcore.JobLookupByUUID(dom, job_id)
    legacy = jobcore.JobLookupByUUID(dom, jobcore.LEGACY_DOMAIN_JOB_UUID)
    return {
        "dom": (dom.name(), dom.UUIDString()),
        "doms": [d.name() for d in conn.listAllDomains()],
        "jobInfo": dom.jobInfo(),
        "jobStats": dom.jobStats(),
        "completed": dom.jobStats(
            jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED | jobcore.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        ),
        "blockJobInfo": dom.blockJobInfo("vda"),
        "info": jobcore.JobGetInfo(job),
        "stats": jobcore.JobGetStats(job),
        "xml": jobcore.JobGetXMLDesc(job),
        "legacy": jobcore.JobGetInfo(legacy),
        "jobs": sorted(str(j.uuid) for j in dom.listJobs()),
        "backup": dom.backupGetXMLDesc(),
    }


async def _async_view(uri: str, dom_name: str, job_id: uuid.UUID) -> dict[str, Any]:
    async with jobcore.connect(uri) as conn:
        dom = await conn.lookup_domain(dom_name)
        job = await conn.job_lookup_by_uuid(dom, job_id)
        legacy = await conn.job_lookup_by_uuid(dom, jobcore.LEGACY_DOMAIN_JOB_UUID)
        flags = jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED | jobcore.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        return {
            "dom": (dom.name, str(dom.uuid)),
            "doms": [d.name for d in await conn.list_domains()],
            "jobInfo": await dom.job_info(),
            "jobStats": await dom.job_stats(),
            "completed": await dom.job_stats(flags),
            "blockJobInfo": await dom.block_job_info("vda"),
            "info": await job.info(),
            "stats": await job.stats(),
            "xml": await job.xml_desc(),
            "legacy": await legacy.info(),
            "jobs": sorted(str(j.uuid) for j in await dom.list_jobs()),
            "backup": await dom.backup_get_xml_desc(),
        }


def _seen(exc: jobcore.JobError) -> tuple[str, str, dict[str, Any]]:
    """An error's class, message and fields; a refused new job's own UUID masked."""
    return type(exc).__name__, re.sub(r"^job '[0-9a-f-]{36}'", "job NEW", str(exc)), vars(exc)


def _error(fn: Any, *args: Any) -> tuple[str, str, dict[str, Any]]:
    try:
        fn(*args)
    except jobcore.JobError as exc:
        return _seen(exc)
    raise AssertionError(f"{fn} raised nothing")


async def _aerror(coro: Any) -> tuple[str, str, dict[str, Any]]:
    try:
        await coro
    except jobcore.JobError as exc:
        return _seen(exc)
    raise AssertionError("raised nothing")


def test_blocking_results_and_errors_equal_the_async_clients(jobd: Jobd) -> None:
    """Every query and error of the blocking path, with a job running and one ended (a
    manual clock: nothing moves between the two clients), equals the async client's."""
    uri = jobd.uri(MANUAL, host="same")
    with jobcore.open(uri) as conn:
        dom = conn.lookupByName("vm1")
        ended = jobcore.JobBegin(dom, "<job type='blockpull'><disk name='vdb'/></job>")
        assert jobcore.JobWait(ended, timeout=10).state is jobcore.JobState.COMPLETED
        running = jobcore.JobBegin(dom, BACKUP_VDA.format(tag="same"))
        blocking = _blocking_view(conn, "vm1", running.uuid)
        errors = [
            _error(conn.lookupByName, "nope"),
            _error(dom.blockPull, "vda"),
            _error(jobcore.JobBegin, dom, "<job type='backup'>\n<oops/></job>"),
            _error(dom.blockJobInfo, "sdz"),
            _error(jobcore.JobResume, running),
        ]

        async def both() -> tuple[dict[str, Any], list[tuple[str, str, dict[str, Any]]]]:
            view = await _async_view(uri, "vm1", running.uuid)
            async with jobcore.connect(uri) as aconn:
                adom = await aconn.lookup_domain("vm1")
                ajob = await aconn.lookup_job(running.uuid)
                aerrors = [
                    await _aerror(aconn.lookup_domain("nope")),
                    await _aerror(adom.block_pull("vda")),
                    await _aerror(adom.job_begin("<job type='backup'>\n<oops/></job>")),
                    await _aerror(adom.block_job_info("sdz")),
                    await _aerror(ajob.resume()),
                ]
            return view, aerrors

        view, aerrors = anyio.run(both)
        assert blocking == view
        assert blocking["info"].state is jobcore.JobState.RUNNING
        assert errors == aerrors
        kinds = [e[0] for e in errors]
        assert kinds == [
            NoSuchDomain.__name__,
            JobConflict.__name__,
            XMLError.__name__,
            InvalidArgument.__name__,
            "OperationInvalid",
        ]
        assert errors[1][2]["holder"] == running.uuid
        assert errors[2][2]["line"] == 2
        jobcore.JobAbort(running)
        assert jobcore.JobWait(running, timeout=10).state is jobcore.JobState.CANCELLED


def test_threads_share_one_connection_with_requests_in_flight(jobd: Jobd) -> None:
    """One thread waits for a running job (its request stays in flight) while eight others
    make calls on the same connection: each gets its own replies (whichever thread reads
    hands them out), and the wait ends when the job is aborted."""
    with jobcore.open(jobd.uri("rate=1", host="threads")) as conn:
        dom = conn.lookupByName("vm2")
        long_job = jobcore.JobBegin(dom, BACKUP_VDB.format(tag="threads"))
        waited: list[Any] = []
        waiter = threading.Thread(target=lambda: waited.append(jobcore.JobWait(long_job, 60)))
        waiter.start()
        failures: list[BaseException] = []

        def caller(i: int) -> None:
            try:
                for n in range(100):
                    name = ("vm1", "vm2")[(i + n) % 2]
                    got = conn.lookupByName(name)
                    assert got.name() == name
                    info = jobcore.JobGetInfo(jobcore.JobLookupByUUID(dom, long_job.uuid))
                    assert info.uuid == long_job.uuid and info.state is jobcore.JobState.RUNNING
                    assert got.jobStats()["type"] == (
                        jobcore.VIR_DOMAIN_JOB_UNBOUNDED
                        if name == "vm2"
                        else jobcore.VIR_DOMAIN_JOB_NONE
                    )
            except BaseException as exc:
                failures.append(exc)

        callers = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(60)
        assert not failures, failures
        assert waiter.is_alive() and not waited  # still in flight, all along
        jobcore.JobAbort(long_job)
        waiter.join(30)
        assert waited and waited[0].state is jobcore.JobState.CANCELLED


def test_pipelined_reads_and_their_errors_come_back_each_to_its_id(jobd: Jobd) -> None:
    """Reads jobd serves in its read loop, sent in one write with a malformed one and a
    refused one between them: each reply carries its request's id, in order."""
    with RawClient.ready(jobd.sock, "sim:///raw?rate=0") as raw:
        burst = b"".join(
            frame(msgpack.packb(msg))
            for msg in (
                [0, 10, "legacy_job_stats", ["vm1", 0]],
                [0, 11, "lookup_domain", ["nope"]],
                [0, 12, "legacy_job_stats", ["vm1", "not a flag"]],
                [0, 13, "job_info", [b"\x00" * 16]],
                [0, 14, "lookup_domain", ["vm2"]],
            )
        )
        raw.sock.sendall(burst)
        replies = [raw.recv() for _ in range(5)]
    assert [(r[0], r[1]) for r in replies] == [(1, 10), (2, 11), (2, 12), (2, 13), (1, 14)]
    assert replies[0][2] == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
    assert replies[1][2] == "NoSuchDomain"
    assert replies[2][2] == "BadRequest"
    assert replies[3][2] == "NoSuchJob"
    assert replies[4][2][0] == "vm2"


def test_the_read_only_socket_refuses_writes_on_the_blocking_path(jobd: Jobd) -> None:
    with (
        jobcore.open(jobd.uri("rate=0", host="ro")),  # the read-only socket attaches to it
        jobcore.open(jobd.uri("rate=0", readonly=True, host="ro")) as conn,
    ):
        dom = conn.lookupByName("vm1")
        assert dom.jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
        with pytest.raises(AccessDenied, match="read-only access prevents 'job_begin'"):
            jobcore.JobBegin(dom, BACKUP_VDB.format(tag="ro"))
        assert isinstance(conn.aconn, RemoteConnection) and conn.aconn.readonly


def test_a_blocking_connection_reconnects_after_jobd_restarts(tmp_path: Path) -> None:
    """A call in flight when jobd dies fails with ConnectionLost; the next call reconnects
    (jobd back on the same run directory) and works; with reconnect=0 it raises."""
    run_dir = tmp_path / "run"
    daemon = Jobd(run_dir).wait_ready()
    try:
        conn = jobcore.open(daemon.uri("rate=1"))
        once = jobcore.open(daemon.uri("rate=1&reconnect=0"))
        try:
            dom = conn.lookupByName("vm1")
            job = jobcore.JobBegin(dom, BACKUP_VDB.format(tag="again"))
            lost: list[BaseException] = []

            def wait() -> None:
                try:
                    jobcore.JobWait(job, 60)
                except BaseException as exc:
                    lost.append(exc)

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.3)
            assert once.lookupByName("vm1").name() == "vm1"
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.stop()
            waiter.join(30)
            assert lost and isinstance(lost[0], ConnectionLost), lost
            daemon = Jobd(run_dir).wait_ready()
            assert conn.lookupByName("vm2").name() == "vm2"  # reconnected
            assert dom.jobStats()["type"] in (
                jobcore.VIR_DOMAIN_JOB_NONE,
                jobcore.VIR_DOMAIN_JOB_UNBOUNDED,
            )
            with pytest.raises(DaemonUnreachable):
                once.lookupByName("vm1")
        finally:
            conn.close()
            once.close()
    finally:
        daemon.stop()


def test_a_blocking_call_to_a_stopped_jobd_is_lost_not_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocking path pings a silent jobd while a call waits, and loses it after
    KEEPALIVE_TIMEOUT s of silence; a healthy jobd's long wait is not cut."""
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_TIMEOUT", 1.5)
    with Jobd(tmp_path / "run") as daemon:
        daemon.wait_ready()
        with jobcore.open(daemon.uri("rate=1&reconnect=0")) as conn:
            job = jobcore.JobBegin(conn.lookupByName("vm1"), BACKUP_VDB.format(tag="hung"))
            with pytest.raises(TimeoutError):  # 2.5 s of a healthy jobd, pinged: not lost
                jobcore.JobWait(job, 2.5)
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(ConnectionLost, match="answered nothing"):
                    jobcore.JobWait(job)
                assert time.monotonic() - started < 15
            finally:
                daemon.proc.send_signal(signal.SIGCONT)


def test_an_idle_blocking_connection_is_not_lost_by_its_next_long_call(
    jobd: Jobd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silence while no call waits is fine: a call made after an idle spell longer than
    KEEPALIVE_TIMEOUT, that jobd takes longer than KEEPALIVE_INTERVAL to answer, is
    answered (jobd answers the pings), not lost."""
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_TIMEOUT", 1.0)
    with jobcore.open(jobd.uri("rate=1&reconnect=0", host="idle")) as conn:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), BACKUP_VDB.format(tag="idle"))
        time.sleep(1.5)  # idle: nothing in flight
        with pytest.raises(TimeoutError):
            jobcore.JobWait(job, 1.2)
        jobcore.JobAbort(job)


@pytest.mark.parametrize("mode", ["silent", "slowframe"])
def test_blocking_open_gives_up_when_hello_is_not_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(jobcore.remote, "HELLO_TIMEOUT", SHORT)
    monkeypatch.setattr(jobcore.remote, "FRAME_TIMEOUT", SHORT)
    fake = FakeDaemon(tmp_path / "fake.sock", mode)
    try:
        started = time.monotonic()
        with pytest.raises(DaemonUnreachable) as err:
            jobcore.open(fake.uri)
        assert time.monotonic() - started < 5
        assert str(fake.path) in str(err.value) and f"within {SHORT:g} s" in str(err.value)
    finally:
        fake.close()


def test_a_blocking_frame_that_never_completes_loses_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobcore.remote, "FRAME_TIMEOUT", SHORT)
    fake = FakeDaemon(tmp_path / "fake.sock", "hello-then-stall")
    try:
        with (
            jobcore.open(fake.uri + "&reconnect=0") as conn,
            pytest.raises(DaemonUnreachable, match=r"header of a 1000-byte frame"),
        ):
            conn.listAllDomains()
    finally:
        fake.close()


def test_a_blocking_connection_works_on_a_descriptor_above_1024(jobd: Jobd) -> None:
    """A process with many files open (vdsm, a backup tool) gets a socket numbered over
    FD_SETSIZE: the blocking path waits with poll, which takes any descriptor (select
    raises ValueError there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        fillers.append(null)
        while len(fillers) < 1100:
            fillers.append(os.dup(null))
        with jobcore.open(jobd.uri("rate=0", host="highfd")) as conn:
            assert isinstance(conn.aconn, RemoteConnection)
            sock = conn.aconn._blocking.session._sock  # type: ignore[union-attr]
            assert sock.fileno() > 1024
            assert conn.lookupByName("vm1").jobStats() == {"type": jobcore.VIR_DOMAIN_JOB_NONE}
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
