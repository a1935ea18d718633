"""A QEMU that stops answering while jobd starts a job on it (SIGSTOP stands in for a hung
QEMU): every QMP command has a time limit (drivers.qemu.process.QMP_TIMEOUT, shortened
here), so the shielded start fails with the timeout's message and SIGTERM still ends jobd
within its shutdown grace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jobd_helpers import ROOT, RawClient
from qemu_helpers import create, domain_xml, kill_and_reap

from jobcore.daemon.config import SHUTDOWN_GRACE

QMP_TIMEOUT = 1.0
_LAUNCH = (
    "import sys, drivers.qemu.process as p; p.QMP_TIMEOUT = float(sys.argv[1]); "
    "from jobcore.daemon.main import main; main(sys.argv[2:], prog_name='jobd')"
)


def test_hung_qemu_start_fails_in_time_and_sigterm_ends_jobd(tmp_path: Path) -> None:
    run, qdir = tmp_path / "run", tmp_path / "qemu"
    log = tmp_path / "jobd.log"
    jobd = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(QMP_TIMEOUT), "--run-dir", str(run),
         "--allow-uri", f"qemu:///session?dir={qdir}", "--log-file", str(log)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    qpid = 0
    try:
        deadline = time.monotonic() + 20
        while not (run / "jobd-ro.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s = RawClient.ready(run / "jobd.sock", f"qemu:///session?dir={qdir}", timeout=30)
        disk = create(tmp_path / "d.qcow2")
        assert s.call("create_domain", domain_xml("d1", {"vda": disk}))[0] == 1
        qpid = int(next(qdir.glob("d1.*.pid")).read_text())
        os.kill(qpid, signal.SIGSTOP)
        job = (
            "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
            f"<target file='{tmp_path}/t.qcow2'/></disk></disks></domainbackup></job>"
        )
        t0 = time.monotonic()
        s.send([0, 3, "job_begin", ["d1", job, 0]])
        time.sleep(0.3)  # the start is under way, waiting for QEMU
        jobd.send_signal(signal.SIGTERM)
        jobd.wait(timeout=SHUTDOWN_GRACE + 4 * QMP_TIMEOUT + 5)  # jobd ended (it closes
        took = time.monotonic() - t0  # its clients at once: the begin gets no reply)
        assert took < SHUTDOWN_GRACE + 4 * QMP_TIMEOUT + 5, took
        s.close()
        ended = [json.loads(line) for line in log.read_text().splitlines() if "job ended" in line]
        assert len(ended) == 1 and ended[0]["state"] == "failed", ended
        assert f"did not answer QMP 'blockdev-add' within {QMP_TIMEOUT:g} s" in ended[0]["errmsg"]
    finally:
        if qpid:
            with contextlib.suppress(ProcessLookupError):  # jobd may have ended it
                os.kill(qpid, signal.SIGCONT)
                kill_and_reap({qpid})
        if jobd.poll() is None:
            jobd.kill()
            jobd.wait()
