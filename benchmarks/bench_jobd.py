"""jobStats calls per second: in-process vs through jobd, in the same run.

Both sides use the blocking facade (``dom.jobStats()``, libvirt-python's call) with a push
backup running, so every call resolves the legacy alias and computes live stats. The jobd
side starts a real daemon on a temporary run directory and talks to it over its UNIX
socket. libvirtd is measured only where libvirt-python and a libvirtd are available.

    python -m benchmarks.bench_jobd
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jobcore
from jobcore.facade import BlockingConnection

N_CALLS = 5000
WARMUP = 200
BACKUP = (
    "<domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/bench-vdb.qcow2'/></disk></disks></domainbackup>"
)
SLOW = "rate=1048576"  # the backup keeps running for the whole measurement


def calls_per_second(conn: BlockingConnection, n: int = N_CALLS) -> float:
    dom = conn.lookupByName("vm1")
    dom.backupBegin(BACKUP, None)
    try:
        for _ in range(WARMUP):
            dom.jobStats()
        start = time.perf_counter()
        for _ in range(n):
            stats = dom.jobStats()
        elapsed = time.perf_counter() - start
        assert stats["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_BACKUP
    finally:
        dom.abortJob()
    return n / elapsed


def _start_jobd(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobcore.daemon",
            "--run-dir",
            str(run_dir),
            "--log-level",
            "error",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = run_dir / "jobd.sock"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jobd exited with status {proc.returncode}")
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(sock))
                    return proc
                except OSError:
                    pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("jobd did not start")


def libvirt_note() -> str:
    try:
        import libvirt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "libvirtd: skipped (libvirt-python is not installed on this machine)"
    return (
        "libvirtd: skipped (libvirt-python is installed, but this benchmark needs a "
        "libvirtd with a running domain and a backup job; see shared/research/libvirtd.md "
        "for measured figures: about 690-1100 jobStats/s with a backup running)"
    )


def main() -> None:
    local_conn = jobcore.open(f"sim:///default?{SLOW}")
    try:
        local = calls_per_second(local_conn)
    finally:
        local_conn.close()
    with tempfile.TemporaryDirectory(prefix="bench-jobd-") as tmp:
        run_dir = Path(tmp) / "run"
        proc = _start_jobd(run_dir)
        try:
            remote_conn = jobcore.open(f"sim+unix:///default?socket={run_dir}/jobd.sock&{SLOW}")
            try:
                remote = calls_per_second(remote_conn)
            finally:
                remote_conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    print(f"jobStats in-process:   {local:10.0f} calls/s ({1e6 / local:7.1f} µs/call)")
    print(f"jobStats through jobd: {remote:10.0f} calls/s ({1e6 / remote:7.1f} µs/call)")
    print(f"in-process / jobd:     {local / remote:10.1f}x")
    print(libvirt_note())


if __name__ == "__main__":
    main()
