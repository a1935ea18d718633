"""The fleet's core on a real PostgreSQL server (jobcore.fleet, jobcore.store_pg): shared
claims arbitrated between members, leases, fencing, fleet-wide reads. Two members in one
process: two in-process connections with different hosts on one database, each with its
``Fleet`` on its connection's ``PostgresDatabase``."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from store_helpers import pg_rows

import jobcore
from jobcore.errors import InvalidArgument, JobConflict, OperationInvalid, StoreError
from jobcore.fleet import Fleet, SharedRoot, parse_shared_root, shared_resource
from jobcore.info import HostState
from jobcore.lifecycle import JobState
from jobcore.local import LocalConnection, as_local, connect_local
from jobcore.scheduler import image_resource
from jobcore.store_pg import PG_MIGRATIONS, PG_SCHEMA_VERSION, PostgresDatabase
from jobcore.store_sqlite import SQLiteJobStore

pytestmark = pytest.mark.anyio
MiB = 1 << 20
#: where the sim's domains keep their images (drivers/sim/world.py): each member's vm1
#: has the same paths, as two hosts' domains on one shared storage would
SIM_IMAGES = "/var/lib/sim"
NFS = (SharedRoot("nfs1", SIM_IMAGES),)


def pull(job: uuid.UUID, disk: str = "vda") -> str:
    return f"<job type='blockpull'><uuid>{job}</uuid><disk name='{disk}'/></job>"


def backup(job: uuid.UUID, disk: str = "vda", *, queue: bool = False) -> str:
    others = "".join(f"<disk name='{d}' backup='no'/>" for d in ("vda", "vdb") if d != disk)
    return (
        f"<job type='backup'><uuid>{job}</uuid>{'<queue/>' if queue else ''}<domainbackup>"
        f"<disks><disk name='{disk}' type='file'><target file='/b/{job}.{disk}'/></disk>"
        f"{others}</disks></domainbackup></job>"
    )


@asynccontextmanager
async def member(
    pg_url: str,
    host: str,
    *,
    roots: tuple[SharedRoot, ...] = NFS,
    ttl: float = 30.0,
    rate: float = MiB,
    fenced: bool = False,
) -> AsyncIterator[tuple[LocalConnection, Fleet]]:
    """A member: an in-process sim connection on the fleet's database as ``host``, its
    Fleet joined (told it had been fenced: ``fenced``)."""
    async with connect_local(f"sim:///default?rate={rate}", store=pg_url, host=host) as conn:
        fleet = Fleet(_db(conn), lease_ttl=ttl, shared_roots=roots)
        warning = await anyio.to_thread.run_sync(fleet.join)
        assert (warning is not None) == fenced, warning
        yield conn, fleet


def _db(conn: LocalConnection) -> PostgresDatabase:
    store = as_local(conn).engine._dstore
    assert isinstance(store, SQLiteJobStore) and isinstance(store.db, PostgresDatabase)
    return store.db


def _store(conn: LocalConnection) -> SQLiteJobStore:
    store = as_local(conn).engine._dstore
    assert isinstance(store, SQLiteJobStore)
    return store


def claims(pg_url: str) -> set[tuple[str, str, str, str]]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        return {tuple(r) for r in c.execute("SELECT resource, mode, job, host FROM claims")}


async def until(what: Any, timeout: float = 30.0) -> None:
    """Poll ``what()`` (async) until true; fail after ``timeout`` (a bound, not a speed)."""
    deadline = time.monotonic() + timeout
    while not await what():
        assert time.monotonic() < deadline, "condition not reached"
        await anyio.sleep(0.05)


# ---- shared roots ------------------------------------------------------------------------


def test_shared_roots_parse_and_name_resources_by_storage() -> None:
    assert parse_shared_root("/srv/nfs1/") == SharedRoot("/srv/nfs1", "/srv/nfs1")
    assert parse_shared_root("nfs1=/srv/./nfs1") == SharedRoot("nfs1", "/srv/nfs1")
    assert parse_shared_root("nfs1=/srv/x/../nfs1") == SharedRoot("nfs1", "/srv/nfs1")
    assert parse_shared_root("/srv/a=b") == SharedRoot("/srv/a=b", "/srv/a=b")  # a path
    for bad in ("", "srv/nfs1", "nfs1=srv", "=/srv", "a:b=/srv", "a b=/srv", "nfs1="):
        with pytest.raises(InvalidArgument, match="shared root"):
            parse_shared_root(bad)
    roots = (SharedRoot("nfs1", "/srv/nfs1"), SharedRoot("deep", "/srv/nfs1/deep"))
    assert shared_resource("image:/srv/nfs1/vm1.qcow2", roots) == "image:nfs1:/vm1.qcow2"
    assert shared_resource("file:/srv/nfs1/b/t.qcow2", roots) == "file:nfs1:/b/t.qcow2"
    assert shared_resource("image:/srv/nfs1", roots) == "image:nfs1:/"  # the root itself
    assert shared_resource("image:/srv/nfs1/deep/x", roots) == "image:deep:/x"  # deepest
    assert shared_resource("image:/srv/nfs1x/vm1.qcow2", roots) is None  # not below it
    assert shared_resource("image:/srv/nfs1/../etc/x", roots) is None  # '..' leaves it
    assert shared_resource("image:relative/x", roots) is None
    for other in ("disk:vm1/vda", "domain:vm1", "checkpoint:vm1/c1", "file"):
        assert shared_resource(other, roots) is None
    # two hosts mounting one storage at different paths name its images alike
    elsewhere = (SharedRoot("nfs1", "/mnt/images"),)
    assert shared_resource("image:/mnt/images/vm1.qcow2", elsewhere) == "image:nfs1:/vm1.qcow2"
    assert image_resource("/srv//nfs1/./vm1.qcow2") == "image:/srv/nfs1/vm1.qcow2"


# ---- the schema ---------------------------------------------------------------------


def test_a_version_4_database_migrates_to_version_5(pg_url: str) -> None:
    v4 = dict(PG_MIGRATIONS)[4]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE jobcore_schema (version INTEGER NOT NULL)")
        c.execute("INSERT INTO jobcore_schema VALUES (4)")
        for sql in v4:
            c.execute(sql.encode())
        c.execute(
            "INSERT INTO jobs (uuid, scope, type, domain, host, state, xml, claims, created,"
            " retention) VALUES ('u1', 's', 'backup', 'vm1', 'hv1', 'completed', '<job/>',"
            " '[]', 1.0, 60.0)"
        )
    PostgresDatabase(pg_url, "hv1").release()
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT version FROM jobcore_schema").fetchone() == (5,)
        tables = {
            r[0]
            for r in c.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        }
        assert {"hosts", "claims", "commands", "jobs"} <= tables
        indexes = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes")}
        assert {"jobs_seq", "claims_job", "claims_host", "commands_pending"} <= indexes
    assert pg_rows(pg_url)["u1"]["state"] == "completed"  # the v4 rows are kept
    assert PG_SCHEMA_VERSION == 5


# ---- shared claims ----------------------------------------------------------------------


async def test_a_conflict_on_a_shared_image_across_hosts_names_the_holder(pg_url: str) -> None:
    async with member(pg_url, "hv1") as (c1, _), member(pg_url, "hv2") as (c2, _):
        dom1, dom2 = await c1.lookup_domain("vm1"), await c2.lookup_domain("vm1")
        puller = await dom1.job_begin(pull(uuid.uuid4()))  # rewrites vda's top layer
        held = claims(pg_url)
        top = ("image:nfs1:/vm1/vda.qcow2", "chain", str(puller.uuid), "hv1")
        assert top in held
        assert ("image:nfs1:/vm1/vda.1.qcow2", "read", str(puller.uuid), "hv1") in held
        refused = uuid.uuid4()
        with pytest.raises(JobConflict) as caught:
            await dom2.job_begin(backup(refused))  # reads every layer of vda
        assert caught.value.holder == puller.uuid
        assert caught.value.resource == "image:nfs1:/vm1/vda.qcow2"
        assert str(caught.value) == (
            f"job '{refused}' conflicts with job '{puller.uuid}' on host 'hv1' holding "
            "'image:nfs1:/vm1/vda.qcow2' (chain excludes read)"
        )
        assert str(refused) not in pg_rows(pg_url)  # its insert was left out
        with pytest.raises(jobcore.NoSuchJob):
            await c2.lookup_job(refused)
        assert all(c[2] != str(refused) for c in claims(pg_url))
        other = await dom2.job_begin(backup(uuid.uuid4(), "vdb"))  # another image: admitted
        assert (await other.info()).state is JobState.RUNNING
        await puller.abort()
        assert (await puller.wait()).state is JobState.CANCELLED
        assert all(c[2] != str(puller.uuid) for c in claims(pg_url))  # released at its end
        again = await dom2.job_begin(backup(uuid.uuid4()))
        assert (await again.info()).state is JobState.RUNNING
        for job in (other, again):
            await job.abort()
            await job.wait()
    assert claims(pg_url) == set()


async def test_images_outside_the_shared_roots_are_not_arbitrated(pg_url: str) -> None:
    elsewhere = (SharedRoot("nfs1", "/srv/other"),)
    async with (
        member(pg_url, "hv1", roots=elsewhere) as (c1, _),
        member(pg_url, "hv2", roots=elsewhere) as (c2, _),
    ):
        puller = await (await c1.lookup_domain("vm1")).job_begin(pull(uuid.uuid4()))
        reader = await (await c2.lookup_domain("vm1")).job_begin(backup(uuid.uuid4()))
        assert (await reader.info()).state is JobState.RUNNING  # hv1's images, not shared
        assert claims(pg_url) == set()
        for job in (puller, reader):
            await job.abort()
            await job.wait()


async def test_a_queued_job_holds_its_shared_claims_while_it_waits(pg_url: str) -> None:
    async with member(pg_url, "hv1") as (c1, _), member(pg_url, "hv2") as (c2, _):
        dom1 = await c1.lookup_domain("vm1")
        reading = await dom1.job_begin(backup(uuid.uuid4()))  # reads vda on hv1
        waiting = await dom1.job_begin(pull(uuid.uuid4()).replace("<disk", "<queue/><disk"))
        assert (await waiting.info()).state is JobState.QUEUED  # behind its own host's job
        assert ("image:nfs1:/vm1/vda.qcow2", "chain", str(waiting.uuid), "hv1") in claims(pg_url)
        with pytest.raises(JobConflict) as caught:  # hv1's queued pull keeps it out
            await (await c2.lookup_domain("vm1")).job_begin(backup(uuid.uuid4()))
        assert caught.value.holder == waiting.uuid and "on host 'hv1'" in str(caught.value)
        await reading.abort()
        await reading.wait()
        await until(lambda: _state_is(waiting, JobState.RUNNING))  # admitted by its own host
        await waiting.abort()
        await waiting.wait()
    assert claims(pg_url) == set()


async def _state_is(job: jobcore.api.Job, state: JobState) -> bool:
    return (await job.info()).state is state


async def test_a_member_drops_its_stale_claims_when_it_joins(pg_url: str) -> None:
    async with member(pg_url, "hv1") as (c1, fleet):
        puller = await (await c1.lookup_domain("vm1")).job_begin(pull(uuid.uuid4()))
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("INSERT INTO claims VALUES ('image:nfs1:/x', 'chain', 'gone', 'hv1')")
            c.execute("INSERT INTO claims VALUES ('image:nfs1:/y', 'read', 'theirs', 'hv2')")
        assert await anyio.to_thread.run_sync(fleet.join) is None
        left = claims(pg_url)
        assert ("image:nfs1:/x", "chain", "gone", "hv1") not in left  # no active job of it
        assert ("image:nfs1:/y", "read", "theirs", "hv2") in left  # another host's
        assert any(c[2] == str(puller.uuid) for c in left)  # its running job's
        await puller.abort()
        await puller.wait()


async def test_a_uuid_another_host_has_is_refused_and_its_row_kept(pg_url: str) -> None:
    job = uuid.uuid4()
    async with (
        member(pg_url, "hv1", rate=0) as (c1, _),
        member(pg_url, "hv2", rate=0) as (c2, _),
    ):
        first = await (await c1.lookup_domain("vm1")).job_begin(backup(job, "vdb"))
        assert (await first.wait()).state is JobState.COMPLETED
        before = pg_rows(pg_url)[str(job)]
        with pytest.raises(InvalidArgument) as caught:
            await (await c2.lookup_domain("vm1")).job_begin(backup(job))
        assert str(caught.value) == (
            f"a job with UUID '{job}' already exists (on host 'hv1'): choose another UUID"
        )
        await _store(c2).sync()  # hv2's own writes of it (its failure) touch no row
        assert _store(c2).error is None  # never a failed batch
        assert pg_rows(pg_url)[str(job)] == before
        with pytest.raises(jobcore.NoSuchJob):  # hv2 keeps no record of it
            await c2.lookup_job(job)
        fine = await (await c2.lookup_domain("vm1")).job_begin(backup(uuid.uuid4()))
        assert (await fine.wait()).state is JobState.COMPLETED


# ---- leases --------------------------------------------------------------------------


async def test_a_lease_is_live_then_lost_by_the_database_clock_then_stopped(
    pg_url: str,
) -> None:
    async with member(pg_url, "hv1") as (_, f1), member(pg_url, "hv2", ttl=0.5) as (_, f2):
        (h1, h2) = await f1.hosts()
        assert (h1.name, h2.name) == ("hv1", "hv2") and h2.lease_ttl == 0.5
        assert h1.state is HostState.LIVE and h1.pid > 0
        await until(lambda: _host_is(f1, "hv2", HostState.LOST))  # not renewed
        lost = {h.name: h for h in await f1.hosts()}["hv2"]
        assert lost.lease_age > 0.5 and lost.as_dict()["state"] == "lost"
        async with anyio.create_task_group() as tg:  # renewals bring it back
            await tg.start(lambda task_status: f2.run(on_fenced=_never, task_status=task_status))
            await until(lambda: _host_is(f1, "hv2", HostState.LIVE))
            tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(f2.leave)
        assert await f1.host_state("hv2") is HostState.STOPPED
        assert await f1.host_state("nobody") is None


async def _host_is(fleet: Fleet, name: str, state: HostState) -> bool:
    return await fleet.host_state(name) is state


def _never(message: str) -> None:
    raise AssertionError(f"fenced: {message}")


# ---- fencing -------------------------------------------------------------------------


async def test_fence_releases_claims_fails_jobs_and_stops_the_fenced_members_writes(
    pg_url: str,
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute("LISTEN jobcore_jobs")
        listener.execute("LISTEN jobcore_hosts")
        async with member(pg_url, "hv1") as (_, f1), member(pg_url, "hv2", ttl=0.5) as (c2, f2):
            with pytest.raises(InvalidArgument, match="is this member"):
                await f1.fence("hv1", "x")
            with pytest.raises(InvalidArgument, match="host 'hv9' is not a member"):
                await f1.fence("hv9", "x")
            await anyio.to_thread.run_sync(f2._renew)
            with pytest.raises(OperationInvalid, match=r"live \(its lease .* s ago\).*--force"):
                await f1.fence("hv2", "x")
            running = await (await c2.lookup_domain("vm1")).job_begin(pull(uuid.uuid4()))
            seq = pg_rows(pg_url)[str(running.uuid)]["event_seq"]
            assert any(c[3] == "hv2" for c in claims(pg_url))
            await until(lambda: _host_is(f1, "hv2", HostState.LOST))
            _drain(listener)
            fenced = await f1.fence("hv2", "powered off")
            assert (fenced.state, fenced.fenced_by, fenced.fence_reason) == (
                HostState.FENCED,
                "hv1",
                "powered off",
            )
            assert fenced.active_jobs == 0 and fenced.jobs == 1
            assert claims(pg_url) == set()
            row = pg_rows(pg_url)[str(running.uuid)]
            assert row["state"] == "failed" and row["event_seq"] == seq + 2
            assert row["errmsg"] == "host 'hv2' was fenced by 'hv1': powered off"
            assert row["ended"] is not None
            heard = _drain(listener)
            assert ("jobcore_jobs", f"{running.uuid} hv2 {seq + 2}") in heard
            assert ("jobcore_hosts", "hv2") in heard
            # the fenced member's next commit is refused: nothing of it is written
            await running.abort()
            store = _store(c2)
            with pytest.raises(StoreError, match="host 'hv2' was fenced by 'hv1': powered off"):
                await store.sync()
            assert pg_rows(pg_url)[str(running.uuid)] == row
            with pytest.raises(StoreError, match="fenced"):
                await (await c2.lookup_domain("vm1")).job_begin(backup(uuid.uuid4()))
            assert len(pg_rows(pg_url)) == 1
        # restarted, it rejoins: told it was fenced, the mark cleared
        db = PostgresDatabase(pg_url, "hv2")
        try:
            again = Fleet(db)
            warning = await anyio.to_thread.run_sync(again.join)
            assert warning is not None and "fenced by 'hv1': powered off" in warning
            assert await again.host_state("hv2") is HostState.LIVE
            assert await anyio.to_thread.run_sync(again.join) is None  # cleared
        finally:
            db.release()


def _drain(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """The notifications ``conn`` received so far."""
    conn.execute("SELECT 1")  # reads what the server sent meanwhile
    return [(n.channel, n.payload) for n in conn.notifies(timeout=0.2)]


async def test_a_fenced_member_is_told_by_its_lease_loop(pg_url: str) -> None:
    async with member(pg_url, "hv1") as (_, f1), member(pg_url, "hv2") as (_, f2):
        await f1.fence("hv2", None, force=True)  # live: only with force
        told: list[str] = []
        with anyio.fail_after(30):
            await f2.run(on_fenced=told.append)  # returns once it found itself fenced
        assert told == ["host 'hv2' was fenced by 'hv1'"]


async def test_job_commits_notify_their_row(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute("LISTEN jobcore_jobs")
        async with member(pg_url, "hv1", rate=0) as (c1, _):
            job = await (await c1.lookup_domain("vm1")).job_begin(backup(uuid.uuid4(), "vdb"))
            await job.wait()
            await _store(c1).sync()
        heard = [p for _, p in _drain(listener)]
        assert f"{job.uuid} hv1 1" in heard
        last = pg_rows(pg_url)[str(job.uuid)]["event_seq"]
        assert f"{job.uuid} hv1 {last}" in heard


# ---- fleet-wide reads ----------------------------------------------------------------


async def test_every_hosts_jobs_are_read_with_host_lost_for_a_lost_host(pg_url: str) -> None:
    async with member(pg_url, "hv1") as (c1, f1), member(pg_url, "hv2", ttl=0.5) as (c2, _):
        dom1, dom2 = await c1.lookup_domain("vm1"), await c2.lookup_domain("vm1")
        done1 = await dom1.job_begin(backup(uuid.uuid4(), "vdb"))
        await done1.abort()
        await done1.wait()
        run2 = await dom2.job_begin(backup(uuid.uuid4(), "vdb"))
        run1 = await dom1.job_begin(pull(uuid.uuid4()))
        await until(lambda: _host_is(f1, "hv2", HostState.LOST))
        page, cursor = await f1.jobs_page(-1, 100)
        assert cursor is None
        assert [i.uuid for i in page] == [done1.uuid, run2.uuid, run1.uuid]  # begin order
        by = {i.uuid: i for i in page}
        assert by[run2.uuid].host == "hv2" and by[run2.uuid].host_lost
        assert by[run2.uuid].state is JobState.RUNNING  # its state unchanged
        assert not by[run1.uuid].host_lost and not by[done1.uuid].host_lost
        assert by[done1.uuid].state is JobState.CANCELLED
        first, cursor = await f1.jobs_page(-1, 2)
        assert cursor is not None
        rest, end = await f1.jobs_page(cursor, 2)
        assert [i.uuid for i in first + rest] == [done1.uuid, run2.uuid, run1.uuid]
        assert end is None
        digits = run2.uuid.hex[:9]
        assert [i.uuid for i in await f1.find_prefix(digits.upper(), 5)] == [run2.uuid]
        assert {i.uuid for i in await f1.find_prefix(run1.uuid.hex, 5)} == {run1.uuid}
        with pytest.raises(InvalidArgument, match="UUID prefix"):
            await f1.find_prefix("xyz", 5)
        remote = await f1.job(run2.uuid)
        assert remote is not None and remote.host_state is HostState.LOST
        assert remote.info.host_lost and remote.info.domain == "vm1"
        assert "<job" in remote.xml and str(run2.uuid) in remote.xml
        assert remote.stats["uuid"] == str(run2.uuid) and remote.stats["state"] == "running"
        assert "disk_total" in remote.stats and remote.event_seq >= 1
        assert await f1.job(uuid.uuid4()) is None
        for job in (run1, run2):
            await job.abort()
            await job.wait()


async def test_a_fence_and_a_members_commit_exclude_each_other(pg_url: str) -> None:
    """A commit in flight ends before the fence takes the host's row; a commit that
    starts while a fence holds it waits, then is refused: no write lands after it. A
    lease renewal waits for neither."""
    async with (
        member(pg_url, "hv1") as (_, f1),
        member(pg_url, "hv2") as (_, f2),
    ):
        with psycopg.connect(pg_url) as inflight:  # a commit of hv2's, begun, not ended
            inflight.execute("SELECT jobcore_check_fenced('hv2')")
            await anyio.to_thread.run_sync(f2._renew)  # not blocked by it
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(f1.fence, "hv2", "gone", force=True))
                await until(lambda: _waiting_for_a_lock(pg_url))  # the fence waits
                assert await f1.host_state("hv2") is HostState.LIVE
                inflight.commit()
            assert await f1.host_state("hv2") is HostState.FENCED
    async with member(pg_url, "hv2", fenced=True) as (c2, f2):  # rejoined: mark cleared
        job = await (await c2.lookup_domain("vm1")).job_begin(backup(uuid.uuid4(), "vdb"))
        with psycopg.connect(pg_url) as fence:  # an operator's fence, in flight
            fence.execute("SELECT 1 FROM hosts WHERE host = 'hv2' FOR UPDATE")
            fence.execute("UPDATE hosts SET fenced_at = now(), fenced_by = 'op' WHERE host = 'hv2'")
            await job.abort()  # its end's commit waits for the fence
            await until(lambda: _waiting_for_a_lock(pg_url))
            fence.commit()
            with pytest.raises(StoreError, match="host 'hv2' was fenced by 'op'"):
                await _store(c2).sync()
        assert pg_rows(pg_url)[str(job.uuid)]["state"] == "running"  # its end never landed
        assert await anyio.to_thread.run_sync(f2.join) is not None


async def _waiting_for_a_lock(pg_url: str) -> bool:
    def probe() -> bool:
        with psycopg.connect(pg_url, autocommit=True) as c:
            row = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).fetchone()
            return row is not None and row[0] > 0

    return await anyio.to_thread.run_sync(probe)
