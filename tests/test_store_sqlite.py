"""The durable job store (sqlite:///ABS/PATH): round trips across close and reopen, the
durability points, kill -9, a corrupt, locked, newer-schema or full store, jobd --store."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobd_helpers import BACKUP_VDB, Jobd, jobctl, write
from store_helpers import Durable, rows, url

import jobcore
from jobcore.daemon.config import ConfigError, load_config
from jobcore.engine import Engine
from jobcore.errors import InvalidArgument, StoreError
from jobcore.events import EventKind, JobEvent
from jobcore.lifecycle import JobState
from jobcore.local import as_local
from jobcore.store_sqlite import (
    NO_PREPARED_SPEC,
    SCHEMA_VERSION,
    SQLiteJobStore,
    StoredScope,
    open_database,
    parse_store_url,
)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def backup(tag: str) -> str:
    return BACKUP_VDB.format(tag=tag)


def same_view(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a == b


# ---- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["sqlite://rel/jobs.sqlite", "sqlite:jobs.sqlite", "sqlite:///", "mysql://x/y", ""]
)
def test_bad_store_url_is_refused_by_name(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=f"'{bad}'" if bad else "store URL"):
        parse_store_url(bad)
    with pytest.raises(InvalidArgument):
        anyio.run(_open_with_store, bad)


async def _open_with_store(store: str) -> None:
    async with jobcore.connect("sim:///default", store=store):
        pass


def test_remote_uri_refuses_store(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="daemon's config"):
        anyio.run(_remote_with_store, tmp_path)


async def _remote_with_store(tmp_path: Path) -> None:
    async with jobcore.connect(
        f"sim+unix:///default?socket={tmp_path}/jobd.sock", store=url(tmp_path / "j.sqlite")
    ):
        pass


def test_jobd_store_config_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f"store = '{url(tmp_path / 'j.sqlite')}'\n")
    assert load_config(good).store == url(tmp_path / "j.sqlite")
    default = load_config(None, run_dir=tmp_path / "run")
    assert default.store is None  # RUN_DIR/jobs.sqlite (design/store.md)
    assert default.store_url == url(tmp_path / "run" / "jobs.sqlite")
    bad = tmp_path / "bad.toml"
    bad.write_text("store = 'sqlite://relative.sqlite'\n")
    with pytest.raises(ConfigError, match=r"relative\.sqlite"):
        load_config(bad)


# ---- round trips --------------------------------------------------------------------------


async def test_ended_jobs_survive_close_and_reopen(durable: Durable) -> None:
    store = durable.url
    before: dict[uuid.UUID, tuple[Any, Any, str]] = {}
    async with jobcore.connect(f"sim:///default?rate={4096 * MiB}", store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        conn.driver.inject_failure(at=0.5, message="disk on fire")  # type: ignore[attr-defined]
        for i in range(4):
            job = await dom.job_begin(backup(f"rt{i}"))
            await job.wait()
            before[job.uuid] = (await job.info(), await job.stats(), await job.xml_desc())
        slow = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        await slow.abort()
        await slow.wait()
        before[slow.uuid] = (await slow.info(), await slow.stats(), await slow.xml_desc())
    states = sorted(str(v[0].state) for v in before.values())
    assert states == ["cancelled", "completed", "completed", "completed", "failed"]
    async with jobcore.connect("sim:///default?rate=0", store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        listed = [j.uuid for j in await dom.list_jobs()]
        assert listed == list(before)  # begin order is kept
        for job_id, (info, stats, xml) in before.items():
            job = await conn.lookup_job(job_id)
            assert await job.info() == info
            same_view(await job.stats(), stats)
            assert await job.xml_desc() == xml
        first = next(iter(before))
        found = await conn.find_jobs(str(first)[:8])
        assert first in [j.uuid for j in found]
        failed = next(i for i, _, _ in before.values() if i.state is JobState.FAILED)
        assert failed.errmsg is not None and "disk on fire" in failed.errmsg


async def test_retention_expiry_survives_reopen(durable: Durable) -> None:
    store = durable.url
    async with jobcore.connect("sim:///default?rate=0", store=store, retention=0.3) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(backup("exp"))
        await job.wait()
        gone = job.uuid
        keep_xml = backup("keep").replace(
            "<job type='backup'>", "<job type='backup'><retention seconds='3600'/>"
        )
        kept = await dom.job_begin(keep_xml)
        await kept.wait()
    await anyio.sleep(0.4)
    async with jobcore.connect("sim:///default?rate=0", store=store) as conn:
        with pytest.raises(jobcore.NoSuchJob):
            await conn.lookup_job(gone)
        assert (await (await conn.lookup_job(kept.uuid)).info()).state is JobState.COMPLETED
    assert str(gone) not in durable.rows()  # the expired row was deleted


def test_facade_round_trip(durable: Durable) -> None:
    store = durable.url
    conn = jobcore.open("sim:///default?rate=0", store=store)
    try:
        dom = conn.lookupByName("vm1")
        job = jobcore.JobBegin(dom, backup("facade"))
        jobcore.JobWait(job)
        info, stats = jobcore.JobGetInfo(job), jobcore.JobGetStats(job)
        job_id = jobcore.JobGetUUIDString(job)
    finally:
        conn.close()
    conn = jobcore.open("sim:///default?rate=0", store=store, backend="trio")
    try:
        again = jobcore.JobLookupByUUID(conn.lookupByName("vm1"), job_id)
        assert jobcore.JobGetInfo(again) == info
        assert jobcore.JobGetStats(again) == stats
    finally:
        conn.close()


# ---- durability points --------------------------------------------------------------------


async def test_no_event_is_built_or_held_back_while_nobody_subscribed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody subscribed a durable engine builds no event (nothing would receive it)
    and its waiters still learn each end only once it is committed; a subscriber gets
    every event of the jobs begun after it subscribed."""
    built: list[EventKind] = []
    original = Engine._event

    def event(self: Engine, rec: Any, kind: EventKind, previous: Any = None) -> JobEvent:
        built.append(kind)
        return original(self, rec, kind, previous)

    monkeypatch.setattr(Engine, "_event", event)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default?rate=0", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        quiet = await dom.job_begin(backup("quiet"))
        assert (await quiet.wait()).state is JobState.COMPLETED
        assert rows(path)[str(quiet.uuid)]["state"] == "completed"  # committed already
        assert built == []
        with conn.subscribe() as sub:
            heard = await dom.job_begin(backup("heard"))
            await heard.wait()
            kinds = []
            with anyio.fail_after(10):
                async for ev in sub:
                    kinds.append((ev.kind, ev.state))
                    if ev.kind is EventKind.FINAL:
                        break
    assert kinds == [
        (EventKind.STATE, JobState.RUNNING),
        (EventKind.PROGRESS, JobState.RUNNING),  # the sim's start reports 0 of its total
        (EventKind.STATE, JobState.COMPLETED),
        (EventKind.FINAL, JobState.COMPLETED),
    ]
    assert built == [kind for kind, _ in kinds]


