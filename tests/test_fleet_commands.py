"""Verbs and events across a fleet (design/fleet.md, "Commands", "Events of other hosts'
jobs"): real jobd members on one PostgreSQL database, each with its own sim host; a job
begun on hv1 is looked up, steered, waited for and watched through hv2, whose verbs reach
hv1 through the database alone; a lost owner is refused by name, comes back, and answers
again; a command nobody answers times out; a command past its deadline is never run."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest
from fleet_helpers import fleet_member as member
from fleet_helpers import until
from jobd_helpers import Jobd
from pg_helpers import PgServer

import jobcore
from jobcore.daemon.config import ConfigError, load_config
from jobcore.errors import AccessDenied, NoSuchJob, OperationInvalid, StoreError
from jobcore.events import EventHub, EventKind, JobEvent, Subscription
from jobcore.fleet import Fleet, SharedRoot
from jobcore.fleet_commands import FleetCommands
from jobcore.info import HostState
from jobcore.lifecycle import JobState
from jobcore.store_pg import open_pg_database

pytestmark = pytest.mark.anyio

SLOW = "rate=1"  # a backup that runs for ever (its bytes at 1 B/s)


def backup(job: uuid.UUID) -> str:
    return (
        f"<job type='backup'><uuid>{job}</uuid><domainbackup><disks><disk name='vdb'/>"
        "</disks></domainbackup></job>"
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the members are processes: one event loop kind suffices here


async def events_until(sub: Subscription, kind: EventKind, timeout: float = 20) -> list[JobEvent]:
    """The subscription's events up to the first of ``kind``."""
    seen: list[JobEvent] = []
    with anyio.fail_after(timeout):
        while not seen or seen[-1].kind is not kind:
            seen.append(await sub.get())
    return seen


def numbered(events: list[JobEvent]) -> list[tuple[EventKind, JobState, int]]:
    return [(e.kind, e.state, e.seq) for e in events if e.kind is not EventKind.PROGRESS]


@pytest.fixture
async def job_on_hv1(fleet2: tuple[Jobd, Jobd]) -> AsyncIterator[uuid.UUID]:
    hv1, _ = fleet2
    job = uuid.uuid4()
    async with jobcore.connect(hv1.uri(SLOW)) as conn:
        dom = await conn.lookup_domain("vm1")
        await dom.job_begin(backup(job))
    yield job


