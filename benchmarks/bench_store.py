"""The durable store's cost: begin→completed of instant sim jobs with the SQLite store
vs the memory store, in the same run (issue 10's target: ≥ 0.5× the memory store's
throughput).

Two shapes: one client beginning and waiting for one job at a time (every job waits for
two commits: its row before the driver starts it, its end before the waiter learns it),
and ``CLIENTS`` clients at once (their writes share commits: group commit). The SQLite
file is on the temporary directory's file system, ``synchronous=NORMAL`` (the default) and
``FULL``; and, as jobd sees them (a remote client's typed spec travels as job XML), jobs begun
from job XML by ``CLIENTS`` clients: a spec parsed from XML is known to round-trip, so the
writer formats its row without parsing it again (jobcore.xml.common.round_trips), while a
spec built in Python keeps that self-check. Besides jobs/s (wall time, which a machine
shared with other work disturbs) each line gives the process's CPU time per job (both
threads: the event loop and the store's writer), whose ratio is steadier.

    python -m benchmarks.bench_store
    BENCH_STORE_JOBS=5000 python -m benchmarks.bench_store
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import jobcore
from jobcore.backup import BackupDef, BackupDisk, BackupStore
from jobcore.types.backup import BackupJobSpec

N_JOBS = int(os.environ.get("BENCH_STORE_JOBS", "2000"))
CLIENTS = 32


def _spec(i: int) -> BackupJobSpec:
    return BackupJobSpec(
        BackupDef(disks=(BackupDisk("vdb", type=None, store=BackupStore(f"/bench/{i}.qcow2")),))
    )


def _doc(i: int) -> str:
    return (
        "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
        f"<target file='/bench/{i}.qcow2'/></disk></disks></domainbackup></job>"
    )


async def jobs_per_second(
    n: int, clients: int, store: str | None, *, from_xml: bool = False
) -> tuple[float, float]:
    """(jobs/s, CPU µs per job)."""
    # retention 0: ended jobs go at once, as in bench_engine (the rows are deleted too)
    async with jobcore.connect("sim:///default?rate=0", retention=0, store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        per = n // clients
        make = _doc if from_xml else _spec
        specs = [[make(c * per + i) for i in range(per)] for c in range(clients)]

        async def client(mine: list[Any]) -> None:
            for spec in mine:
                if from_xml:
                    job = await dom.job_begin(spec)
                else:
                    job = await dom.job_begin_spec(spec)
                await job.wait()

        start, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            for mine in specs:
                tg.start_soon(client, mine)
        done = per * clients
        return done / (time.perf_counter() - start), (time.process_time() - cpu) / done * 1e6


def measure(n: int = N_JOBS) -> list[tuple[str, float, float, float, float]]:
    """(shape, memory jobs/s, sqlite jobs/s, memory CPU µs/job, sqlite CPU µs/job) for
    each shape and synchronous mode."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for clients in (1, CLIENTS):
            memory, memory_cpu = anyio.run(jobs_per_second, n, clients, None)
            for sync in ("normal", "full"):
                path = Path(tmp) / f"jobs-{clients}-{sync}.sqlite"
                url = f"sqlite://{path}?synchronous={sync}"
                sqlite, sqlite_cpu = anyio.run(jobs_per_second, n, clients, url)
                shape = f"{clients} client{'s' if clients > 1 else ''}, synchronous={sync}"
                rows.append((shape, memory, sqlite, memory_cpu, sqlite_cpu))
        memory, memory_cpu = anyio.run(
            functools.partial(jobs_per_second, n, CLIENTS, None, from_xml=True)
        )
        url = f"sqlite://{Path(tmp) / 'jobs-xml.sqlite'}?synchronous=normal"
        sqlite, sqlite_cpu = anyio.run(
            functools.partial(jobs_per_second, n, CLIENTS, url, from_xml=True)
        )
        shape = f"{CLIENTS} clients, from XML, synchronous=normal"
        rows.append((shape, memory, sqlite, memory_cpu, sqlite_cpu))
    return rows


def main() -> None:
    print(f"begin→completed of {N_JOBS:,d} instant sim jobs: SQLite store vs memory store")
    for shape, memory, sqlite, memory_cpu, sqlite_cpu in measure():
        print(
            f"  {shape:44s} memory {memory:7,.0f} jobs/s  sqlite {sqlite:7,.0f} jobs/s  "
            f"ratio {sqlite / memory:.2f}× (target ≥ 0.5×)  CPU/job {memory_cpu:4.0f} vs "
            f"{sqlite_cpu:4.0f} µs: {memory_cpu / sqlite_cpu:.2f}×"
        )


if __name__ == "__main__":
    main()
