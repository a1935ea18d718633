"""Issue 12's soak: members of one PostgreSQL fleet and PostgreSQL itself killed at random
moments, cycle after cycle, while sim jobs are begun and aborted from every member
(design/fleet.md "Property kit and soak").

Each cycle does random work on the members (begins of sim backups and block pulls on
domains whose images are under a shared root of every member, so their claims meet;
aborts, through any member; a begin, or an abort through another member, whose reply
is never read), then kills, at a random
moment, one member (SIGKILL), PostgreSQL (``pg_ctl stop -m immediate``: every backend
dies at once, no checkpoint) or both, and starts them again on the same directories.
After each cycle:

- no record is lost: every job whose begin returned is found by UUID (on some member), in
  a state its last known one can lead to; a begin refused with an error left no job, or
  a failed one that never ran; an in-flight begin left a whole job or none;
- a thread samples the ``claims`` table (joined with ``jobs``, one
  snapshot per query) many times a second through the whole run, outages included: no
  two jobs ever hold conflicting modes (``jobcore.scheduler.CONFLICTS``) on one resource,
  no claim belongs to a job without a row or to an ended job; a killed member's claims
  stay exactly as they were while it is away, its lease expiring (it may still be
  writing); and in the end, every job ended, no claim is left.

Knobs: ``JOBCORE_FLEET_SOAK_CYCLES`` (default 10), ``JOBCORE_FLEET_SOAK_MEMBERS``
(default 2), ``JOBCORE_FLEET_SOAK_SEED`` (default random; every failure message names
it)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import attrs
import psycopg
from fleet_helpers import JobdFleet
from fleet_helpers import Member as FleetMember
from pg_helpers import PgServer, pg_bin
from test_kill_soak import LATER, CallFailed, Client

from jobcore.info import JobInfo
from jobcore.lifecycle import TRANSITIONS, JobState
from jobcore.methods import Method
from jobcore.scheduler import CONFLICTS, Mode

S = JobState
MiB = 1 << 20
CYCLES = int(os.environ.get("JOBCORE_FLEET_SOAK_CYCLES", "10"))
MEMBERS = int(os.environ.get("JOBCORE_FLEET_SOAK_MEMBERS", "2"))
#: the members' lease (s): a killed member is reported lost while it is down
LEASE_TTL = 2.0
SEED = int(os.environ.get("JOBCORE_FLEET_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
#: sim jobs run a few seconds (a backup of vdb, 512 MiB: 4 s; a pull of vda: longer)
RATE = 128 * MiB
WORLD = "soak"
#: where the sim driver keeps its domains' images (drivers/sim/world.py)
SIM_IMAGES = "/var/lib/sim"


def _reachable(state: JobState) -> frozenset[JobState]:
    """Every state ``TRANSITIONS`` leads to from ``state`` (itself included)."""
    seen, todo = {state}, [state]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


def _kill_pg(server: PgServer) -> None:
    """Every backend of the server killed at once, no shutdown checkpoint (crash recovery
    at the next start)."""
    server._run(pg_bin("pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w", "stop")


class SoakMember(FleetMember):
    """A member of tests/fleet_helpers.py's fleet whose shared root also holds the sim
    domains' images (so its vm1 and vm2 are every member's), with a client of the
    soak's sim host while it runs."""

    def __init__(self, fleet: JobdFleet, name: str) -> None:
        super().__init__(fleet, name)
        self.client: Client | None = None

    def args(self) -> tuple[str, ...]:
        return (*super().args(), "--shared-root", f"sim={SIM_IMAGES}")

    def start(self) -> SoakMember:
        super().start()
        assert self.jobd is not None
        self.client = Client(self.jobd.sock, f"sim:///{WORLD}?rate={RATE}")
        return self

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def kill(self) -> None:
        self._drop_client()
        super().kill()

    def stop(self) -> int | None:
        self._drop_client()
        return super().stop()

    def c(self) -> Client:
        assert self.client is not None, f"member {self.name} is down"
        return self.client


