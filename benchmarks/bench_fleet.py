"""Lookup of a job on another host with 100,000 jobs in the fleet (issue 12's second
benchmark), µs per call, against the same lookup of a local job in the same process.

The fleet's database holds ``N_JOBS`` job rows: real ended jobs of the measuring member
``hv1`` (one per local lookup) and the rest copies of a real ended job, bulk-inserted
with COPY under two other hosts (``hv2``, ``hv3``, with live ``hosts`` rows), UUIDs
random. Every lookup names a job its connection has not looked up before (jobd keeps
each session's handles: a second lookup would be a cache hit). Two shapes:

- in process: ``jobcore.fleet.Fleet.job(uuid)`` of another host's job (one indexed read of
  its row, off the event loop) vs ``conn.lookup_job(uuid)`` of a local job on an in-process
  connection on the same store (found in memory): the baseline;
- through jobd: a jobd member ``hv1`` on that database, a client's ``lookup_job`` of
  another host's UUID (the member misses in memory and reads the fleet's row) vs its
  ``lookup_job`` of one of the member's own jobs: the baseline, one round trip.

The server is a private one on a unix socket in a temporary directory (tests/pg_helpers.py,
``fsync=off``), or the one ``BENCH_PG_URL`` names (a fresh, empty database).

    python -m benchmarks.bench_fleet
    BENCH_FLEET_JOBS=20000 python -m benchmarks.bench_fleet
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg

import jobcore

ROOT = Path(__file__).resolve().parents[1]
N_JOBS = int(os.environ.get("BENCH_FLEET_JOBS", "100000"))
#: lookups per timed run; the best of ROUNDS runs counts. Every lookup of a run names a
#: job not looked up before on that connection (jobd keeps a session's handles: a second
#: lookup of one UUID is a cache hit, on either side)
CALLS = int(os.environ.get("BENCH_FLEET_CALLS", "1000"))
ROUNDS = 3
WARMUP = 50
#: the measuring member's own jobs (real ones, begun through its engine): one per lookup
LOCAL_JOBS = WARMUP + CALLS * ROUNDS
#: an instant backup (the sim at rate 0), kept a day: ended jobs a lookup finds
INSTANT = (
    "<job type='backup'><retention seconds='86400'/><domainbackup><disks>"
    "<disk name='vdb' type='file'><target file='/bench-fleet/{tag}.qcow2'/></disk>"
    "</disks></domainbackup></job>"
)
REMOTE_HOSTS = ("hv2", "hv3")
#: the retention caps, raised above the local jobs' count (none is evicted)
KEEP = 100_000


def _local_jobs(url: str, host: str, n: int) -> list[str]:
    """``n`` instant jobs begun and ended on ``host`` in process; their UUIDs."""

    async def begin() -> list[str]:
        from jobcore.local import connect_local

        found = []
        async with connect_local(
            "sim:///default?rate=0",
            store=url,
            host=host,
            max_retained_per_domain=KEEP,
            max_retained=KEEP,
        ) as conn:
            dom = await conn.lookup_domain("vm1")
            for _ in range(n):
                job = await dom.job_begin(INSTANT.format(tag=uuid.uuid4()))
                await job.wait(30)
                found.append(str(job.uuid))
        return found

    return anyio.run(begin)


def fill(url: str, n: int) -> list[str]:
    """The fleet's rows: hv1's real jobs, then ``n`` less those in copies of a real ended
    job under the other hosts (COPY); the other hosts' UUIDs."""
    (template,) = _local_jobs(url, "template", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
                " AND column_name NOT IN ('seq', 'uuid', 'host') ORDER BY ordinal_position"
            )
        ]
        names = ", ".join(cols)
        row = conn.execute(
            f"SELECT {names} FROM jobs WHERE uuid = %s".encode(), (template,)
        ).fetchone()
        assert row is not None
        conn.execute("DELETE FROM jobs WHERE host = 'template'")
        remote = [str(uuid.uuid4()) for _ in range(n)]
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY jobs (uuid, host, {names}) FROM STDIN".encode()) as copy,
        ):
            for i, job in enumerate(remote):
                copy.write_row((job, REMOTE_HOSTS[i % 2], *row))
        for host in REMOTE_HOSTS:  # members that renew their lease (a long one, for the run)
            conn.execute(
                "INSERT INTO hosts (host, pid, joined, renewed, lease_ttl)"
                " VALUES (%s, 1, now(), now(), 1e9)",
                (host,),
            )
        conn.execute("ANALYZE jobs")
    return remote


