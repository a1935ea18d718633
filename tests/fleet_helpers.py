"""A fleet of jobd members on one private PostgreSQL server, for the fleet's end-to-end
tests (design/fleet.md "Tests and benchmarks").

``JobdFleet`` runs N jobd processes (``hv1``, ``hv2``…), each on its own run directory,
all with ``--store URL --host NAME --lease-ttl T --shared-root STORAGE=DIR`` on one
database of the test's own server (tests/pg_helpers.py ``private_pg``), and a directory
in tmp_path standing for the shared storage every member mounts. A member can be killed
with SIGKILL, restarted on the same run directory, stopped cleanly; the server can be
stopped and started; jobctl runs against any member; and the ``jobs``, ``hosts`` and
``claims`` tables can be read directly (psycopg) to check what the members say. The
fixture ``jobd_fleet`` stops every member at teardown (the server goes with private_pg).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psycopg
import pytest
from jobd_helpers import ROOT, Jobd, jobctl
from pg_helpers import PgServer

MiB = 1 << 20
#: the simulated hosts' rate: a 1 GiB layer takes minutes, so jobs stay active
SLOW_RATE = MiB
#: the lease the tests' members take (seconds; renewed every ttl/4)
TEST_LEASE_TTL = 4.0
#: the storage id every member gives the shared directory
STORAGE = "nfs1"

T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something other than None or False; that value.
    AssertionError naming ``what`` when it never does (a deadline for liveness, not a
    measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


class EventStream:
    """``jobctl events --json ARGS`` running against a member; its events, one per line,
    read by a thread into a queue. ``close`` stops it."""

    def __init__(self, uri: str, *args: str) -> None:
        env = {**os.environ, "JOBCORE_URI": uri}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobcore.cli", "events", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """The first event that is ``wanted`` (others are skipped); AssertionError if none
        comes within ``timeout`` or the command ends."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"jobctl events ended ({self.proc.wait()})")
            event: dict[str, Any] = json.loads(line)
            if wanted(event):
                return event
        raise AssertionError(f"no such event within {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        self._reader.join(15)


class Member:
    """One jobd of the fleet: its name (``--host``), run directory and process."""

    def __init__(self, fleet: JobdFleet, name: str) -> None:
        self.fleet = fleet
        self.name = name
        self.run_dir = fleet.base / name / "run"
        self.jobd: Jobd | None = None
        self.starts = 0

    def args(self) -> tuple[str, ...]:
        return (
            "--store", self.fleet.url,
            "--host", self.name,
            "--lease-ttl", str(self.fleet.lease_ttl),
            "--shared-root", f"{STORAGE}={self.fleet.shared}",
        )  # fmt: skip

    def spawn(self) -> Jobd:
        """Start the process (not waiting for it); the log of an earlier run is kept as
        ``NAME.log.N``."""
        assert self.jobd is None or self.jobd.proc.poll() is not None, f"{self.name} runs"
        log = self.run_dir.parent / f"{self.run_dir.name}.log"
        if log.exists():
            log.rename(log.with_name(f"{log.name}.{self.starts}"))
        self.starts += 1
        self.jobd = Jobd(self.run_dir, *self.args())
        return self.jobd

    def start(self) -> Member:
        """Start (or restart, on the same run directory) and wait until it serves."""
        self.spawn().wait_ready(30)
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.jobd is not None, f"{self.name} was never started"
        return self.jobd.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.jobd is not None and self.jobd.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no clean stop, no leave; its lease just stops being renewed."""
        assert self.jobd is not None
        self.jobd.proc.send_signal(signal.SIGKILL)
        self.jobd.proc.wait()
        self.jobd.stop()  # closes the log

    def freeze(self) -> None:
        """SIGSTOP: the process stands still (a host cut off, or hung), holding its
        database sessions; ``thaw`` lets it go on where it was."""
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> int | None:
        """SIGTERM (a clean stop: it leaves the fleet); its exit status."""
        if self.running():
            self.thaw()  # a frozen one would hold SIGTERM pending
        return None if self.jobd is None else self.jobd.stop()

    def log(self) -> str:
        """This run's log."""
        assert self.jobd is not None
        return self.jobd.log()

    def uri(self, query: str = f"rate={SLOW_RATE}", *, sim_host: str = "default") -> str:
        """A client URI of this member (read-write socket), on simulated host
        ``sim_host`` (its rate is set by the first hello that opens it)."""
        assert self.jobd is not None
        return self.jobd.uri(query, host=sim_host)

    def jobctl(
        self, *args: str, uri: str | None = None, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        """jobctl against this member (``uri``: another of its client URIs)."""
        return jobctl(uri or self.uri(), *args, timeout=timeout)

    def ok(self, *args: str, uri: str | None = None) -> str:
        """jobctl's stdout, once checked that it succeeded."""
        done = self.jobctl(*args, uri=uri)
        assert done.returncode == 0, (self.name, args, done.returncode, done.stderr)
        return done.stdout

    def json(self, *args: str) -> Any:
        """jobctl ARGS --json, decoded."""
        return json.loads(self.ok(*args, "--json"))

    def begin(self, domain: str, xml: str, *, uri: str | None = None) -> str:
        """A job begun on this member from job XML text; its UUID."""
        path = self.fleet.write(f"job-{self.name}-{time.monotonic_ns()}.xml", xml)
        return self.ok("begin", domain, path, uri=uri).strip()

    def events(self, *args: str) -> EventStream:
        """``jobctl events --json ARGS`` through this member, running."""
        return EventStream(self.uri(), *args)

    def create_domain(self, xml: str) -> None:
        path = self.fleet.write(f"domain-{self.name}-{time.monotonic_ns()}.xml", xml)
        self.ok("domain", "create", path)

    def __repr__(self) -> str:
        return f"Member({self.name!r})"


class JobdFleet:
    """``count`` jobd members (hv1…) on one database of ``pg``, sharing ``shared``."""

    def __init__(
        self,
        base: Path,
        pg: PgServer,
        count: int = 3,
        *,
        lease_ttl: float = TEST_LEASE_TTL,
    ) -> None:
        self.base = base
        self.pg = pg
        self.url = pg.create_database()
        self.lease_ttl = lease_ttl
        self.shared = base / "shared"
        self.shared.mkdir()
        self.members = [Member(self, f"hv{i + 1}") for i in range(count)]

    def start(self) -> JobdFleet:
        """Every member, started together (the first migrates the schema; the others wait
        on its lock)."""
        daemons = [m.spawn() for m in self.members]
        for daemon in daemons:
            daemon.wait_ready(60)
        return self

    def __getitem__(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def others(self, member: Member) -> list[Member]:
        return [m for m in self.members if m is not member]

    def write(self, name: str, text: str) -> str:
        path = self.base / name
        path.write_text(text)
        return str(path)

    # ---- the server -------------------------------------------------------------------

    def stop_pg(self) -> None:
        self.pg.stop()

    def start_pg(self) -> None:
        self.pg.start()

    # ---- the tables, read directly ----------------------------------------------------

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query.encode(), params or None)
            return list(cur.fetchall()) if cur.description is not None else []

    def claims(self, host: str | None = None) -> set[tuple[str, str, str, str]]:
        """(resource, mode, job, host) of every shared claim (of ``host``'s jobs)."""
        rows = self.sql("SELECT resource, mode, job, host FROM claims")
        return {(r, m, j, h) for r, m, j, h in rows if host is None or h == host}

    def job_rows(self) -> dict[str, tuple[str, str]]:
        """uuid -> (host, state) of every job row."""
        return {u: (h, s) for u, h, s in self.sql("SELECT uuid, host, state FROM jobs")}

    def host_rows(self) -> dict[str, dict[str, Any]]:
        rows = self.sql(
            "SELECT host, pid, left_at IS NOT NULL, fenced_at IS NOT NULL, fenced_by,"
            " fence_reason FROM hosts"
        )
        return {
            h: {"pid": p, "left": left, "fenced": fenced, "fenced_by": by, "reason": why}
            for h, p, left, fenced, by, why in rows
        }

    def orphan_claims(self) -> list[tuple[Any, ...]]:
        """Claims whose job row is missing, of another host, or not active: none may be
        (a claim lives exactly as long as its job is active)."""
        return self.sql(
            "SELECT c.resource, c.mode, c.job, c.host, j.host, j.state FROM claims c"
            " LEFT JOIN jobs j ON j.uuid = c.job WHERE j.uuid IS NULL OR j.host <> c.host"
            " OR j.state IN ('completed', 'failed', 'cancelled')"
        )

    def conflicting_holders(self) -> list[tuple[Any, ...]]:
        """Pairs of claims of two jobs on one resource in conflicting modes (the matrix
        of jobcore.scheduler.CONFLICTS): none may be, ever."""
        from jobcore.scheduler import CONFLICTS

        pairs = sorted({(a.value, b.value) for a, others in CONFLICTS.items() for b in others})
        values = ", ".join(f"('{a}', '{b}')" for a, b in pairs)
        return self.sql(
            "SELECT a.resource, a.mode, a.job, a.host, b.mode, b.job, b.host FROM claims a"
            " JOIN claims b ON a.resource = b.resource AND a.job < b.job"
            f" WHERE (a.mode, b.mode) IN ({values})"
        )

    def close(self) -> None:
        """Every member stopped (SIGTERM, SIGKILL if it hangs)."""
        for member in self.members:
            member.stop()
        left = [m.name for m in self.members if m.running()]
        assert not left, f"members still running: {left}"


@pytest.fixture
def jobd_fleet(tmp_path: Path, private_pg: PgServer) -> Iterator[JobdFleet]:
    """Three started members (hv1, hv2, hv3) on a server of the test's own."""
    fleet = JobdFleet(tmp_path, private_pg)
    try:
        yield fleet.start()
    finally:
        fleet.close()


# ---- two members on the session's server (pg_url: a fresh database per test) ----------------


def fleet_member(tmp_path: Path, name: str, pg_url: str, run: str | None = None) -> Jobd:
    """A ready jobd member ``name`` on ``pg_url`` (run dir ``tmp_path/(run or name)``), its
    lease 1 s: a killed member is lost soon."""
    args = ("--store", pg_url, "--host", name, "--lease-ttl", "1")
    return Jobd(tmp_path / (run or name), *args).wait_ready()


@pytest.fixture
def fleet2(tmp_path: Path, pg_url: str) -> Iterator[tuple[Jobd, Jobd]]:
    """Members hv1 and hv2, stopped after the test."""
    hv1, hv2 = fleet_member(tmp_path, "hv1", pg_url), fleet_member(tmp_path, "hv2", pg_url)
    try:
        yield hv1, hv2
    finally:
        hv1.stop()
        hv2.stop()


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll ``check`` until it returns true (at most ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await anyio.sleep(0.1)