@attrs.define
class Record:
    """A job whose begin returned: what was last seen of it, and the last of that which a
    later commit on its member covers (``durable``: a kill of the member may take it back
    there, as what it wrote since may not have landed)."""

    member: SoakMember
    latest: JobInfo
    durable: JobState = S.RUNNING  # its row as the begin inserted it
    durable_info: JobInfo | None = None
    #: a verb was sent since ``durable``: any state it leads to may come back
    verb: bool = False


class ClaimSampler:
    """A thread reading the ``claims`` table (with each claim's job row) over and over,
    through outages (it reconnects), recording what must never be seen."""

    QUERY = (
        "SELECT c.resource, c.mode, c.job, c.host, j.state, j.host "
        "FROM claims c LEFT JOIN jobs j ON j.uuid = c.job"
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = 0
        self.held = 0  # samples in which some shared claim was held
        self.violations: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="claim sampler")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                rows = conn.execute(self.QUERY).fetchall()
            except psycopg.Error:  # the server is down (killed): sample again once it is up
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self._stop.wait(0.05)
                continue
            self.samples += 1
            self.held += bool(rows)
            self.check(rows)
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()

    def check(self, rows: list[tuple[str, str, str, str, str | None, str | None]]) -> None:
        by_resource: dict[str, list[tuple[str, Mode, str]]] = {}
        for resource, mode, job, host, state, row_host in rows:
            if state is None:
                self.violate(f"{resource} held ({mode}) by {job} on {host}: no row")
            elif JobState(state).terminal:
                self.violate(f"{resource} held ({mode}) by {job} on {host}: {state}")
            elif row_host != host:
                self.violate(f"{resource} held ({mode}) by {job} on {host}: a job of {row_host}")
            by_resource.setdefault(resource, []).append((job, Mode(mode), host))
        for resource, holders in by_resource.items():
            for i, (job_a, mode_a, host_a) in enumerate(holders):
                for job_b, mode_b, host_b in holders[i + 1 :]:
                    if job_a != job_b and mode_b in CONFLICTS[mode_a]:
                        self.violate(
                            f"{resource}: {job_a} on {host_a} holds {mode_a}, "
                            f"{job_b} on {host_b} holds {mode_b}"
                        )

    def violate(self, what: str) -> None:
        if what not in self.violations:
            self.violations.append(what)

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10)


BACKUP = (
    "<job type='backup'><uuid>{job}</uuid><domainbackup><disks>"
    "<disk name='{disk}' type='file'><target file='/b/{job}.{disk}'/></disk>"
    "{other}</disks></domainbackup></job>"
)
BLOCKPULL = "<job type='blockpull'><uuid>{job}</uuid><disk name='vda'/></job>"


