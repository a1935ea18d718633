"""jobStats calls per second: in-process, through jobd and through libvirtd, in one run.

The jobcore sides use the blocking facade (``dom.jobStats()``, libvirt-python's call) with
a push backup running, so every call resolves the legacy alias and computes live stats.
The jobd side starts a real daemon on a temporary run directory and talks to it over its
UNIX socket. libvirtd is a real one with a TCG domain (benchmarks/_libvirtd.py; ``make
bench`` installs it), measured with libvirt-python under /usr/bin/python3: idle (no job:
libvirtd answers from its own state) and while a push backup copies (it asks QEMU). Each
rate is the best of ``REPEATS`` rounds, the sides taking turns. The ratios are issue 14's
targets: in-process >= 12x libvirtd idle, jobd >= 1.8x libvirtd idle. jobd is measured
twice: as shipped (busy-poll on both sides: design/daemon.md "Busy-poll") and with
busy-polling off on both (``--busy-poll-us 0``, ``jobcore.remote.BUSY_POLL_US = 0``),
the path before it. If libvirtd cannot run, the benchmark says so loudly and reports
jobcore alone.

    python -m benchmarks.bench_jobd
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import jobcore
import jobcore.remote
from benchmarks import _libvirtd
from jobcore.facade import BlockingConnection

N_CALLS = 5000
REPEATS = 3
#: issue 14's targets, as multiples of libvirtd's idle rate measured in the same run
IN_PROCESS_TARGET = 12.0
JOBD_TARGET = 1.8
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


def _verdict(ratio: float, target: float) -> str:
    return f"{ratio:6.2f}x  (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})"


def main() -> None:
    best: dict[str, float] = {}

    def keep(name: str, rate: float) -> None:
        best[name] = max(best.get(name, 0.0), rate)

    with ExitStack() as stack:
        lv_error: Exception | None = None
        try:
            lv = stack.enter_context(_libvirtd.libvirtd())
            dom = stack.enter_context(_libvirtd.bench_domain(lv))
        except _libvirtd.LibvirtdUnavailable as exc:
            lv_error = exc
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-jobd-"))
        run_dir = Path(tmp) / "run"
        plain_dir = Path(tmp) / "plain"
        proc = _start_jobd(run_dir)
        plain = _start_jobd(plain_dir, "--busy-poll-us", "0")
        polling = jobcore.remote.BUSY_POLL_US
        try:
            for _ in range(REPEATS):
                if lv_error is None:
                    try:
                        keep(
                            "libvirtd idle", _libvirtd.measure(lv, dom, "idle", N_CALLS).per_second
                        )
                    except _libvirtd.LibvirtdUnavailable as exc:
                        lv_error = exc
                local_conn = jobcore.open(f"sim:///default?{SLOW}")
                try:
                    keep("in-process", calls_per_second(local_conn))
                finally:
                    local_conn.close()
                remote_conn = jobcore.open(f"sim+unix:///default?socket={run_dir}/jobd.sock&{SLOW}")
                try:
                    keep("jobd", calls_per_second(remote_conn))
                finally:
                    remote_conn.close()
                jobcore.remote.BUSY_POLL_US = 0  # read when the socket opens
                try:
                    plain_conn = jobcore.open(
                        f"sim+unix:///default?socket={plain_dir}/jobd.sock&{SLOW}"
                    )
                finally:
                    jobcore.remote.BUSY_POLL_US = polling
                try:
                    keep("jobd, no busy-poll", calls_per_second(plain_conn))
                finally:
                    plain_conn.close()
            if lv_error is None:
                try:  # once: each round copies the whole disk
                    keep(
                        "libvirtd copying",
                        _libvirtd.measure(lv, dom, "copying", N_CALLS).per_second,
                    )
                except _libvirtd.LibvirtdUnavailable as exc:
                    print(_libvirtd.loud(f"the copying figure: {exc}"))
        finally:
            for daemon in (proc, plain):
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(15)
    local, remote = best["in-process"], best["jobd"]
    print(f"jobStats in-process:   {local:10.0f} calls/s ({1e6 / local:7.1f} µs/call)")
    print(f"jobStats through jobd: {remote:10.0f} calls/s ({1e6 / remote:7.1f} µs/call)")
    off = best["jobd, no busy-poll"]
    us = 1e6 / off
    gain = remote / off
    print(f"  busy-poll off:       {off:10.0f} calls/s ({us:7.1f} µs/call; on/off {gain:.2f}x)")
    print(f"in-process / jobd:     {local / remote:10.1f}x")
    if lv_error is not None:
        print(_libvirtd.loud(lv_error))
        return
    idle = best["libvirtd idle"]
    print(f"libvirtd, idle domain: {idle:10.0f} calls/s ({1e6 / idle:7.1f} µs/call; no job)")
    copying = best.get("libvirtd copying")
    if copying:
        us = 1e6 / copying
        print(f"libvirtd, copying:     {copying:10.0f} calls/s ({us:7.1f} µs/call; push backup)")
    print(f"in-process / libvirtd idle: {_verdict(local / idle, IN_PROCESS_TARGET)}")
    print(f"jobd / libvirtd idle:       {_verdict(remote / idle, JOBD_TARGET)}")
    if copying:
        print(f"jobd / libvirtd copying:    {remote / copying:6.2f}x")
    print(f"(best of {REPEATS} rounds of {N_CALLS} calls each; libvirtd copying: one backup)")


if __name__ == "__main__":
    main()
