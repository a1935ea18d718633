"""jobd recovers every driver connection its store holds jobs of at start, not only those a
client names: after a kill -9 and a restart where no client names them, a sim job on a
second sim host and a qemu domain's job are found by UUID (``jobctl info`` on another
connection), a job that ended while jobd was away has its one FINAL event, a running one
finishes, and the recovered connection closes once idle. A stored connection that
``allowed_uris`` no longer allows is logged and left as it is in the store."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from jobd_helpers import BACKUP_VDB, Jobd, jobctl
from jobd_helpers import write as write_file
from qemu_helpers import create, domain_xml, kill_and_reap, run, write

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _row(path: Path, job: str) -> tuple[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        state, seq = conn.execute(
            "SELECT state, event_seq FROM jobs WHERE uuid = ?", (job,)
        ).fetchone()
    finally:
        conn.close()
    return str(state), int(seq)


def _info(uri: str, job: str) -> dict[str, object]:
    shown = jobctl(uri, "info", job, "--json")
    assert shown.returncode == 0, shown.stderr
    info: dict[str, object] = json.loads(shown.stdout)
    return info


def _begin(uri: str, domain: str, path: str) -> str:
    began = jobctl(uri, "begin", domain, path)
    assert began.returncode == 0, began.stderr
    return began.stdout.strip()


def _wait_for_log(daemon: Jobd, *needles: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(all(n in line for n in needles) for line in daemon.log().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no log line with {needles}: {daemon.log()}")


def test_jobd_recovers_stored_connections_nobody_names(tmp_path: Path) -> None:
    run_dir, qdir = tmp_path / "run", tmp_path / "qemu"
    store = run_dir / "jobs.sqlite"
    config = tmp_path / "jobd.toml"
    config.write_text("driver_idle_timeout = 0.5\n")
    qemu_uri = f"qemu:///session?dir={qdir}"
    args = ("--config", str(config), "--allow-uri", "sim:///*", "--allow-uri", qemu_uri)
    sock = run_dir / "jobd.sock"

    def client(base: str, query: str = "") -> str:
        scheme, rest = base.split(":", 1)
        sep = "&" if "?" in rest else "?"
        return f"{scheme}+unix:{rest}{sep}socket={sock}" + (f"&{query}" if query else "")

    disk = create(tmp_path / "d.qcow2", "64M")
    write(disk, "write -P 0x5a 0 40M")
    target = tmp_path / "t.qcow2"
    qemu_job_xml = write_file(
        tmp_path,
        "q.xml",
        "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
        f"<target file='{target}'/></disk></disks></domainbackup></job>",
    )
    # retention 0: gone once it ends, so its host idles
    long_xml = write_file(
        tmp_path, "long.xml", BACKUP_VDB.format(tag="l").replace("<domainbackup>",
        "<retention seconds='0'/><domainbackup>")
    )  # fmt: skip
    qpid = 0
    daemon = Jobd(run_dir, *args).wait_ready()
    try:
        made = jobctl(
            client(qemu_uri, f"backup_bandwidth={4 * MiB}"),
            "domain", "create", write_file(tmp_path, "d.xml", domain_xml("d1", {"vda": disk})),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        qpid = int(next(qdir.glob("d1.*.pid")).read_text())
        qjob = _begin(client(qemu_uri), "d1", qemu_job_xml)  # 40 MiB at 4 MiB/s
        # 512 MiB at 64 MiB/s, slowed to 1 MiB/s at once: runs until sped up again
        long_job = _begin(client("sim:///other", f"rate={64 * MiB}"), "vm1", long_xml)
        assert jobctl(daemon.uri(), "set-speed", long_job, "1MiB").returncode == 0
        for job in (qjob, long_job):
            assert _info(daemon.uri(), job)["state"] == "running"
        # 512 MiB at 64 MiB/s: ends 8 s after its start (before short_began), while jobd
        # is away (killed at once: its row below says it was running)
        short_job = _begin(
            client("sim:///third", f"rate={64 * MiB}"),
            "vm1",
            write_file(tmp_path, "short.xml", BACKUP_VDB.format(tag="s")),
        )
        short_began = time.monotonic()
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    try:
        assert _row(store, short_job) == ("running", 1)
        time.sleep(max(0.0, short_began + 9 - time.monotonic()))  # the short job ended
        daemon = Jobd(run_dir, *args).wait_ready()
        try:
            # no client names sim:///other, sim:///third or the qemu URI: daemon.uri() is
            # sim:///default; each job is found anyway, with what its hypervisor did
            short = _info(daemon.uri(), short_job)
            assert (short["state"], short["errmsg"]) == ("completed", None), short
            # its one FINAL event: STATE of the begin (1), STATE completed (2), FINAL (3)
            assert _row(store, short_job) == ("completed", 3)
            assert _info(daemon.uri(), long_job)["state"] == "running"
            qinfo = _info(daemon.uri(), qjob)
            assert qinfo["state"] in ("running", "completed") and qinfo["errmsg"] is None, qinfo
            # the limit lifted (back to the host's 64 MiB/s): it finishes
            assert jobctl(daemon.uri(), "set-speed", long_job, "0").returncode == 0
            for job in (long_job, qjob):
                waited = jobctl(daemon.uri(), "wait", job, timeout=120)
                assert waited.returncode == 0, waited.stdout + waited.stderr
            # sim:///other has no job left (retention 0) and no client: it closes
            _wait_for_log(daemon, "driver connection idle", "sim:///other")
            assert jobctl(client(qemu_uri), "domain", "destroy", "d1").returncode == 0
            run("qemu-img", "compare", "-q", str(disk), str(target))
        finally:
            assert daemon.stop() == 0
        assert _row(store, short_job) == ("completed", 3)  # never announced again
        # a stored connection jobd may no longer open: logged, its jobs left as they are
        other = _begin_running_then_kill(tmp_path, run_dir, args)
        daemon = Jobd(run_dir, "--allow-uri", "sim:///default").wait_ready()
        try:
            _wait_for_log(daemon, "stored driver connection not recovered", "sim:///fourth")
            assert jobctl(daemon.uri(), "info", other).returncode != 0  # not served
        finally:
            assert daemon.stop() == 0
        assert _row(store, other) == ("running", 1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            if qpid:
                kill_and_reap({qpid})


def _begin_running_then_kill(tmp_path: Path, run_dir: Path, args: tuple[str, ...]) -> str:
    daemon = Jobd(run_dir, *args).wait_ready()
    try:
        job = _begin(
            daemon.uri(f"rate={MiB}", host="fourth"),
            "vm1",
            write_file(tmp_path, "fourth.xml", BACKUP_VDB.format(tag="f")),
        )
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    return job
