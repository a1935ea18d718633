"""``jobctl list`` against a running jobd vs ``virsh list`` against libvirtd, wall time.

Both are whole processes, started the way a user starts them (the ``jobctl`` script of
this environment; ``virsh`` on PATH), each listing one item: jobd runs one slow backup,
libvirtd one transient TCG domain (benchmarks/_libvirtd.py). Each command runs ``RUNS``
times in turn with the other; the best and the median of each are reported, with the
ratio against issue 14's target (jobctl list ≤ 3× virsh list). The interpreter's own start
(``python -c pass``) is shown for scale.

    python -m benchmarks.bench_cli
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jobcore
from benchmarks import _libvirtd
from benchmarks.bench_jobd import BACKUP, SLOW, _start_jobd

RUNS = 15
TARGET = 3.0


def _wall(cmd: list[str], expect: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or expect not in done.stdout:
        raise RuntimeError(f"{' '.join(cmd)}: status {done.returncode}: {done.stdout}{done.stderr}")
    return elapsed


def _jobctl() -> str:
    script = Path(sys.executable).parent / "jobctl"
    if not script.exists():
        raise RuntimeError(f"no jobctl script beside {sys.executable}: pip install -e .")
    return str(script)


def _row(name: str, times: list[float]) -> str:
    best, median = min(times), statistics.median(times)
    return f"{name:<28} best {best * 1e3:7.1f} ms   median {median * 1e3:7.1f} ms"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        run_dir = Path(tmp) / "run"
        proc = _start_jobd(run_dir)
        try:
            uri = f"sim+unix:///default?socket={run_dir}/jobd.sock&{SLOW}"
            conn = jobcore.open(uri)
            try:
                conn.lookupByName("vm1").backupBegin(BACKUP, None)
                job = str(conn.lookupByName("vm1").listJobs()[0].uuid)
                measure(uri, job)
            finally:
                conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def measure(uri: str, job: str) -> None:
    jobctl = [_jobctl(), "-c", uri, "list"]
    python = [sys.executable, "-c", "pass"]
    try:
        with _libvirtd.libvirtd() as lv, _libvirtd.bench_domain(lv, data_mib=0) as dom:
            virsh = ["virsh", "-c", lv.uri, "list"]
            times: dict[str, list[float]] = {"jobctl": [], "virsh": [], "python": []}
            for _ in range(RUNS):
                times["jobctl"].append(_wall(jobctl, job[:8]))
                times["virsh"].append(_wall(virsh, dom.name))
                times["python"].append(_wall(python, ""))
    except _libvirtd.LibvirtdUnavailable as exc:
        print(loud_only_jobctl(jobctl, job, exc))
        return
    print(_row("jobctl list (through jobd)", times["jobctl"]))
    print(_row("virsh list (libvirtd)", times["virsh"]))
    print(_row("python -c pass", times["python"]))
    best = min(times["jobctl"]) / min(times["virsh"])
    median = statistics.median(times["jobctl"]) / statistics.median(times["virsh"])
    verdict = "met" if best <= TARGET else "NOT met"
    print(
        f"jobctl / virsh: best {best:.1f}x, median {median:.1f}x "
        f"(target <= {TARGET:.0f}x: {verdict}; {RUNS} runs each)"
    )


def loud_only_jobctl(jobctl: list[str], job: str, reason: object) -> str:
    times = [_wall(jobctl, job[:8]) for _ in range(RUNS)]
    return _row("jobctl list (through jobd)", times) + "\n" + _libvirtd.loud(reason)


if __name__ == "__main__":
    main()
