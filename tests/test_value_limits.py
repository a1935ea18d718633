"""Every number that reaches jobcore is range-checked where it enters, after unit
conversion: XML values, legacy bandwidth arguments, set_speed, sim URI parameters, wait
timeouts, jobd's configuration; URI paths have one spelling; jobctl reads at most 1 MiB
of a FILE; a simulated world has a bounded number of hosts."""

from __future__ import annotations

import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from jobd_helpers import Jobd, RawClient, jobctl

import jobcore
from jobcore import InvalidArgument, InvalidURI, JobState, XMLError
from jobcore.cli import ExitCode
from jobcore.daemon.config import ConfigError, load_config
from jobcore.daemon.sessions import _Client
from jobcore.protocol import Reply, decode_message
from jobcore.uri import parse_uri
from jobcore.xml import format_job, parse_job

MiB = 1 << 20
MAX_INT64 = 2**63 - 1  # jobcore.spec.MAX_INT64: QEMU's int64 speed
SIM_HOSTS = 64  # drivers.sim.MAX_HOSTS
PULL = "<job type='blockpull'><disk name='{disk}'/></job>"
MIGRATE = "<job type='migration'><destination uri='{uri}'/></job>"


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("jval") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


# ---- M5: bandwidth, downtime, priority, seconds -------------------------------------------


@pytest.mark.parametrize(
    ("xml", "where"),
    [
        # 2^63 bytes/s: over QEMU's int64 speed (the old limit was 2^64-1)
        ("<bandwidth>9223372036854775808</bandwidth>", "<bandwidth>"),
        ("<bandwidth unit='MiB/s'>8796093022208</bandwidth>", "<bandwidth>"),
        ("<bandwidth unit='GiB/s'>18446744073709551615</bandwidth>", "<bandwidth>"),
    ],
)
def test_bandwidth_over_int64_is_refused_naming_element_value_and_maximum(
    xml: str, where: str
) -> None:
    with pytest.raises(XMLError) as err:
        parse_job(f"<job type='blockpull'><disk name='vda'/>{xml}</job>")
    assert where in str(err.value) and str(MAX_INT64) in str(err.value)
    assert "too large" in str(err.value)


def test_largest_bandwidth_and_downtime_round_trip() -> None:
    spec = parse_job(
        "<job type='migration'><destination uri='sim:///x'/>"
        f"<bandwidth>{MAX_INT64}</bandwidth><downtime-limit>{MAX_INT64}</downtime-limit></job>"
    )
    assert spec.bandwidth == spec.downtime_limit == MAX_INT64
    assert parse_job(format_job(spec)) == spec


def test_downtime_limit_in_seconds_is_bounded_after_conversion() -> None:
    with pytest.raises(XMLError, match=r"<downtime-limit>: 18446744073709551615000 ms .*maximum"):
        parse_job(
            "<job type='migration'><destination uri='sim:///x'/>"
            "<downtime-limit unit='s'>18446744073709551615</downtime-limit></job>"
        )


