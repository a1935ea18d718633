"""The headline of durable jobs, through jobd on real QEMU: a jobd killed with SIGKILL
while a throttled push backup copies leaves the guest running; a new jobd on the same run
dir re-attaches the job (CONTRACT.md, "Durability and recovery"), which then completes
with the right data (qemu-img compare), and destroying the domain leaves no QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from jobd_helpers import Jobd, jobctl
from jobd_helpers import write as write_file
from qemu_helpers import create, domain_xml, kill_and_reap, run, write

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone(pid: int, timeout: float = 10.0) -> None:
    """The process exits (its reaper is not jobd: the QEMU outlived the jobd that
    started it, so its parent is now init or a subreaper)."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if _alive(pid) else "gone"
    assert state in ("gone", "Z"), f"QEMU {pid} still runs ({state})"


def test_a_guest_and_its_backup_outlive_a_killed_jobd(tmp_path: Path) -> None:
    run_dir, qdir = tmp_path / "run", tmp_path / "qemu"
    allow = ("--allow-uri", f"qemu:///session?dir={qdir}")

    def uri(extra: str = "") -> str:
        return f"qemu+unix:///session?dir={qdir}{extra}&socket={run_dir / 'jobd.sock'}"

    disk = create(tmp_path / "d.qcow2", "64M")
    write(disk, "write -P 0x5a 0 40M")
    target = tmp_path / "t.qcow2"
    job_xml = (
        "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
        f"<target file='{target}'/></disk></disks></domainbackup></job>"
    )
    qpid = 0
    daemon = Jobd(run_dir, *allow).wait_ready()
    try:
        made = jobctl(
            uri(f"&backup_bandwidth={4 * MiB}"),
            "domain", "create", write_file(tmp_path, "d.xml", domain_xml("d1", {"vda": disk})),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        qpid = int(next(qdir.glob("d1.*.pid")).read_text())
        began = jobctl(uri(), "begin", "d1", write_file(tmp_path, "b.xml", job_xml))
        assert began.returncode == 0, began.stderr
        job = began.stdout.strip()
        info = json.loads(jobctl(uri(), "info", job, "--json").stdout)
        assert info["state"] == "running", info  # 40 MiB at 4 MiB/s: about 10 s
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    try:
        assert _alive(qpid), "the guest died with jobd"
        daemon = Jobd(run_dir, *allow).wait_ready()
        try:
            shown = jobctl(uri(), "info", job, "--json")
            assert shown.returncode == 0, shown.stderr
            info = json.loads(shown.stdout)
            assert info["state"] in ("running", "completed"), info
            assert info["errmsg"] is None, info
            domains = jobctl(uri(), "domains")
            assert "d1" in domains.stdout, domains.stdout + domains.stderr
            if info["state"] == "running":
                assert jobctl(uri(), "set-speed", job, "0").returncode == 0  # verbs work
            waited = jobctl(uri(), "wait", job, timeout=120)
            assert waited.returncode == 0, waited.stdout + waited.stderr
            assert jobctl(uri(), "domain", "destroy", "d1").returncode == 0
            _gone(qpid)
            run("qemu-img", "compare", "-q", str(disk), str(target))  # same data
        finally:
            assert daemon.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            if qpid and _alive(qpid):
                kill_and_reap({qpid})
