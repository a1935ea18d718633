"""Job groups (jobcore.groups, design/scheduling.md "Job groups"): the <jobgroup> document,
atomic admission, all-or-nothing and independent modes, checkpoints kept only if every
member completed, abort, wait, info, the blocking facade, and the all-or-nothing property."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoints import ready

import jobcore
from jobcore.api import Connection, JobGroup
from jobcore.errors import AccessDenied, JobConflict, NoSuchJob, XMLError
from jobcore.groups import GROUP_STATE_TABLE, GroupState, Member, group_state, render_state_table
from jobcore.lifecycle import JobState
from jobcore.local import as_local
from jobcore.paths import PathUse
from jobcore.testing import JobGroupMachine
from jobcore.xml import parse_job
from jobcore.xml.group import MAX_GROUP_MEMBERS, GroupMode, format_group, parse_group

pytestmark = pytest.mark.anyio
SCHEDULING_MD = Path(__file__).resolve().parents[1] / "design" / "scheduling.md"
FAST = "rate=4294967296"  # 4 GiB/s: a 1 GiB disk in a quarter second


def backup(domain: str, target: str, checkpoint: str | None = None, vdb: bool = False) -> str:
    second = (
        f"<disk name='vdb' type='file'><target file='{target}.vdb'/></disk>"
        if vdb
        else "<disk name='vdb' backup='no'/>"
    )
    cp = f"<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>" if checkpoint else ""
    return (
        f"<job type='backup' domain='{domain}'><domainbackup><disks><disk name='vda' "
        f"type='file'><target file='{target}'/></disk>{second}</disks></domainbackup>{cp}</job>"
    )


def group(*members: str, mode: str = "all-or-nothing", extra: str = "") -> str:
    return f"<jobgroup mode='{mode}'>{extra}{''.join(members)}</jobgroup>"


async def checkpoints(conn: Connection, domain: str) -> list[str]:
    return [c.name for c in await (await conn.lookup_domain(domain)).list_checkpoints()]


def inject(conn: Connection, at: float) -> None:
    """The next backup the sim starts fails at fraction ``at`` (design/sim.md)."""
    driver: Any = as_local(conn).driver
    driver.inject_failure("backup", at)


def advance(conn: Connection, seconds: float) -> None:
    clock: Any = as_local(conn).driver.clock
    clock.advance(seconds)


@asynccontextmanager
async def sim(query: str = FAST) -> AsyncIterator[Connection]:
    async with jobcore.connect(f"sim:///groups?{query}") as conn:
        yield conn


# ---- the document -------------------------------------------------------------------


def test_group_xml_round_trips_and_members_parse_as_their_type(tmp_path: Path) -> None:
    gid = uuid.uuid4()
    doc = group(
        backup("vm1", f"{tmp_path}/a", "c1"),
        "<job type='blockpull' domain='vm2'><disk name='vda'/><priority>5</priority></job>",
        extra=f"<uuid>{gid}</uuid><queue/>",
    )
    spec = parse_group(doc)
    assert spec.mode is GroupMode.ALL_OR_NOTHING and spec.uuid == gid and spec.queue
    assert [m.domain for m in spec.members] == ["vm1", "vm2"]
    assert spec.members[0].spec == parse_job(
        backup("vm1", f"{tmp_path}/a", "c1").replace(" domain='vm1'", "")
    )
    assert spec.members[1].spec.options.priority == 5
    text = format_group(spec)
    assert parse_group(text) == spec and format_group(parse_group(text)) == text


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("<jobgroup mode='some'><job type='blockpull' domain='vm1'/></jobgroup>", "mode"),
        ("<jobgroup mode='independent'/>", "at least one member"),
        (group("<job type='blockpull'><disk name='vda'/></job>"), "job"),
        (group("<job type='nope' domain='vm1'/>"), "member 1 .*unknown job type 'nope'"),
        (
            group(backup("vm1", "/t/a"), "<job type='blockpull' domain='vm2'><disk/></job>"),
            "member 2 <job type='blockpull' domain='vm2'>",
        ),
        (group("<job type='blockpull' domain=''><disk name='vda'/></job>"), "/jobgroup/job"),
        ("<!DOCTYPE jobgroup [<!ENTITY x 'y'>]><jobgroup mode='independent'/>", "DOCTYPE"),
        (
            group(*["<job type='blockpull' domain='vm1'><disk name='vda'/></job>"] * 65),
            f"at most {MAX_GROUP_MEMBERS}",
        ),
        (group(extra="<uuid>x</uuid>" + backup("vm1", "/t/a")), "uuid"),
        (group(backup("vm1", "/t/a"), extra="<queue/><queue/>"), "only once"),
    ],
)
def test_bad_group_documents_are_refused_naming_what(doc: str, match: str) -> None:
    with pytest.raises(XMLError, match=match):
        parse_group(doc)


def test_state_table_is_rendered_in_the_design_doc() -> None:
    assert render_state_table() in SCHEDULING_MD.read_text(), "design/scheduling.md"
    assert {r.state for r in GROUP_STATE_TABLE} == set(GroupState)
    M = Member
    assert group_state({M.COMPLETED}) is GroupState.COMPLETED
    assert group_state({M.COMPLETED, M.FAILED}) is GroupState.PARTIAL
    assert group_state({M.QUEUED}) is GroupState.QUEUED
    assert group_state({M.QUEUED, M.ACTIVE}) is GroupState.RUNNING
    assert group_state({M.ACTIVE, M.FAILED, M.ABORT}) is GroupState.ABORTING
    assert group_state({M.FAILED, M.CANCELLED}) is GroupState.FAILED


# ---- the use case: a consistent backup of two domains -----------------------------------


async def test_two_domain_backup_keeps_both_checkpoints(tmp_path: Path) -> None:
    async with sim() as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        info = await g.wait(30)
        assert info["state"] == "completed" and info["states"] == ["completed"] * 2
        jobs = await g.jobs()
        assert info["jobs"] == [str(j.uuid) for j in jobs]
        assert [j.domain for j in jobs] == info["domains"] == ["vm1", "vm2"]
        assert info["completed"] == 2 and info["processed"] == info["total"] > 0
        assert info["ended"] is not None and info["mode"] == "all-or-nothing"
        assert await checkpoints(conn, "vm1") == ["c1"]
        assert await checkpoints(conn, "vm2") == ["c2"]
        assert await (await conn.job_group_lookup(g.uuid)).info() == info


async def test_a_failed_member_cancels_the_other_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    async with sim() as conn:
        inject(conn, 0.5)  # vm1's: it starts first
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        info = await g.wait(30)
        assert info["states"] == ["failed", "cancelled"] and info["state"] == "failed"
        assert info["completed"] == 0
        assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []


async def test_a_member_done_first_waits_and_is_undone_when_the_other_fails(
    tmp_path: Path,
) -> None:
    async with sim("rate=1073741824&clock=manual") as conn:
        # vm1 backs up two disks (more work than vm2's one) and fails at its very end
        inject(conn, 1.0)
        g = await conn.job_group_begin(
            group(
                backup("vm1", f"{tmp_path}/1", "c1", vdb=True), backup("vm2", f"{tmp_path}/2", "c2")
            )
        )
        vm2 = (await g.jobs())[1]
        advance(conn, 1.0)  # vm2's 1 GiB is done; vm1 is not
        await anyio.wait_all_tasks_blocked()
        held = await vm2.info()
        assert held.processed == held.total and held.state is JobState.RUNNING  # held
        assert (await g.info())["state"] == "running"
        assert await checkpoints(conn, "vm2") == ["c2"]  # not yet decided
        advance(conn, 100.0)
        info = await g.wait(30)
        assert info["states"] == ["failed", "cancelled"], info
        final = await vm2.info()
        assert "did not complete" in (final.errmsg or "")
        assert await checkpoints(conn, "vm2") == []  # its checkpoint deleted


async def test_independent_members_run_on_their_own(tmp_path: Path) -> None:
    async with sim() as conn:
        inject(conn, 0.5)
        g = await conn.job_group_begin(
            group(
                backup("vm1", f"{tmp_path}/1", "c1"),
                backup("vm2", f"{tmp_path}/2", "c2"),
                mode="independent",
            )
        )
        info = await g.wait(30)
        assert info["states"] == ["failed", "completed"] and info["state"] == "partial"
        assert await checkpoints(conn, "vm2") == ["c2"]  # kept: its own


# ---- admission ----------------------------------------------------------------------


PULL = "<job type='blockpull'><disk name='vda'/></job>"


async def test_a_conflicting_member_begins_nothing_and_names_member_and_holder(
    tmp_path: Path,
) -> None:
    async with sim("clock=manual") as conn:
        pull = await (await conn.lookup_domain("vm2")).job_begin(PULL)
        with pytest.raises(JobConflict) as err:
            await conn.job_group_begin(
                group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
            )
        assert err.value.holder == pull.uuid and err.value.resource == "disk:vm2/vda"
        assert "group member job '" in str(err.value) and str(pull.uuid) in str(err.value)
        assert await (await conn.lookup_domain("vm1")).list_jobs() == []  # nothing begun
        assert len(await (await conn.lookup_domain("vm2")).list_jobs()) == 1
        assert await checkpoints(conn, "vm1") == []
        engine = as_local(conn).engine
        assert engine.scheduler.holders("domain:vm1") == {}


async def test_members_that_conflict_with_each_other_are_refused(tmp_path: Path) -> None:
    async with sim() as conn:
        with pytest.raises(JobConflict, match="group member 2"):
            await conn.job_group_begin(
                group(backup("vm1", f"{tmp_path}/same"), backup("vm2", f"{tmp_path}/same"))
            )
        assert await (await conn.lookup_domain("vm1")).list_jobs() == []


async def test_queued_members_are_admitted_together(tmp_path: Path) -> None:
    async with sim("clock=manual") as conn:
        pull = await (await conn.lookup_domain("vm2")).job_begin(PULL)
        g = await conn.job_group_begin(
            group(
                backup("vm1", f"{tmp_path}/1", "c1"),
                backup("vm2", f"{tmp_path}/2", "c2"),
                extra="<queue/>",
            )
        )
        info = await g.info()
        assert info["states"] == ["queued", "queued"] and info["state"] == "queued"
        await pull.abort()  # frees vm2's disk: both are admitted at once
        advance(conn, 0.5)
        await anyio.wait_all_tasks_blocked()
        assert (await pull.info()).state.terminal
        assert (await g.info())["states"] == ["running", "running"]
        advance(conn, 10_000)
        assert (await g.wait(30))["state"] == "completed"


async def test_abort_ends_every_member(tmp_path: Path) -> None:
    async with sim("clock=manual") as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        with pytest.raises(TimeoutError):
            await g.wait(0.05)
        await g.abort()
        info = await g.wait(30)
        assert info["states"] == ["cancelled", "cancelled"] and info["state"] == "cancelled"
        assert await checkpoints(conn, "vm1") == []
        with pytest.raises(NoSuchJob):
            await conn.job_group_lookup(uuid.uuid4())


def test_blocking_facade(tmp_path: Path) -> None:
    with jobcore.open(f"sim:///groups?{FAST}") as conn:
        g = jobcore.JobGroupBegin(
            conn, group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2"))
        )
        jobs = jobcore.JobGroupGetJobs(g)
        assert [jobcore.JobGetUUIDString(j) for j in jobs] == jobcore.JobGroupGetInfo(g)["jobs"]
        assert jobcore.JobGroupWait(g, 30)["state"] == "completed"
        assert jobcore.JobGroupAbort(g) == 0  # nothing active: nothing to do


# ---- the property -------------------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(2, 3),
    fails=st.lists(st.sampled_from([0.0, 0.3, 0.9, 1.0]), max_size=2),
    abort_after=st.sampled_from([None, 0.0, 0.01]),
)
def test_all_or_nothing_never_ends_with_completed_and_failed(
    tmp_path: Path, size: int, fails: list[float], abort_after: float | None
) -> None:
    """Members start in document order, so the first len(fails) fail at those fractions."""

    async def run() -> list[str]:
        async with jobcore.connect("sim:///prop?rate=17179869184") as conn:
            for at in fails:
                inject(conn, at)
            members = [
                backup(f"vm{i % 2 + 1}", f"{tmp_path}/{uuid.uuid4()}", f"c{uuid.uuid4().hex}")
                for i in range(size)
            ]
            g = await conn.job_group_begin(group(*members))
            if abort_after is not None:
                await anyio.sleep(abort_after)
                await g.abort()
            info = await g.wait(60)
            for dom in ("vm1", "vm2"):
                left = await checkpoints(conn, dom)
                assert info["state"] == "completed" or left == [], (info, left)
            return list(info["states"])

    states = anyio.run(run)
    assert all(s in ("completed", "failed", "cancelled") for s in states)
    assert not ("completed" in states and set(states) - {"completed"}), states
    if fails:
        assert "completed" not in states


# ---- a restart ----------------------------------------------------------------------


@pytest.mark.parametrize("end", ["complete", "abort"])
async def test_a_group_survives_a_restart_with_the_sqlite_store(tmp_path: Path, end: str) -> None:
    store = f"sqlite:///{tmp_path}/jobs.sqlite"
    uri = "sim:///durable?clock=manual"
    async with jobcore.connect(uri, store=store) as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        before = await g.info()
        assert before["states"] == ["running", "running"]
    async with jobcore.connect(uri, store=store) as conn:  # the members were kept running
        again = await conn.job_group_lookup(g.uuid)
        info = await again.info()
        assert info["jobs"] == before["jobs"] and info["mode"] == "all-or-nothing"
        assert info["created"] == before["created"] and info["states"] == ["running"] * 2
        if end == "complete":
            advance(conn, 10_000)
            assert (await again.wait(30))["state"] == "completed"
            assert await checkpoints(conn, "vm1") == ["c1"]
        else:
            await again.abort()
            assert (await again.wait(30))["state"] == "cancelled"
            assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []
    async with jobcore.connect(uri, store=store) as conn:  # ended: still there, retained
        assert (await (await conn.job_group_lookup(g.uuid)).info())["state"] in (
            "completed",
            "cancelled",
        )


async def test_a_restart_that_finds_a_member_failed_cancels_the_others(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/jobs.sqlite"
    uri = "sim:///durable?clock=manual"
    async with jobcore.connect(uri, store=store) as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        first = (await g.jobs())[0]
        engine = as_local(conn).engine
        engine.member_ended.pop(first.uuid)  # as if the process died as it failed
        rec = engine.lookup(first.uuid)
        engine._finish(rec, JobState.FAILED, errmsg="died with the process")
        await engine.wait(rec)
    async with jobcore.connect(uri, store=store) as conn:
        info = await (await conn.job_group_lookup(g.uuid)).wait(30)
        assert info["states"] == ["failed", "cancelled"] and info["state"] == "failed"
        assert await checkpoints(conn, "vm2") == []


# ---- the kit's group machine (jobcore.testing.JobGroupMachine) on sim -------------------


class SimGroupMachine(JobGroupMachine):
    URI = "sim:///kitgroups?clock=manual"


SimGroupMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=12, deadline=None)
TestSimGroupKit = SimGroupMachine.TestCase


async def test_the_path_guard_sees_every_member_before_anything_begins(tmp_path: Path) -> None:
    seen: list[str] = []

    def guard(uses: Iterable[PathUse]) -> None:
        for use in uses:
            seen.append(use.path)
            if use.path.endswith("/forbidden"):
                raise AccessDenied(f"{use.what} '{use.path}' refused")

    async with sim() as conn:
        doc = group(backup("vm1", f"{tmp_path}/fine"), backup("vm2", f"{tmp_path}/forbidden"))
        with pytest.raises(AccessDenied, match="forbidden"):
            await as_local(conn).job_group_begin(doc, path_guard=guard)
        assert f"{tmp_path}/fine" in seen  # the first member was checked, and not begun
        assert await (await conn.lookup_domain("vm1")).list_jobs() == []
        assert not (tmp_path / "fine").exists()


def pull_backup(domain: str, sock: str, checkpoint: str) -> str:
    return (
        f"<job type='backup' domain='{domain}'><domainbackup mode='pull'>"
        f"<server transport='unix' socket='{sock}'/><disks><disk name='vda' type='file'>"
        f"<scratch file='{sock}.scratch'/></disk><disk name='vdb' backup='no'/></disks>"
        f"</domainbackup><domaincheckpoint><name>{checkpoint}</name></domaincheckpoint></job>"
    )


@pytest.mark.parametrize("end", ["consumer-done", "group-abort"])
async def test_a_push_member_waits_for_a_pull_member(tmp_path: Path, end: str) -> None:
    """A pull backup is READY until its consumer is done (abort, as in libvirt, completes
    it); the push member, done first, is held meanwhile. Aborting the group instead
    cancels both: the pull member's completion is undone like any held one."""
    async with sim("clock=manual") as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), pull_backup("vm2", f"{tmp_path}/s", "c2"))
        )
        push, pull = await g.jobs()
        await ready(pull)
        advance(conn, 100.0)  # the push member's work is done
        await anyio.wait_all_tasks_blocked()
        done = await push.info()
        assert done.total and done.processed == done.total
        assert (await push.info()).state is JobState.RUNNING  # held
        if end == "consumer-done":
            await pull.abort()
            info = await g.wait(30)
            assert info["states"] == ["completed", "completed"]
            assert await checkpoints(conn, "vm1") == ["c1"]
            assert await checkpoints(conn, "vm2") == ["c2"]
        else:
            await g.abort()
            info = await g.wait(30)
            assert info["states"] == ["cancelled", "cancelled"], info
            assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []


