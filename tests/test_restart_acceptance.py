"""Issue 10's acceptance beyond the listed tests: restarts and kills in places the soak and
the recovery tests do not reach, each a regression test of what it found (design/store.md,
"Tried beyond the tests")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobd_helpers import Jobd, jobctl
from jobd_helpers import write as write_file
from qemu_helpers import alive, create, domain_xml, kill_and_reap, write

import jobcore
import jobcore.remote
from jobcore.errors import ConnectionLost
from jobcore.lifecycle import JobState
from jobcore.local import as_local

TESTS = Path(__file__).parent
JOB = "6a0c1b8e-0000-4000-8000-000000000001"
#: a child runs the same jobcore as this process (tests/ first, for this module)
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def push(target: Path, *, inc: str | None = None, checkpoint: str | None = None) -> str:
    return (
        "<job type='backup'>"
        + (f"<uuid>{JOB}</uuid>" if inc is None else "")
        + "<domainbackup>"
        + (f"<incremental>{inc}</incremental>" if inc else "")
        + f"<disks><disk name='vda' type='file'><target file='{target}'/></disk></disks>"
        + "</domainbackup>"
        + (f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>" if checkpoint else "")
        + "</job>"
    )


def killed_after_checkpoint_start(opts_json: str) -> None:
    """Child: a durable keep-guests owner that begins a throttled backup creating
    checkpoint c1 and dies (as SIGKILL would) the moment the driver's start returned,
    before the engine records the checkpoint."""
    from jobcore.engine import Engine

    opts = json.loads(opts_json)

    async def main() -> None:
        async with jobcore.connect(opts["uri"], store=opts["store"]) as conn:
            dom = await conn.create_domain(opts["xml"])

            async def die(self: Engine, rec: Any) -> None:
                driver: Any = as_local(conn).driver
                sys.stdout.write(f"{driver.pid('vm1')}\n")
                sys.stdout.flush()
                os._exit(0)

            Engine._checkpoint_started = die  # type: ignore[method-assign]
            await dom.job_begin(opts["job"])

    anyio.run(main, backend="asyncio")


@pytest.mark.qemu
def test_a_backups_checkpoint_survives_a_kill_before_its_record(tmp_path: Path) -> None:
    """Killed between QEMU's transaction (bitmap c1 made) and the checkpoint's record:
    the recovered backup completes, c1 is listed, matches QEMU's bitmap, and an
    incremental from it works. Before: c1 missing (NoSuchCheckpoint for the incremental,
    QEMU's "Bitmap already exists" for a new full backup naming c1)."""
    src = create(tmp_path / "vda.qcow2", "16M")
    write(src, "write -P 0x5a 0 8M")
    uri = f"qemu:///session?dir={tmp_path / 'qemu'}&keep_guests=yes&backup_bandwidth={2 << 20}"
    store = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    opts = {
        "uri": uri,
        "store": store,
        "xml": domain_xml("vm1", {"vda": src}),
        "job": push(tmp_path / "full.qcow2", checkpoint="c1"),
    }
    code = "import sys, test_restart_acceptance as t; t.killed_after_checkpoint_start(sys.argv[1])"
    child = subprocess.run(
        [sys.executable, "-c", code, json.dumps(opts)],
        capture_output=True, text=True, cwd=TESTS, timeout=60,
        env=CHILD_ENV,
    )  # fmt: skip
    assert child.stdout.strip(), child.stderr
    qpid = int(child.stdout.strip())

    async def after() -> None:
        async with jobcore.connect(uri, store=store) as conn:
            job = await conn.lookup_job(JOB)
            assert (await job.wait(60)).state is JobState.COMPLETED
            dom = await conn.lookup_domain("vm1")
            assert [c.name for c in await dom.list_checkpoints()] == ["c1"]
            driver: Any = as_local(conn).driver
            node = driver.domains["vm1"].disks["vda"].active.node
            nodes = await driver.qmp("vm1", "query-named-block-nodes", {"flat": True})
            names = [b.get("name") for n in nodes if n["node-name"] == node
                     for b in n.get("dirty-bitmaps", [])]  # fmt: skip
            assert names == ["c1"]
            inc = await dom.job_begin(push(tmp_path / "inc.qcow2", inc="c1", checkpoint="c2"))
            assert (await inc.wait(60)).state is JobState.COMPLETED
            assert [c.name for c in await dom.list_checkpoints()] == ["c1", "c2"]
            await dom.destroy()

    try:
        anyio.run(after, backend="asyncio")
    finally:
        if alive(qpid):
            kill_and_reap({qpid})


SIM_JOB = "6a0c1b8e-0000-4000-8000-000000000002"
SIM_BACKUP = (
    f"<job type='backup'><uuid>{SIM_JOB}</uuid><domainbackup><disks>"
    "<disk name='vda' type='file'><target file='/b/x.qcow2'/></disk>"
    "<disk name='vdb' backup='no'/></disks></domainbackup></job>"
)


def killed_while_running(store: str) -> None:
    """Child: a sim backup at 1 MiB/s, killed (os._exit) 0.3 s in; prints info.started."""

    async def main() -> None:
        async with jobcore.connect("sim:///default?rate=1048576", store=store) as conn:
            job = await (await conn.lookup_domain("vm1")).job_begin(SIM_BACKUP)
            await anyio.sleep(0.3)
            sys.stdout.write(f"{(await job.info()).started!r}\n")
            sys.stdout.flush()
            os._exit(0)

    anyio.run(main)


def test_a_running_jobs_start_time_survives_a_kill(tmp_path: Path) -> None:
    """info.started of a job that ran is the same after a kill and a reopen. Before: None
    (its row got a start time only with a later state change)."""
    store = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    code = "import sys, test_restart_acceptance as t; t.killed_while_running(sys.argv[1])"
    child = subprocess.run(
        [sys.executable, "-c", code, store],
        capture_output=True, text=True, cwd=TESTS, timeout=60,
        env=CHILD_ENV,
    )  # fmt: skip
    started = float(child.stdout.strip() or "nan")
    assert started > 0, child.stderr

    async def after() -> None:
        async with jobcore.connect("sim:///default?rate=1048576", store=store) as conn:
            info = await (await conn.lookup_job(SIM_JOB)).info()
            assert info.state is JobState.RUNNING
            assert info.started == started

    anyio.run(after)


def _stopped(tmp_path: Path) -> tuple[Jobd, str, str]:
    """A jobd running a 1 GiB sim backup at 1 MiB/s; the URI and the job's UUID."""
    daemon = Jobd(tmp_path / "run").wait_ready()
    uri = daemon.uri("rate=1048576")
    began = jobctl(uri, "begin", "vm1", write_file(tmp_path, "b.xml", SIM_BACKUP))
    assert began.returncode == 0, began.stderr
    return daemon, uri, began.stdout.strip()


def test_jobctl_wait_keeps_its_timeout_when_jobd_is_stopped(tmp_path: Path) -> None:
    """SIGSTOP of jobd while `jobctl wait --timeout 3` waits: it ends after its timeout,
    exit 10, saying jobd did not answer. Before: it hung (its wait's reply never came, and
    the state shown after a timeout was asked of the stopped jobd too)."""
    daemon, uri, job = _stopped(tmp_path)
    try:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "jobcore.cli", "wait", job, "--timeout", "3"],
            env={**os.environ, "JOBCORE_URI": uri}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # its wait is in flight (a loaded machine may start jobctl slowly)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            _, err = waiter.communicate(timeout=20)
        finally:
            waiter.kill()
            daemon.proc.send_signal(signal.SIGCONT)
        assert waiter.returncode == 10, err
        assert "did not end within 3 s (state: unknown: jobd did not answer)" in err
    finally:
        daemon.stop()


