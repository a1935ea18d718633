"""The sim driver across restarts (driver level, no engine): its world and jobs persist in
a DriverState; ``recover_job`` re-attaches each job where wall time says it is now, or
concludes it if it ended meanwhile, applying its effect on the world exactly once.

A "restart" leaves the connection's context without ending its jobs, as a killed process
would (the connection's close never ends jobs: the engine does), then opens the same
host with the same state; one test SIGKILLs a child process that runs the jobs.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_helpers import RecordingReporter
from sim_state import BACKUP_XML, JOB_UUID, WALL, FileState, MemoryState

from drivers.sim import ManualClock, SimConnection, SimDriver
from drivers.sim.job import Phase
from jobcore.driver import Concluded, DriverJob, DriverState, Reattached, Vanished
from jobcore.lifecycle import JobState
from jobcore.testing import prepare_job
from jobcore.uri import parse_uri

pytestmark = pytest.mark.anyio
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


@asynccontextmanager
async def opened(uri: str, state: DriverState | None) -> AsyncIterator[SimConnection]:
    """One process's connection; leaving it drops the connection, jobs unended."""
    async with anyio.create_task_group() as tg:
        async with SimDriver().connect(parse_uri(uri), tg, state) as conn:
            yield conn
        tg.cancel_scope.cancel()


async def begin(conn: SimConnection, domain: str, xml: str) -> tuple[DriverJob, RecordingReporter]:
    rep = RecordingReporter()
    spec = prepare_job(xml, await conn.lookup_domain(domain))
    job = DriverJob(spec.uuid, spec.TYPE, domain, spec, rep)
    await conn.start(job)
    return job, rep


def again(job: DriverJob) -> tuple[DriverJob, RecordingReporter]:
    """The job as the engine hands it back after a restart: same spec, fresh reporter."""
    rep = RecordingReporter()
    return DriverJob(job.uuid, job.type, job.domain, job.spec, rep), rep


def away(state: MemoryState, job: uuid.UUID, seconds: float) -> None:
    """``seconds`` of wall time pass while no process runs (its saved instant moves back)."""
    state.records[f"job:{job}"]["wall"] -= seconds


def backup(target: str, disk: str = "vda", mode: str = "push", extra: str = "") -> str:
    store = "scratch" if mode == "pull" else "target"
    return (
        f"<job type='backup'><domainbackup mode='{mode}'><disks>"
        f"<disk name='{disk}' type='file'><{store} file='{target}'/></disk>"
        f"</disks></domainbackup>{extra}</job>"
    )


COMMIT_TOP1 = "<job type='blockcommit'><disk name='vda'/><top index='1'/></job>"
ACTIVE_COMMIT = "<job type='blockcommit'><disk name='vda'/></job>"
SLOW = "sim:///h1?rate=1048576"  # 1 MiB/s: nothing ends unless wall time passes


async def test_a_running_backup_goes_on_by_wall_time_and_completes_on_time() -> None:
    state = MemoryState()
    rate = 512 * MiB  # vda's 1 GiB in 2 s
    uri = f"sim:///h1?rate={rate}"
    xml = backup("/b/full.qcow2", extra="<domaincheckpoint><name>cp1</name></domaincheckpoint>")
    async with opened(uri, state) as conn:
        job, rep = await begin(conn, "vm1", xml)
        started = time.monotonic()
        total = rep.progress_calls[0][1]
        await anyio.sleep(0.4)
    assert rep.terminal is None  # the process went away, the job did not end
    await anyio.sleep(0.4)
    async with opened(uri, state) as conn:
        job2, rep2 = again(job)
        got = await conn.recover_job(job2, JobState.RUNNING)
        elapsed = time.monotonic() - started
        assert isinstance(got, Reattached) and got.state is JobState.RUNNING
        assert got.total == total
        assert abs(got.processed - rate * elapsed) <= rate * 0.25
        # the checkpoint's bitmap exists from the backup's start (libvirt's atomic begin)
        assert conn.world.domain("vm1").checkpoints == {"cp1": ("vda",)}
        assert await rep2.wait_end(10) == ("completed", {})
        assert abs(time.monotonic() - started - total / rate) <= 0.5
        assert conn.world.domain("vm1").checkpoints == {"cp1": ("vda",)}
        assert "/b/full.qcow2" in conn.host.files
        await anyio.sleep(0.05)  # the ended job's record goes after the store's sync
    assert state.keys("job:") == []
    async with opened(uri, state) as conn:  # the effect is in the world that persists
        assert conn.world.domain("vm1").checkpoints == {"cp1": ("vda",)}
        assert "/b/full.qcow2" in conn.host.files