async def test_a_job_of_another_member_is_found_and_steered(
    fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    hv1, hv2 = fleet2
    u = job_on_hv1
    async with jobcore.connect(hv1.uri()) as c1, jobcore.connect(hv2.uri()) as c2:
        local = await c1.lookup_job(u)
        remote = await c2.lookup_job(u)
        assert (remote.uuid, str(remote.type), remote.domain) == (u, "backup", "vm1")
        info = await remote.info()
        assert info.host == "hv1" and info.state is JobState.RUNNING and not info.host_lost
        # the other lookups find it too: a prefix, and JobLookupByUUID with its domain's
        # name (hv2 has a vm1 of its own: the job is still hv1's)
        assert [j.uuid for j in await c2.find_jobs(u.hex[:12])] == [u]
        by_domain = await c2.job_lookup_by_uuid(await c2.lookup_domain("vm1"), u)
        assert by_domain.uuid == u and (await by_domain.info()).host == "hv1"
        # verbs reach hv1 and answer as hv1's own engine does
        await remote.set_speed(12345)
        assert (await local.info()).bandwidth == 12345
        assert await remote.xml_desc() == await local.xml_desc()
        stats = await remote.stats()
        assert stats["uuid"] == str(u) and stats["state"] == "running"
        await remote.pause()
        assert (await local.info()).state is JobState.PAUSED
        with pytest.raises(OperationInvalid, match="pause") as refused:
            await remote.pause()  # the owner's refusal, its class and message
        with pytest.raises(OperationInvalid) as same:
            await local.pause()
        assert str(refused.value) == str(same.value)
        await remote.resume()
        assert (await local.info()).state is JobState.RUNNING
        with pytest.raises(TimeoutError):  # as a local wait
            await remote.wait(0.3)
        # a subscription on hv2 gets hv1's events of the job, numbered as hv1's own
        theirs = c1.subscribe(job=u)
        ours = c2.subscribe(job=u)
        await c2.list_domains()  # the subscription is in place
        await c1.list_domains()
        async with anyio.create_task_group() as tg:
            waited: list[object] = []

            async def wait() -> None:
                waited.append(await remote.wait(30))

            tg.start_soon(wait)
            await remote.abort()
        assert (await local.info()).state is JobState.CANCELLED
        final = waited[0]
        assert getattr(final, "state", None) is JobState.CANCELLED
        assert getattr(final, "host", None) == "hv1"
        got, want = (
            await events_until(ours, EventKind.FINAL),
            await events_until(theirs, EventKind.FINAL),
        )
        assert numbered(got)[-2:] == numbered(want)[-2:]
        assert numbered(got)[-1] == (EventKind.FINAL, JobState.CANCELLED, want[-1].seq)
        assert got[-1].stats is not None and got[-1].stats["uuid"] == str(u)
        ours.close()
        theirs.close()


async def test_a_read_only_member_socket_refuses_a_forwarded_verb(
    fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    hv1, hv2 = fleet2
    async with (
        jobcore.connect(hv2.uri()),  # the read-only socket attaches to open connections
        jobcore.connect(hv2.uri(readonly=True)) as ro,
        jobcore.connect(hv1.uri()) as c1,
    ):
        job = await ro.lookup_job(job_on_hv1)
        assert (await job.info()).host == "hv1"
        with pytest.raises(AccessDenied, match="read-only"):
            await job.abort()
        assert (await (await c1.lookup_job(job_on_hv1)).info()).state is JobState.RUNNING


async def test_a_lost_owner_is_refused_by_name_and_answers_again_once_back(
    tmp_path: Path, pg_url: str, fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    hv1, hv2 = fleet2
    u = job_on_hv1
    async with jobcore.connect(hv2.uri()) as c2:
        remote = await c2.lookup_job(u)
        sub = c2.subscribe(job=u)
        await c2.list_domains()
        hv1.proc.send_signal(signal.SIGKILL)
        hv1.proc.wait(10)

        async def refused() -> bool:
            try:
                await remote.set_speed(1000)
            except OperationInvalid as exc:
                assert f"job '{u}' is on host 'hv1', which is lost" in str(exc), exc
                assert "jobctl host fence hv1" in str(exc)
                return True
            return False

        await until("hv2 refuses verbs on the lost member's job", refused)
        lost = await events_until(sub, EventKind.HOST_LOST)
        assert lost[-1].job == u and lost[-1].state is JobState.RUNNING
        info = await remote.info()
        assert info.host_lost and info.state is JobState.RUNNING
        # a command the killed process had picked and not answered (as if it died
        # running it): its successor answers it and never runs it
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO commands (target, asker, job, verb, args, deadline, picked)"
                " VALUES ('hv1', 'hv2', %s, 'abort', '[]', now() + interval '1 hour', now())"
                " RETURNING id",
                (str(u),),
            ).fetchone()
        assert row is not None
        # hv1 comes back: it recovers its job, takes its lease again and answers
        again = member(tmp_path, "hv1", pg_url, run="hv1-again")
        try:
            assert _command(pg_url, row[0])[:2] == (
                "JobError",
                "jobd on host 'hv1' restarted while it ran this command: it may or may not "
                "have taken effect; look at the job and ask again",
            )

            async def answers() -> bool:
                try:
                    await remote.set_speed(2000)
                except OperationInvalid:
                    return False
                return True

            await until("hv1 answers verbs again", answers)
            assert not (await remote.info()).host_lost
            await remote.abort()
            assert (await remote.wait(30)).state is JobState.CANCELLED
            final = await events_until(sub, EventKind.FINAL)
            assert final[-1].state is JobState.CANCELLED
        finally:
            sub.close()
            again.stop()


async def test_a_subscriber_resumes_another_hosts_job_across_its_members_restart(
    tmp_path: Path, pg_url: str, fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    """The job ends while the subscriber's member is away: once it is back, the
    resumed subscription gets the job's FINAL event from its row, once."""
    hv1, hv2 = fleet2
    u = job_on_hv1
    async with jobcore.connect(hv2.uri()) as c2, jobcore.connect(hv1.uri()) as c1:
        remote = await c2.lookup_job(u)
        sub = c2.subscribe(job=u)
        await c2.list_domains()
        await remote.pause()
        paused = await events_until(sub, EventKind.STATE)
        assert paused[-1].state is JobState.PAUSED
        hv2.proc.send_signal(signal.SIGKILL)
        hv2.proc.wait(10)
        hv2.stop()
        theirs = c1.subscribe(job=u)
        await (await c1.lookup_job(u)).abort()
        want = await events_until(theirs, EventKind.FINAL)
        back = member(tmp_path, "hv2", pg_url)
        try:
            got = await events_until(sub, EventKind.FINAL, timeout=90)  # reconnect included
            assert numbered(got)[-1] == numbered(want)[-1]
            assert [e.kind for e in got].count(EventKind.FINAL) == 1
            assert got[-1].stats is not None and got[-1].stats["state"] == "cancelled"
        finally:
            sub.close()
            theirs.close()
            back.stop()


async def test_commands_and_events_carry_on_after_the_database_restarts(
    tmp_path: Path, private_pg: PgServer
) -> None:
    """Each member's listener connects again by itself (its polls meanwhile)."""
    url = private_pg.create_database()
    hv1, hv2 = member(tmp_path, "hv1", url), member(tmp_path, "hv2", url)
    try:
        u = uuid.uuid4()
        async with jobcore.connect(hv1.uri(SLOW)) as c1:
            await (await c1.lookup_domain("vm1")).job_begin(backup(u))
            private_pg.stop()
            await anyio.sleep(1.5)  # an outage the listeners notice (they look every 0.5 s)
            private_pg.start()
            async with jobcore.connect(hv2.uri()) as c2:

                async def steered() -> bool:
                    try:
                        await (await c2.lookup_job(u)).pause()
                    except (OperationInvalid, StoreError):  # hv1 not renewed yet; the pool
                        return False
                    return True

                await until("a verb through hv2 after the restart", steered, timeout=60)
                sub = c2.subscribe(job=u)
                await c2.list_domains()
                await (await c1.lookup_job(u)).abort()  # on hv1 itself: hv2 hears of it
                final = await events_until(sub, EventKind.FINAL)
                assert final[-1].state is JobState.CANCELLED
                sub.close()
        assert "fleet notifications lost" in hv2.log() and "fleet notifications back" in hv2.log()
    finally:
        hv1.stop()
        hv2.stop()


async def test_an_unknown_job_is_no_such_job_on_every_member(fleet2: tuple[Jobd, Jobd]) -> None:
    _, hv2 = fleet2
    async with jobcore.connect(hv2.uri()) as c2:
        with pytest.raises(NoSuchJob):
            await c2.lookup_job(uuid.uuid4())


async def test_a_fenced_member_stops_and_a_clean_stop_leaves(
    pg_url: str, fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    hv1, hv2 = fleet2
    db = open_pg_database(pg_url, "operator")
    try:
        fenced = await Fleet(db).fence("hv1", "power lost", force=True)
        assert fenced.name == "hv1"
        assert hv1.proc.wait(15) == 1  # it saw the fence at its next renewal
        assert "jobd: host 'hv1' was fenced by 'operator': power lost: jobd stopped" in hv1.log()
        assert hv2.stop() == 0
        states = {h.name: h.state for h in await Fleet(db).hosts()}
        assert states == {"hv1": HostState.FENCED, "hv2": HostState.STOPPED}
    finally:
        db.release()


def _command(pg_url: str, cmd_id: int) -> tuple[object, ...]:
    """(error kind, error, result) of an answered command."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT error_kind, error, result FROM commands WHERE id = %s AND done IS NOT NULL",
            (cmd_id,),
        ).fetchone()
    assert row is not None, f"command {cmd_id} is not answered"
    return tuple(row)


def _pending(pg_url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT id, target, picked, done FROM commands").fetchall()


async def test_a_command_past_its_deadline_is_answered_and_never_run(
    pg_url: str, fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    hv1, _ = fleet2
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO commands (target, asker, job, verb, args, deadline) VALUES"
            " ('hv1', 'someone', %s, 'abort', '[]', now() - interval '1 second') RETURNING id",
            (str(job_on_hv1),),
        ).fetchone()
        assert row is not None
        conn.execute("NOTIFY jobcore_cmd, 'hv1'")

        async def answered() -> bool:
            found = conn.execute(
                "SELECT error_kind, error, result FROM commands WHERE id = %s AND done IS NOT NULL",
                (row[0],),
            ).fetchone()
            if found is None:
                return False
            kind, error, result = found
            assert kind == "OperationInvalid" and result is None, found
            assert "after its deadline: not run" in error and str(job_on_hv1) in error
            return True

        await until("hv1 answers the expired command", answered)
        # rows nobody takes go after a minute: an answer its asker never took, a command
        # for a host that never came
        conn.execute(
            "INSERT INTO commands (target, asker, job, verb, args, created, deadline, picked,"
            " done, error_kind, error) VALUES ('hv1', 'gone', %s, 'stats', '[]',"
            " now() - interval '3 minutes', now() - interval '2 minutes',"
            " now() - interval '2 minutes', now() - interval '2 minutes', 'JobError', 'x'),"
            " ('nowhere', 'gone', %s, 'stats', '[]', now() - interval '3 minutes',"
            " now() - interval '2 minutes', NULL, NULL, NULL, NULL)",
            (str(job_on_hv1), str(job_on_hv1)),
        )

        async def cleaned() -> bool:
            rows = conn.execute("SELECT asker FROM commands WHERE asker = 'gone'").fetchall()
            return not rows

        await until("the members delete stale commands", cleaned, timeout=30)
    async with jobcore.connect(hv1.uri()) as c1:
        assert (await (await c1.lookup_job(job_on_hv1)).info()).state is JobState.RUNNING


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_command_nobody_answers_times_out_and_is_withdrawn(pg_url: str) -> None:
    """A member that is live (its lease renewed) but never picks its commands up."""
    ghost, job = "ghost", uuid.uuid4()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        db = open_pg_database(pg_url, "asker")  # creates the tables
        try:
            conn.execute(
                "INSERT INTO hosts (host, pid, joined, renewed, lease_ttl)"
                " VALUES (%s, 1, now(), now(), 3600)",
                (ghost,),
            )
            conn.execute(
                "INSERT INTO jobs (uuid, scope, type, domain, host, state, xml, claims,"
                " created, retention) VALUES (%s, 'sim:///default', 'backup', 'vm1', %s,"
                " 'running', %s, '[]', 0, 600)",
                (str(job), ghost, backup(job)),
            )
            fleet = Fleet(db, lease_ttl=1.0)
            await anyio.to_thread.run_sync(fleet.join)
            commands = FleetCommands(fleet)

            async def execute(*args: object) -> None:
                raise AssertionError(f"nothing is addressed to this member: {args}")

            async with anyio.create_task_group() as tg:
                await tg.start(commands.run, execute)
                started = time.monotonic()
                with pytest.raises(OperationInvalid) as refused:
                    await commands.call(job, "abort", timeout=0.5)
                assert time.monotonic() - started >= 0.5
                assert f"host '{ghost}' did not answer 'abort' on job '{job}' within 0.5 s" in str(
                    refused.value
                )
                assert _pending(pg_url) == []  # withdrawn: it can never run late
                # a verb that is no verb is refused before anything is written
                with pytest.raises(jobcore.InvalidArgument):
                    await commands.call(job, "destroy")
                tg.cancel_scope.cancel()
        finally:
            db.release()


async def test_a_forwarded_command_is_one_row_until_its_answer_is_taken(
    pg_url: str, fleet2: tuple[Jobd, Jobd], job_on_hv1: uuid.UUID
) -> None:
    """The table stays bounded: the asker deletes its row as it reads the answer."""
    _, hv2 = fleet2
    async with jobcore.connect(hv2.uri()) as c2:
        remote = await c2.lookup_job(job_on_hv1)
        for speed in range(1, 6):
            await remote.set_speed(speed * 1000)
    assert _pending(pg_url) == []


# ---- jobd's fleet options ------------------------------------------------------------------


def test_shared_roots_and_the_lease_ttl_are_configured_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "jobd.toml"
    config.write_text('shared_roots = ["nfs1=/srv/nfs", "/srv/b"]\nlease_ttl = 2.5\n')
    loaded = load_config(config)
    assert loaded.shared_roots == (SharedRoot("nfs1", "/srv/nfs"), SharedRoot("/srv/b", "/srv/b"))
    assert loaded.lease_ttl == 2.5
    # the command line replaces the file's list
    again = load_config(config, shared_roots=["/srv/c"], lease_ttl=4)
    assert again.shared_roots == (SharedRoot("/srv/c", "/srv/c"),) and again.lease_ttl == 4.0
    assert load_config(None).lease_ttl == 10.0 and load_config(None).shared_roots == ()
    for bad, named in (
        ('shared_roots = "/srv/nfs"', "shared_roots must be a list"),
        ('shared_roots = ["relative/path"]', "shared_roots: invalid shared root"),
        ("lease_ttl = 0", "lease_ttl must be between"),
        ("lease_ttl = nan", "lease_ttl must be between"),
    ):
        config.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=named):
            load_config(config)


def test_jobd_refuses_a_bad_fleet_option_at_start(tmp_path: Path) -> None:
    for args, named in (
        (("--lease-ttl", "-1"), "lease_ttl must be between"),
        (("--shared-root", "nfs1=relative"), "invalid shared root 'nfs1=relative'"),
    ):
        daemon = Jobd(tmp_path / "run", *args)
        assert daemon.proc.wait(30) == 2
        daemon.stop()
        assert named in daemon.log()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_watch_numbers_another_hosts_row_changes_and_reports_its_loss(
    pg_url: str,
) -> None:
    """In-process: rows of a host 'ghost' changed by hand (with the notification its
    commits send) become events numbered as the owner numbers them; its lease expiring
    brings HOST_LOST; unwatching lets go."""
    first, second = uuid.uuid4(), uuid.uuid4()
    db = open_pg_database(pg_url, "watcher")
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO hosts (host, pid, joined, renewed, lease_ttl)"
                " VALUES ('ghost', 1, now(), now(), 3600)"
            )
            for job in (first, second):
                conn.execute(
                    "INSERT INTO jobs (uuid, scope, type, domain, host, state, xml, claims,"
                    " created, retention, event_seq) VALUES (%s, 'sim:///default', 'backup',"
                    " 'vm1', 'ghost', 'running', %s, '[]', 0, 600, 1)",
                    (str(job), backup(job)),
                )

            def change(job: uuid.UUID, state: str, seq: int) -> None:
                conn.execute(
                    "UPDATE jobs SET state = %s, event_seq = %s WHERE uuid = %s",
                    (state, seq, str(job)),
                )
                conn.execute("SELECT pg_notify('jobcore_jobs', %s)", (f"{job} ghost {seq}",))

            fleet = Fleet(db, lease_ttl=0.4)  # its watches look at hosts every 0.2 s
            await anyio.to_thread.run_sync(fleet.join)
            commands = FleetCommands(fleet)

            async def execute(*args: object) -> None:
                raise AssertionError(args)

            hub = EventHub()
            sub = hub.subscribe()
            async with anyio.create_task_group() as tg:
                await tg.start(commands.run, execute)
                watch = commands.watch(first, hub, since=1)
                change(first, "paused", 2)
                ev = await _next(sub)
                # (its previous state: what the watch read before, if it read in time)
                assert (ev.kind, ev.state, ev.seq) == (EventKind.STATE, JobState.PAUSED, 2)
                change(first, "cancelled", 4)  # its terminal STATE is 3, its FINAL 4
                ended = [await _next(sub), await _next(sub)]
                assert [(e.kind, e.state, e.previous, e.seq) for e in ended] == [
                    (EventKind.STATE, JobState.CANCELLED, JobState.PAUSED, 3),
                    (EventKind.FINAL, JobState.CANCELLED, None, 4),
                ]
                assert ended[1].stats is not None and ended[1].stats["state"] == "cancelled"
                other = commands.watch(second, hub, since=1)
                conn.execute("UPDATE hosts SET lease_ttl = 0.05 WHERE host = 'ghost'")
                lost = await _next(sub)
                assert (lost.kind, lost.job, lost.state) == (
                    EventKind.HOST_LOST,
                    second,
                    JobState.RUNNING,
                )
                assert commands.watching == 2
                watch()
                other()
                assert commands.watching == 0
                tg.cancel_scope.cancel()
    finally:
        db.release()


async def _next(sub: Subscription, timeout: float = 10) -> JobEvent:
    with anyio.fail_after(timeout):
        return await sub.get()
