"""The job store on PostgreSQL (jobcore.store_pg): what only it has — a server that is
unreachable or restarted, its schema version table, the host's advisory lock, hosts
sharing one database, the pool — and jobd on it across kill -9. The tests every durable
store passes run on it too (tests/test_store_sqlite.py, ``durable``)."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.parse
from pathlib import Path

import anyio
import psycopg
import pytest
from jobd_helpers import BACKUP_VDB, Jobd, jobctl, write
from pg_helpers import PgServer
from store_helpers import pg_rows, rows, url

import jobcore
from jobcore.daemon.config import ConfigError, load_config
from jobcore.errors import StoreError
from jobcore.lifecycle import JobState
from jobcore.local import as_local, connect_local
from jobcore.store_pg import (
    PG_SCHEMA_VERSION,
    POOL_SIZE,
    PostgresDatabase,
    display_url,
    open_pg_database,
)
from jobcore.store_sqlite import parse_store_url

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def backup(tag: str) -> str:
    return BACKUP_VDB.format(tag=tag)


def test_jobd_host_config_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("host = 'hv1'\nstore = 'postgresql://jobcore@db.example/jobs'\n")
    config = load_config(good)
    assert (config.host, config.store) == ("hv1", "postgresql://jobcore@db.example/jobs")
    assert load_config(None).host is None  # the machine's hostname (Server.host)
    for bad in ("", "a/b", "x" * 256, "tab\there"):
        with pytest.raises(ConfigError, match="host must be a printable name"):
            load_config(None, host=bad)


def test_postgresql_urls_parse_and_hide_their_password() -> None:
    for good in ("postgresql://u@/db?host=/tmp/x", "postgres://u:secret@db.example/jobs"):
        parsed = parse_store_url(good)
        assert parsed.kind == "postgresql" and parsed.dsn == good
    assert display_url("postgresql://u:secret@db.example:5433/jobs") == (
        "postgresql://u:***@db.example:5433/jobs"
    )


async def test_an_unreachable_server_is_refused_at_open(tmp_path: Path) -> None:
    dead = f"postgresql://jobcore@/jobs?host={urllib.parse.quote(str(tmp_path), safe='')}"
    with pytest.raises(StoreError, match=r"cannot reach the job store .*start the server"):
        async with jobcore.connect("sim:///default", store=dead):
            pass


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with jobcore.connect("sim:///default?rate=0", store=pg_url) as conn:
        await (await (await conn.lookup_domain("vm1")).job_begin(backup("n"))).wait()
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert c.execute("SELECT version FROM jobcore_schema").fetchone() == (PG_SCHEMA_VERSION,)
        c.execute("UPDATE jobcore_schema SET version = 99")
    with pytest.raises(StoreError, match=r"schema version 99, newer than this jobcore's \(5\)"):
        async with jobcore.connect("sim:///default", store=pg_url):
            pass
    assert len(pg_rows(pg_url)) == 1  # nothing was touched


async def test_a_database_with_other_tables_named_jobs_is_not_a_job_store(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE jobs (id integer)")
    with pytest.raises(StoreError, match=r"tables named like a job store's \(jobs\)"):
        async with jobcore.connect("sim:///default", store=pg_url):
            pass


def test_one_host_is_served_by_one_process(pg_url: str) -> None:
    db = open_pg_database(pg_url, "h1")
    try:
        with pytest.raises(StoreError, match=r"host 'h1' of the job store .* another process"):
            PostgresDatabase(pg_url, "h1")  # what another jobd with --host h1 would open
        PostgresDatabase(pg_url, "h2").release()  # another host is free
    finally:
        db.release()
    PostgresDatabase(pg_url, "h1").release()  # free again


async def test_hosts_sharing_a_database_keep_their_own_jobs(pg_url: str) -> None:
    jobs: dict[str, str] = {}
    for host in ("h1", "h2"):
        async with connect_local("sim:///default?rate=0", store=pg_url, host=host) as conn:
            job = await (await conn.lookup_domain("vm1")).job_begin(backup(host))
            info = await job.wait()
            assert info.host == host
            jobs[host] = str(job.uuid)
    on_disk = pg_rows(pg_url)
    assert {r["host"] for r in on_disk.values()} == {"h1", "h2"}
    async with connect_local("sim:///default", store=pg_url, host="h1") as conn:
        assert (await conn.lookup_job(jobs["h1"])).uuid
        with pytest.raises(jobcore.NoSuchJob):
            await conn.lookup_job(jobs["h2"])  # the fleet-wide lookup is the next brick


async def test_job_info_carries_the_host_on_every_store(tmp_path: Path) -> None:
    for store in (None, url(tmp_path / "jobs.sqlite")):
        async with jobcore.connect("sim:///default?rate=0", store=store) as conn:
            info = await (await (await conn.lookup_domain("vm1")).job_begin(backup("h"))).wait()
            assert info.host == socket.gethostname()
            assert info["host"] == socket.gethostname()
    store = url(tmp_path / "named.sqlite")  # jobd --host NAME on SQLite
    async with connect_local("sim:///default?rate=0", store=store, host="hv9") as conn:
        job = await (await conn.lookup_domain("vm1")).job_begin(backup("n"))
        assert (await job.wait()).host == "hv9"
    assert rows(tmp_path / "named.sqlite")[str(job.uuid)]["host"] == "hv9"
    async with connect_local("sim:///default", store=store, host="renamed") as conn:
        assert (await (await conn.lookup_job(job.uuid)).info()).host == "hv9"  # its row's


async def test_connections_of_a_process_share_one_bounded_pool(pg_url: str) -> None:
    async with (
        jobcore.connect("sim:///a?rate=0", store=pg_url) as a,
        jobcore.connect("sim:///b?rate=0", store=pg_url) as b,
        jobcore.connect("sim:///c?rate=0", store=pg_url) as c,
    ):
        stores = [as_local(x).engine._dstore for x in (a, b, c)]
        assert stores[0] is not None and all(s is not None and s.db is stores[0].db for s in stores)
        async with anyio.create_task_group() as tg:
            for conn in (a, b, c):
                dom = await conn.lookup_domain("vm1")
                for i in range(10):
                    tg.start_soon(_begin_and_wait, dom, f"p{i}")
        with psycopg.connect(pg_url, autocommit=True) as probe:
            row = probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None and row[0] <= POOL_SIZE + 1  # the pool and the host's lock
    assert len(pg_rows(pg_url)) == 30


async def _begin_and_wait(dom: jobcore.api.Domain, tag: str) -> None:
    assert (await (await dom.job_begin(backup(tag))).wait()).state is JobState.COMPLETED


async def test_a_server_restart_refuses_new_jobs_and_spares_running_ones(
    private_pg: PgServer,
) -> None:
    """The database goes away while a job runs: the job runs on and ends, new jobs are
    refused with a clear error; once the server is back the kept writes land and new
    jobs are accepted again."""
    store = private_pg.create_database()
    async with jobcore.connect(f"sim:///default?rate={64 * MiB}", store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        slow = await dom.job_begin(backup("slow"))  # 512 MiB at 64 MiB/s: 8 s
        await anyio.to_thread.run_sync(private_pg.stop)
        with pytest.raises(StoreError, match="unreachable"):
            await dom.job_begin(backup("refused"))
        assert (await slow.info()).state is JobState.RUNNING
        await anyio.to_thread.run_sync(private_pg.start)
        deadline = time.monotonic() + 30
        while True:  # retried every RETRY_INTERVAL; the pool reconnects
            try:
                again = await dom.job_begin(backup("again"))
                break
            except StoreError:
                assert time.monotonic() < deadline, "the store did not come back"
                await anyio.sleep(0.5)
        assert (await again.wait()).state is JobState.COMPLETED
        assert (await slow.wait()).state is JobState.COMPLETED
        await as_local(conn).engine._dstore.sync()  # type: ignore[union-attr]
    on_disk = {r["uuid"]: r["state"] for r in pg_rows(store).values()}
    assert on_disk[str(slow.uuid)] == "completed" and on_disk[str(again.uuid)] == "completed"
    assert len([s for s in on_disk.values() if s == "failed"]) == 1  # the refused one


def test_jobd_on_postgresql_kill_9_and_restart_finds_every_job(tmp_path: Path, pg_url: str) -> None:
    run_dir = tmp_path / "run"
    args = ("--store", pg_url, "--host", "member-1")
    daemon = Jobd(run_dir, *args).wait_ready()
    try:
        uri = daemon.uri(f"rate={MiB}")
        ended = jobctl(uri, "begin", "vm1", write(tmp_path, "a.xml", backup("a"))).stdout.strip()
        assert jobctl(uri, "abort", ended).returncode == 0
        assert jobctl(uri, "wait", ended).returncode == 4
        began = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", backup("b")))
        assert began.returncode == 0, began.stderr
        running = began.stdout.strip()
        before = json.loads(jobctl(uri, "info", ended, "--json").stdout)
        assert before["host"] == "member-1"
        assert "Host:          member-1" in jobctl(uri, "info", ended).stdout
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    assert {r["host"] for r in pg_rows(pg_url).values()} == {"member-1"}
    daemon = Jobd(run_dir, *args).wait_ready()
    try:
        uri = daemon.uri()
        assert json.loads(jobctl(uri, "info", ended, "--json").stdout) == before
        info = json.loads(jobctl(uri, "info", running, "--json").stdout)
        assert info["state"] == "running" and info["host"] == "member-1", info
        listed = json.loads(jobctl(uri, "list", "--all", "--json").stdout)
        assert {j["uuid"] for j in listed} == {ended, running}
        assert jobctl(uri, "abort", running).returncode == 0
        assert jobctl(uri, "wait", running).returncode == 4
    finally:
        assert daemon.stop() == 0


def test_jobd_stops_at_start_on_an_unreachable_or_newer_store(tmp_path: Path, pg_url: str) -> None:
    dead = f"postgresql://jobcore@/jobs?host={urllib.parse.quote(str(tmp_path), safe='')}"
    daemon = Jobd(tmp_path / "run", "--store", dead)
    assert daemon.proc.wait(30) == 1
    daemon.stop()
    assert "cannot reach the job store" in daemon.log()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE jobcore_schema (version INTEGER NOT NULL)")
        c.execute("INSERT INTO jobcore_schema VALUES (7)")
    daemon = Jobd(tmp_path / "run2", "--store", pg_url)
    assert daemon.proc.wait(30) == 1
    daemon.stop()
    assert "schema version 7, newer" in daemon.log()
