"""Explain through jobd: the async API over the wire, the read-only socket, and jobctl
explain (human and --json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobd_helpers import BACKUP_VDA, PULL_VDA, Jobd, MiB, jobctl, write

import jobcore
from jobcore.cli import ExitCode


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    daemon = Jobd(tmp_path_factory.mktemp("jobd") / "run").wait_ready()
    try:
        yield daemon
    finally:
        daemon.stop()


def test_jobctl_explain_a_file_and_a_queued_job(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={MiB}", host="ex1")  # slow: the backup runs throughout
    ro = jobd.uri(f"rate={MiB}", readonly=True, host="ex1")
    backup = write(tmp_path, "b.xml", BACKUP_VDA.format(tag="ex1"))
    pull = write(tmp_path, "p.xml", PULL_VDA)

    holder = jobctl(uri, "begin", "vm1", backup).stdout.strip()
    other = write(tmp_path, "b2.xml", BACKUP_VDA.format(tag="ex1b"))
    admit = jobctl(ro, "explain", "vm1", other, "--json")  # read-only socket: allowed
    assert admit.returncode == 0, admit.stderr
    assert json.loads(admit.stdout)["decision"] == "admit"  # two backups read together

    conflict = jobctl(ro, "explain", "vm1", pull, "--json")
    assert conflict.returncode == 0, conflict.stderr
    ex = json.loads(conflict.stdout)
    assert ex["decision"] == "conflict" and ex["position"] is None
    assert {"resource": "disk:vm1/vda", "mode": "chain"} in ex["claims"]
    assert [(b["uuid"], b["resource"]) for b in ex["blockers"]] == [(holder, "disk:vm1/vda")]
    assert "reject (default: fail fast)" in ex["blockers"][0]["rule"]
    human = jobctl(ro, "explain", "vm1", pull, "--queue")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0] == "Decision: queue"
    assert f"Blocker:  {holder} on disk:vm1/vda: read (held) excludes chain: queue" in (
        human.stdout
    )
    refused = jobctl(uri, "begin", "vm1", pull)  # begin does what explain said
    assert refused.returncode != 0 and holder in refused.stderr

    queued = jobctl(uri, "begin", "--queue", "vm1", pull).stdout.strip()
    mine = json.loads(jobctl(ro, "explain", queued, "--json").stdout)
    assert mine["decision"] == "queue" and mine["position"] == 1
    assert [b["uuid"] for b in mine["blockers"]] == [holder]
    assert "Position: 1" in jobctl(ro, "explain", queued[:8]).stdout
    assert jobctl(ro, "begin", "vm1", pull).returncode == ExitCode.DENIED  # still read-only
    for job in (queued, holder):
        assert jobctl(uri, "abort", job).returncode == 0


@pytest.mark.anyio
async def test_the_async_api_and_facade_over_jobd(jobd: Jobd, tmp_path: Path) -> None:
    uri = jobd.uri(f"rate={MiB}", host="ex2")
    async with jobcore.connect(uri) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(BACKUP_VDA.format(tag="ex2"))
        ex = await dom.job_explain(PULL_VDA)
        assert isinstance(ex, jobcore.Explanation)
        assert ex.decision == "conflict" and ex.blockers[0].uuid == job.uuid
        assert (await job.explain())["decision"] == "admit"
        queued = await dom.job_begin(PULL_VDA, jobcore.JOB_BEGIN_QUEUE)
        assert (await queued.explain())["position"] == 1
        await queued.abort()
        await job.abort()
    conn2 = jobcore.open(uri)
    try:
        bdom = conn2.lookupByName("vm1")
        assert jobcore.JobExplain(bdom, PULL_VDA)["decision"] == "admit"
        bjob = jobcore.JobBegin(bdom, BACKUP_VDA.format(tag="ex3"))
        assert jobcore.JobExplain(bdom, PULL_VDA)["blockers"][0]["uuid"] == str(
            bjob.uuid if hasattr(bjob, "uuid") else jobcore.JobGetUUIDString(bjob)
        )
        assert jobcore.JobExplain(bjob)["decision"] == "admit"
        with pytest.raises(jobcore.InvalidArgument):
            jobcore.JobExplain(bjob, PULL_VDA)
        jobcore.JobAbort(bjob)
    finally:
        conn2.close()