async def _vm2_held(conn: Connection, tmp_path: Path) -> tuple[JobGroup, jobcore.Job]:
    """An all-or-nothing group of two backups whose vm2 member is done, and held (vm1's
    two disks are not done)."""
    g = await conn.job_group_begin(
        group(backup("vm1", f"{tmp_path}/1", "c1", vdb=True), backup("vm2", f"{tmp_path}/2", "c2"))
    )
    vm2 = (await g.jobs())[1]
    advance(conn, 1.0)
    await anyio.wait_all_tasks_blocked()
    return g, vm2


async def test_aborting_a_held_member_cancels_the_group(tmp_path: Path) -> None:
    async with sim("rate=1073741824&clock=manual") as conn:
        g, vm2 = await _vm2_held(conn, tmp_path)
        await vm2.abort()  # the driver is done with it: the group undoes it
        info = await g.wait(30)
        assert info["states"] == ["cancelled", "cancelled"], info
        assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []


async def test_a_held_member_refuses_pause_and_speed_and_the_group_completes(
    tmp_path: Path,
) -> None:
    """A held member is done in the driver: pause and set_speed say so (typed,
    naming the hold) instead of the driver's "not running", and change nothing."""
    async with sim("rate=1073741824&clock=manual") as conn:
        g, vm2 = await _vm2_held(conn, tmp_path)
        for verb in (vm2.pause, lambda: vm2.set_speed(1)):
            with pytest.raises(jobcore.OperationInvalid, match="its completion is held"):
                await verb()
        info = await vm2.info()
        assert info.state is JobState.RUNNING and info.processed == info.total
        advance(conn, 100.0)
        final = await g.wait(30)
        assert final["states"] == ["completed", "completed"], final