async def test_a_job_that_ended_while_away_is_concluded_and_applied_once() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        job, _ = await begin(conn, "vm1", COMMIT_TOP1)
        chain = conn.world.domain("vm1").disks["vda"].chain
    assert len(chain) == 3
    away(state, job.uuid, 3600)
    state.stalled = True  # the engine's terminal write never reaches the disk
    async with opened(SLOW, state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert isinstance(got, Concluded) and got.state is JobState.COMPLETED
        assert conn.world.domain("vm1").disks["vda"].chain == [chain[0], chain[2]]
        await anyio.sleep(0.05)
    # the process died again before the engine recorded COMPLETED: asked once more, the
    # driver gives the same outcome and does not commit a second time
    state.stalled = False
    async with opened(SLOW, state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert isinstance(got, Concluded) and got.state is JobState.COMPLETED
        assert conn.world.domain("vm1").disks["vda"].chain == [chain[0], chain[2]]
        await anyio.sleep(0.05)
    assert state.keys("job:") == []
    async with opened(SLOW, state) as conn:
        assert conn.world.domain("vm1").disks["vda"].chain == [chain[0], chain[2]]


async def test_a_migration_that_ended_while_away_moved_the_domain_once() -> None:
    state = MemoryState()
    mig = "<job type='migration'><destination uri='sim:///dst'/></job>"
    async with opened(SLOW, state) as conn:
        job, _ = await begin(conn, "vm1", mig)
    away(state, job.uuid, 3600)
    async with opened(SLOW, state) as conn:
        job2, rep2 = again(job)
        got = await conn.recover_job(job2, JobState.RUNNING)
        assert isinstance(got, Concluded) and got.state is JobState.COMPLETED
        assert got.extra is not None and got.extra["memory_remaining"] == 0
        assert rep2.kinds == ["domain_moved"]
        assert conn.world.domain_host("vm1") == "dst"
    async with opened(SLOW, state) as conn:
        assert [d.name for d in await conn.list_domains()] == ["vm2"]
        assert conn.world.domain_host("vm1") == "dst"
        assert list(conn.world.hosts["dst"].domains) == ["vm1"]


async def test_a_failure_point_passed_while_away_fails_the_job_and_removes_its_files() -> None:
    state = MemoryState()
    uri = "sim:///h1?rate=1048576&fail_at=0.5"
    async with opened(uri, state) as conn:
        job, rep = await begin(conn, "vm1", backup("/b/half.qcow2"))
        total = rep.progress_calls[0][1]
        assert "/b/half.qcow2" in conn.host.files
    assert len(state.keys("file:")) == 1
    away(state, job.uuid, 3600)
    async with opened(uri, state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert got == Concluded(
            JobState.FAILED, f"simulated failure at {total // 2} of {total} bytes", {}
        )
        assert "/b/half.qcow2" not in conn.host.files
    assert state.keys("file:") == []


async def test_a_job_not_yet_at_its_end_is_rescheduled_to_finish_on_time() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        job, rep = await begin(conn, "vm1", backup("/b/later.qcow2"))
        total = rep.progress_calls[0][1]
    away(state, job.uuid, 100)
    async with opened(SLOW, state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert isinstance(got, Reattached) and got.state is JobState.RUNNING
        assert abs(got.processed - 100 * MiB) <= MiB // 2
        sj = conn._jobs[job.uuid]
        assert abs(sj.deadline() - conn.clock.now() - (total - 100 * MiB) / MiB) < 1


async def test_a_paused_job_stays_where_it_was_and_resumes_from_there() -> None:
    state = MemoryState()
    rate = 1024 * MiB  # vda's 1 GiB in 1 s
    uri = f"sim:///h1?rate={rate}"
    async with opened(uri, state) as conn:
        job, rep = await begin(conn, "vm1", backup("/b/paused.qcow2"))
        total = rep.progress_calls[0][1]
        await anyio.sleep(0.3)
        await conn.pause(job)
        done = conn._jobs[job.uuid].processed(conn.clock.now())
    assert 0 < done < total
    await anyio.sleep(1.2)  # longer than the whole job: paused, it does not move
    async with opened(uri, state) as conn:
        job2, rep2 = again(job)
        got = await conn.recover_job(job2, JobState.PAUSED)
        assert got == Reattached(JobState.PAUSED, done, total)
        resumed = time.monotonic()
        await conn.resume(job2)
        assert await rep2.wait_end(10) == ("completed", {})
        assert abs(time.monotonic() - resumed - (total - done) / rate) <= 0.5


async def test_a_pull_backup_stays_ready_across_the_restart() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        job, rep = await begin(conn, "vm1", backup("/b/scratch.qcow2", mode="pull"))
        await rep.wait_for("ready", 5)
    assert len(state.keys("file:")) == 1
    away(state, job.uuid, 3600)
    async with opened(SLOW, state) as conn:
        job2, rep2 = again(job)
        got = await conn.recover_job(job2, JobState.READY)
        assert isinstance(got, Reattached) and got.state is JobState.READY
        assert got.processed == got.total > 0
        await conn.complete(job2)
        assert (await rep2.wait_end(5))[0] == "completed"
        assert "/b/scratch.qcow2" not in conn.host.files  # scratch files always go
    assert state.keys("file:") == []


async def test_an_active_commit_that_converged_while_away_is_ready_then_pivots() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        job, _ = await begin(conn, "vm2", ACTIVE_COMMIT)
    away(state, job.uuid, 3600)
    async with opened(SLOW, state) as conn:
        job2, rep2 = again(job)
        got = await conn.recover_job(job2, JobState.RUNNING)
        assert isinstance(got, Reattached) and got.state is JobState.READY
        assert got.processed == got.total
        assert rep2.kinds == []  # the engine makes the transition from what it is told
        await conn.complete(job2)
        assert await rep2.wait_end(5) == ("completed", {})
        disk = (await conn.lookup_domain("vm2")).disk("vda")
        assert disk is not None and disk.chain == ("/var/lib/sim/vm2/vda.2.qcow2",)
    async with opened(SLOW, state) as conn:
        disk = (await conn.lookup_domain("vm2")).disk("vda")
        assert disk is not None and disk.chain == ("/var/lib/sim/vm2/vda.2.qcow2",)


async def test_a_cancel_requested_before_the_restart_concludes_cancelled() -> None:
    state = MemoryState()
    async with opened("sim:///h1?rate=1048576&clock=manual", state) as conn:
        job, _ = await begin(conn, "vm1", backup("/b/cancelled.qcow2"))
        await conn.cancel(job)  # takes effect at the next step, which never comes
    async with opened("sim:///h1?rate=1048576&clock=manual", state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.ABORTING)
        assert got == Concluded(JobState.CANCELLED, None, {})
        assert "/b/cancelled.qcow2" not in conn.host.files


async def test_a_cancel_or_completion_the_engine_took_is_carried_out_on_recovery() -> None:
    state = MemoryState()
    manual = "sim:///h1?rate=1048576&clock=manual"
    async with opened(manual, state) as conn:
        cancelled, _ = await begin(conn, "vm1", backup("/b/taken.qcow2"))
        completed, rep = await begin(conn, "vm2", ACTIVE_COMMIT)
        assert isinstance(conn.clock, ManualClock)
        conn.clock.advance(1000)
        await rep.wait_for("ready", 5)
    # the engine wrote ABORTING and COMPLETING, the process died before the driver acted
    async with opened(manual, state) as conn:
        got = await conn.recover_job(again(cancelled)[0], JobState.ABORTING)
        assert got == Concluded(JobState.CANCELLED, None, {})
        assert "/b/taken.qcow2" not in conn.host.files
        got = await conn.recover_job(again(completed)[0], JobState.COMPLETING)
        assert got == Concluded(JobState.COMPLETED, None, {})
        disk = (await conn.lookup_domain("vm2")).disk("vda")
        assert disk is not None and disk.chain == ("/var/lib/sim/vm2/vda.2.qcow2",)


async def test_a_job_whose_domain_or_record_is_gone_vanished() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        job, _ = await begin(conn, "vm2", COMMIT_TOP1)
    async with opened(SLOW, state) as conn:
        await conn.destroy_domain("vm2")
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert got == Vanished(f"domain 'vm2' is gone from '{SLOW}'")
        unknown = DriverJob(uuid.uuid4(), job.type, "vm1", job.spec, RecordingReporter())
        got = await conn.recover_job(unknown, JobState.RUNNING)
        assert isinstance(got, Vanished) and "no record of job" in got.reason
    async with opened(SLOW, state) as conn:
        assert [d.name for d in await conn.list_domains()] == ["vm1"]


async def test_a_manual_clock_resumes_jobs_at_their_saved_progress() -> None:
    state = MemoryState()
    uri = "sim:///h1?rate=1048576&clock=manual"
    async with opened(uri, state) as conn:
        assert isinstance(conn.clock, ManualClock)
        paused, _ = await begin(conn, "vm1", backup("/b/m1.qcow2"))
        running, _ = await begin(conn, "vm2", backup("/b/m2.qcow2"))
        conn.clock.advance(10)
        await conn.pause(paused)  # saved: 10 MiB done
        conn.clock.advance(20)  # not saved: the manual clock stops with its process
    async with opened(uri, state) as conn:
        got = await conn.recover_job(again(paused)[0], JobState.PAUSED)
        assert isinstance(got, Reattached) and got.processed == 10 * MiB
        got = await conn.recover_job(again(running)[0], JobState.RUNNING)
        assert isinstance(got, Reattached) and got.processed == 0
        assert got.state is JobState.RUNNING


async def test_records_of_jobs_not_recovered_are_dropped_when_the_engine_serves() -> None:
    state = MemoryState()
    async with opened(SLOW, state) as conn:
        await begin(conn, "vm1", backup("/b/orphan.qcow2"))
    assert len(state.keys("job:")) == 1
    async with opened(SLOW, state) as conn:
        job, _ = await begin(conn, "vm2", backup("/b/next.qcow2"))
    assert state.keys("job:") == [f"job:{job.uuid}"]


async def test_without_a_state_nothing_is_saved_and_a_reopen_starts_a_new_world() -> None:
    async with opened(SLOW, None) as conn:
        assert conn._persist is None
        job, _ = await begin(conn, "vm1", COMMIT_TOP1)
        await conn.destroy_domain("vm2")
    async with opened(SLOW, None) as conn:
        assert [d.name for d in await conn.list_domains()] == ["vm1", "vm2"]
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        assert isinstance(got, Vanished)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sigkilled_process_leaves_its_jobs_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    rate = 768 * MiB  # vm1's vda + vdb (1.5 GiB) in 2 s
    uri = f"sim:///killed?rate={rate}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    child = await anyio.open_process(
        [sys.executable, str(ROOT / "tests" / "sim_state.py"), str(path), uri], env=env, cwd=ROOT
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(30):
            line = await child.stdout.receive()
        assert line == b"started\n"
        await anyio.sleep(0.4)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    saved = FileState(path)
    record = saved.load()[f"job:{JOB_UUID}"]
    await anyio.sleep(0.3)
    async with opened(uri, saved) as conn:
        spec = prepare_job(BACKUP_XML, await conn.lookup_domain("vm1"), wall=WALL)
        rep = RecordingReporter()
        job = DriverJob(JOB_UUID, spec.TYPE, "vm1", spec, rep)
        got = await conn.recover_job(job, JobState.RUNNING)
        since = time.time() - record["wall"]
        assert isinstance(got, Reattached) and got.state is JobState.RUNNING
        assert got.total == 1536 * MiB
        assert abs(got.processed - rate * since) <= rate * 0.25
        assert await rep.wait_end(10) == ("completed", {})
        assert abs(time.time() - record["wall"] - got.total / rate) <= 0.5
        assert conn.world.domain("vm1").checkpoints == {"cp-killed": ("vda", "vdb")}
    saved.close()
    reread = FileState(path)
    async with opened(uri, reread) as conn:
        assert conn.world.domain("vm1").checkpoints == {"cp-killed": ("vda", "vdb")}
        assert {"/backups/killed-vda.qcow2", "/backups/killed-vdb.qcow2"} <= set(conn.host.files)
    reread.close()


# ---- a property: progress after a restart is wall time × rate from the saved point ---

VERBS = st.lists(
    st.one_of(
        st.just(("pause", 0)),
        st.just(("resume", 0)),
        st.tuples(st.just("speed"), st.integers(1, 64).map(lambda n: n * MiB)),
    ),
    max_size=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.integers(1, 64).map(lambda n: n * MiB),
    elapsed=st.floats(0, 100),
    verbs=VERBS,
)
def test_recovered_progress_is_saved_progress_plus_wall_time_times_rate(
    rate: int, elapsed: float, verbs: list[tuple[str, int]]
) -> None:
    anyio.run(_progress_scenario, rate, elapsed, verbs)


async def _progress_scenario(rate: int, elapsed: float, verbs: list[tuple[str, int]]) -> None:
    state = MemoryState()
    uri = f"sim:///h1?rate={rate}"
    paused, effective = False, float(rate)
    async with opened(uri, state) as conn:
        job, rep = await begin(conn, "vm1", backup("/b/prop.qcow2"))
        total = rep.progress_calls[0][1]
        for verb, arg in verbs:
            if verb == "pause":
                await conn.pause(job)
                paused = True
            elif verb == "resume":
                await conn.resume(job)
                paused = False
            else:
                await conn.set_speed(job, arg)
                effective = min(float(rate), float(arg))
        saved = state.records[f"job:{job.uuid}"]
        base = saved["processed"]
    away(state, job.uuid, elapsed)
    expected = base if paused else base + effective * elapsed
    slack = effective * 0.2 + 1  # the instants of the save and of the recovery
    async with opened(uri, state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.RUNNING)
        if abs(expected - total) <= slack:
            return  # too close to the end to say which side of it the job is
        if expected > total:
            assert got == Concluded(JobState.COMPLETED, None, {})
            assert "/b/prop.qcow2" in conn.host.files
            return
        assert isinstance(got, Reattached)
        assert got.state is (JobState.PAUSED if paused else JobState.RUNNING)
        assert abs(got.processed - expected) <= slack
        sj = conn._jobs[job.uuid]
        assert sj.phase is Phase.COPY and sj.paused is paused
        if not paused:  # rescheduled to end when the remaining bytes are copied
            left = (total - got.processed) / effective
            assert abs(sj.deadline() - conn.clock.now() - left) <= 0.25


async def test_a_job_paused_while_ready_comes_back_standby() -> None:
    state = MemoryState()
    async with opened("sim:///h1?clock=manual", state) as conn:
        job, rep = await begin(conn, "vm1", ACTIVE_COMMIT)
        assert isinstance(conn.clock, ManualClock)
        conn.clock.advance(1000)
        await rep.wait_for("ready", 5)
        await conn.pause(job)
    async with opened("sim:///h1?clock=manual", state) as conn:
        got = await conn.recover_job(again(job)[0], JobState.STANDBY)
        assert isinstance(got, Reattached) and got.state is JobState.STANDBY


async def test_a_manual_clock_goes_on_from_its_saved_reading() -> None:
    """Time stands still while no process runs: the next connection's manual clock reads
    what the last one's did, so wall times never go back across a restart."""
    state = MemoryState()
    uri = "sim:///h1?clock=manual"
    async with opened(uri, state) as conn:
        assert isinstance(conn.clock, ManualClock)
        start, wall = conn.clock.now(), conn.clock.wall()
        conn.clock.advance(25)
    async with opened(uri, state) as conn:
        assert (conn.clock.now(), conn.clock.wall()) == (start + 25, wall + 25)
    async with opened(uri, None) as conn:  # without a state: a fresh clock
        assert (conn.clock.now(), conn.clock.wall()) == (start, wall)
