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

Beside each rate: the CPU time per job of jobd (all its threads: the event loop and the
store's writer, from /proc) and of the clients (each process's own, over its window): on
2 cores, 20 clients + jobd reach at most 2 s / (their sum) jobs/s, and jobd alone (one
event loop) at most 1 s / its own.

    python -m benchmarks.bench_jobd_clients
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import NamedTuple

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


class Run(NamedTuple):
    """One window: jobs/s, and CPU seconds per job of jobd and of the clients."""

    rate: float
    jobd_cpu: float
    client_cpu: float


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(
    sock: str, name: str, barrier: Barrier, window: float, out: mp.Queue[tuple[int, float]]
) -> None:
    import jobcore

    conn = jobcore.open(URI.format(sock=sock))
    try:
        dom = conn.createXML(DOMAIN.format(name=name))
        jobcore.JobWait(jobcore.JobBegin(dom, JOB.format(name=name, i="warm")))
        barrier.wait()
        done = 0
        cpu = time.process_time()
        end = time.monotonic() + window
        while time.monotonic() < end:
            info = jobcore.JobWait(jobcore.JobBegin(dom, JOB.format(name=name, i=done)))
            assert info.state == jobcore.JobState.COMPLETED, info
            done += 1
        out.put((done, time.process_time() - cpu))
    finally:
        conn.close()


def jobs_per_second(sock: Path, clients: int, run: int, jobd_pid: int | None = None) -> Run:
    ctx = mp.get_context("fork")  # jobcore imported once, before any connection exists
    barrier = ctx.Barrier(clients + 1)
    out: mp.Queue[tuple[int, float]] = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(str(sock), f"c{run}x{clients}n{i}", barrier, WINDOW, out))
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=120)
    started = time.monotonic()
    jobd_cpu = 0.0 if jobd_pid is None else _cpu_seconds(jobd_pid)
    results = [out.get(timeout=120) for _ in procs]
    elapsed = max(time.monotonic() - started, WINDOW)
    if jobd_pid is not None:  # jobd's over the window (it went on a little past it)
        jobd_cpu = _cpu_seconds(jobd_pid) - jobd_cpu
    for proc in procs:
        proc.join(30)
        if proc.exitcode != 0:
            raise RuntimeError(f"a client exited with status {proc.exitcode}")
    total = sum(done for done, _ in results)
    return Run(
        total / elapsed, jobd_cpu / max(total, 1), sum(c for _, c in results) / max(total, 1)
    )


def _line(label: str, run: Run) -> str:
    return (
        f"  {label} {run.rate:8.0f} jobs/s; CPU per job: jobd {run.jobd_cpu * 1e6:4.0f} us, "
        f"clients {run.client_cpu * 1e6:4.0f} us"
    )


def main() -> None:
    import jobcore  # noqa: F401  # imported before the clients fork

    for store, args in STORES.items():
        with tempfile.TemporaryDirectory(prefix="bench-jobd-clients-") as tmp:
            run_dir = Path(tmp) / "run"
            proc = _start_jobd(run_dir, *args)
            try:
                sock = run_dir / "jobd.sock"
                one = max(jobs_per_second(sock, 1, r, proc.pid) for r in range(REPEATS))
                many = max(jobs_per_second(sock, CLIENTS, r, proc.pid) for r in range(REPEATS))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
        verdict = "met" if many.rate >= TARGET else "NOT met"
        print(f"jobd, {store} store: begin+wait of instant sim jobs")
        print(_line("1 client:  ", one))
        print(_line(f"{CLIENTS} clients:", many))
        print(
            f"  {CLIENTS} clients: {many.rate / one.rate:.1f}x one client; "
            f"target >= {TARGET:.0f} jobs/s: {verdict}"
        )


if __name__ == "__main__":
    main()