async def test_a_backup_without_a_checkpoint_leaves_the_sim_host_record_alone(
    tmp_path: Path,
) -> None:
    """The sim saves its host's record when a backup adds bitmaps (its checkpoint), not
    for every backup."""
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default?rate=0", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        store = as_local(conn).engine.store
        assert isinstance(store, SQLiteJobStore)
        saved: list[str] = []
        original = store._save_state

        def save_state(key: str, value: Any) -> None:
            saved.append(key)
            original(key, value)

        store._save_state = save_state  # type: ignore[method-assign]
        await (await dom.job_begin(backup("plain"))).wait()
        assert saved and not [k for k in saved if k.startswith("host:")], saved
        saved.clear()
        with_checkpoint = backup("cp").replace(
            "</job>", "<domaincheckpoint><name>cp1</name></domaincheckpoint></job>"
        )
        await (await dom.job_begin(with_checkpoint)).wait()
        assert "host:default" in saved, saved


async def test_state_is_on_disk_before_its_event(durable: Durable) -> None:
    seen: list[tuple[str, str, str, int]] = []  # kind, job, state, on-disk event_seq
    async with jobcore.connect(f"sim:///default?rate={256 * MiB}", store=durable.url) as conn:
        dom = await conn.lookup_domain("vm1")
        with conn.subscribe() as sub:
            jobs = [await dom.job_begin(backup(f"dp{i}")) for i in range(3)]
            # every job is on disk once JobBegin returned
            assert {str(j.uuid) for j in jobs} <= set(durable.rows())
            await jobs[1].pause()
            await jobs[1].resume()
            await jobs[2].abort()
            finals = 0
            counts: dict[str, int] = {}
            async for ev in sub:
                row = durable.rows()[str(ev.job)]
                if ev.kind is EventKind.STATE:
                    counts[str(ev.job)] = counts.get(str(ev.job), 0) + 1
                    # the state change this event reports is written already
                    assert row["event_seq"] >= counts[str(ev.job)], (ev, row)
                    if ev.state.terminal:
                        assert row["state"] == str(ev.state)
                if ev.kind is EventKind.FINAL:
                    assert row["state"] == str(ev.state)
                    stats = json.loads(row["stats"])
                    assert row["ended"] is not None and row["expires"] is not None
                    assert ev.stats is not None
                    assert row["processed"] == ev.stats["disk_processed"]
                    assert all(ev.stats[k] == v for k, v in stats.items())
                    finals += 1
                    if finals == 3:
                        break
                seen.append((str(ev.kind), str(ev.job), str(ev.state), row["event_seq"]))
    assert sum(1 for k, *_ in seen if k == "state") >= 3 + 2 + 3  # begin, pause/resume, ends


