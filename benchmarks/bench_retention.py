"""jobd's memory after many instant jobs with the default retention (600 s) and caps.

A fresh jobd on a temporary run directory; one client runs ``N`` instant block pulls
(``sim:///default?rate=0``), four at a time (vm1 and vm2, disks vda and vdb: no two
conflict), each waited for. jobd's RSS is sampled as the jobs run; at the end the
client lists every domain's jobs (``dom.list_jobs()``, paged) and resolves a UUID
prefix, and their times are shown. Block pulls leave nothing behind in the simulated
host, so what grows is jobd's own bookkeeping.

    python -m benchmarks.bench_retention                 # N=200,000 (a few minutes)
    BENCH_RETENTION_JOBS=20000 python -m benchmarks.bench_retention
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import anyio

import jobcore
from benchmarks.bench_jobd import _start_jobd
from benchmarks.bench_subscribers import _rss_kib

N_JOBS = int(os.environ.get("BENCH_RETENTION_JOBS", "200000"))
STREAMS = (("vm1", "vda"), ("vm1", "vdb"), ("vm2", "vda"), ("vm2", "vdb"))
SAMPLES = 4


async def _stream(conn: jobcore.Connection, domain: str, disk: str, n: int) -> None:
    dom = await conn.lookup_domain(domain)
    xml = f"<job type='blockpull'><disk name='{disk}'/></job>"
    for _ in range(n):
        await (await dom.job_begin(xml)).wait()


async def _run(sock: Path, pid: int, n: int) -> list[str]:
    lines: list[str] = []
    async with jobcore.connect(f"sim+unix:///default?socket={sock}&rate=0") as conn:
        start = time.perf_counter()
        per_sample = n // SAMPLES // len(STREAMS)
        for i in range(SAMPLES):
            async with anyio.create_task_group() as tg:
                for domain, disk in STREAMS:
                    tg.start_soon(_stream, conn, domain, disk, per_sample)
            rss, peak = _rss_kib(pid)
            done = (i + 1) * per_sample * len(STREAMS)
            lines.append(
                f"after {done:8,d} jobs ({time.perf_counter() - start:6.1f} s): "
                f"jobd RSS {rss / 1024:6.1f} MiB (peak {peak / 1024:.1f} MiB)"
            )
        newest = None
        for name in ("vm1", "vm2"):
            t0 = time.perf_counter()
            try:
                jobs = await (await conn.lookup_domain(name)).list_jobs()
            except jobcore.JobError as exc:
                lines.append(f"list_jobs({name}) failed: {type(exc).__name__}: {exc}")
                continue
            ms = (time.perf_counter() - t0) * 1e3
            lines.append(f"list_jobs({name}): {len(jobs):7,d} jobs in {ms:7.1f} ms")
            newest = jobs[-1] if jobs else newest
        find = getattr(conn, "find_jobs", None)
        if newest is not None and find is not None:
            t0 = time.perf_counter()
            found = await find(newest.uuid.hex[:8])
            lines.append(
                f"find_jobs(8-digit prefix): {len(found)} match in "
                f"{(time.perf_counter() - t0) * 1e3:.2f} ms"
            )
    return lines


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-retention-") as tmp:
        run_dir = Path(tmp) / "run"
        proc = _start_jobd(run_dir)
        try:
            rss0, _ = _rss_kib(proc.pid)
            lines = anyio.run(_run, run_dir / "jobd.sock", proc.pid, N_JOBS)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{N_JOBS:,d} instant jobs through jobd, default retention and caps")
    print(f"jobd RSS at start: {rss0 / 1024:.1f} MiB")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    main()
