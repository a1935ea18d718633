"""Conflict policy per pair, preemption, aging and explain on the sim driver (manual
clock): design/scheduling.md "Policy", "Preemption", "Fairness", "Explain"."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jobcore
from jobcore import JobState
from jobcore.api import Connection
from jobcore.events import EventKind, JobEvent
from jobcore.lifecycle import Verb
from jobcore.local import as_local
from jobcore.scheduler import KUBEVIRT_POLICY

pytestmark = pytest.mark.anyio

MANUAL = "sim:///default?clock=manual"
S = JobState


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    async with jobcore.connect(MANUAL) as c:
        yield c


async def step(conn: Connection, seconds: float = 0.0) -> None:
    conn.driver.clock.advance(seconds)  # type: ignore[attr-defined]
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


def backup(extra: str = "", disk: str = "vda") -> str:
    return (
        f"<job type='backup'>{extra}<domainbackup mode='push'><disks>"
        f"<disk name='{disk}' type='file'><target file='/backups/{uuid.uuid4()}.qcow2'/></disk>"
        "</disks></domainbackup></job>"
    )


def pull(extra: str = "") -> str:
    return f"<job type='blockpull'>{extra}<disk name='vda'/></job>"


def migration(extra: str = "") -> str:
    return f"<job type='migration'>{extra}<destination uri='sim:///other'/></job>"


def drain(sub: jobcore.Subscription) -> list[JobEvent]:
    out = []
    while (ev := sub.get_nowait()) is not None:
        out.append(ev)
    return out


async def test_the_default_table_keeps_fail_fast_and_queue_on_request(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    holder = await dom.job_begin(backup())
    with pytest.raises(jobcore.JobConflict) as err:
        await dom.job_begin(pull("<priority>9</priority>"))
    assert err.value.holder == holder.uuid
    queued = await dom.job_begin(pull("<queue/>"))
    assert queued.state is S.QUEUED and holder.state is S.RUNNING


async def test_a_jobs_policy_queue_or_reject_overrides_its_queue_choice(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    await dom.job_begin(backup())
    queued = await dom.job_begin(pull("<policy conflict='queue'/>"))
    assert queued.state is S.QUEUED
    with pytest.raises(jobcore.JobConflict):  # asked to queue, but its policy rejects
        await dom.job_begin(pull("<queue/><policy conflict='reject'/>"))


async def test_preemption_pauses_the_victim_and_resumes_it_after(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    with conn.subscribe(domain="vm1") as sub:
        victim = await dom.job_begin(backup())
        await step(conn, 1.0)
        boss = await dom.job_begin(pull("<priority>5</priority><policy conflict='preempt'/>"))
        assert boss.state is S.RUNNING and victim.state is S.PAUSED
        assert (await victim.stats())["preempted_by"] == str(boss.uuid)
        assert (await boss.stats())["preempted"] == str(victim.uuid)
        with pytest.raises(jobcore.OperationInvalid, match="preempted by"):
            await victim.resume()  # it waits for the preemptor, not for the user
        await step(conn, 100.0)
        assert (await boss.wait(1))["state"] == "completed"
        await step(conn)
        assert (await victim.info())["state"] == "running"
        await step(conn, 100.0)
        assert (await victim.wait(1))["state"] == "completed"
        events = drain(sub)
    pre = [e for e in events if e.kind is EventKind.PREEMPTED]
    assert [(e.job, (e.stats or {})["preempted_by"], (e.stats or {})["preempt"]) for e in pre] == [
        (victim.uuid, str(boss.uuid), "pause")
    ]
    vstates = [e.state for e in events if e.job == victim.uuid and e.kind is EventKind.STATE]
    assert vstates == [S.RUNNING, S.PAUSED, S.RUNNING, S.COMPLETED]
    assert [e for e in events if e.job == victim.uuid][-1].kind is EventKind.FINAL


async def test_preemption_needs_a_higher_priority(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    holder = await dom.job_begin(backup("<priority>5</priority>"))
    with pytest.raises(jobcore.JobConflict):
        await dom.job_begin(pull("<priority>5</priority><policy conflict='preempt'/>"))
    queued = await dom.job_begin(pull("<queue/><priority>5</priority><policy conflict='preempt'/>"))
    assert queued.state is S.QUEUED and holder.state is S.RUNNING


async def test_kubevirt_table_a_migration_cancels_a_backup_and_requeues_it() -> None:
    async with jobcore.connect(MANUAL) as conn:
        as_local(conn).engine.scheduler.policy = KUBEVIRT_POLICY
        dom = await conn.lookup_domain("vm1")
        with conn.subscribe(domain="vm1") as sub:
            victim = await dom.job_begin(backup("<policy requeue='yes'/>"))
            await step(conn, 1.0)
            mig = await dom.job_begin(migration("<priority>10</priority>"))
            assert mig.state is S.RUNNING
            info = await victim.wait(1)
            assert info["state"] == "cancelled"
            assert info["errmsg"] == f"preempted by job '{mig.uuid}'"
            stats = await victim.stats()
            assert stats["preempted_by"] == str(mig.uuid)
            again = await conn.lookup_job(stats["requeued_as"])
            assert again.state is S.QUEUED
            assert (await again.stats())["requeued_from"] == str(victim.uuid)
            events = drain(sub)
        kinds = [e.kind for e in events if e.job == victim.uuid]
        assert EventKind.PREEMPTED in kinds and kinds[-1] is EventKind.FINAL
        # a backup never waits for a migration in that table unless it asks to queue
        with pytest.raises(jobcore.JobConflict):
            await dom.job_begin(backup())


async def test_a_victim_that_cannot_pause_is_cancelled(conn: Connection) -> None:
    conn.driver.job_verbs = {"backup": frozenset({Verb.ABORT})}  # type: ignore[attr-defined]
    dom = await conn.lookup_domain("vm1")
    victim = await dom.job_begin(backup())
    boss = await dom.job_begin(pull("<priority>1</priority><policy conflict='preempt'/>"))
    assert boss.state is S.RUNNING
    info = await victim.wait(1)
    assert info["state"] == "cancelled"
    assert "requeued_as" not in await victim.stats()  # it did not ask


async def test_aging_lets_a_starved_low_priority_job_through(conn: Connection) -> None:
    """A steady stream of priority-3 backups, each queued while the one before runs,
    would keep a priority-0 pull waiting forever without aging; with AGING_BOOST 1 it is
    admitted after at most 3 + 1 overtakes."""
    dom = await conn.lookup_domain("vm1")
    current = await dom.job_begin(backup())
    low = await dom.job_begin(pull("<queue/>"))
    overtakes = 0
    for _ in range(20):
        nxt = await dom.job_begin(backup("<queue/><priority>3</priority>"))
        await current.abort()
        await step(conn)
        if low.state is not S.QUEUED:
            break
        overtakes += 1
        current = nxt
    assert low.state is S.RUNNING
    assert overtakes <= 4


async def test_explain_admit_conflict_queue_preempt(conn: Connection) -> None:
    dom = await conn.lookup_domain("vm1")
    ex = await dom.job_explain(backup())
    assert ex["decision"] == "admit" and ex["blockers"] == []
    assert {"resource": "disk:vm1/vda", "mode": "read"} in ex["claims"]
    holder = await dom.job_begin(backup())
    ex = await dom.job_explain(pull())
    assert ex["decision"] == "conflict"
    (b,) = ex["blockers"]
    assert b["uuid"] == str(holder.uuid) and b["resource"] == "disk:vm1/vda"
    assert "read (held) excludes chain: reject (default: fail fast)" == b["rule"]
    assert (await dom.job_explain(pull("<queue/>")))["decision"] == "queue"
    assert (await dom.job_explain(pull(), jobcore.JOB_BEGIN_QUEUE))["decision"] == "queue"
    ex = await dom.job_explain(pull("<priority>2</priority><policy conflict='preempt'/>"))
    assert ex["decision"] == "preempt"
    assert holder.state is S.RUNNING  # explain changed nothing
    queued = await dom.job_begin(pull("<queue/>"))
    second = await dom.job_begin(pull("<queue/>"))
    mine = await second.explain()
    assert mine["decision"] == "queue" and mine["position"] == 2
    assert {b["uuid"] for b in mine["blockers"]} == {str(holder.uuid), str(queued.uuid)}
    assert (await queued.explain())["position"] == 1
    assert (await holder.explain())["decision"] == "admit"


async def test_a_paused_victim_still_waits_for_its_preemptor_after_a_restart(
    tmp_path: Path,
) -> None:
    store = f"sqlite://{tmp_path}/jobs.sqlite"
    async with jobcore.connect(MANUAL, store=store) as conn:
        dom = await conn.lookup_domain("vm1")
        victim = await dom.job_begin(backup())
        boss = await dom.job_begin(pull("<priority>5</priority><policy conflict='preempt'/>"))
        assert victim.state is S.PAUSED and boss.state is S.RUNNING
    async with jobcore.connect(MANUAL, store=store) as conn:  # recovered
        victim2 = await conn.lookup_job(victim.uuid)
        boss2 = await conn.lookup_job(boss.uuid)
        assert victim2.state is S.PAUSED and boss2.state is S.RUNNING
        assert (await victim2.explain())["decision"] == "queue"  # waits, not held
        with pytest.raises(jobcore.OperationInvalid, match="preempted by"):
            await victim2.resume()
        await boss2.abort()
        await step(conn)
        assert (await victim2.info())["state"] == "running"  # resumed once it let go
        await victim2.abort()


# ---- explain's decision is what begin does (hypothesis, random job mixes on sim) -------

KINDS: dict[str, Callable[[str], str]] = {
    "backup-vda": lambda extra: backup(extra, "vda"),
    "backup-vdb": lambda extra: backup(extra, "vdb"),
    "pull-vda": pull,
    "commit-vda": lambda extra: (
        f"<job type='blockcommit'>{extra}<disk name='vda'/><top index='1'/></job>"
    ),
    "migration": migration,
}
job_mix = st.lists(
    st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.integers(0, 3),  # priority
        st.sampled_from(
            [
                "",
                "<queue/>",
                "<policy conflict='preempt'/>",
                "<queue/><policy conflict='preempt'/>",
                "<policy conflict='preempt' requeue='yes'/>",
                "<policy conflict='queue'/>",
                "<policy conflict='reject'/>",
            ]
        ),
        st.booleans(),  # abort a random active job first
        st.integers(0, 1000),
    ),
    min_size=1,
    max_size=12,
)


async def _explain_then_begin(mix: list[tuple[str, int, str, bool, int]], kubevirt: bool) -> None:
    async with jobcore.connect(MANUAL) as conn:
        if kubevirt:
            as_local(conn).engine.scheduler.policy = KUBEVIRT_POLICY
        dom = await conn.lookup_domain("vm1")
        jobs: list[jobcore.Job] = []
        for kind, priority, extra, abort_first, pick in mix:
            active = [j for j in jobs if j.state.active]
            if abort_first and active:
                with contextlib.suppress(jobcore.OperationInvalid):
                    await active[pick % len(active)].abort()
                await step(conn)
            xml = KINDS[kind](f"<priority>{priority}</priority>{extra}")
            ex = await dom.job_explain(xml)
            before = {j.uuid: j.state for j in await dom.list_jobs()}  # requeued too
            try:
                job = await dom.job_begin(xml)
            except jobcore.JobConflict as exc:
                assert ex["decision"] == "conflict", ex
                assert str(exc.holder) in {b["uuid"] for b in ex["blockers"]}
                continue
            jobs.append(job)
            decision = ex["decision"]
            assert decision != "conflict", ex
            if decision == "admit":
                assert job.state is S.RUNNING
            elif decision == "queue":
                assert job.state is S.QUEUED
            else:  # preempt: it runs, each blocker was paused or cancelled for it
                assert job.state is S.RUNNING
                for b in ex["blockers"]:
                    victim = await conn.lookup_job(b["uuid"])
                    assert before[victim.uuid].active
                    stats = await victim.stats()
                    assert stats["preempted_by"] == str(job.uuid)
                    assert victim.state in (S.PAUSED, S.STANDBY, S.ABORTING, S.CANCELLED)
            await step(conn)


@settings(max_examples=100, deadline=None)
@given(mix=job_mix, kubevirt=st.booleans())
@example(  # a preemptor's victim let go, the waiter admitted first aged a migration past it
    mix=[
        ("backup-vda", 0, "", True, 201),
        ("backup-vda", 0, "<policy conflict='preempt' requeue='yes'/>", False, 619),
        ("backup-vdb", 3, "<policy conflict='preempt'/>", True, 123),
        ("commit-vda", 0, "<queue/><policy conflict='preempt'/>", False, 20),
        ("commit-vda", 1, "<queue/><policy conflict='preempt'/>", False, 491),
        ("migration", 1, "<policy conflict='queue'/>", False, 499),
        ("backup-vda", 2, "<queue/>", False, 124),
        ("backup-vda", 2, "<policy conflict='preempt'/>", False, 69),
    ],
    kubevirt=False,
)
def test_explain_decides_what_begin_then_does(
    mix: list[tuple[str, int, str, bool, int]], kubevirt: bool
) -> None:
    anyio.run(_explain_then_begin, mix, kubevirt)


async def test_a_closing_connection_ends_a_waiting_preemptor_at_once() -> None:
    """A preemptor waiting for a victim that does not let go (the hypervisor took the
    cancel and never ends the job) fails when the connection closes, and its begin
    returns then, not a start timeout later."""
    async with jobcore.connect(MANUAL) as conn:
        engine = as_local(conn).engine
        engine.start_timeout = 1e6  # only the close can end the wait
        conn.driver.job_verbs = {"backup": frozenset({Verb.ABORT})}  # type: ignore[attr-defined]
        dom = await conn.lookup_domain("vm1")
        victim = await dom.job_begin(backup())

        async def cancel_taken_never_done(job: object) -> None:
            return None

        conn.driver.cancel = cancel_taken_never_done  # type: ignore[attr-defined]
        began: list[S] = []

        async def preempt() -> None:
            job = await dom.job_begin(pull("<priority>1</priority><policy conflict='preempt'/>"))
            began.append(job.state)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(preempt)
                await step(conn)
                assert not began and victim.state is S.ABORTING  # waiting for the victim
                engine.close()
    assert began == [S.FAILED]