@pytest.mark.parametrize("end", ["complete", "abort-the-other"])
async def test_a_held_completion_survives_a_restart(tmp_path: Path, end: str) -> None:
    """vm2's member is done and held when the process goes; after the restart it is held
    again (not completed), so the group still ends all completed or all undone."""
    store = f"sqlite:///{tmp_path}/jobs.sqlite"
    uri = "sim:///durable?rate=1073741824&clock=manual"
    async with jobcore.connect(uri, store=store) as conn:
        g = await conn.job_group_begin(
            group(
                backup("vm1", f"{tmp_path}/1", "c1", vdb=True), backup("vm2", f"{tmp_path}/2", "c2")
            )
        )
        advance(conn, 1.0)  # vm2's 1 GiB is done; vm1's two disks are not
        await anyio.wait_all_tasks_blocked()
        held = await (await g.jobs())[1].info()
        assert held.state is JobState.RUNNING and held.processed == held.total
    async with jobcore.connect(uri, store=store) as conn:
        again = await conn.job_group_lookup(g.uuid)
        vm1, vm2 = await again.jobs()
        info = await vm2.info()
        assert info.state is JobState.RUNNING and info.processed == info.total, info  # held
        assert (await again.info())["state"] == "running"
        if end == "complete":
            advance(conn, 100.0)
            final = await again.wait(30)
            assert final["states"] == ["completed", "completed"], (final, (await vm2.info()).errmsg)
            assert await checkpoints(conn, "vm1") == ["c1"]
            assert await checkpoints(conn, "vm2") == ["c2"]
        else:
            await vm1.abort()
            final = await again.wait(30)
            assert final["states"] == ["cancelled", "cancelled"], final
            assert "did not complete" in ((await vm2.info()).errmsg or "")
            assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []


async def test_a_member_that_finished_while_no_process_ran_is_held(tmp_path: Path) -> None:
    """vm1's member reaches its end while the process is away (the sim's wall clock moved
    on): its recovery's completion goes through the group's gate (held, not completed), so
    aborting vm2's afterwards undoes it too."""
    store = f"sqlite:///{tmp_path}/jobs.sqlite"
    uri = "sim:///away?rate=1073741824"  # 1 GiB/s: vm1's disk in one second of wall time
    async with jobcore.connect(uri, store=store) as conn:
        g = await conn.job_group_begin(
            group(backup("vm1", f"{tmp_path}/1", "c1"), backup("vm2", f"{tmp_path}/2", "c2"))
        )
        vm1, vm2 = await g.jobs()
        await vm2.set_speed(1)  # a byte a second: vm2 runs on
        assert (await vm1.info()).processed < (await vm1.info()).total
    await anyio.sleep(2.0)  # no process: vm1's copy ends meanwhile, in simulated wall time
    async with jobcore.connect(uri, store=store) as conn:
        again = await conn.job_group_lookup(g.uuid)
        vm1, vm2 = await again.jobs()
        info = await vm1.info()
        assert info.state is JobState.RUNNING and info.processed == info.total, info  # held
        await vm2.abort()
        final = await again.wait(30)
        assert final["states"] == ["cancelled", "cancelled"], final
        assert await checkpoints(conn, "vm1") == [] and await checkpoints(conn, "vm2") == []