async def per_call(lookup: Callable[[str], Awaitable[Any]], jobs: list[str]) -> float:
    """µs per call of ``lookup``, each of a job of ``jobs`` once, best of ROUNDS."""
    assert len(jobs) >= LOCAL_JOBS
    for job in jobs[:WARMUP]:
        await lookup(job)
    best = float("inf")
    for r in range(ROUNDS):
        batch = jobs[WARMUP + r * CALLS : WARMUP + (r + 1) * CALLS]
        start = time.perf_counter()
        for job in batch:
            await lookup(job)
        best = min(best, (time.perf_counter() - start) / CALLS * 1e6)
    return best


async def in_process(url: str, local: list[str], remote: list[str]) -> tuple[float, float]:
    """(Fleet.job of another host's job, lookup_job of a local one) in µs per call."""
    from jobcore.fleet import Fleet
    from jobcore.local import connect_local
    from jobcore.store_pg import open_pg_database

    async with connect_local(
        "sim:///default?rate=0",
        store=url,
        host="hv1",
        max_retained_per_domain=KEEP,
        max_retained=KEEP,
    ) as conn:
        db = await anyio.to_thread.run_sync(open_pg_database, url, "hv1")
        try:
            fleet = Fleet(db)

            async def fleet_job(job: str) -> None:
                found = await fleet.job(uuid.UUID(job))
                assert found is not None and found.info.host in REMOTE_HOSTS

            async def local_job(job: str) -> None:
                assert (await conn.lookup_job(job)).uuid == uuid.UUID(job)

            return await per_call(fleet_job, remote), await per_call(local_job, local)
        finally:
            db.release()


async def through_jobd(sock: Path, local: list[str], remote: list[str]) -> tuple[float, float]:
    """A jobd client's lookup_job of another host's job and of the member's own."""
    async with jobcore.connect(f"sim+unix:///default?socket={sock}&rate=0") as conn:

        async def lookup(job: str) -> None:
            assert (await conn.lookup_job(job)).uuid == uuid.UUID(job)

        return await per_call(lookup, remote), await per_call(lookup, local)


def measure(n: int = N_JOBS) -> dict[str, tuple[float, float]]:
    """shape -> (µs per lookup of another host's job, µs per lookup of a local one)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from jobd_helpers import Jobd
    from pg_helpers import PgServer

    given = os.environ.get("BENCH_PG_URL")
    server = None if given else PgServer()
    try:
        url = str(given) if server is None else server.create_database()
        local = _local_jobs(url, "hv1", LOCAL_JOBS)
        remote = fill(url, n - LOCAL_JOBS)
        sample = random.Random(12).sample(remote, LOCAL_JOBS)
        results = {"in process": anyio.run(in_process, url, local, sample)}
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            config = Path(tmp) / "jobd.toml"
            config.write_text(f"max_retained_per_domain = {KEEP}\nmax_retained = {KEEP}\n")
            jobd = Jobd(Path(tmp) / "run", "--store", url, "--host", "hv1", "--config", str(config))
            try:
                jobd.wait_ready(60)
                results["through jobd"] = anyio.run(through_jobd, jobd.sock, local, sample)
            finally:
                jobd.stop()
    finally:
        if server is not None:
            server.close()
    return results


def main() -> None:
    print(f"lookup of a job on another host, {N_JOBS:,d} jobs in the fleet (3 hosts)")
    labels = {
        "in process": ("Fleet.job(remote)", "lookup_job(local)"),
        "through jobd": ("lookup_job(remote)", "lookup_job(local)"),
    }
    for shape, (remote, local) in measure().items():
        what_remote, what_local = labels[shape]
        print(
            f"  {shape:13s} {what_remote:19s} {remote:8.1f} µs/call   "
            f"{what_local:17s} {local:7.1f} µs/call   ratio {remote / local:.2f}×"
        )


if __name__ == "__main__":
    main()
