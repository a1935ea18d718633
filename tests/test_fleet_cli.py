"""The fleet calls (list_fleet_jobs, fleet_hosts, fence_host) and their jobctl commands
(list --fleet, hosts, host fence), protocol version 2, and the HOST column of jobctl
list: refused with Unsupported where there is no fleet (in-process, jobd on SQLite),
served by jobd members sharing one PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import BACKUP_VDB, PULL_VDA, Jobd, RawClient, jobctl, one_line_error, write

import jobcore
from jobcore import constants as C
from jobcore.cli import ExitCode
from jobcore.daemon import handlers
from jobcore.driver import FleetPeers
from jobcore.errors import InvalidArgument, Unsupported
from jobcore.info import HostInfo, HostState, JobInfo
from jobcore.lifecycle import JobState
from jobcore.local import as_local
from jobcore.methods import Method
from jobcore.protocol import MAX_FRAME, PROTOCOL_VERSION, InfoPage, decode_result
from jobcore.spec import JobType

MiB = 1 << 20
NOT_A_MEMBER = "is not a fleet member: start jobd with --store postgresql://"


@pytest.fixture(scope="module")
def sqlite_jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    base = tmp_path_factory.mktemp("fleetless")
    store = f"sqlite:///{base / 'jobs.db'}"
    daemon = Jobd(base / "run", "--store", store, "--host", "hv-solo").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


# ---- protocol version 2 -----------------------------------------------------------------


def test_a_version_1_client_is_refused_at_its_hello(sqlite_jobd: Jobd) -> None:
    assert PROTOCOL_VERSION == 2
    with RawClient(sqlite_jobd.sock, None) as old:
        reply = old.call("hello", 1, "sim:///default")
        assert reply[0] == 2 and reply[2] == "ProtocolError", reply
        assert reply[3] == "protocol version 1 is not supported (jobd speaks 2)"
    with RawClient.ready(sqlite_jobd.sock) as new:
        assert new.hello is not None and new.hello[2][0] == PROTOCOL_VERSION


# ---- no fleet: Unsupported --------------------------------------------------------------


@pytest.mark.anyio
async def test_in_process_connections_are_no_fleet_members() -> None:
    async with jobcore.connect("sim:///default") as conn:
        for call in (
            conn.list_fleet_jobs(),
            conn.fleet_hosts(),
            conn.fence_host("hv2", "gone", C.JOB_FENCE_FORCE),
        ):
            with pytest.raises(Unsupported, match=NOT_A_MEMBER):
                await call
        with pytest.raises(InvalidArgument, match="unsupported flags"):
            await conn.fence_host("hv2", None, 2)  # a bit fenceHost does not know
    with jobcore.open("sim:///default") as blocking, pytest.raises(Unsupported):
        blocking.fleetHosts()


@pytest.mark.anyio
async def test_jobd_on_sqlite_refuses_the_fleet_calls(sqlite_jobd: Jobd) -> None:
    async with jobcore.connect(sqlite_jobd.uri()) as conn:
        for call in (
            conn.list_fleet_jobs(-1, 10),
            conn.fleet_hosts(),
            conn.fence_host("hv2", None, 0),
        ):
            with pytest.raises(Unsupported, match=NOT_A_MEMBER):
                await call
    async with jobcore.connect(sqlite_jobd.uri(readonly=True)) as ro:
        with pytest.raises(jobcore.AccessDenied, match="read-only access prevents 'fence_host'"):
            await ro.fence_host("hv2", None, 0)
        with pytest.raises(Unsupported):
            await ro.fleet_hosts()  # a read: allowed, and refused for want of a fleet


def test_jobctl_fleet_commands_without_a_fleet(sqlite_jobd: Jobd) -> None:
    uri = sqlite_jobd.uri()
    for argv in (
        ("hosts",),
        ("hosts", "--json"),
        ("list", "--fleet"),
        ("list", "--fleet", "--json"),
        ("host", "fence", "hv2", "--reason", "gone", "--force"),
    ):
        done = jobctl(uri, *argv)
        assert done.returncode == ExitCode.ERROR, (argv, done)
        assert NOT_A_MEMBER in one_line_error(done), argv
        assert done.stdout == ""
    # read-only and no fleet: no fleet is what the user must hear of first (the read-only
    # refusal of a fleet's fence: test_fence_on_a_fleet below)
    ro = jobctl(sqlite_jobd.uri(readonly=True), "host", "fence", "hv2")
    assert ro.returncode == ExitCode.ERROR and NOT_A_MEMBER in one_line_error(ro)


def test_jobctl_list_shows_each_jobs_host(sqlite_jobd: Jobd, tmp_path: Path) -> None:
    uri = sqlite_jobd.uri(f"rate={MiB}", host="slow")
    began = jobctl(uri, "begin", "vm1", write(tmp_path, "pull.xml", PULL_VDA))
    assert began.returncode == 0, began.stderr
    job = began.stdout.strip()
    try:
        listed = jobctl(uri, "list").stdout.splitlines()
        assert listed[0].split()[:4] == ["UUID", "Domain", "Host", "Type"], listed
        row = next(line for line in listed if line.startswith(job))
        assert row.split()[:5] == [job, "vm1", "hv-solo", "blockpull", "running"], row
        assert json.loads(jobctl(uri, "list", "--json").stdout)[0]["host"] == "hv-solo"
    finally:
        jobctl(uri, "abort", job)


# ---- jobd's side, on a fleet that answers as told ----------------------------------------


def _info(n: int, host: str, errmsg: str | None = None, lost: bool = False) -> JobInfo:
    return JobInfo(
        uuid.UUID(int=n), JobType("backup"), f"vm{n}", JobState.RUNNING, 0, 0, 0, 1.0, 1.0,
        None, errmsg, None, host, lost,
    )  # fmt: skip


class ToldFleet:
    """A FleetView over fixed rows (jobd's FleetService over PostgreSQL is tested below):
    the seq of job ``n`` is ``n``."""

    host = "hv1"

    def __init__(self, infos: list[JobInfo]) -> None:
        self.infos = infos
        self.asked: list[tuple[int, int]] = []
        self.fenced: list[tuple[str, str | None, bool]] = []

    async def jobs_page(self, after: int, limit: int) -> tuple[list[JobInfo], int | None]:
        self.asked.append((after, limit))
        rest = [i for i in self.infos if i.uuid.int > after]
        page = rest[:limit]
        return page, (page[-1].uuid.int if len(rest) > limit else None)

    async def hosts(self) -> list[HostInfo]:
        return [HostInfo("hv1", HostState.LIVE, 0.5, 10.0, 1, 2, 11)]

    async def fence(self, name: str, reason: str | None, *, force: bool = False) -> HostInfo:
        self.fenced.append((name, reason, force))
        return HostInfo(name, HostState.FENCED, 12.0, 10.0, 0, 4, 12, "hv1", reason)

    def peers(self) -> FleetPeers:
        raise AssertionError("the fleet calls never ask for the member's peers")


def _wire(value: Any) -> Any:
    """What the client receives (the handler's reply through msgpack)."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


@pytest.mark.anyio
async def test_jobd_serves_the_fleet_calls_and_keeps_a_page_within_a_frame() -> None:
    big = "é" * (MAX_FRAME // 40)  # ~200 KiB of UTF-8 each: ten fill half a frame
    infos = [_info(n, "hv2", big if 3 <= n < 40 else None, lost=n == 1) for n in range(1, 60)]
    fleet = ToldFleet(infos)
    async with jobcore.connect("sim:///default") as conn:
        local = as_local(conn)
        local.fleet = fleet
        client: Any = SimpleNamespace(conn=local)  # what a handler reads of a session
        serve = handlers._HANDLERS
        pages: list[InfoPage] = []
        cursor: int | None = -1
        while cursor is not None:
            wire = await serve[Method.LIST_FLEET_JOBS](client, (cursor, 5000))
            assert len(msgpack.packb(wire, use_bin_type=True)) <= MAX_FRAME // 2
            pages.append(decode_result(Method.LIST_FLEET_JOBS, _wire(wire)))
            cursor = pages[-1].cursor
        got = [i for p in pages for i in p.infos]
        assert got == infos  # every job once, in order, host_lost kept
        assert got[0].host_lost and not got[1].host_lost
        assert fleet.asked[0] == (-1, 1000)  # the page limit, as list_jobs_page's
        assert len(pages) > 6  # the long errors made smaller pages
        hosts = decode_result(
            Method.FLEET_HOSTS, _wire(await serve[Method.FLEET_HOSTS](client, ()))
        )
        assert hosts == await fleet.hosts()
        fenced = await serve[Method.FENCE_HOST](client, ("hv2", "disk died", C.JOB_FENCE_FORCE))
        assert decode_result(Method.FENCE_HOST, _wire(fenced)).fence_reason == "disk died"
        await local.fence_host("hv3")
        assert fleet.fenced == [("hv2", "disk died", True), ("hv3", None, False)]
        with pytest.raises(InvalidArgument, match="cursor"):
            await local.list_fleet_jobs(-2, 10)
    assert Method.LIST_FLEET_JOBS in handlers._BULKY and Method.FLEET_HOSTS in handlers._BULKY


# ---- a fleet: two jobd members on one PostgreSQL -----------------------------------------

#: what a member's plain URI for slow jobs names: a block pull at 1 MiB/s takes minutes
SLOW = f"rate={MiB}"


@pytest.fixture
def members(tmp_path: Path, pg_url: str) -> Iterator[tuple[Jobd, Jobd]]:
    started: list[Jobd] = []
    try:
        for name in ("hv1", "hv2"):
            args = ("--store", pg_url, "--host", name, "--lease-ttl", "1")
            started.append(Jobd(tmp_path / name, *args).wait_ready())
        yield started[0], started[1]
    finally:
        for daemon in started:
            daemon.stop()


def _begin_slow(member: Jobd, tmp_path: Path, domain: str = "vm1", xml: str = PULL_VDA) -> str:
    uri = member.uri(SLOW, host="slow")
    began = jobctl(uri, "begin", domain, write(tmp_path, "job.xml", xml))
    assert began.returncode == 0, began.stderr
    return began.stdout.strip()


def _json(member: Jobd, *argv: str) -> Any:
    done = jobctl(member.uri(), *argv, "--json")
    assert done.returncode == 0, (argv, done.stderr)
    return json.loads(done.stdout)


def _host(member: Jobd, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(h for h in _json(member, "hosts") if h["name"] == name)
    return found


def _until_state(member: Jobd, name: str, state: str) -> dict[str, Any]:
    """``name``'s row as ``member`` lists it, once it is in ``state`` (asked every 0.2 s
    for up to 30 s: the lease ttl is 1 s)."""
    for _ in range(150):
        row = _host(member, name)
        if row["state"] == state:
            return row
        time.sleep(0.2)
    raise AssertionError(f"{name} never became {state}: {row}")


def _complete(member: Jobd, *words: str) -> list[str]:
    """What shell completion offers after ``jobctl WORDS`` (click's bash protocol)."""
    env = {
        "_JOBCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(["jobctl", *words]),
        "COMP_CWORD": str(len(words)),
        "JOBCORE_URI": member.uri(),
    }
    done = subprocess.run(
        [str(Path(sys.executable).with_name("jobctl"))],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line]


def test_list_fleet_and_hosts_show_both_members(members: tuple[Jobd, Jobd], tmp_path: Path) -> None:
    hv1, hv2 = members
    jobs = {"hv1": _begin_slow(hv1, tmp_path), "hv2": _begin_slow(hv2, tmp_path)}
    try:
        for member in members:  # either member answers for the whole fleet
            listed = {j["uuid"]: j for j in _json(member, "list", "--fleet")}
            assert {listed[u]["host"] for u in jobs.values()} == {"hv1", "hv2"}
            assert {listed[jobs[h]]["host"] for h in jobs} == set(jobs)
            assert all(listed[u]["state"] == "running" for u in jobs.values())
            assert not any(listed[u]["host_lost"] for u in jobs.values())
            hosts = {h["name"]: h for h in _json(member, "hosts")}
            assert {n: h["state"] for n, h in hosts.items()} == {"hv1": "live", "hv2": "live"}
            assert hosts["hv2"]["active_jobs"] == 1 and hosts["hv2"]["pid"] == hv2.proc.pid
        plain = jobctl(hv1.uri(), "list", "--fleet").stdout.splitlines()
        assert plain[0].split() == ["UUID", "Domain", "Host", "Type", "State", "Lost", "Done"]
        for host, job in jobs.items():
            row = next(line for line in plain if line.startswith(job)).split()
            assert row[1:6] == ["vm1", host, "blockpull", "running", "-"], row
        own = jobctl(hv1.uri(SLOW, host="slow"), "list").stdout  # a member's own jobs only
        assert jobs["hv1"] in own and jobs["hv2"] not in own
        shown = jobctl(hv2.uri(), "hosts").stdout.splitlines()
        assert shown[0].split() == ["Name", "State", "Lease", "TTL", "Active", "Jobs", "PID"]
        assert [line.split()[:2] for line in shown[1:]] == [["hv1", "live"], ["hv2", "live"]]
    finally:
        for host, job in jobs.items():
            jobctl(dict(zip(("hv1", "hv2"), members, strict=True))[host].uri(), "abort", job)


@pytest.mark.anyio
async def test_fleet_pages_through_the_client_api(
    members: tuple[Jobd, Jobd], tmp_path: Path
) -> None:
    hv1, hv2 = members
    backup = BACKUP_VDB.format(tag="paged")
    began = [
        _begin_slow(member, tmp_path, domain, xml)
        for member, domain, xml in (
            (hv1, "vm1", PULL_VDA),
            (hv2, "vm1", PULL_VDA),
            (hv1, "vm2", PULL_VDA),
            (hv2, "vm2", PULL_VDA),
            (hv1, "vm1", backup),
        )
    ]
    try:
        async with jobcore.connect(hv2.uri()) as conn:
            seen: list[str] = []
            cursor: int | None = -1
            while cursor is not None:  # one job a page: the cursor runs across hosts
                page, cursor = await conn.list_fleet_jobs(cursor, 1)
                assert len(page) <= 1
                seen += [str(i.uuid) for i in page]
            assert seen == began  # begin order, every host's, each once
            whole, last = await conn.list_fleet_jobs()
            assert [str(i.uuid) for i in whole] == began and last is None
            assert [h.name for h in await conn.fleet_hosts()] == ["hv1", "hv2"]
        with jobcore.open(hv1.uri()) as blocking:
            assert [h.state for h in blocking.fleetHosts()] == [HostState.LIVE] * 2
            assert len(blocking.listFleetJobs(-1, 2)[0]) == 2
    finally:
        for job in began:  # a member forwards a verb on another's job to its owner
            jobctl(hv1.uri(), "abort", job)


def test_a_killed_member_is_lost_then_fenced(members: tuple[Jobd, Jobd], tmp_path: Path) -> None:
    hv1, hv2 = members
    job = _begin_slow(hv2, tmp_path)
    hv2.proc.kill()  # kill -9: no leave, its lease just stops
    hv2.proc.wait()
    lost = _until_state(hv1, "hv2", "lost")
    assert lost["lease_age"] > lost["lease_ttl"] == 1.0 and lost["active_jobs"] == 1
    (row,) = [j for j in _json(hv1, "list", "--fleet") if j["uuid"] == job]
    assert (row["state"], row["host"], row["host_lost"]) == ("running", "hv2", True)
    line = next(x for x in jobctl(hv1.uri(), "list", "--fleet").stdout.splitlines() if job in x)
    assert line.split()[2:6] == ["hv2", "blockpull", "running", "LOST"], line
    shown = jobctl(hv1.uri(), "info", job).stdout
    assert "Host:          hv2 (not live: stopped or lease expired)" in shown, shown
    assert _complete(hv1, "host", "fence", "hv") == ["plain,hv1", "plain,hv2"]
    # the read-only socket may look, never fence; a member never fences itself
    ro = jobctl(hv1.uri(readonly=True), "host", "fence", "hv2", "--reason", "power cut")
    assert ro.returncode == ExitCode.DENIED
    assert "read-only access prevents 'fence_host'" in one_line_error(ro)
    itself = jobctl(hv1.uri(), "host", "fence", "hv1")
    assert itself.returncode == ExitCode.ERROR and "hv1" in one_line_error(itself)
    assert _host(hv1, "hv2")["state"] == "lost"  # neither refusal fenced anything
    fenced = jobctl(hv1.uri(), "host", "fence", "hv2", "--reason", "power cut")
    assert fenced.returncode == 0, fenced.stderr
    assert fenced.stdout.splitlines()[0] == (
        "Host 'hv2' fenced by 'hv1' (power cut): 1 active job failed, "
        "its shared-storage claims released"
    )
    assert fenced.stdout.splitlines()[2].split()[:2] == ["hv2", "fenced"]
    (after,) = [j for j in _json(hv1, "list", "--fleet", "--all") if j["uuid"] == job]
    assert after["state"] == "failed" and not after["host_lost"]
    assert after["errmsg"] == "host 'hv2' was fenced by 'hv1': power cut"
    assert not [j for j in _json(hv1, "list", "--fleet") if j["uuid"] == job]  # not active
    host = _host(hv1, "hv2")
    assert (host["state"], host["fenced_by"], host["fence_reason"]) == (
        "fenced",
        "hv1",
        "power cut",
    )
    assert host["active_jobs"] == 0
    shown = jobctl(hv1.uri(), "hosts").stdout
    assert "Fenced" in shown.splitlines()[0] and "by hv1: power cut" in shown
    again = _json(hv1, "host", "fence", "hv2")  # fenced already: nothing left to fail
    assert again["jobs_failed"] == 0 and again["host"]["state"] == "fenced"


def test_fencing_a_live_member_takes_force(members: tuple[Jobd, Jobd], tmp_path: Path) -> None:
    hv1, hv2 = members
    job = _begin_slow(hv2, tmp_path)
    refused = jobctl(hv1.uri(), "host", "fence", "hv2")
    assert refused.returncode == ExitCode.ERROR
    assert "--force" in one_line_error(refused)
    assert _host(hv1, "hv2")["state"] == "live"
    forced = _json(hv1, "host", "fence", "hv2", "--force", "--reason", "maintenance")
    assert forced["jobs_failed"] == 1
    assert (forced["host"]["state"], forced["host"]["fenced_by"]) == ("fenced", "hv1")
    (row,) = [j for j in _json(hv1, "list", "--fleet", "--all") if j["uuid"] == job]
    assert (row["state"], row["errmsg"]) == (
        "failed",
        "host 'hv2' was fenced by 'hv1': maintenance",
    )
    assert hv2.proc.wait(30) == 1  # a fenced member stops (its writes would be refused)
