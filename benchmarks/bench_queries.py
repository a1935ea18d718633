"""The blocking facade's read-only queries in-process: answered from the engine's
published snapshots (the facade's call, as any caller makes it) against the same query
hopping to the event loop's thread (the in-process API's coroutine through the portal,
as every call went before), in the same run, with jobs running that change all the time
(a push backup and a block pull copy at 1 MiB/s, real clock: each call computes live
stats of a job whose snapshot the engine keeps replacing); the lists and the lookup of an
ended job on a domain with 10 retained ended jobs and a running block pull.

    python -m benchmarks.bench_queries
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jobcore
from jobcore.facade import BlockingConnection

N_CALLS = 5000
ENDED_JOBS = 10
REPEATS = 3
BACKUP = (
    "<domainbackup><disks><disk name='vdb' type='file'>"
    "<target file='/b/bench-queries.qcow2'/></disk></disks></domainbackup>"
)


def rate(call: Callable[[], Any], n: int = N_CALLS) -> float:
    """Calls per second, the best of REPEATS runs (the machine is shared)."""
    best = 0.0
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best = max(best, n / (time.perf_counter() - start))
    return best


def queries(conn: BlockingConnection) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (the facade's call, the same query hopping to the loop)."""
    vm1, vm2 = conn.lookupByName("vm1"), conn.lookupByName("vm2")
    vm1.backupBegin(BACKUP, None)
    vm2.blockPull("vda", 1)
    backup = jobcore.JobLookupByUUID(vm1, jobcore.LEGACY_DOMAIN_JOB_UUID)
    # vm2: its running block pull and ENDED_JOBS ended backups (the default retention)
    for i in range(ENDED_JOBS):
        target = BACKUP.replace("bench-queries", f"bench-queries-{i}")
        small = jobcore.JobBegin(vm2, f"<job type='backup'>{target}</job>")
        jobcore.JobAbort(small)
        jobcore.JobWait(small, timeout=30)
    ended = small
    bps = jobcore.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
    hop = conn._call
    return {
        "jobStats": (vm1.jobStats, lambda: hop(vm1.adom.job_stats, 0)),
        "jobInfo": (vm1.jobInfo, lambda: hop(vm1.adom.job_info)),
        "blockJobInfo": (
            lambda: vm2.blockJobInfo("vda", bps),
            lambda: hop(vm2.adom.block_job_info, "vda", bps),
        ),
        "JobGetInfo": (lambda: jobcore.JobGetInfo(backup), lambda: hop(backup.ajob.info)),
        "JobGetStats": (lambda: jobcore.JobGetStats(backup), lambda: hop(backup.ajob.stats)),
        "JobLookupByUUID": (
            lambda: jobcore.JobLookupByUUID(vm1, backup.uuid),
            lambda: hop(conn.aconn.job_lookup_by_uuid, vm1.adom, backup.uuid),
        ),
        "lookup (ended)": (
            lambda: jobcore.JobLookupByUUID(vm2, ended.uuid),
            lambda: hop(conn.aconn.job_lookup_by_uuid, vm2.adom, ended.uuid),
        ),
        "listJobs": (vm2.listJobs, lambda: hop(vm2.adom.list_jobs)),
    }


def main() -> None:
    conn = jobcore.open("sim:///default?rate=1048576")
    try:
        table = queries(conn)
        for name, (fast, hop) in table.items():
            assert fast() is not None and hop() is not None  # (snapshots start here)
            f, h = rate(fast), rate(hop)
            print(
                f"{name:16s} snapshots {f:9.0f}/s ({1e6 / f:5.1f} µs)   "
                f"hop {h:7.0f}/s ({1e6 / h:6.1f} µs)   {f / h:5.1f}x"
            )
    finally:
        conn.close()


if __name__ == "__main__":
    main()