class Soak:
    def __init__(self, tmp: Path, server: PgServer, *, members: int) -> None:
        self.server = server
        self.rng = random.Random(SEED)
        self.fleet = JobdFleet(tmp, server, members, lease_ttl=LEASE_TTL)
        self.url = self.fleet.url
        self.members = [SoakMember(self.fleet, f"hv{i + 1}") for i in range(members)]
        self.fleet.members = list(self.members)
        #: every job whose begin returned
        self.jobs: dict[uuid.UUID, Record] = {}
        #: begins refused with an error: no job, or a failed one that never ran
        self.refused: dict[uuid.UUID, SoakMember] = {}
        #: begins whose answer was lost (a kill): a whole job or none
        self.in_flight: dict[uuid.UUID, SoakMember] = {}
        self.sampler = ClaimSampler(self.url)
        self.cycle = 0
        self.what = "setup"
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def where(self) -> str:
        return (
            f"seed {SEED} (JOBCORE_FLEET_SOAK_SEED={SEED}), cycle {self.cycle}, {self.what}; "
            f"logs in {self.fleet.base}/hv*/run.log*"
        )

    def check(self, cond: object, what: str) -> None:
        if not cond:
            raise AssertionError(f"{what} [{self.where()}]")

    def up(self) -> list[SoakMember]:
        return [m for m in self.members if m.client is not None]

    # ---- work -----------------------------------------------------------------------

    def xml(self, job: uuid.UUID) -> tuple[str, str]:
        domain = self.rng.choice(("vm1", "vm2"))
        kind = self.rng.random()
        if kind < 0.3:
            return domain, BLOCKPULL.format(job=job)
        disk, other = ("vda", "vdb") if kind < 0.6 else ("vdb", "vda")
        return domain, BACKUP.format(
            job=job, disk=disk, other=f"<disk name='{other}' backup='no'/>"
        )

    def begin(self, member: SoakMember) -> None:
        job = uuid.uuid4()
        domain, xml = self.xml(job)
        # everything seen before this begin was committed when it returns: its insert
        # commits after every write its member queued before (design/store.md)
        seen = {j: r.latest for j, r in self.jobs.items() if r.member is member}
        try:
            member.c().begin(domain, xml)
        except CallFailed as exc:
            self.counts[f"begin refused: {exc.name}"] += 1
            self.refused[job] = member
            if exc.name == "JobConflict":
                self.conflict(member, str(exc))
            return
        for j, latest in seen.items():
            rec = self.jobs[j]
            rec.durable, rec.durable_info, rec.verb = latest.state, latest, False
        self.jobs[job] = Record(member, member.c().info(job))
        self.counts["begun"] += 1

    def conflict(self, member: SoakMember, said: str) -> None:
        """A refusal names its holder, a job begun here; one of another member with that
        member's host."""
        found = re.search(r"conflicts with job '([0-9a-f-]{36})'", said)
        self.check(found, f"a conflict names no holder: {said}")
        assert found is not None
        job = uuid.UUID(found.group(1))
        rec = self.jobs.get(job)
        owner = rec.member if rec is not None else self.in_flight.get(job)
        self.check(owner is not None, f"a conflict names an unknown holder: {said}")
        assert owner is not None
        if owner is not member:
            self.check(f"on host '{owner.name}'" in said, f"a conflict names no host: {said}")
            self.counts["refused by another member's job"] += 1

    def abort(self, member: SoakMember) -> None:
        """An abort of one of ``member``'s jobs, sent through any member that runs
        (forwarded to the owner from another)."""
        active = [j for j, r in self.jobs.items() if r.latest.state.active and r.member is member]
        if not active:
            return
        job = self.rng.choice(active)
        via = self.rng.choice(self.up())
        self.jobs[job].verb = True
        try:
            via.c().call(Method.JOB_ABORT, job)
            self.counts["aborted" if via is member else "aborted through another"] += 1
        except CallFailed as exc:
            self.counts[f"abort refused: {exc.name}"] += 1
        self.jobs[job].latest = member.c().info(job)

    def opening(self) -> None:
        """One conflict across members for sure: a block pull of vm2's vda on the first,
        then a backup of the same images from the second, refused naming the pull."""
        first, second = self.members[0], self.members[1]
        pull = uuid.uuid4()
        first.c().begin("vm2", BLOCKPULL.format(job=pull))
        self.jobs[pull] = Record(first, first.c().info(pull))
        job = uuid.uuid4()
        try:
            second.c().begin("vm2", BACKUP.format(job=job, disk="vda", other=""))
        except CallFailed as exc:
            self.check(exc.name == "JobConflict", f"the backup beside the pull: {exc}")
            self.check(f"'{pull}' on host '{first.name}'" in str(exc), str(exc))
            self.conflict(second, str(exc))
        else:
            self.check(False, f"a backup of the images {pull} pulls was begun on {second.name}")

    def work(self, steps: int) -> None:
        for _ in range(steps):
            up = self.up()
            if not up:
                return
            member = self.rng.choice(up)
            if self.rng.random() < 0.7:
                self.begin(member)
            else:
                self.abort(member)
            time.sleep(self.rng.uniform(0, 0.05))

    def begin_unanswered(self, member: SoakMember) -> None:
        """A begin sent and its answer never read (the kill follows)."""
        job = uuid.uuid4()
        domain, xml = self.xml(job)
        member.c().raw.request("job_begin", domain, xml, 0)
        self.in_flight[job] = member

    def abort_unanswered(self, owner: SoakMember) -> None:
        """An abort of one of ``owner``'s jobs sent through another member, its answer
        never read (the owner's kill follows): the job may end aborted or go on."""
        active = [j for j, r in self.jobs.items() if r.latest.state.active and r.member is owner]
        via = [m for m in self.up() if m is not owner]
        if not active or not via:
            return
        job = self.rng.choice(active)
        self.jobs[job].verb = True
        self.rng.choice(via).c().raw.request("job_abort", job.bytes)
        self.counts["forwarded abort in flight"] += 1

    # ---- kills ------------------------------------------------------------------------

    def kill_cycle(self) -> None:
        what = self.rng.choice(("member", "postgresql", "both"))
        victim = self.rng.choice(self.members)
        self.what = f"kill {what}" + (f" ({victim.name})" if what != "postgresql" else "")
        self.counts[self.what.split(" (")[0]] += 1
        self.work(self.rng.randrange(2, 8))
        if what != "postgresql" and self.rng.random() < 0.5:
            self.begin_unanswered(victim)
            time.sleep(self.rng.uniform(0, 0.03))
        if what != "postgresql" and self.rng.random() < 0.3:
            self.abort_unanswered(victim)
            time.sleep(self.rng.uniform(0, 0.03))
        if what != "member":
            _kill_pg(self.server)
            self.work(self.rng.randrange(0, 4))  # members without their database
        killed: set[str] = set()
        if what != "postgresql":
            killed.add(victim.name)
            victim.kill()
            held = self.claims_of(victim) if what == "member" else None
            self.work(self.rng.randrange(0, 3))  # the others go on
            if held is not None:  # nobody releases them while it is away (it may write)
                time.sleep(self.rng.uniform(0, LEASE_TTL * 1.5))  # its lease expires
                now = self.claims_of(victim)
                self.check(
                    now == held, f"{victim.name}'s claims while it was down: {held} -> {now}"
                )
                self.counts["claims kept while down"] += bool(held)
        if what != "member":
            time.sleep(self.rng.uniform(0, 0.3))
            self.server.start()
        started = time.monotonic()
        if what != "postgresql":
            victim.start()
        self.seconds["member restart"] += time.monotonic() - started
        started = time.monotonic()
        self.settle()
        self.seconds["until every member begins jobs again"] += time.monotonic() - started
        started = time.monotonic()
        self.verify(killed)
        self.seconds["checks"] += time.monotonic() - started

    def claims_of(self, member: SoakMember) -> set[tuple[str, str, str]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT resource, mode, job FROM claims WHERE host = %s", (member.name,)
            ).fetchall()
        return {(r, m, j) for r, m, j in rows}

    def settle(self) -> None:
        """Until every member begins jobs again (its pool has reconnected)."""
        deadline = time.monotonic() + 30
        for member in self.members:
            while True:
                try:
                    member.c().call(Method.LOOKUP_DOMAIN, "vm1")
                    job = uuid.uuid4()
                    member.c().begin("vm2", BACKUP.format(job=job, disk="vdb", other=""))
                except CallFailed as exc:
                    self.check(time.monotonic() < deadline, f"{member.name} stays refusing: {exc}")
                    time.sleep(0.1)
                    continue
                member.c().call(Method.JOB_ABORT, job)
                self.jobs[job] = Record(member, member.c().info(job), verb=True)
                break

    # ---- checks -----------------------------------------------------------------------

    def find(self, job: uuid.UUID, owner: SoakMember, *, begun: bool = True) -> JobInfo | None:
        """The job's info from its owner, and from every other member too: found there if
        its begin returned (its row was committed), else there or not."""
        try:
            info = owner.c().info(job)
        except CallFailed as exc:
            self.check(exc.name == "NoSuchJob", f"job {job}: {exc}")
            return None
        for other in self.members:
            if other is not owner:
                try:
                    there = self.read_row(other, job)  # from its row: it may lag behind
                except CallFailed as exc:
                    self.check(
                        not begun and exc.name == "NoSuchJob",
                        f"job {job} of {owner.name} ({info.state}): {other.name}: {exc}",
                    )
                    self.counts["on its owner only"] += 1
                    continue
                self.check(
                    there.host == owner.name and info.state in _reachable(there.state),
                    f"job {job} of {owner.name}: {other.name} says {there}, owner {info}",
                )
        return info

    def read_row(self, member: SoakMember, job: uuid.UUID) -> JobInfo:
        """Another host's job through ``member``: its fleet reads may still find the
        database unreachable for a few seconds after a restart (its pool reconnecting)
        while its writes succeed again; retried (and counted) for at most 30 s."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return member.c().info(job)
            except CallFailed as exc:
                if exc.name != "StoreError" or time.monotonic() > deadline:
                    raise
                self.counts["fleet read unreachable, retried"] += 1
                time.sleep(0.2)

    def verify(self, killed: Collection[str] = ()) -> None:
        """Each job's state now against what was seen of it: the last state seen on a
        member that lived on (which kept its writes through an outage), the last
        committed one on a member that was killed."""
        for job, rec in self.jobs.items():
            now = self.find(job, rec.member)
            self.check(now is not None, f"job {job} ({rec.latest.type}, {rec}) lost")
            assert now is not None
            if rec.member.name in killed:
                before, info, verb = rec.durable, rec.durable_info, rec.verb
            else:
                before, info, verb = rec.latest.state, rec.latest, False
            if before.terminal:
                assert info is not None
                self.check(
                    (now.state, now.errmsg) == (info.state, info.errmsg),
                    f"ended job {job} changed: {info} -> {now}",
                )
            else:
                allowed = _reachable(before) if verb else LATER[before]
                self.check(
                    now.state in allowed,
                    f"job {job} ({now.type} on {rec.member.name}) was {before} "
                    f"({'a verb since, ' if verb else ''}last seen {rec.latest.state}), now "
                    f"{now.state} ({now.errmsg})",
                )
            if rec.latest.state is not now.state:
                self.counts[f"{rec.latest.state} -> {now.state}"] += 1
            rec.latest = now
        for job, member in list(self.refused.items()):
            info = self.find(job, member, begun=False)
            self.check(
                info is None or (info.state is S.FAILED and not info.processed),
                f"a refused begin left job {job}: {info}",
            )
            self.counts["refused: none" if info is None else "refused: failed"] += 1
            del self.refused[job]
        for job, member in list(self.in_flight.items()):
            info = self.find(job, member, begun=False)
            self.counts[f"in flight: {'none' if info is None else info.state}"] += 1
            if info is not None:
                self.check(
                    info.state in LATER[S.RUNNING] or info.state is S.FAILED,
                    f"in-flight begin {job}: {info}",
                )
                self.jobs[job] = Record(member, info, info.state)
            del self.in_flight[job]
        self.check(not self.sampler.violations, f"claims: {self.sampler.violations[:5]}")

    def finish(self) -> None:
        """Every job ends; their claims go with them."""
        self.what = "the end"
        for job, rec in self.jobs.items():
            if rec.latest.state.active:
                with contextlib.suppress(CallFailed):
                    rec.member.c().call(Method.JOB_ABORT, job)
            rec.latest = rec.member.c().wait(job, 60)
            self.check(rec.latest.state.terminal, f"job {job} did not end: {rec.latest}")
        self.verify()
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(self.url, autocommit=True) as conn:
                left = conn.execute(ClaimSampler.QUERY).fetchall()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.check(not left, f"claims left after every job ended: {left}")


def test_members_and_postgresql_killed_lose_no_record_nor_hold_conflicting_claims(
    tmp_path: Path, private_pg: PgServer
) -> None:
    soak = Soak(tmp_path, private_pg, members=MEMBERS)
    started = time.monotonic()
    try:
        for m in soak.members:
            m.start()
        soak.opening()
        soak.sampler.start()
        for cycle in range(1, CYCLES + 1):
            soak.cycle = cycle
            soak.kill_cycle()
        soak.finish()
        for m in soak.members:
            soak.check(m.stop() == 0, f"{m.name} did not stop cleanly")
    finally:
        soak.sampler.stop()
        soak.fleet.close()
    print(
        f"fleet soak: {CYCLES} cycles, seed {SEED}, {time.monotonic() - started:.1f} s, "
        f"{soak.sampler.samples} samples of the claims ({soak.sampler.held} with some held)"
    )
    for what, count in sorted(soak.counts.items()):
        print(f"  {what:32} {count}")
    for what, seconds in sorted(soak.seconds.items()):
        print(f"  {what:40} {seconds:.1f} s")
    assert soak.counts["begun"] > 0
    assert soak.sampler.held > 0, "no sample saw a shared claim held"
    assert soak.counts["refused by another member's job"] > 0
