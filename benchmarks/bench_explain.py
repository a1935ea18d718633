"""Explain and admission benchmarks, in-process, each with its baseline in the same run:

1. ``dom.job_explain`` per call (target < 50 µs), from a typed spec (``Engine.explain``:
   begin's checks and the scheduler's verdict) and from job XML (parse + validate too),
   beside one ``begin`` of the same job (its baseline: explain is begin's admission
   without the start);
2. ``job.explain()`` of a queued job;
3. admission cost flat: begin and explain with 10,000 active jobs vs 10 (target ≤ 1.5×),
   the heap frozen (gc.freeze) in both runs alike, as bench_engine does.

    python -m benchmarks.bench_explain
"""

from __future__ import annotations

import gc
import time

import anyio

import jobcore
from jobcore.backup import BackupDef, BackupDisk, BackupStore
from jobcore.local import as_local
from jobcore.types.backup import BackupJobSpec

MANUAL = "sim:///default?clock=manual"
SAMPLES = 2000


def _spec(i: int, disk: str = "vdb") -> BackupJobSpec:
    return BackupJobSpec(
        BackupDef(disks=(BackupDisk(disk, type=None, store=BackupStore(f"/bench/{i}.qcow2")),))
    )


def _xml(i: int) -> str:
    return (
        "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
        f"<target file='/bench/x{i}.qcow2'/></disk></disks></domainbackup></job>"
    )


async def _timed(active: int) -> dict[str, float]:
    """Per-call seconds with ``active`` backups of vdb running (manual clock: they stay)."""
    async with jobcore.connect(MANUAL) as conn:
        engine = as_local(conn).engine
        dom = await conn.lookup_domain("vm1")
        for i in range(active):
            await dom.job_begin_spec(_spec(i))
        pull = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        queued = await dom.job_begin(
            "<job type='blockcommit'><queue/><disk name='vda'/><top index='1'/></job>"
        )
        specs = [_spec(10**6 + i) for i in range(SAMPLES)]
        docs = [_xml(i) for i in range(SAMPLES)]
        out: dict[str, float] = {}
        gc.collect()
        gc.freeze()
        try:
            start = time.perf_counter()
            for spec in specs:
                await engine.explain("vm1", spec)
            out["explain_spec"] = (time.perf_counter() - start) / SAMPLES
            start = time.perf_counter()
            for doc in docs:
                await dom.job_explain(doc)
            out["explain_xml"] = (time.perf_counter() - start) / SAMPLES
            start = time.perf_counter()
            for _ in range(SAMPLES):
                await queued.explain()
            out["explain_queued"] = (time.perf_counter() - start) / SAMPLES
            start = time.perf_counter()
            for spec in specs:
                await dom.job_begin_spec(spec)
            out["begin"] = (time.perf_counter() - start) / SAMPLES
        finally:
            gc.unfreeze()
        await queued.abort()
        await pull.abort()
        return out


async def run() -> dict[str, float]:
    await _timed(10)  # warm up imports and caches
    small = [await _timed(10) for _ in range(5)]  # best of five: the machine is shared
    big = [await _timed(10_000) for _ in range(3)]

    def best(runs: list[dict[str, float]], key: str) -> float:
        return min(r[key] for r in runs)

    r = {f"{k}_us_10": best(small, k) * 1e6 for k in small[0]}
    r |= {f"{k}_us_10000": best(big, k) * 1e6 for k in big[0]}
    r["explain_ratio"] = r["explain_spec_us_10000"] / r["explain_spec_us_10"]
    r["begin_ratio"] = r["begin_us_10000"] / r["begin_us_10"]
    r["explain_vs_begin"] = r["explain_spec_us_10"] / r["begin_us_10"]
    return r


def main() -> None:
    r = anyio.run(run)
    print(
        f"explain (spec), 10 active    : {r['explain_spec_us_10']:8.1f} us  (target < 50 us; "
        f"{r['explain_vs_begin']:.2f}x of one begin)"
    )
    print(f"explain (job XML), 10 active : {r['explain_xml_us_10']:8.1f} us  (parse+validate too)")
    print(f"job.explain() of a queued job: {r['explain_queued_us_10']:8.1f} us")
    print(f"begin (spec), 10 active      : {r['begin_us_10']:8.1f} us")
    print(
        f"explain, 10,000 active       : {r['explain_spec_us_10000']:8.1f} us  "
        f"ratio {r['explain_ratio']:.2f}x (target <= 1.5x)"
    )
    print(
        f"begin, 10,000 active         : {r['begin_us_10000']:8.1f} us  "
        f"ratio {r['begin_ratio']:.2f}x (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