async def test_wait_returns_only_once_the_end_is_on_disk(durable: Durable) -> None:
    async with jobcore.connect("sim:///default?rate=0", store=durable.url) as conn:
        dom = await conn.lookup_domain("vm1")
        for i in range(20):
            job = await dom.job_begin(backup(f"w{i}"))
            info = await job.wait()
            assert durable.rows()[str(job.uuid)]["state"] == str(info.state) == "completed"


@pytest.mark.parametrize("durable", [False, True])
async def test_events_wait_for_the_commit_only_with_a_durable_store(
    tmp_path: Path, durable: bool
) -> None:
    """The memory store pays nothing: an event is emitted within the transition. With
    SQLite it is held back until the state it reports is committed."""
    store = url(tmp_path / "jobs.sqlite") if durable else None
    async with jobcore.connect(f"sim:///default?rate={MiB}", store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(backup("mem"))
        assert (as_local(conn).engine._dstore is not None) is durable
        with conn.subscribe(job=job.uuid) as sub:
            engine = as_local(conn).engine
            engine._finish(engine.lookup(job.uuid), JobState.FAILED, errmsg="x")
            now = sub.get_nowait()  # no await since the state changed
            if durable:
                assert now is None
                assert rows(tmp_path / "jobs.sqlite")[str(job.uuid)]["state"] == "running"
                got = await sub.get()
                while got.kind is EventKind.PROGRESS:  # the start's, held back meanwhile
                    got = await sub.get()
                ev: JobEvent | None = got
                assert rows(tmp_path / "jobs.sqlite")[str(job.uuid)]["state"] == "failed"
            else:
                ev = now
            assert ev is not None and ev.kind is EventKind.STATE and ev.state is JobState.FAILED
            assert (await sub.get()).kind is EventKind.FINAL


async def test_progress_is_written_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobcore.store_sqlite as store_sqlite

    monkeypatch.setattr(store_sqlite, "PROGRESS_INTERVAL", 0.25)
    writes: list[float] = []
    build = store_sqlite._progress

    def counted(rec: Any) -> Any:
        writes.append(time.monotonic())
        return build(rec)

    monkeypatch.setattr(store_sqlite, "_progress", counted)
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(f"sim:///default?rate={512 * MiB}", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(backup("prog"))  # 512 MiB at 512 MiB/s: about 1 s
        ticks = 0
        with job.events() as sub:
            async for ev in sub:
                if ev.kind is EventKind.PROGRESS:
                    ticks += 1
                    await anyio.sleep(0.05)  # the writer commits meanwhile
                    assert rows(path)[str(job.uuid)]["processed"] <= ev.processed
                if ev.kind is EventKind.FINAL:
                    break
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert len(writes) >= 2 and all(g >= 0.25 for g in gaps), gaps
    assert ticks > len(writes), (ticks, len(writes))
    assert rows(path)[str(job.uuid)]["processed"] == 512 * MiB


# ---- kill -9 --------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys, anyio, jobcore
    XML = sys.argv[2]
    async def main():
        async with jobcore.connect("sim:///default?rate={rate}", store=sys.argv[1]) as conn:
            dom = await conn.lookup_domain("vm1")
            begun = 0
            async with anyio.create_task_group() as tg:
                async def one(i):
                    nonlocal begun
                    job = await dom.job_begin(XML.replace("TAG", str(i)))
                    print(job.uuid, flush=True)
                    begun += 1
                    if begun == int(sys.argv[4]):  # the others are still being begun
                        os.kill(os.getpid(), signal.SIGKILL)
                for i in range(int(sys.argv[3])):
                    tg.start_soon(one, i)
                    await anyio.sleep(0)
    anyio.run(main, backend=sys.argv[5])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_kill_9_keeps_every_begun_job(durable: Durable, backend: str) -> None:
    xml = backup("k-TAG")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(rate=64 * MiB), durable.url, xml, "400", "60", backend],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    begun = proc.stdout.split()
    assert len(begun) > 50, proc.stdout
    on_disk = durable.rows()
    missing = [u for u in begun if u not in on_disk]
    assert not missing, f"{len(missing)} of {len(begun)} begun jobs are not in the store"
    active = {u for u, r in on_disk.items() if r["state"] == "running"}
    assert active, "the kill came while jobs ran"
    anyio.run(_reopen_after_kill, durable.url, begun, active, backend=backend)
    # the sim driver re-attached the active jobs whose JobBegin had returned (their start
    # was on disk), and a job killed between its row and its start's commit was started
    # again (NotStarted): none failed
    after = durable.rows()
    assert {after[u]["state"] for u in active} <= {"running", "completed"}


async def _reopen_after_kill(store: str, begun: list[str], active: set[str]) -> None:
    async with jobcore.connect("sim:///default", store=store) as conn:
        for job_id in begun:
            info = await (await conn.lookup_job(job_id)).info()
            if job_id in active:  # re-attached: running on, or done meanwhile
                assert info.state in (JobState.RUNNING, JobState.COMPLETED), info
                assert info.errmsg is None
            else:
                assert info.state is JobState.COMPLETED, info


# ---- bad stores -----------------------------------------------------------------------------


async def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    with pytest.raises(StoreError, match=f"'{path}'.*corrupt.*move it away"):
        async with jobcore.connect("sim:///default", store=url(path)):
            pass
    assert path.stat().st_size == 16 + 8192  # left as it was
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a job store"):
        async with jobcore.connect("sim:///default", store=url(other)):
            pass


async def test_corrupt_page_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default?rate=0", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        for i in range(40):
            await (await dom.job_begin(backup(f"c{i}"))).wait()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 2 * page
    data[page:] = os.urandom(len(data) - page)  # every page but the header's
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"'{path}'.*corrupt"):
        async with jobcore.connect("sim:///default", store=url(path)):
            pass


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default", store=url(path)):
        pass
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 98}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 98}, newer"):
        async with jobcore.connect("sim:///default", store=url(path)):
            pass