@pytest.mark.parametrize(
    ("xml", "where"),
    [
        ("<queue timeout='1e308'/>", "<queue> attribute 'timeout'"),
        ("<retention seconds='1e10'/>", "<retention> attribute 'seconds'"),
        ("<retention seconds='nan'/>", "<retention> attribute 'seconds'"),
    ],
)
def test_common_numbers_are_bounded(xml: str, where: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_job(f"<job type='blockpull'><disk name='vda'/>{xml}</job>")
    assert where in str(err.value)


def test_legacy_bandwidth_in_mib_cannot_overflow() -> None:
    conn = jobcore.open("sim:///default?rate=1000")
    try:
        dom = conn.lookupByName("vm1")
        with pytest.raises(InvalidArgument, match=r"MiB/s is too large: the maximum is"):
            dom.blockPull("vda", 2**63 - 1, 0)
        with pytest.raises(InvalidArgument, match=r"bytes/s is too large"):
            dom.blockPull("vda", 2**63, jobcore.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
        with pytest.raises(InvalidArgument, match=r"MiB/s is too large"):
            dom.blockCommit(
                "vda", None, None, MAX_INT64 // MiB + 1, jobcore.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            )
        assert dom.listJobs() == []  # nothing was begun
        assert dom.blockPull("vda", MAX_INT64 // MiB, 0) == 0  # the largest that fits
        job = dom.listJobs()[0]
        assert "<bandwidth" in jobcore.JobGetXMLDesc(job)  # it can still be described
        with pytest.raises(InvalidArgument, match=r"too large"):
            jobcore.JobSetSpeed(job, 2**63)
        jobcore.JobSetSpeed(job, MAX_INT64)
        assert jobcore.JobGetInfo(job).bandwidth == MAX_INT64
        jobcore.JobAbort(job)
    finally:
        conn.close()


def test_jobd_refuses_an_overflowing_legacy_bandwidth_and_the_session_lives(jobd: Jobd) -> None:
    c = RawClient.ready(jobd.sock, "sim:///m5?rate=1000", timeout=15)
    try:
        reply = c.call("block_pull", "vm1", "vda", 2**63 - 1, 0)
        assert reply[0] == 2 and reply[2] == "InvalidArgument", reply
        assert c.call("list_jobs", "vm1")[0] == 1
    finally:
        c.close()


class _FullSocket:
    """A raw socket that takes nothing now: every frame goes out through the stream."""

    def send(self, data: bytes, flags: int = 0) -> int:
        raise BlockingIOError


class _FakeStream:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    def extra(self, attribute: object) -> _FullSocket:
        return _FullSocket()


async def _send_unencodable() -> list[bytes]:
    stream = _FakeStream()
    async with anyio.create_task_group() as tg:
        client = _Client(1, stream, False, tg, jobcore.log.get_logger("test"))  # type: ignore[arg-type]
        await client.send(Reply(7, {"bandwidth": 2**70}))
    return stream.sent


def test_an_unencodable_reply_becomes_an_error_reply() -> None:
    sent = anyio.run(_send_unencodable)
    assert len(sent) == 1
    msg = decode_message(sent[0][4:])
    assert msg.id == 7 and msg.error == "JobError"  # type: ignore[union-attr]
    assert "internal error" in msg.message and "encoded" in msg.message  # type: ignore[union-attr]


# ---- M7: sim URI parameters, qemu backup_bandwidth -----------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "rate=nan",
        "rate=inf",
        "rate=-1",
        "rate=fast",
        "fail_at=nan",
        "fail_at=2",
        "fail_at=-0.5",
        "clock=fast",
    ],
)
def test_sim_refuses_bad_parameters_naming_them(query: str) -> None:
    name, _, value = query.partition("=")
    with pytest.raises(InvalidArgument) as err:
        jobcore.open(f"sim:///default?{query}")
    assert f"{name}='{value}'" in str(err.value)


def test_sim_rate_zero_is_instant() -> None:
    conn = jobcore.open("sim:///default?rate=0")
    try:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), PULL.format(disk="vda"))
        assert jobcore.JobWait(job, timeout=5).state is JobState.COMPLETED
    finally:
        conn.close()


def test_jobd_refuses_a_nan_rate_at_hello_and_keeps_serving(jobd: Jobd) -> None:
    bad = RawClient(jobd.sock, "sim:///m7?rate=nan", timeout=15)
    try:
        assert bad.hello is not None, "no hello sent"
        assert bad.hello[0] == 2 and bad.hello[2] == "InvalidArgument", bad.hello
        assert "rate='nan'" in bad.hello[3]
    finally:
        bad.close()
    good = RawClient.ready(jobd.sock, "sim:///m7?rate=0", timeout=15)
    try:
        begun = good.call("job_begin", "vm1", PULL.format(disk="vda"), 0)
        assert begun[0] == 1
        final = good.call("job_wait", begun[2][0], 10)
        assert final[0] == 1 and final[2][3] == "completed", final
    finally:
        good.close()


