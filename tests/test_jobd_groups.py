"""Job groups through jobd (design/scheduling.md "Job groups"): begun, listed, waited for
and aborted over the wire; a refused member named across it; writes refused on the
read-only socket; the blocking facade on a jobd URI."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import anyio
import pytest
from jobd_helpers import PULL_VDA, Jobd, jobctl, write

import jobcore
from jobcore.cli.errors import ExitCode
from jobcore.errors import AccessDenied, JobConflict, NoSuchJob
from jobcore.info import GroupInfo
from jobcore.lifecycle import JobState


def backup(domain: str, target: str, checkpoint: str) -> str:
    return (
        f"<job type='backup' domain='{domain}'><domainbackup><disks><disk name='vda' "
        f"type='file'><target file='{target}'/></disk><disk name='vdb' backup='no'/></disks>"
        f"</domainbackup><domaincheckpoint><name>{checkpoint}</name></domaincheckpoint></job>"
    )


def two_domains(tmp_path: Path, tag: str, extra: str = "", mode: str = "all-or-nothing") -> str:
    return (
        f"<jobgroup mode='{mode}'>{extra}{backup('vm1', f'{tmp_path}/{tag}1', f'{tag}1')}"
        f"{backup('vm2', f'{tmp_path}/{tag}2', f'{tag}2')}</jobgroup>"
    )


def test_groups_through_jobd(tmp_path: Path) -> None:
    async def remote(daemon: Jobd) -> None:
        async with jobcore.connect(daemon.uri("rate=0")) as conn:
            g = await conn.job_group_begin(two_domains(tmp_path, "a"))
            info = await g.wait(30)
            assert isinstance(info, GroupInfo)
            assert info["state"] == "completed" and info["states"] == ["completed"] * 2
            jobs = await g.jobs()
            assert [str(j.uuid) for j in jobs] == info["jobs"]
            assert [j.domain for j in jobs] == ["vm1", "vm2"]
            for j in jobs:
                assert (await j.info()).state is JobState.COMPLETED
            for dom, name in (("vm1", "a1"), ("vm2", "a2")):
                cps = await (await conn.lookup_domain(dom)).list_checkpoints()
                assert [c.name for c in cps] == [name]
            assert await (await conn.job_group_lookup(g.uuid)).info() == info
            with pytest.raises(NoSuchJob, match="no job group"):
                await conn.job_group_lookup(jobs[0].uuid)
        async with jobcore.connect(daemon.uri("rate=0", readonly=True)) as ro:
            seen = await ro.job_group_lookup(g.uuid)
            assert (await seen.info())["jobs"] == info["jobs"]  # reading is allowed
            with pytest.raises(AccessDenied):
                await ro.job_group_begin(two_domains(tmp_path, "r"))
            with pytest.raises(AccessDenied):
                await seen.abort()

    with Jobd(tmp_path / "run").wait_ready() as daemon:
        anyio.run(remote, daemon)


def test_refusal_queue_and_abort_through_jobd(tmp_path: Path) -> None:
    async def remote(daemon: Jobd) -> None:
        async with jobcore.connect(daemon.uri("clock=manual", host="grp")) as conn:
            pull = await (await conn.lookup_domain("vm2")).job_begin(PULL_VDA)
            with pytest.raises(JobConflict) as err:
                await conn.job_group_begin(two_domains(tmp_path, "c"))
            assert err.value.holder == pull.uuid and err.value.resource == "disk:vm2/vda"
            assert "group member job" in str(err.value)
            assert await (await conn.lookup_domain("vm1")).list_jobs() == []
            queued = await conn.job_group_begin(two_domains(tmp_path, "q", "<queue/>"))
            assert (await queued.info())["states"] == ["queued", "queued"]
            await queued.abort()
            final = await queued.wait(30)
            assert final["state"] == "cancelled" and final["cancelled"] == 2
            await pull.abort()

    with Jobd(tmp_path / "run").wait_ready() as daemon:
        anyio.run(remote, daemon)


def test_blocking_facade_on_jobd(tmp_path: Path) -> None:
    with (
        Jobd(tmp_path / "run").wait_ready() as daemon,
        jobcore.open(daemon.uri("rate=0")) as conn,
    ):
        g = jobcore.JobGroupBegin(conn, two_domains(tmp_path, "f", mode="independent"))
        info = jobcore.JobGroupWait(g, 30)
        assert info["mode"] == "independent" and info["state"] == "completed"
        assert [jobcore.JobGetUUIDString(j) for j in jobcore.JobGroupGetJobs(g)] == info["jobs"]
        assert jobcore.JobGroupGetInfo(g) == info


def test_jobctl_group(tmp_path: Path) -> None:
    doc = write(tmp_path, "group.xml", two_domains(tmp_path, "j"))
    with Jobd(tmp_path / "run").wait_ready() as daemon:
        uri = daemon.uri("rate=0")
        began = jobctl(uri, "group", "begin", doc, "--wait")
        assert began.returncode == 0, began.stderr
        lines = began.stdout.splitlines()
        gid = lines[0].split()[-1]
        assert lines[1:3] == ["Mode:     all-or-nothing", "State:    completed"]
        assert len([ln for ln in lines if ln.startswith("Member:")]) == 2
        shown = jobctl(uri, "group", "info", gid, "--json")
        assert shown.returncode == 0, shown.stderr
        info = json.loads(shown.stdout)
        assert info["uuid"] == gid and info["states"] == ["completed", "completed"]
        assert info["domains"] == ["vm1", "vm2"]
        assert jobctl(uri, "group", "wait", gid).returncode == 0
        ro = daemon.uri("rate=0", readonly=True)
        assert jobctl(ro, "group", "info", gid).returncode == 0
        assert jobctl(ro, "group", "abort", gid).returncode == ExitCode.DENIED
        missing = jobctl(uri, "group", "info", str(uuid.uuid4()))
        assert missing.returncode == ExitCode.NOT_FOUND, missing.stderr
        bad = jobctl(uri, "group", "info", "nope")
        assert bad.returncode == ExitCode.USAGE and "not a job group UUID" in bad.stderr
        failing = write(tmp_path, "bad.xml", "<jobgroup mode='independent'/>")
        refused = jobctl(uri, "group", "begin", failing)
        assert refused.returncode == ExitCode.ERROR and "at least one member" in refused.stderr


def test_a_group_outlives_a_killed_jobd(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    slow = "rate=1"  # a byte a second: still running when jobd is killed

    async def make(daemon: Jobd) -> tuple[str, list[str]]:
        async with jobcore.connect(daemon.uri(slow)) as conn:
            g = await conn.job_group_begin(two_domains(tmp_path, "k"))
            info = await g.info()
            assert info["states"] == ["running", "running"]
            return str(g.uuid), list(info["jobs"])

    async def check(daemon: Jobd, gid: str, jobs: list[str]) -> None:
        async with jobcore.connect(daemon.uri(slow)) as conn:
            g = await conn.job_group_lookup(gid)
            info = await g.info()
            assert info["jobs"] == jobs and info["states"] == ["running", "running"], info
            await g.abort()
            final = await g.wait(30)
            assert final["states"] == ["cancelled", "cancelled"], final
            for dom in ("vm1", "vm2"):
                assert await (await conn.lookup_domain(dom)).list_checkpoints() == []

    daemon = Jobd(run_dir).wait_ready()
    try:
        gid, jobs = anyio.run(make, daemon)
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    with Jobd(run_dir).wait_ready() as daemon:
        anyio.run(check, daemon, gid, jobs)


@pytest.mark.parametrize("end", ["complete", "roll-back"])
def test_a_held_completion_outlives_a_killed_jobd(tmp_path: Path, end: str) -> None:
    """An all-or-nothing group mid-way (SQLite store): vm1's member done and held, vm2's
    crawling, when jobd is killed. After the restart vm1's is held again, and the group
    ends all completed (vm2 finishes) or all rolled back (vm2 aborted), never partial."""
    run_dir = tmp_path / "run"
    query = "rate=268435456"  # 256 MiB/s: a 1 GiB disk in 4 s

    async def make(daemon: Jobd) -> tuple[str, list[str]]:
        async with jobcore.connect(daemon.uri(query)) as conn:
            g = await conn.job_group_begin(two_domains(tmp_path, "h"))
            vm1, vm2 = await g.jobs()
            await vm2.set_speed(1)  # a byte a second: vm2 runs on
            with anyio.fail_after(60):
                while not (info := await vm1.info()).total or info.processed < info.total:  # noqa: ASYNC110 (no event says held)
                    await anyio.sleep(0.05)
            assert info.state is JobState.RUNNING  # done, and held
            assert (await vm2.info()).state is JobState.RUNNING
            return str(g.uuid), [str(vm1.uuid), str(vm2.uuid)]

    async def check(daemon: Jobd, gid: str, jobs: list[str]) -> None:
        async with jobcore.connect(daemon.uri(query)) as conn:
            g = await conn.job_group_lookup(gid)
            vm1, vm2 = await g.jobs()
            assert [str(vm1.uuid), str(vm2.uuid)] == jobs
            held = await vm1.info()
            assert held.state is JobState.RUNNING and held.processed == held.total, held
            assert (await g.info())["state"] == "running"
            if end == "complete":
                await vm2.set_speed(None)  # the host's rate again
                final = await g.wait(60)
                assert final["states"] == ["completed", "completed"], final
                names = [["h1"], ["h2"]]
            else:
                await vm2.abort()
                final = await g.wait(60)
                assert final["states"] == ["cancelled", "cancelled"], final
                assert "did not complete" in ((await vm1.info()).errmsg or "")
                names = [[], []]
            for dom, expected in zip(("vm1", "vm2"), names, strict=True):
                cps = await (await conn.lookup_domain(dom)).list_checkpoints()
                assert [c.name for c in cps] == expected

    daemon = Jobd(run_dir).wait_ready()
    try:
        gid, jobs = anyio.run(make, daemon)
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.stop()
    with Jobd(run_dir).wait_ready() as daemon:
        anyio.run(check, daemon, gid, jobs)


def test_group_explain_through_jobd_and_jobctl(tmp_path: Path) -> None:
    doc = write(tmp_path, "group.xml", two_domains(tmp_path, "x"))

    async def remote(daemon: Jobd) -> str:
        async with jobcore.connect(daemon.uri("clock=manual", host="gx")) as conn:
            pull = await (await conn.lookup_domain("vm2")).job_begin(PULL_VDA)
        async with jobcore.connect(daemon.uri("clock=manual", readonly=True, host="gx")) as ro:
            ex = await ro.job_group_explain(two_domains(tmp_path, "x"))  # read-only: allowed
            assert ex["decision"] == "conflict"
            (b,) = ex["blockers"]
            assert b["uuid"] == str(pull.uuid) and b["resource"] == "disk:vm2/vda"
            assert b["rule"].startswith("member 2 (job '")
            queued = await ro.job_group_explain(two_domains(tmp_path, "x"), jobcore.JOB_BEGIN_QUEUE)
            assert queued["decision"] == "queue"
            assert await (await ro.lookup_domain("vm1")).list_jobs() == []  # nothing begun
        return str(pull.uuid)

    with Jobd(tmp_path / "run").wait_ready() as daemon:
        holder = anyio.run(remote, daemon)
        ro = daemon.uri("clock=manual", readonly=True, host="gx")
        out = jobctl(ro, "group", "explain", doc, "--json")
        assert out.returncode == 0, out.stderr
        ex = json.loads(out.stdout)
        assert ex["decision"] == "conflict" and ex["blockers"][0]["uuid"] == holder
        human = jobctl(ro, "group", "explain", doc, "--queue")
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0] == "Decision: queue"
        assert any(ln.startswith(f"Blocker:  {holder} on disk:vm2/vda: member 2") for ln in lines)