HOLDER = textwrap.dedent(
    """
    import sys, anyio, jobcore
    async def main():
        async with jobcore.connect("sim:///default", store=sys.argv[1]):
            print("open", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
    anyio.run(main)
    """
)


def test_store_locked_by_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(StoreError, match=f"'{path}' is in use by another process"):
            anyio.run(_open_with_store, url(path))
    finally:
        holder.communicate("", timeout=30)
    anyio.run(_open_with_store, url(path))  # free again


async def test_same_scope_twice_in_one_process_is_refused(durable: Durable) -> None:
    store = durable.url
    async with jobcore.connect("sim:///default", store=store):
        with pytest.raises(StoreError, match="already serves a connection to 'sim:///default'"):
            async with jobcore.connect("sim:///default", store=store):
                pass
        async with jobcore.connect("sim:///other", store=store) as other:  # its own scope
            dom = await other.lookup_domain("vm1")
            await (await dom.job_begin(backup("o"))).abort()


# ---- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"cannot mount a 1 MiB tmpfs (needs root): {done.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(path: Path) -> None:
    """Fill the file system ``path`` is on (unbuffered writes until ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


async def test_full_disk_refuses_new_jobs_and_spares_running_ones(small_fs: Path) -> None:
    path = small_fs / "jobs.sqlite"
    async with jobcore.connect(f"sim:///default?rate={128 * MiB}", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        running = await dom.job_begin(backup("run"))  # about 4 s
        filler = small_fs / "filler"
        _fill(filler)
        refused: StoreError | None = None
        began = 0
        with conn.subscribe(job=running.uuid) as sub:
            for i in range(3000):
                try:
                    job = await dom.job_begin(backup(f"full{i}"))
                except StoreError as exc:
                    refused = exc
                    break
                began += 1
                await job.abort()
            assert refused is not None, f"{began} jobs began on a full disk"
            assert str(refused) == f"no space left for the job store at {path}"
            with pytest.raises(StoreError, match="no space left"):  # refused at once now
                await dom.job_begin(backup("again"))
            # the running job goes on: progress and its end reach subscribers
            info = await running.wait(timeout=30)
            assert info.state is JobState.COMPLETED
            kinds = []
            async for ev in sub:
                kinds.append(ev.kind)
                if ev.kind is EventKind.FINAL:
                    break
            assert EventKind.PROGRESS in kinds
        filler.unlink()  # space again: the kept writes land, new jobs are accepted
        await anyio.sleep(1.5)
        job = await dom.job_begin(backup("after"))
        await job.abort()
        await job.wait()
        ended = rows(path)
        assert ended[str(running.uuid)]["state"] == "completed"
        assert ended[str(job.uuid)]["state"] == "cancelled"


# ---- jobd --store -------------------------------------------------------------------------


def test_jobd_store_survives_restart(tmp_path: Path) -> None:
    store = url(tmp_path / "state" / "jobs.sqlite")
    run_dir = tmp_path / "run"
    daemon = Jobd(run_dir, "--store", store).wait_ready()
    try:
        uri = daemon.uri("rate=0")
        done = []
        for i in range(3):
            began = jobctl(uri, "begin", "vm1", write(tmp_path, f"b{i}.xml", backup(f"d{i}")))
            assert began.returncode == 0, began.stderr
            done.append(began.stdout.strip())
            assert jobctl(uri, "wait", done[-1]).returncode == 0
        before = {u: json.loads(jobctl(uri, "info", u, "--json").stdout) for u in done}
    finally:
        assert daemon.stop() == 0
    daemon = Jobd(run_dir, "--store", store).wait_ready()
    try:
        for job_id, info in before.items():
            shown = jobctl(daemon.uri(), "info", job_id, "--json")
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout) == info
            assert info["state"] == "completed"
        # a second jobd on another run dir cannot take the same store
        other = Jobd(tmp_path / "run2", "--store", store)
        assert other.proc.wait(30) == 1
        assert "is in use by another process" in other.log()
        other.stop()
    finally:
        assert daemon.stop() == 0


def test_jobd_refuses_to_start_on_a_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    daemon = Jobd(tmp_path / "run", "--store", url(path))
    assert daemon.proc.wait(30) == 1
    log = daemon.log()
    daemon.stop()
    assert f"jobd: the job store '{path}' is corrupt" in log
    assert not (tmp_path / "run" / "jobd.sock").exists()


# ---- a job whose XML cannot be written ------------------------------------------------------


async def test_a_job_whose_xml_is_refused_fails_alone(tmp_path: Path) -> None:
    """A typed spec that breaks a rule of the format (an export name in push mode) cannot
    be written, so it could not be read back: its JobBegin fails, and the store goes on
    taking other jobs (the rest of its batch is committed)."""
    from jobcore.backup import BackupDef, BackupDisk, BackupStore
    from jobcore.types.backup import BackupJobSpec

    def spec(name: str, **disk: Any) -> BackupJobSpec:
        store = BackupStore(f"/refused/{name}.qcow2")
        return BackupJobSpec(BackupDef(disks=(BackupDisk("vdb", type=None, store=store, **disk),)))

    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default?rate=0", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        with pytest.raises(StoreError, match=r"cannot keep job .*only a pull mode backup exports"):
            await dom.job_begin_spec(spec("bad", exportname="x"))
        dstore = as_local(conn).engine._dstore
        assert dstore is not None and dstore.error is None
        job = await dom.job_begin_spec(spec("good"))
        assert (await job.wait()).state is JobState.COMPLETED
    on_disk = rows(path)
    assert list(on_disk) == [str(job.uuid)]  # the refused job has no row
    assert on_disk[str(job.uuid)]["state"] == "completed"


# ---- schema versions ------------------------------------------------------------------------

#: a version-1 store written by jobcore 312c38e (before the domains table): three completed
#: backups, one failed ("disk on fire"), a cancelled blockpull, and a backup still running
#: when its process was killed; retention 10^9 s, so they are retained until 2057
V1_STORE = ROOT / "tests" / "data" / "store-v1.sqlite"
V1_JOBS = {
    "dce02db9-39d8-4f54-8d7e-31653d0b2a6c": "completed",
    "88d858f8-a9a0-47b0-b285-49a800801a18": "completed",
    "975ca12f-d73f-48a1-b741-d61540270fe8": "completed",
    "e92676ff-e135-4013-a0e1-bfc4ce99d2ae": "failed",
    "66c0f886-5aa5-4a63-b459-d93610aa130c": "cancelled",
    "9ab2881b-8df3-4fb2-ab4d-35dbf2bc380d": "running",
}


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


async def test_a_version_1_store_opens_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(V1_STORE.read_bytes())
    assert _version(path) == 1
    async with jobcore.connect("sim:///default", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        assert [str(j.uuid) for j in await dom.list_jobs()] == list(V1_JOBS)
        for job_id, state in V1_JOBS.items():
            info = await (await conn.lookup_job(job_id)).info()
            if state == "running":  # a v1 row has no prepared spec to hand a driver
                assert info.state is JobState.FAILED and info.errmsg == NO_PREPARED_SPEC
            else:
                assert str(info.state) == state
        failed = await (await conn.lookup_job("e92676ff-e135-4013-a0e1-bfc4ce99d2ae")).info()
        assert failed.errmsg is not None and "disk on fire" in failed.errmsg
        store = as_local(conn).engine._dstore
        assert store is not None and store.domains() == []
        assert store.last_event_seq(uuid.UUID("66c0f886-5aa5-4a63-b459-d93610aa130c")) == 3
        # the migrated file takes new jobs and domain definitions
        job = await dom.job_begin(backup("after-v1"))
        await job.wait()
        await store.save_domain("vm9", uuid.uuid4(), "sim:///default", "<domain/>")
    assert _version(path) == SCHEMA_VERSION == 4
    on_disk = rows(path)
    # v1 rows as they were, but the running one: recovery ended it (failed, written)
    assert {u: on_disk[u]["state"] for u in V1_JOBS} == V1_JOBS | {
        "9ab2881b-8df3-4fb2-ab4d-35dbf2bc380d": "failed"
    }
    assert on_disk[str(job.uuid)]["state"] == "completed"
    async with jobcore.connect("sim:///default", store=url(path)) as conn:
        store = as_local(conn).engine._dstore
        assert store is not None and [d.name for d in store.domains()] == ["vm9"]


#: a version-3 store written by jobcore ba24f44 (before the scopes table): two completed
#: backups on sim:///default?rate=0 (retention 10^9 s), one backup (retention 10^9 s) on
#: sim:///other?rate=1048576 still running when its process exited
V3_STORE = ROOT / "tests" / "data" / "store-v3.sqlite"
V3_RUNNING = "72c393dd-1f90-45df-9967-e61cf5d9ddd0"


def _stored_scopes(path: Path) -> list[StoredScope]:
    db = open_database(path)
    try:
        return db.stored_scopes(time.time())
    finally:
        db.release()


async def test_a_version_3_store_migrates_and_names_the_scopes_to_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(V3_STORE.read_bytes())
    assert _version(path) == 3
    # the migration names each scope by itself: its URI without the parameters it had
    assert _stored_scopes(path) == [
        StoredScope("sim:///default", "sim:///default", 2),
        StoredScope("sim:///other", "sim:///other", 1),
    ]
    assert _version(path) == SCHEMA_VERSION == 4
    async with jobcore.connect(f"sim:///other?rate={MiB}", store=url(path)) as conn:
        # recovered by the sim driver: begun 2026-12-01 14:32 UTC at 1 MiB/s, its 512 MiB
        # were copied 512 s later, while no process ran
        info = await (await conn.lookup_job(V3_RUNNING)).info()
        assert (info.state, info.errmsg) == (JobState.COMPLETED, None)
    # an open records the URI it was opened with (configuration included)
    async with jobcore.connect("sim:///other?rate=0&fail_at=0.5", store=url(path)):
        pass
    async with jobcore.connect("sim:///empty", store=url(path)):
        pass  # a scope without jobs or domains is not one to reopen
    assert _stored_scopes(path) == [
        StoredScope("sim:///default", "sim:///default", 2),
        StoredScope("sim:///other", "sim:///other?rate=0&fail_at=0.5", 1),
    ]


# ---- domain definitions ---------------------------------------------------------------------


async def test_domain_definitions_are_kept_per_scope(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    vm1, vm2, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with (
        jobcore.connect("sim:///default", store=url(path)) as conn,
        jobcore.connect("sim:///other", store=url(path)) as conn2,
    ):
        store, store2 = as_local(conn).engine._dstore, as_local(conn2).engine._dstore
        assert store is not None and store2 is not None
        first = await store.save_domain("vm1", vm1, "sim:///default?rate=0", "<domain>1</domain>")
        # on disk once save_domain returned
        assert _domain_rows(path) == {("sim:///default", "vm1"): (str(vm1), "<domain>1</domain>")}
        await store.save_domain("vm2", vm2, "sim:///default", "<domain>2</domain>")
        await store2.save_domain("vm1", other, "sim:///other", "<domain>other</domain>")
        await anyio.sleep(0.01)
        changed = await store.save_domain("vm1", vm1, "sim:///default", "<domain>1b</domain>")
        assert changed.created == first.created and changed.modified > first.modified
        with pytest.raises(InvalidArgument, match=f"'vm1' is already defined with UUID {vm1}"):
            await store.save_domain("vm1", uuid.uuid4(), "sim:///default", "<domain/>")
        with pytest.raises(InvalidArgument, match=f"UUID {vm2} is already domain 'vm2'"):
            await store.save_domain("vm3", vm2, "sim:///default", "<domain/>")
        assert await store.delete_domain("vm2") is True
        assert await store.delete_domain("vm2") is False
        assert ("sim:///default", "vm2") not in _domain_rows(path)
        assert [d.name for d in store.domains()] == ["vm1"]
        assert store.domain("vm1") == changed
    async with jobcore.connect("sim:///default", store=url(path)) as conn:
        store = as_local(conn).engine._dstore
        assert store is not None
        assert store.domains() == [changed]  # uri, xml and both timestamps kept
        assert changed.uri == "sim:///default" and changed.xml == "<domain>1b</domain>"
        # the UUID freed by the delete is free again
        await store.save_domain("vm3", vm2, "sim:///default", "<domain>3</domain>")
    async with jobcore.connect("sim:///other", store=url(path)) as conn2:
        store2 = as_local(conn2).engine._dstore
        assert store2 is not None
        assert [(d.name, d.uuid, d.xml) for d in store2.domains()] == [
            ("vm1", other, "<domain>other</domain>")
        ]


def _domain_rows(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            (scope, name): (u, xml)
            for scope, name, u, xml in conn.execute("SELECT scope, name, uuid, xml FROM domains")
        }
    finally:
        conn.close()


async def test_domain_definition_is_refused_on_a_failing_store(tmp_path: Path) -> None:
    async with jobcore.connect("sim:///default", store=url(tmp_path / "jobs.sqlite")) as conn:
        store = as_local(conn).engine._dstore
        assert store is not None
        store.error = StoreError("no space left for the job store at X")
        with pytest.raises(StoreError, match="no space left"):
            await store.save_domain("vm1", uuid.uuid4(), "sim:///default", "<domain/>")
        assert store.domains() == []  # nothing changed
        store.error = None


# ---- event sequence numbers -----------------------------------------------------------------


async def test_event_sequence_numbers_are_kept_with_the_state(durable: Durable) -> None:
    """1 is the STATE event of the begin, each state change adds one, the FINAL event takes
    the number after the terminal STATE event; the row holds it, a reopen reads it."""
    async with jobcore.connect(f"sim:///default?rate={64 * MiB}", store=durable.url) as conn:
        dom = await conn.lookup_domain("vm1")
        store = as_local(conn).engine._dstore
        assert store is not None
        job = await dom.job_begin(backup("seq"))
        numbered: list[EventKind] = []
        with job.events() as sub:
            assert store.last_event_seq(job.uuid) == 1
            assert durable.rows()[str(job.uuid)]["event_seq"] == 1
            await job.pause()
            await job.resume()
            await job.abort()
            async for ev in sub:
                if ev.kind is not EventKind.PROGRESS:
                    numbered.append(ev.kind)
                    # the event's number is on disk once the event is out
                    assert durable.rows()[str(job.uuid)]["event_seq"] >= 1 + len(numbered)
                if ev.kind is EventKind.FINAL:
                    break
        last = 1 + len(numbered)  # the begin's STATE event was before the subscription
        assert numbered[-2:] == [EventKind.STATE, EventKind.FINAL]
        assert store.last_event_seq(job.uuid) == last
        assert store.last_event_seq(uuid.uuid4()) is None
    assert durable.rows()[str(job.uuid)]["event_seq"] == last
    async with jobcore.connect("sim:///default", store=durable.url) as conn:
        store = as_local(conn).engine._dstore
        assert store is not None and store.last_event_seq(job.uuid) == last


async def test_a_later_write_of_a_row_replaces_the_queued_one(tmp_path: Path) -> None:
    """In the batch being gathered, a state update replaces the job's queued progress
    write, and a delete replaces its queued update; the committed row is the same."""
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect(f"sim:///default?rate={MiB}", store=url(path)) as conn:
        dom = await conn.lookup_domain("vm1")
        store = as_local(conn).engine._dstore
        assert store is not None
        job = await dom.job_begin(backup("sup"))
        rec = as_local(conn).engine.lookup(job.uuid)
        await store.sync()
        # no await from here: all of this is one batch
        store._progress_at.clear()
        rec.processed = 4096
        store.progress(rec)
        assert [w is None for w in store._pending] == [False]
        store.changed(rec)  # covers the progress write
        assert [w is None for w in store._pending] == [True, False]
        store.progress(rec)  # not written: the update wrote progress just now
        assert len(store._pending) == 2
        store._progress_at.clear()
        store.progress(rec)  # written: not covered by the update before it
        store._progress_at.clear()
        store.progress(rec)  # covers the progress before it, not the update
        assert [w is None for w in store._pending] == [True, False, True, False]
        await store.sync()
        assert rows(path)[str(job.uuid)]["processed"] == 4096
        await job.abort()
        await job.wait()
        await store.sync()  # (a wait syncs its own job's outcome, not every write)
        rec.extra["x"] = 1
        store.changed(rec)
        store._remove(rec)  # as a cap would: the delete covers the update
        assert [w is None for w in store._pending] == [True, False]
        await store.sync()
    assert str(job.uuid) not in rows(path)


@pytest.mark.anyio
async def test_wait_waits_for_its_own_outcome_not_later_writes(durable: Durable) -> None:
    """A waiter learns its job's outcome once that job's write is committed (with every
    write queued before it), and not only once later writes of other jobs are."""
    async with jobcore.connect(f"sim:///default?rate={MiB}", store=durable.url) as conn:
        store = as_local(conn).engine._dstore
        assert store is not None
        held: list[tuple[Any, Any]] = []
        hold = False
        batch_held = anyio.Event()
        submit = store.db.submit

        def gated(writes: Any, done: Any) -> None:  # batches wait while ``hold``
            if hold:
                held.append((writes, done))
                batch_held.set()
            else:
                submit(writes, done)

        def release() -> None:
            nonlocal hold
            hold = False
            for writes, done in held:
                submit(writes, done)
            held.clear()

        store.db.submit = gated  # type: ignore[method-assign]
        vm1, vm2 = await conn.lookup_domain("vm1"), await conn.lookup_domain("vm2")
        ended = await vm1.job_begin(backup("ended"))
        running = await vm2.job_begin(backup("running"))
        await ended.abort()
        assert (await ended.wait()).state is JobState.CANCELLED
        async with anyio.create_task_group() as tg:
            try:
                hold = True
                tg.start_soon(vm2.job_begin, backup("later"))  # its insert is held
                with anyio.fail_after(10):  # a batch after the ended job's outcome
                    await batch_held.wait()
                with anyio.fail_after(10):  # the ended job's waiter does not wait for it
                    assert (await ended.wait()).state is JobState.CANCELLED
                waited: list[Any] = []

                async def end_running() -> None:  # its outcome is queued behind the held batch
                    await running.abort()
                    waited.append(await running.wait())

                tg.start_soon(end_running)
                await anyio.wait_all_tasks_blocked()
                assert not waited  # not before its outcome is on disk
                assert not store.job_synced(running.uuid)
            finally:
                release()
        assert waited[0].state is JobState.CANCELLED
        assert store.job_synced(running.uuid)
        assert durable.rows()[str(running.uuid)]["state"] == "cancelled"
