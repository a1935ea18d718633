"""Retained ended jobs are capped (oldest ended first, never an active job), listed in
pages, and found by UUID prefix through the store's index."""

from __future__ import annotations

import uuid
from typing import Any

import anyio.lowlevel
import pytest

import jobcore
from jobcore import JobState, NoSuchJob
from jobcore.api import Connection, Job
from jobcore.local import as_local
from jobcore.store import MemoryJobStore

pytestmark = pytest.mark.anyio

PULL_VDA = "<job type='blockpull'><disk name='vda'/></job>"  # instant at rate=0


def pull_backup(i: int) -> str:
    return (
        "<job type='backup'><domainbackup mode='pull'><disks><disk name='vdb' type='file'>"
        f"<scratch file='/s/ret-{i}.qcow2'/></disk></disks></domainbackup></job>"
    )


async def run_instant(conn: Connection, domain: str, n: int, xml: str = PULL_VDA) -> list[Job]:
    dom = await conn.lookup_domain(domain)
    jobs = []
    for _ in range(n):
        job = await dom.job_begin(xml)
        assert (await job.wait(5)).state is JobState.COMPLETED
        jobs.append(job)
    return jobs


async def test_per_domain_cap_evicts_the_oldest_ended_first() -> None:
    async with jobcore.connect(
        "sim:///default?rate=0", max_retained_per_domain=50, max_retained=1000
    ) as conn:
        jobs = await run_instant(conn, "vm1", 500)
        listed = await (await conn.lookup_domain("vm1")).list_jobs()
        assert [j.uuid for j in listed] == [j.uuid for j in jobs[-50:]]  # begin order
        for gone in (jobs[0], jobs[200], jobs[449]):
            with pytest.raises(NoSuchJob):
                await conn.lookup_job(gone.uuid)
            assert await conn.find_jobs(gone.uuid.hex) == []
        for kept in (jobs[450], jobs[499]):
            assert (await conn.lookup_job(kept.uuid)).uuid == kept.uuid
        assert len(as_local(conn).engine.store) == 50


async def test_total_cap_evicts_the_oldest_ended_across_domains() -> None:
    async with jobcore.connect(
        "sim:///default?rate=0", max_retained_per_domain=50, max_retained=80
    ) as conn:
        first = await run_instant(conn, "vm1", 60)
        second = await run_instant(conn, "vm2", 60)
        vm1 = [j.uuid for j in await (await conn.lookup_domain("vm1")).list_jobs()]
        vm2 = [j.uuid for j in await (await conn.lookup_domain("vm2")).list_jobs()]
        assert vm2 == [j.uuid for j in second[-50:]]
        assert vm1 == [j.uuid for j in first[-30:]]  # 80 in all: vm1's oldest went
        assert as_local(conn).engine.store.retained_count() == 80


async def test_active_jobs_are_never_evicted() -> None:
    async with jobcore.connect(
        "sim:///default?rate=0", max_retained_per_domain=5, max_retained=5
    ) as conn:
        dom = await conn.lookup_domain("vm1")
        # pull backups wait in 'ready' for their consumer: active all along
        active = [await dom.job_begin(pull_backup(i)) for i in range(20)]
        await run_instant(conn, "vm1", 100)
        for job in active:
            assert (await conn.lookup_job(job.uuid)).state.active
        assert len(await dom.list_jobs()) == 25
        for job in active:
            await job.abort()
            await job.wait(5)
        assert len(await dom.list_jobs()) == 5  # once ended, they count toward the cap


async def test_cap_of_zero_keeps_no_ended_job() -> None:
    async with jobcore.connect(
        "sim:///default?rate=0", max_retained_per_domain=0, max_retained=0
    ) as conn:
        (job,) = await run_instant(conn, "vm1", 1)
        assert (await job.info()).state is JobState.COMPLETED  # the handle still answers
        with pytest.raises(NoSuchJob):
            await conn.lookup_job(job.uuid)


async def test_a_reused_uuid_is_not_purged_by_the_evicted_jobs_deadline() -> None:
    async with jobcore.connect(
        "sim:///default?rate=0&clock=manual", retention=10, max_retained_per_domain=1
    ) as conn:
        clock: Any = as_local(conn).driver.clock  # the sim's ManualClock
        chosen = uuid.uuid4()
        mine = f"<job type='blockpull'><uuid>{chosen}</uuid><disk name='vda'/></job>"
        await run_instant(conn, "vm1", 1, mine)  # ends at t=0: deadline t=10
        await run_instant(conn, "vm1", 1)  # evicts it
        with pytest.raises(NoSuchJob):
            await conn.lookup_job(chosen)
        clock.advance(5)
        await anyio.lowlevel.checkpoint()
        await run_instant(conn, "vm1", 1, mine)  # the same UUID again: deadline t=15
        clock.advance(6)  # t=11: the first deadline has passed, not the new one
        assert (await conn.lookup_job(chosen)).state is JobState.COMPLETED
        clock.advance(5)  # t=16
        with pytest.raises(NoSuchJob):
            await conn.lookup_job(chosen)


async def test_pages_follow_begin_order_and_skip_nothing() -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        jobs = await run_instant(conn, "vm1", 23)
        engine = as_local(conn).engine
        seen: list[uuid.UUID] = []
        cursor: int | None = -1
        pages = 0
        while cursor is not None:
            recs, cursor = engine.domain_jobs_page("vm1", cursor, 5)
            seen += [r.uuid for r in recs]
            pages += 1
            if pages == 2:  # jobs begun while paging come on later pages
                jobs += await run_instant(conn, "vm1", 2)
        assert seen == [j.uuid for j in jobs] and pages == 5
        assert engine.domain_jobs_page("nosuchvm", -1, 5) == ([], None)


async def test_prefix_lookup_uses_the_index_not_the_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        jobs = await run_instant(conn, "vm1", 200)
        jobs += await run_instant(conn, "vm2", 200)

        def no_listing(*args: object) -> object:
            raise AssertionError("a prefix lookup listed a domain's jobs")

        monkeypatch.setattr(MemoryJobStore, "domain_jobs", no_listing)
        monkeypatch.setattr(MemoryJobStore, "domain_jobs_page", no_listing)
        for job in (jobs[0], jobs[399]):
            hexed = job.uuid.hex
            assert [j.uuid for j in await conn.find_jobs(hexed[:12])] == [job.uuid]
            dashed = str(job.uuid)[:13].upper()  # dashes and case do not matter
            assert [j.uuid for j in await conn.find_jobs(dashed)] == [job.uuid]
        by_digit = await conn.find_jobs("a", limit=400)
        expected = sorted(j.uuid.int for j in jobs if j.uuid.hex.startswith("a"))
        assert [j.uuid.int for j in by_digit] == expected
        assert len(await conn.find_jobs("a", limit=3)) == min(3, len(expected))
        with pytest.raises(jobcore.InvalidArgument, match="not a UUID prefix"):
            await conn.find_jobs("xyz")
        with pytest.raises(jobcore.InvalidArgument):
            await conn.find_jobs("0" * 33)


async def test_default_caps_bound_a_domains_retained_jobs() -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        jobs = await run_instant(conn, "vm1", 1100)
        listed = await (await conn.lookup_domain("vm1")).list_jobs()
        assert len(listed) == 1000 and listed[0].uuid == jobs[100].uuid