@pytest.mark.parametrize("value", ["-5", "nan", "1.5", str(2**63)])
def test_qemu_backup_bandwidth_is_checked(value: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with jobcore.connect(f"qemu:///session?dir={tmp_path}&backup_bandwidth={value}"):
            pass

    with pytest.raises(InvalidArgument, match=rf"backup_bandwidth='{value}'"):
        anyio.run(main, backend="asyncio")


# ---- L3: retention and other seconds in jobd's configuration -------------------------------


@pytest.mark.parametrize(
    "key", ["retention", "hello_timeout", "idle_timeout", "driver_idle_timeout"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_seconds_must_be_finite(key: str, value: float, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, **{key: value})
    config = tmp_path / "jobd.toml"
    config.write_text(f"{key} = {'nan' if math.isnan(value) else str(value)}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(config)


def test_jobd_retention_nan_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--run-dir", run_dir, "--retention", "nan"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "retention" in done.stderr, done
    assert not (tmp_path / "run" / "jobd.sock").exists()


def test_in_process_connection_refuses_a_nan_retention() -> None:
    async def main() -> None:
        async with jobcore.connect("sim:///default", retention=math.nan):
            pass

    with pytest.raises(InvalidArgument, match="retention"):
        anyio.run(main)


# ---- L4: one spelling per URI path ---------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "sim:////default",
        "sim:///default/",
        "sim:///./default",
        "sim:///a/../default",
        "sim:///def%61ult",
        "sim+unix:////default?socket=/x.sock",
    ],
)
def test_odd_uri_paths_are_refused(uri: str) -> None:
    with pytest.raises(InvalidURI, match="invalid path"):
        parse_uri(uri)


def test_sim_needs_a_host_name() -> None:
    with pytest.raises(InvalidURI, match="names no simulated host"):
        jobcore.open("sim:///")


def test_jobd_has_one_host_per_name(jobd: Jobd) -> None:
    a = RawClient.ready(jobd.sock, "sim:///l4?rate=1000", timeout=15)
    try:
        begun = a.call("job_begin", "vm1", PULL.format(disk="vda"), 0)
        assert begun[0] == 1
        for spelling in ("sim:////l4?rate=1000", "sim:///l4/?rate=1000"):
            b = RawClient(jobd.sock, spelling, timeout=15)
            try:
                assert b.hello is not None, "no hello sent"
                assert b.hello[0] == 2 and b.hello[2] == "InvalidURI", b.hello
            finally:
                b.close()
        assert a.call("job_abort", begun[2][0])[0] == 1
    finally:
        a.close()


# ---- L6: wait timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [math.nan, -1.0, -math.inf])
def test_wait_refuses_nan_and_negative_timeouts(timeout: float) -> None:
    conn = jobcore.open("sim:///default?rate=1000")
    try:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), PULL.format(disk="vda"))
        with pytest.raises(InvalidArgument, match="timeout"):
            jobcore.JobWait(job, timeout=timeout)
        jobcore.JobAbort(job)
        # +inf: no limit, as None
        assert jobcore.JobWait(job, timeout=math.inf).state is JobState.CANCELLED
    finally:
        conn.close()


def test_remote_wait_refuses_nan(jobd: Jobd) -> None:
    async def main() -> None:
        async with jobcore.connect(jobd.uri("rate=1000", host="l6")) as conn:
            job = await (await conn.lookup_domain("vm1")).job_begin(PULL.format(disk="vda"))
            try:
                with pytest.raises(InvalidArgument, match="timeout"):
                    await job.wait(math.nan)
            finally:
                await job.abort()

    anyio.run(main)
    # the daemon checks it too (NaN: BadRequest)
    c = RawClient.ready(jobd.sock, "sim:///l6?rate=1000", timeout=15)
    try:
        begun = c.call("job_begin", "vm2", PULL.format(disk="vda"), 0)
        reply = c.call("job_wait", begun[2][0], -1.0)
        assert reply[0] == 2 and reply[2] == "InvalidArgument", reply
        c.call("job_abort", begun[2][0])
    finally:
        c.close()


