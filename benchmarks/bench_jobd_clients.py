"""Instant sim jobs through jobd: 20 clients (and 1) × begin+wait, jobs/s over the run.

A real jobd serves ``sim:///default?rate=0``, measured twice: with its default durable
store (SQLite in the run directory, as bench_jobd starts it: each job's row is committed
before it starts and its outcome before a waiter learns it) and with ``--store memory:``
(jobd's own path alone, as bench_engine measures the engine). Each client is a process
of its own (as 20 monitoring or backup programs would be: none shares another's
interpreter, so the figure is jobd's and not one client process's GIL) with its own
blocking connection
(``jobcore.open``) and its own domain, so that no job waits for another's claims. Every
client loops ``JobBegin`` + ``JobWait`` of an instant backup for the same wall-clock
window, started together; jobs/s = all jobs completed / the window. The baseline in the
same run is 1 client alone (its jobs/s is jobd's sequential round-trip rate).

    python -m benchmarks.bench_jobd_clients
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

from benchmarks.bench_jobd import _start_jobd

CLIENTS = 20
WINDOW = 2.0  # seconds each client keeps beginning and waiting jobs
REPEATS = 2  # the best window of these is reported (the machine is shared)
STORES = {"SQLite (default)": (), "memory": ("--store", "memory:")}
TARGET = 3000.0  # jobs/s with 20 clients (issue 14)
URI = "sim+unix:///default?socket={sock}&rate=0"
DOMAIN = (
    "<domain type='test'><name>{name}</name><devices><disk type='file' device='disk'>"
    "<source file='/var/lib/sim/{name}/vda.qcow2'/><target dev='vda'/></disk></devices>"
    "</domain>"
)
JOB = (
    "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
    "<target file='/bench/{name}/{i}.qcow2'/></disk></disks></domainbackup></job>"
)


def _client(sock: str, name: str, barrier: Barrier, window: float, out: mp.Queue[int]) -> None:
    import jobcore

    conn = jobcore.open(URI.format(sock=sock))
    try:
        dom = conn.createXML(DOMAIN.format(name=name))
        jobcore.JobWait(jobcore.JobBegin(dom, JOB.format(name=name, i="warm")))
        barrier.wait()
        done = 0
        end = time.monotonic() + window
        while time.monotonic() < end:
            info = jobcore.JobWait(jobcore.JobBegin(dom, JOB.format(name=name, i=done)))
            assert info.state == jobcore.JobState.COMPLETED, info
            done += 1
        out.put(done)
    finally:
        conn.close()


def jobs_per_second(sock: Path, clients: int, run: int) -> float:
    ctx = mp.get_context("fork")  # jobcore imported once, before any connection exists
    barrier = ctx.Barrier(clients + 1)
    out: mp.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(str(sock), f"c{run}x{clients}n{i}", barrier, WINDOW, out))
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=120)
    started = time.monotonic()
    total = sum(out.get(timeout=120) for _ in procs)
    elapsed = max(time.monotonic() - started, WINDOW)
    for proc in procs:
        proc.join(30)
        if proc.exitcode != 0:
            raise RuntimeError(f"a client exited with status {proc.exitcode}")
    return total / elapsed


def main() -> None:
    import jobcore  # noqa: F401  # imported before the clients fork

    for store, args in STORES.items():
        with tempfile.TemporaryDirectory(prefix="bench-jobd-clients-") as tmp:
            run_dir = Path(tmp) / "run"
            proc = _start_jobd(run_dir, *args)
            try:
                sock = run_dir / "jobd.sock"
                one = max(jobs_per_second(sock, 1, r) for r in range(REPEATS))
                many = max(jobs_per_second(sock, CLIENTS, r) for r in range(REPEATS))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
        verdict = "met" if many >= TARGET else "NOT met"
        print(f"jobd, {store} store: begin+wait of instant sim jobs")
        print(f"  1 client:   {one:8.0f} jobs/s")
        print(
            f"  {CLIENTS} clients: {many:8.0f} jobs/s ({many / one:.1f}x one client; "
            f"target >= {TARGET:.0f}: {verdict})"
        )


if __name__ == "__main__":
    main()