async def test_a_queued_group_is_admitted_whole_after_a_restart(tmp_path: Path) -> None:
    """An all-or-nothing group queued behind a pull on vm2 stays queued whole across a
    restart (vm1's member is not admitted alone), and both are admitted once it ends."""
    store = f"sqlite:///{tmp_path}/jobs.sqlite"
    uri = "sim:///durable?clock=manual"
    async with jobcore.connect(uri, store=store) as conn:
        pull = await (await conn.lookup_domain("vm2")).job_begin(PULL)
        g = await conn.job_group_begin(
            group(
                backup("vm1", f"{tmp_path}/1", "c1"),
                backup("vm2", f"{tmp_path}/2", "c2"),
                extra="<queue/>",
            )
        )
        assert (await g.info())["states"] == ["queued", "queued"]
    async with jobcore.connect(uri, store=store) as conn:
        again = await conn.job_group_lookup(g.uuid)
        assert (await again.info())["states"] == ["queued", "queued"]
        await (await conn.lookup_job(pull.uuid)).abort()
        advance(conn, 0.5)
        await anyio.wait_all_tasks_blocked()
        assert (await again.info())["states"] == ["running", "running"]
        for member in await again.jobs():  # a verb waits until the driver started it
            await member.set_speed(None)
        advance(conn, 10_000)
        assert (await again.wait(30))["state"] == "completed"
