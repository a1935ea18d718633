"""jobd's conflict policy setting (``jobd --policy``, config key ``policy``;
design/daemon.md, design/scheduling.md "Policy"): a jobd started with the KubeVirt table
lets a migration preempt a backup, and explain names the rule and the table; the default
keeps fail-fast; a bad value is a configuration error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from jobd_helpers import BACKUP_VDA, ROOT, Jobd, daemon_with, jobctl, write

import jobcore
from jobcore.daemon.config import ConfigError, load_config
from jobcore.daemon.main import EXIT_CONFIG

MIGRATION = "<job type='migration'><priority>10</priority><destination uri='sim:///other'/></job>"
RULE = "domain-shared (held) excludes domain-exclusive: preempt (policy table: backup vs migration"


def test_a_kubevirt_jobd_lets_a_migration_preempt_a_backup(tmp_path: Path) -> None:
    async def remote(daemon: Jobd) -> None:
        async with jobcore.connect(daemon.uri("rate=1")) as conn:  # the backup runs on
            dom = await conn.lookup_domain("vm1")
            backup = await dom.job_begin(BACKUP_VDA.format(tag="kv"))
            ex = await dom.job_explain(MIGRATION)
            assert ex["decision"] == "preempt"
            (blocker,) = ex["blockers"]
            assert blocker["uuid"] == str(backup.uuid) and blocker["resource"] == "domain:vm1"
            assert blocker["rule"] == f"{RULE}, table 'kubevirt')"
            mig = await dom.job_begin(MIGRATION)  # begin does what explain said
            info = await backup.wait(30)
            assert info["state"] == "cancelled"
            assert info["errmsg"] == f"preempted by job '{mig.uuid}'"
            stats = await backup.stats()
            assert stats["preempted_by"] == str(mig.uuid) and stats["preempt"] == "cancel"
            assert (await mig.stats())["preempted"] == str(backup.uuid)
            await mig.abort()

    with Jobd(tmp_path / "run", "--policy", "kubevirt").wait_ready() as daemon:
        anyio.run(remote, daemon)
        uri = daemon.uri("rate=1", host="cli")
        holder = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDA.format(tag="c")))
        assert holder.returncode == 0, holder.stderr
        mig = write(tmp_path, "m.xml", MIGRATION)
        shown = jobctl(daemon.uri("rate=1", readonly=True, host="cli"), "explain", "vm1", mig)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[0] == "Decision: preempt"
        assert f"{holder.stdout.strip()} on domain:vm1: {RULE}, table 'kubevirt')" in shown.stdout
        assert jobctl(uri, "abort", holder.stdout.strip()).returncode == 0


def test_the_default_jobd_keeps_fail_fast_and_the_config_key_sets_kubevirt(
    tmp_path: Path,
) -> None:
    async def explain(daemon: Jobd) -> dict[str, object]:
        async with jobcore.connect(daemon.uri("rate=1")) as conn:
            dom = await conn.lookup_domain("vm1")
            backup = await dom.job_begin(BACKUP_VDA.format(tag="d"))
            ex = dict(await dom.job_explain(MIGRATION))
            with pytest.raises(jobcore.JobConflict):
                await dom.job_begin(MIGRATION)
            await backup.abort()
            return ex

    with Jobd(tmp_path / "default" / "run").wait_ready() as daemon:
        ex = anyio.run(explain, daemon)
    assert ex["decision"] == "conflict"
    (tmp_path / "toml").mkdir()
    with daemon_with(tmp_path / "toml", 'policy = "kubevirt"\n') as daemon:
        uri = daemon.uri("rate=1")
        holder = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDA.format(tag="t")))
        assert holder.returncode == 0, holder.stderr
        out = jobctl(uri, "explain", "vm1", write(tmp_path, "m.xml", MIGRATION))
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "Decision: preempt"
        assert "table 'kubevirt'" in out.stdout


def test_a_bad_policy_is_a_configuration_error(tmp_path: Path) -> None:
    assert load_config(None, policy="kubevirt").policy == "kubevirt"
    assert load_config(None).policy == "default"
    with pytest.raises(ConfigError, match="policy must be one of default, kubevirt, not 'nope'"):
        load_config(None, policy="nope")
    bad = tmp_path / "jobd.toml"
    bad.write_text("policy = 3\n")
    with pytest.raises(ConfigError, match="policy must be a str"):
        load_config(bad)
    run = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--run-dir", str(tmp_path / "r"), "--policy", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == EXIT_CONFIG and "'x' is not one of" in run.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "jobcore.daemon", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "--policy [default|kubevirt]" in helped.stdout


def test_in_process_connect_takes_a_policy_by_name_and_jobd_uris_refuse_it() -> None:
    async def run() -> None:
        async with jobcore.connect("sim:///p?clock=manual", policy="kubevirt") as conn:
            dom = await conn.lookup_domain("vm1")
            await dom.job_begin(BACKUP_VDA.format(tag="ip"))
            ex = await dom.job_explain(MIGRATION)
            assert ex["decision"] == "preempt" and "table 'kubevirt'" in ex["blockers"][0]["rule"]
        with pytest.raises(jobcore.InvalidArgument, match="unknown policy table 'nope'"):
            async with jobcore.connect("sim:///p", policy="nope"):
                pass
        with pytest.raises(jobcore.InvalidArgument, match="jobd --policy"):
            async with jobcore.connect("sim+unix:///x?socket=/nonexistent", policy="kubevirt"):
                pass

    anyio.run(run)


def test_the_blocking_open_takes_a_policy_by_name_and_jobd_uris_refuse_it() -> None:
    with jobcore.open("sim:///p?clock=manual", policy="kubevirt") as conn:
        dom = conn.lookupByName("vm1")
        jobcore.JobBegin(dom, BACKUP_VDA.format(tag="ip"))
        ex = jobcore.JobExplain(dom, MIGRATION)
        assert ex["decision"] == "preempt" and "table 'kubevirt'" in ex["blockers"][0]["rule"]
    with jobcore.open("sim:///p?clock=manual") as conn:  # the default table: fail fast
        dom = conn.lookupByName("vm1")
        jobcore.JobBegin(dom, BACKUP_VDA.format(tag="ip"))
        assert jobcore.JobExplain(dom, MIGRATION)["decision"] == "conflict"
    with pytest.raises(jobcore.InvalidArgument, match="unknown policy table 'nope'"):
        jobcore.open("sim:///p", policy="nope")
    with pytest.raises(jobcore.InvalidArgument, match="jobd --policy"):
        jobcore.open("sim+unix:///x?socket=/nonexistent", policy="kubevirt")


def test_json_explain_of_kubevirt_names_the_table(tmp_path: Path) -> None:
    with Jobd(tmp_path / "run", "--policy", "kubevirt").wait_ready() as daemon:
        uri = daemon.uri("rate=1")
        holder = jobctl(uri, "begin", "vm1", write(tmp_path, "b.xml", BACKUP_VDA.format(tag="j")))
        assert holder.returncode == 0, holder.stderr
        out = jobctl(uri, "explain", "vm1", write(tmp_path, "m.xml", MIGRATION), "--json")
        assert out.returncode == 0, out.stderr
        ex = json.loads(out.stdout)
        assert ex["decision"] == "preempt" and ex["blockers"][0]["rule"].endswith(
            "table 'kubevirt')"
        )
