"""kill -9 of a process mid-job (a sim connection on an SQLite store), then two reopens:
every begun job is found, each job gets one FINAL event ever (counted in all three
processes), ended jobs keep their stats and are never announced again. Run with the sim
driver, which re-attaches (its jobs run on and complete), and with a sim that cannot
(tests/recovery_helpers.py ``use_plain_sim``: its active jobs end failed with the engine's
errmsg)."""

from __future__ import annotations

import collections
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_helpers import rows

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import anyio, jobcore
    from jobcore.engine import Engine
    from jobcore.lifecycle import JobState
    from jobd_helpers import BACKUP_VDB
    store, finals_file, mode, recovering = sys.argv[1:5]
    if recovering == "0":
        from recovery_helpers import use_plain_sim
        use_plain_sim(setattr)
    fd = os.open(finals_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    original = Engine._final
    def final(self, rec, event):  # a FINAL event released (its state committed)
        os.write(fd, f"{{os.getpid()}} {{rec.uuid}}\\n".encode())
        original(self, rec, event)
    Engine._final = final
    from jobcore.events import EventHub  # as if subscribed: FINAL events are built
    EventHub.active = property(lambda self: True)
    async def main():
        async with jobcore.connect("sim:///default?rate={rate}", store=store) as conn:
            if mode == "kill":
                dom = await conn.lookup_domain("vm1")
                for i in range(24):
                    job = await dom.job_begin(BACKUP_VDB.format(tag=str(i)))
                    print(job.uuid, flush=True)
                    await anyio.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
            for rec in as_list(conn):
                await (await conn.lookup_job(rec.uuid)).wait()
    def as_list(conn):
        from jobcore.local import as_local
        return as_local(conn).engine.store.active_jobs()
    anyio.run(main)
    """
)


def _run(
    store: Path, finals: Path, mode: str, recovering: bool
) -> subprocess.CompletedProcess[str]:
    script = CHILD.format(tests=str(ROOT / "tests"), rate=256 * MiB)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            f"sqlite://{store}",
            str(finals),
            mode,
            str(int(recovering)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("recovering", [False, True], ids=["plain-sim", "sim"])
def test_one_final_event_per_job_across_kill_and_two_reopens(
    tmp_path: Path, recovering: bool
) -> None:
    store, finals = tmp_path / "jobs.sqlite", tmp_path / "finals"
    killed = _run(store, finals, "kill", recovering)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    begun = killed.stdout.split()
    assert len(begun) == 24
    at_kill = rows(store)
    assert set(begun) <= set(at_kill)  # every begun job is on disk
    ended_before = {u for u in begun if at_kill[u]["state"] == "completed"}
    active = {u for u in begun if at_kill[u]["state"] == "running"}
    assert ended_before and active, {u: r["state"] for u, r in at_kill.items()}
    kill_finals = finals.read_text().split() if finals.exists() else []

    for _ in range(2):
        reopened = _run(store, finals, "reopen", recovering)
        assert reopened.returncode == 0, reopened.stderr
    lines = [line.split() for line in finals.read_text().splitlines()]
    per_job = collections.Counter(job for _, job in lines)
    pids = collections.defaultdict(set)
    for pid, job in lines:
        pids[pid].add(job)
    assert len(pids) <= 2, "the second reopen announced nothing"
    assert all(n == 1 for n in per_job.values()), per_job  # never twice
    # the jobs active at the kill each got their one FINAL event after it
    assert {j for j in active if per_job[j] == 1} == active
    # the jobs that ended before the kill were announced by the killed process only (a
    # kill between a commit and its event's release, microseconds, may leave one at 0)
    after_kill = {j for _, j in lines[len(kill_finals) // 2 :]}
    assert not (ended_before & after_kill)
    end = rows(store)
    want = "completed" if recovering else "failed"
    for job in active:
        assert end[job]["state"] == want, end[job]
        if not recovering:
            assert end[job]["errmsg"] == (
                f"the driver of sim:///default?rate={256 * MiB} cannot re-attach jobs "
                "after a restart"
            )
    for job in ended_before:  # retained ended jobs keep their stats across the reopens
        assert (end[job]["state"], end[job]["processed"]) == ("completed", 512 * MiB)
        assert end[job]["event_seq"] == at_kill[job]["event_seq"]


#: a blockpull of vm1's vda (slow), then a second blockpull and a backup of vda queued
#: behind it; the first is aborted, so the second is admitted: its 'running' is
#: committed, the driver starts it, and the process is killed before the driver's save of
#: that start is committed (the hook below kills right after the driver's start returns)
QUEUED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import anyio, jobcore
    from drivers.sim.connection import SimConnection
    store = sys.argv[1]
    PULL = "<job type='blockpull'><queue/><disk name='vda'/></job>"
    BACKUP = (
        "<job type='backup'><queue/><domainbackup><disks>"
        "<disk name='vda' type='file'><target file='/b/q-vda.qcow2'/></disk>"
        "<disk name='vdb' backup='no'/></disks></domainbackup></job>"
    )
    kill_at = []
    original = SimConnection.start
    async def start(self, job):
        await original(self, job)
        if job.uuid in kill_at:  # started, its save queued, not committed
            os.kill(os.getpid(), signal.SIGKILL)
    SimConnection.start = start
    async def main():
        async with jobcore.connect("sim:///default?rate={rate}", store=store) as conn:
            dom = await conn.lookup_domain("vm1")
            first = await dom.job_begin(PULL)
            second = await dom.job_begin(PULL)
            third = await dom.job_begin(BACKUP)
            print(first.uuid, second.uuid, third.uuid, flush=True)
            kill_at.append(second.uuid)
            await first.abort()
            await anyio.sleep(30)
    anyio.run(main)
    """
)


def test_a_queued_job_killed_before_its_start_was_saved_is_started_again(
    tmp_path: Path,
) -> None:
    store = tmp_path / "jobs.sqlite"
    killed = subprocess.run(
        [sys.executable, "-c", QUEUED_CHILD.format(rate=MiB), f"sqlite://{store}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first, second, third = killed.stdout.split()
    at_kill = rows(store)
    assert [at_kill[j]["state"] for j in (first, second, third)] == [
        "cancelled",
        "running",
        "queued",
    ]
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    saved = {k for (k,) in conn.execute("SELECT key FROM driver_state")}
    conn.close()
    assert f"job:{second}" not in saved  # the window: running, the driver's save lost
    finals = tmp_path / "finals"
    reopened = _run(store, finals, "reopen", recovering=True)  # waits for every job
    assert reopened.returncode == 0, reopened.stderr
    end = rows(store)
    # started again from the beginning (nothing of it had run), then the queued one
    assert (end[second]["state"], end[second]["errmsg"]) == ("completed", None)
    assert (end[third]["state"], end[third]["errmsg"]) == ("completed", None)
    # still queued behind it: its start after the other's end, both read on one clock
    # (``started`` is its begin's wall time plus a monotonic offset, while ``ended`` is a
    # wall-clock reading, which a VM's clock sync may step by milliseconds meanwhile)
    second_ended = end[second]["created"] + end[second]["elapsed"]
    assert end[third]["started"] >= second_ended
    assert sorted(finals.read_text().split()[1::2]) == sorted([second, third])  # one each
