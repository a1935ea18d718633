"""``jobctl list`` against a running jobd vs ``virsh list`` against libvirtd, wall time.

Both are whole processes, started the way a user starts them (the ``jobctl`` script of
this environment; ``virsh`` on PATH), each listing one item: jobd runs one slow backup,
libvirtd one transient TCG domain (benchmarks/_libvirtd.py). Each command runs ``RUNS``
times in turn with the other; the best and the median of each are reported, with the
ratio against issue 14's target (jobctl list ≤ 3× virsh list). Output is captured (a
pipe), as a script or a monitoring program reads it; both are measured on a
pseudo-terminal too, where jobctl draws rich's table (informative: jobctl's fast start
answers piped output only, design/daemon.md "Starting at once"). The interpreter's own start
(``python -c pass``) is shown for scale, and so is the floor of the fast start's libraries
(an interpreter that only imports msgpack and _socket: the ``jobctl`` script answers a
remote ``list`` without click, attrs or cattrs, design/daemon.md "Starting at once"), and
the same ``list`` through the click command, as every other command runs.

Bytecode: an installed jobcore has its ``.pyc`` files (pip compiles them); this editable
checkout has none, and where ``PYTHONDONTWRITEBYTECODE`` is set (as in the sandbox these
benchmarks were written in) every start compiles jobcore's sources again. The ratio is
measured as installed: jobctl runs with a bytecode cache of its own in the temporary
directory (``PYTHONPYCACHEPREFIX``, filled by one uncounted run); the figure without any
cache is shown too.

    python -m benchmarks.bench_cli
"""

from __future__ import annotations

import contextlib
import os
import pty
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


def _wall(cmd: list[str], expect: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or expect not in done.stdout:
        raise RuntimeError(f"{' '.join(cmd)}: status {done.returncode}: {done.stdout}{done.stderr}")
    return elapsed


def _wall_on_terminal(cmd: list[str], expect: str, env: dict[str, str] | None = None) -> float:
    """``_wall`` with stdout and stderr on a pseudo-terminal, as a user at a shell runs it."""
    primary, secondary = pty.openpty()
    try:
        start = time.perf_counter()
        done = subprocess.run(
            cmd, stdout=secondary, stderr=secondary, timeout=60, check=False, env=env
        )
        elapsed = time.perf_counter() - start
        os.set_blocking(primary, False)
        out = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(primary, 65536):
                out += chunk
    finally:
        os.close(primary)
        os.close(secondary)
    text = out.decode(errors="replace")
    if done.returncode != 0 or expect not in text:
        raise RuntimeError(f"{' '.join(cmd)} on a terminal: status {done.returncode}: {text}")
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
                measure(uri, job, Path(tmp) / "pycache")
            finally:
                conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def measure(uri: str, job: str, pycache: Path) -> None:
    jobctl = [_jobctl(), "-c", uri, "list"]
    python = [sys.executable, "-c", "pass"]
    libraries = [sys.executable, "-c", "import msgpack, _socket"]
    click_list = [
        sys.executable,
        "-c",
        "import sys; from jobcore.cli.app import main; main(sys.argv[1:], prog_name='jobctl')",
        "-c",
        uri,
        "list",
    ]
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached["PYTHONPYCACHEPREFIX"] = str(pycache)
    uncached = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    uncached["PYTHONDONTWRITEBYTECODE"] = "1"  # jobcore compiled at each start, as here
    _wall(jobctl, job[:8], cached)  # fills the cache
    times: dict[str, list[float]] = {
        "jobctl": [],
        "uncached": [],
        "virsh": [],
        "python": [],
        "libraries": [],
        "click": [],
        "jobctl tty": [],
        "virsh tty": [],
    }
    try:
        with _libvirtd.libvirtd() as lv, _libvirtd.bench_domain(lv, data_mib=0) as dom:
            virsh = ["virsh", "-c", lv.uri, "list"]
            for _ in range(RUNS):
                times["jobctl"].append(_wall(jobctl, job[:8], cached))
                times["virsh"].append(_wall(virsh, dom.name))
                times["uncached"].append(_wall(jobctl, job[:8], uncached))
                times["python"].append(_wall(python, "", cached))
                times["libraries"].append(_wall(libraries, "", cached))
                times["click"].append(_wall(click_list, job[:8], cached))
                times["jobctl tty"].append(_wall_on_terminal(jobctl, job[:8], cached))
                times["virsh tty"].append(_wall_on_terminal(virsh, dom.name))
    except _libvirtd.LibvirtdUnavailable as exc:
        times["jobctl"] = [_wall(jobctl, job[:8], cached) for _ in range(RUNS)]
        print(_row("jobctl list (through jobd)", times["jobctl"]))
        print(_libvirtd.loud(exc))
        return
    print(_row("jobctl list (through jobd)", times["jobctl"]))
    print(_row("virsh list (libvirtd)", times["virsh"]))
    print(_row("jobctl list, no jobcore .pyc", times["uncached"]))
    print(_row("python -c pass", times["python"]))
    print(_row("python: msgpack+_socket", times["libraries"]))
    print(_row("jobctl list, click command", times["click"]))
    print(_row("jobctl list on a terminal", times["jobctl tty"]))
    print(_row("virsh list on a terminal", times["virsh tty"]))
    tty = min(times["jobctl tty"]) / min(times["virsh tty"])
    print(f"on a terminal (rich's table; informative): jobctl / virsh best {tty:.1f}x")
    best = min(times["jobctl"]) / min(times["virsh"])
    median = statistics.median(times["jobctl"]) / statistics.median(times["virsh"])
    verdict = "met" if best <= TARGET else "NOT met"
    print(
        f"jobctl / virsh: best {best:.1f}x, median {median:.1f}x "
        f"(target <= {TARGET:.0f}x: {verdict}; {RUNS} runs each, taking turns)"
    )


if __name__ == "__main__":
    main()