@pytest.mark.anyio
async def test_a_call_to_a_stopped_jobd_is_lost_not_hung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose jobd is SIGSTOPped mid-call gets ConnectionLost once jobd was silent
    KEEPALIVE_TIMEOUT s (libvirt's keepalive closes such a connection); a healthy jobd
    answers the pings, so a long wait is not cut. Before: the call hung for ever."""
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_INTERVAL", 0.2, raising=False)
    monkeypatch.setattr(jobcore.remote, "KEEPALIVE_TIMEOUT", 1.5, raising=False)
    daemon, uri, job = _stopped(tmp_path)
    try:
        async with jobcore.connect(uri + "&reconnect=0") as conn:
            handle = await conn.lookup_job(job)
            with pytest.raises(TimeoutError):  # 2 s of a healthy jobd, pinged: not lost
                await handle.wait(2.5)
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                with anyio.fail_after(15), pytest.raises(ConnectionLost, match="answered nothing"):
                    await handle.wait()
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
    finally:
        daemon.stop()


@pytest.mark.qemu
def test_a_restart_on_another_store_names_the_job_it_leaves_running(tmp_path: Path) -> None:
    """jobd killed during a qemu backup, restarted with ``--store memory:``: the guest is
    re-adopted, the job is unknown (NoSuchJob), and the first start logs a warning naming
    its record (its QEMU job still runs). Before: nothing said so."""
    run_dir, qdir = tmp_path / "run", tmp_path / "qemu"
    allow = ("--allow-uri", f"qemu:///session?dir={qdir}")
    uri = f"qemu+unix:///session?dir={qdir}&socket={run_dir / 'jobd.sock'}"
    disk = create(tmp_path / "d.qcow2", "16M")
    write(disk, "write -P 0x5a 0 12M")
    job_xml = (
        "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
        "<target file='{}'/></disk></disks></domainbackup></job>"
    )
    daemon = Jobd(run_dir, *allow).wait_ready()
    qpid = 0
    try:
        made = jobctl(
            uri + f"&backup_bandwidth={1 << 20}", "domain", "create",
            write_file(tmp_path, "d.xml", domain_xml("d1", {"vda": disk})),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        qpid = int(next(qdir.glob("d1.*.pid")).read_text())
        began = jobctl(
            uri, "begin", "d1", write_file(tmp_path, "a.xml", job_xml.format(tmp_path / "a.q"))
        )
        assert began.returncode == 0, began.stderr
        job = began.stdout.strip()
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
        with Jobd(run_dir, *allow, "--store", "memory:").wait_ready() as daemon:
            assert jobctl(uri, "info", job).returncode == 7  # not this store's
            other = write_file(tmp_path, "b.xml", job_xml.format(tmp_path / "b.q"))
            assert jobctl(uri, "begin", "d1", other).returncode == 0
            assert jobctl(uri, "domain", "destroy", "d1").returncode == 0
        warned = [line for line in daemon.log().splitlines() if "does not know" in line]
        assert len(warned) == 1 and job.replace("-", "") in warned[0], daemon.log()
    finally:
        if qpid and alive(qpid):
            kill_and_reap({qpid})
