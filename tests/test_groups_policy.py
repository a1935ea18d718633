"""Job groups under the pair policies (design/scheduling.md "Job groups", "Policy",
"Preemption") on the sim driver (manual clock): a member's blocker under ``queue`` queues
the group, under ``preempt`` is preempted as by a job of its own, under ``reject`` refuses
the group naming the member and the holder; a member's explain agrees with what the group
then does; a job of its own takes the pair policies against a group's members."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import jobcore
from jobcore import JobState
from jobcore.api import Connection
from jobcore.events import EventKind, JobEvent
from jobcore.local import as_local
from jobcore.scheduler import KUBEVIRT_POLICY, Policy, PolicyTable

pytestmark = pytest.mark.anyio
S = JobState
MANUAL = "sim:///gpolicy?clock=manual"


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    async with jobcore.connect(MANUAL) as c:
        yield c


async def step(conn: Connection, seconds: float = 0.0) -> None:
    conn.driver.clock.advance(seconds)  # type: ignore[attr-defined]
    for _ in range(5):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


def use(conn: Connection, table: PolicyTable) -> None:
    as_local(conn).engine.scheduler.policy = table


def backup(domain: str = "", extra: str = "") -> str:
    where = f" domain='{domain}'" if domain else ""
    return (
        f"<job type='backup'{where}>{extra}<domainbackup mode='push'><disks>"
        f"<disk name='vda' type='file'><target file='/backups/{uuid.uuid4()}.qcow2'/></disk>"
        "<disk name='vdb' backup='no'/></disks></domainbackup></job>"
    )


def pull(domain: str = "", extra: str = "") -> str:
    where = f" domain='{domain}'" if domain else ""
    return f"<job type='blockpull'{where}>{extra}<disk name='vda'/></job>"


def migration(domain: str = "", extra: str = "") -> str:
    where = f" domain='{domain}'" if domain else ""
    return f"<job type='migration'{where}>{extra}<destination uri='sim:///other'/></job>"


def group(*members: str, mode: str = "all-or-nothing", extra: str = "") -> str:
    return f"<jobgroup mode='{mode}'>{extra}{''.join(members)}</jobgroup>"


def drain(sub: jobcore.Subscription) -> list[JobEvent]:
    out = []
    while (ev := sub.get_nowait()) is not None:
        out.append(ev)
    return out


async def states(g: jobcore.JobGroup) -> list[str]:
    return list((await g.info())["states"])


# ---- queue --------------------------------------------------------------------------


async def test_a_table_rule_queue_queues_the_whole_group(conn: Connection) -> None:
    use(conn, {("blockpull", "backup"): Policy.QUEUE})
    holder = await (await conn.lookup_domain("vm2")).job_begin(pull())
    g = await conn.job_group_begin(group(backup("vm1"), backup("vm2")))  # no <queue/>
    assert await states(g) == ["queued", "queued"]  # the free member waits too
    ex = await (await g.jobs())[1].explain()
    assert ex["decision"] == "queue"
    assert "queue (policy table: blockpull vs backup)" in ex["blockers"][0]["rule"]
    await holder.abort()
    await step(conn)
    assert await states(g) == ["running", "running"]
    await step(conn, 10_000)
    assert (await g.wait(5))["state"] == "completed"


async def test_a_members_own_policy_queue_queues_the_group(conn: Connection) -> None:
    await (await conn.lookup_domain("vm2")).job_begin(pull())
    g = await conn.job_group_begin(
        group(backup("vm1"), backup("vm2", "<policy conflict='queue'/>"))
    )
    assert await states(g) == ["queued", "queued"]


# ---- reject -------------------------------------------------------------------------


async def test_a_table_rule_reject_refuses_a_group_that_asked_to_queue(conn: Connection) -> None:
    use(conn, {("blockpull", "backup"): Policy.REJECT})
    holder = await (await conn.lookup_domain("vm2")).job_begin(pull())
    with pytest.raises(jobcore.JobConflict) as err:
        await conn.job_group_begin(group(backup("vm1"), backup("vm2"), extra="<queue/>"))
    assert err.value.holder == holder.uuid and err.value.resource == "disk:vm2/vda"
    assert "group member job '" in str(err.value) and "no member was begun" in str(err.value)
    assert await (await conn.lookup_domain("vm1")).list_jobs() == []
    # the member's own policy wins over the table, as for a job of its own
    g = await conn.job_group_begin(
        group(backup("vm1"), backup("vm2", "<policy conflict='queue'/>"), extra="<queue/>")
    )
    assert await states(g) == ["queued", "queued"]


# ---- preempt ------------------------------------------------------------------------


async def test_a_preempting_member_pauses_its_victim_and_the_group_runs(conn: Connection) -> None:
    victim = await (await conn.lookup_domain("vm2")).job_begin(backup())
    await step(conn, 0.5)
    boss = pull("vm2", "<priority>5</priority><policy conflict='preempt'/>")
    ex = await (await conn.lookup_domain("vm2")).job_explain(
        boss.replace(" domain='vm2'", "")
    )  # the member explained on its own: what the group then does to its victim
    assert ex["decision"] == "preempt" and ex["blockers"][0]["uuid"] == str(victim.uuid)
    with conn.subscribe(domain="vm2") as sub:
        g = await conn.job_group_begin(group(pull("vm1"), boss))
        assert await states(g) == ["running", "running"]
        member = (await g.jobs())[1]
        assert victim.state is S.PAUSED
        assert (await victim.stats())["preempted_by"] == str(member.uuid)
        assert (await member.stats())["preempted"] == str(victim.uuid)
        await step(conn, 10_000)
        assert (await g.wait(5))["state"] == "completed"
        await step(conn)
        assert (await victim.info()).state is S.RUNNING  # resumed once the preemptor ended
        await step(conn, 10_000)
        assert (await victim.wait(5))["state"] == "completed"
        events = drain(sub)
    pre = [e for e in events if e.kind is EventKind.PREEMPTED]
    assert [(e.job, (e.stats or {})["preempted_by"], (e.stats or {})["preempt"]) for e in pre] == [
        (victim.uuid, str(member.uuid), "pause")
    ]
    vstates = [e.state for e in events if e.job == victim.uuid and e.kind is EventKind.STATE]
    assert vstates == [S.PAUSED, S.RUNNING, S.COMPLETED]


async def test_kubevirt_a_group_of_migrations_cancels_and_requeues_backups(
    conn: Connection,
) -> None:
    use(conn, KUBEVIRT_POLICY)
    victims = [
        await (await conn.lookup_domain(d)).job_begin(backup(extra="<policy requeue='yes'/>"))
        for d in ("vm1", "vm2")
    ]
    await step(conn, 0.5)
    prio = "<priority>10</priority>"
    g = await conn.job_group_begin(group(migration("vm1", prio), migration("vm2", prio)))
    assert await states(g) == ["running", "running"]
    members = await g.jobs()
    for victim, member in zip(victims, members, strict=True):
        info = await victim.wait(5)
        assert info["state"] == "cancelled", info
        assert info["errmsg"] == f"preempted by job '{member.uuid}'"
        stats = await victim.stats()
        assert stats["preempted_by"] == str(member.uuid) and stats["preempt"] == "cancel"
        again = await conn.lookup_job(stats["requeued_as"])
        assert again.state is S.QUEUED  # behind the migration
    await step(conn, 10_000)
    assert (await g.wait(5))["state"] == "completed"


async def test_all_or_nothing_that_must_queue_preempts_nobody(conn: Connection) -> None:
    vm1 = await conn.lookup_domain("vm1")
    victim = await vm1.job_begin(backup())
    await (await conn.lookup_domain("vm2")).job_begin(pull())
    g = await conn.job_group_begin(
        group(
            pull("vm1", "<priority>5</priority><policy conflict='preempt'/>"),
            backup("vm2"),
            extra="<queue/>",
        )
    )
    assert await states(g) == ["queued", "queued"]
    assert victim.state is S.RUNNING and "preempted_by" not in await victim.stats()


async def test_an_independent_member_preempts_while_another_queues(conn: Connection) -> None:
    victim = await (await conn.lookup_domain("vm1")).job_begin(backup())
    await (await conn.lookup_domain("vm2")).job_begin(pull())
    g = await conn.job_group_begin(
        group(
            pull("vm1", "<priority>5</priority><policy conflict='preempt'/>"),
            backup("vm2"),
            mode="independent",
            extra="<queue/>",
        )
    )
    assert await states(g) == ["running", "queued"]
    assert victim.state is S.PAUSED


async def test_a_preempt_the_priority_does_not_allow_refuses_the_group(conn: Connection) -> None:
    holder = await (await conn.lookup_domain("vm2")).job_begin(backup("", "<priority>5</priority>"))
    with pytest.raises(jobcore.JobConflict) as err:
        await conn.job_group_begin(
            group(pull("vm1"), pull("vm2", "<priority>5</priority><policy conflict='preempt'/>"))
        )
    assert err.value.holder == holder.uuid
    assert holder.state is S.RUNNING


# ---- a job of its own against a group's members ----------------------------------------


async def test_a_migration_preempts_a_groups_backup_and_the_group_cancels(
    conn: Connection,
) -> None:
    use(conn, KUBEVIRT_POLICY)
    g = await conn.job_group_begin(group(backup("vm1"), backup("vm2")))
    await step(conn, 0.5)
    mig = await (await conn.lookup_domain("vm1")).job_begin(
        migration(extra="<priority>1</priority>")
    )
    assert mig.state is S.RUNNING
    info = await g.wait(5)
    assert info["states"] == ["cancelled", "cancelled"], info
    first = (await g.jobs())[0]
    assert (await first.stats())["preempted_by"] == str(mig.uuid)


# ---- a member's explain decides what the group then does (hypothesis, random mixes) ----

KINDS = {
    "backup": lambda domain, extra: backup(domain, extra),
    "pull": lambda domain, extra: pull(domain, extra),
    "migration": lambda domain, extra: migration(domain, extra),
}
EXTRAS = [
    "",
    "<policy conflict='preempt'/>",
    "<policy conflict='preempt' requeue='yes'/>",
    "<policy conflict='queue'/>",
    "<policy conflict='reject'/>",
]
job_spec = st.tuples(st.sampled_from(sorted(KINDS)), st.integers(0, 3), st.sampled_from(EXTRAS))
STRENGTH = ["conflict", "queue", "preempt", "admit"]


async def _explain_then_group(
    holders: list[tuple[str, int, str, int]],
    groups: list[tuple[bool, bool, list[tuple[str, int, str]]]],
    kubevirt: bool,
) -> None:
    async with jobcore.connect(MANUAL) as conn:
        if kubevirt:
            use(conn, KUBEVIRT_POLICY)
        domains = ["vm1", "vm2"]
        for kind, priority, extra, d in holders:  # jobs of their own, begun if they can be
            dom = await conn.lookup_domain(domains[d % 2])
            xml = KINDS[kind]("", f"<priority>{priority}</priority>{extra}<queue/>")
            with contextlib.suppress(jobcore.JobConflict):
                await dom.job_begin(xml)
            await step(conn)
        for independent, queued, members in groups:
            docs = [
                (domains[i], KINDS[kind](domains[i], f"<priority>{p}</priority>{extra}"))
                for i, (kind, p, extra) in enumerate(members)
            ]
            flags = jobcore.JOB_BEGIN_QUEUE if queued else 0
            explains = [
                await (await conn.lookup_domain(d)).job_explain(
                    doc.replace(f" domain='{d}'", ""), flags
                )
                for d, doc in docs
            ]
            decisions = [str(ex["decision"]) for ex in explains]
            expected = min(decisions, key=STRENGTH.index)
            event(f"{'independent' if independent else 'all-or-nothing'} group: {expected}")
            mode = "independent" if independent else "all-or-nothing"
            doc = group(*(doc for _, doc in docs), mode=mode)
            whole = await conn.job_group_explain(doc, flags)  # the group's own explain
            assert whole["decision"] == expected, (whole, decisions)
            assert {b["uuid"] for b in whole["blockers"]} == {
                b["uuid"] for ex in explains for b in ex["blockers"]
            }
            before = {
                j.uuid for d in domains for j in await (await conn.lookup_domain(d)).list_jobs()
            }
            try:
                g = await conn.job_group_begin(doc, flags)
            except jobcore.JobConflict as exc:
                assert expected == "conflict", decisions
                refused = explains[decisions.index("conflict")]
                assert str(exc.holder) in {b["uuid"] for b in refused["blockers"]}
                after = {
                    j.uuid for d in domains for j in await (await conn.lookup_domain(d)).list_jobs()
                }
                assert after == before  # nothing begun
                continue
            assert expected != "conflict", decisions
            jobs = await g.jobs()
            got = [j.state for j in jobs]
            for job, decision, ex in zip(jobs, decisions, explains, strict=True):
                if not independent:
                    decision = expected  # the group's
                if decision == "queue":
                    assert job.state is S.QUEUED, (decisions, got)
                else:
                    assert job.state is S.RUNNING, (decisions, got)
                if decision == "preempt":
                    for b in ex["blockers"]:
                        victim = await conn.lookup_job(b["uuid"])
                        by = (await victim.stats())["preempted_by"]
                        assert by in {str(j.uuid) for j in jobs}
                        assert victim.state in (S.PAUSED, S.STANDBY, S.ABORTING, S.CANCELLED)
            await step(conn)


@settings(max_examples=60, deadline=None)
@given(
    holders=st.lists(
        st.tuples(
            st.sampled_from(sorted(KINDS)),
            st.integers(0, 3),
            st.sampled_from(["", "<policy requeue='yes'/>"]),
            st.integers(0, 1),
        ),
        max_size=4,
    ),
    groups=st.lists(
        st.tuples(st.booleans(), st.booleans(), st.lists(job_spec, min_size=2, max_size=2)),
        min_size=1,
        max_size=3,
    ),
    kubevirt=st.booleans(),
)
def test_members_explain_decides_what_the_group_then_does(
    holders: list[tuple[str, int, str, int]],
    groups: list[tuple[bool, bool, list[tuple[str, int, str]]]],
    kubevirt: bool,
) -> None:
    anyio.run(_explain_then_group, holders, groups, kubevirt)


async def test_a_migration_preempts_a_held_member_and_the_group_is_undone() -> None:
    """vm1's member is done and held (its sibling still runs) when a migration of vm1
    preempts it under the KubeVirt table: the held member is undone (cancelled, as an
    abort of a held member is), its sibling cancelled, the migration runs."""
    async with jobcore.connect("sim:///gheld?rate=1073741824&clock=manual") as conn:
        use(conn, KUBEVIRT_POLICY)
        slow = backup("vm2").replace(
            "<disk name='vdb' backup='no'/>",
            f"<disk name='vdb' type='file'><target file='/backups/{uuid.uuid4()}'/></disk>",
        )
        g = await conn.job_group_begin(group(backup("vm1"), slow))
        await step(conn, 1.0)  # vm1's 1 GiB is done; vm2's two disks are not
        vm1 = (await g.jobs())[0]
        held = await vm1.info()
        assert held.state is S.RUNNING and held.processed == held.total
        mig = await (await conn.lookup_domain("vm1")).job_begin(
            migration(extra="<priority>1</priority>")
        )
        await step(conn)
        assert mig.state is S.RUNNING
        info = await g.wait(5)
        assert info["states"] == ["cancelled", "cancelled"], info
        assert (await vm1.stats())["preempted_by"] == str(mig.uuid)


async def test_group_explain_names_the_member_and_changes_nothing(conn: Connection) -> None:
    holder = await (await conn.lookup_domain("vm2")).job_begin(pull())
    doc = group(backup("vm1"), backup("vm2"))
    ex = await conn.job_group_explain(doc)
    assert ex["decision"] == "conflict" and ex["position"] is None
    assert {"resource": "disk:vm1/vda", "mode": "read"} in ex["claims"]
    assert {"resource": "disk:vm2/vda", "mode": "read"} in ex["claims"]
    (b,) = ex["blockers"]
    assert b["uuid"] == str(holder.uuid) and b["resource"] == "disk:vm2/vda"
    assert b["rule"].startswith("member 2 (job '") and b["rule"].endswith(
        "conflict): chain (held) excludes read: reject (default: fail fast)"
    )
    assert (await conn.job_group_explain(doc, jobcore.JOB_BEGIN_QUEUE))["decision"] == "queue"
    assert await (await conn.lookup_domain("vm1")).list_jobs() == []  # nothing begun
    with pytest.raises(jobcore.JobConflict, match="group member 2"):  # as begin refuses
        await conn.job_group_explain(group(pull("vm1"), pull("vm1")))
    with pytest.raises(jobcore.XMLError):
        await conn.job_group_explain("<jobgroup mode='independent'/>")


def test_the_blocking_facade_explains_a_group() -> None:
    with jobcore.open("sim:///gfacade?clock=manual") as conn:
        dom = conn.lookupByName("vm2")
        holder = jobcore.JobBegin(dom, pull())
        ex = jobcore.JobGroupExplain(conn, group(backup("vm1"), backup("vm2")))
        assert ex["decision"] == "conflict"
        assert ex["blockers"][0]["uuid"] == jobcore.JobGetUUIDString(holder)