def test_jobctl_wait_timeout_nan_is_a_usage_error(jobd: Jobd) -> None:
    done = jobctl(jobd.uri(), "wait", "00000000", "--timeout", "nan")
    assert done.returncode == ExitCode.USAGE and "--timeout" in done.stderr, done


# ---- L7: jobctl reads at most 1 MiB of a FILE ----------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("command", [["begin", "vm1"], ["domain", "create"]])
def test_jobctl_refuses_a_file_over_1_mib_without_reading_it_all(command: list[str]) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobcore.cli", "-c", "sim:///default", *command, "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    assert done.returncode == ExitCode.ERROR, done
    assert "larger than the limit of 1048576 bytes (1 MiB)" in done.stderr, done.stderr
    assert "MemoryError" not in done.stderr
    assert time.monotonic() - started < 30


def test_jobctl_still_takes_a_file_of_exactly_the_limit(tmp_path: Path) -> None:
    xml = PULL.format(disk="vda").encode()
    path = tmp_path / "job.xml"
    path.write_bytes(xml[:-6] + b" " * (MiB - len(xml)) + xml[-6:])
    assert path.stat().st_size == MiB
    done = jobctl("sim:///default?rate=0", "begin", "vm1", str(path))
    assert done.returncode == 0, done.stderr


# ---- L9: simulated hosts per world ---------------------------------------------------------


@pytest.mark.anyio
async def test_migrations_create_a_bounded_number_of_sim_hosts() -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        dom = await conn.lookup_domain("vm1")
        for i in range(SIM_HOSTS - 1):  # the world has its own host already
            job = await dom.job_begin(MIGRATE.format(uri=f"sim:///h{i}"))
            assert (await job.wait(5)).state is JobState.COMPLETED
        with pytest.raises(InvalidArgument, match=r"64 simulated hosts, the limit"):
            await dom.job_begin(MIGRATE.format(uri="sim:///one-too-many"))
        # hosts the world has stay reachable
        job = await dom.job_begin(MIGRATE.format(uri="sim:///default"))
        assert (await job.wait(5)).state is JobState.COMPLETED
        assert "vm1" in [d.name for d in await conn.list_domains()]


def test_limits_match_the_code() -> None:
    import drivers.sim
    from jobcore.spec import MAX_INT64 as SPEC_MAX

    assert (SPEC_MAX, drivers.sim.MAX_HOSTS) == (MAX_INT64, SIM_HOSTS)


def test_remote_arguments_that_cannot_be_encoded_are_invalid(jobd: Jobd) -> None:
    async def main() -> None:
        async with jobcore.connect(jobd.uri("rate=1000", host="m5r")) as conn:
            dom = await conn.lookup_domain("vm1")
            with pytest.raises(InvalidArgument, match="block_pull"):
                await dom.block_pull("vda", 2**64, 0)
            job = await dom.job_begin(PULL.format(disk="vda"))
            with pytest.raises(InvalidArgument, match="too large"):
                await job.set_speed(2**63)  # encodable: jobd refuses it
            with pytest.raises(InvalidArgument):
                await job.set_speed(2**64)
            await job.abort()

    anyio.run(main)


def test_blocking_event_get_refuses_a_nan_timeout() -> None:
    conn = jobcore.open("sim:///default?rate=1000")
    try:
        events = conn.subscribe(domain="vm1")
        try:
            with pytest.raises(InvalidArgument, match="timeout"):
                events.get(timeout=math.nan)
            with pytest.raises(TimeoutError):
                events.get(timeout=0.01)
        finally:
            events.close()
    finally:
        conn.close()
