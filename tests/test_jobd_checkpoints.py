"""Checkpoints through jobd: the remote API and jobctl's commands, the read-only socket's
refusal of create and delete, NoSuchCheckpoint on the wire, and checkpoints that outlive a
jobd killed with SIGKILL (sim, and real QEMU with a REDEFINE round trip afterwards)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import anyio
import pytest
from jobd_helpers import BACKUP_VDA, Jobd, jobctl
from qemu_helpers import create, domain_xml, kill_and_reap, write

import jobcore
from jobcore import constants as C
from jobcore.cli.errors import ExitCode
from jobcore.errors import AccessDenied, NoSuchCheckpoint
from jobcore.lifecycle import JobState

MiB = 1 << 20


def cp_xml(name: str) -> str:
    return f"<domaincheckpoint><name>{name}</name></domaincheckpoint>"


def killed(daemon: Jobd) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.stop()


def test_remote_calls_jobctl_and_the_read_only_socket(tmp_path: Path) -> None:
    async def remote(daemon: Jobd) -> str:
        async with jobcore.connect(daemon.uri()) as conn:
            dom = await conn.lookup_domain("vm1")
            c1 = await dom.checkpoint_create(cp_xml("c1"))
            job = await dom.job_begin(
                BACKUP_VDA.format(tag="r").replace("</job>", cp_xml("c2") + "</job>")
            )
            assert (await dom.checkpoint_lookup("c2")).name == "c2"  # at once
            assert (await job.wait(30)).state is JobState.COMPLETED
            c2 = await dom.checkpoint_lookup("c2")
            assert await c2.parent() == c1 and await c1.parent() is None
            assert [c.name for c in await dom.list_checkpoints()] == ["c1", "c2"]
            assert [
                c.name for c in await dom.list_checkpoints(C.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)
            ] == ["c2"]
            assert "size='" in await c2.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
            with pytest.raises(NoSuchCheckpoint, match="'nope'"):
                await dom.checkpoint_lookup("nope")
            await dom.checkpoint_create(cp_xml("c3"))
            await (await dom.checkpoint_lookup("c3")).delete()
            saved = await c2.xml_desc()
        async with jobcore.connect(daemon.uri(readonly=True)) as ro:
            dom = await ro.lookup_domain("vm1")
            cp = await dom.checkpoint_lookup("c2")  # reading is allowed
            assert await cp.xml_desc() == saved
            with pytest.raises(AccessDenied):
                await dom.checkpoint_create(cp_xml("c9"))
            with pytest.raises(AccessDenied):
                await cp.delete()
            assert [c.name for c in await dom.list_checkpoints()] == ["c1", "c2"]
        return saved

    with Jobd(tmp_path / "run").wait_ready() as daemon:
        saved = anyio.run(remote, daemon)
        uri = daemon.uri()
        listed = jobctl(uri, "checkpoint", "list", "vm1")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == ["c1  (parent: -)", "c2  (parent: c1)"]
        shown = jobctl(uri, "checkpoint", "info", "vm1", "c2")
        assert shown.returncode == 0 and shown.stdout == saved
        assert "size='" in jobctl(uri, "checkpoint", "info", "vm1", "c2", "--size").stdout
        missing = jobctl(uri, "checkpoint", "info", "vm1", "nope")
        assert missing.returncode == ExitCode.NOT_FOUND, missing.stderr
        ro = daemon.uri(readonly=True)
        assert jobctl(ro, "checkpoint", "delete", "vm1", "c2").returncode == ExitCode.DENIED
        gone = jobctl(uri, "checkpoint", "delete", "vm1", "c2")
        assert gone.returncode == 0 and gone.stdout == "Domain checkpoint c2 deleted\n"
        assert jobctl(uri, "checkpoint", "list", "vm1", "--json").stdout.count("c2") == 0


def test_sim_checkpoints_outlive_a_killed_jobd(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    async def make(daemon: Jobd) -> str:
        async with jobcore.connect(daemon.uri()) as conn:
            dom = await conn.lookup_domain("vm1")
            await dom.checkpoint_create(cp_xml("a"))
            return await (await dom.checkpoint_create(cp_xml("b"))).xml_desc()

    async def check(daemon: Jobd, saved: str) -> None:
        async with jobcore.connect(daemon.uri()) as conn:
            dom = await conn.lookup_domain("vm1")
            assert await (await dom.checkpoint_lookup("b")).xml_desc() == saved
            job = await dom.job_begin(
                BACKUP_VDA.format(tag="i").replace("<disks>", "<incremental>b</incremental><disks>")
            )
            assert (await job.wait(30)).state is JobState.COMPLETED

    daemon = Jobd(run_dir).wait_ready()
    try:
        saved = anyio.run(make, daemon)
    finally:
        killed(daemon)
    with Jobd(run_dir).wait_ready() as daemon:
        anyio.run(check, daemon, saved)


@pytest.mark.qemu
def test_qemu_checkpoints_outlive_a_killed_jobd_and_redefine_round_trips(tmp_path: Path) -> None:
    run_dir, qdir = tmp_path / "run", tmp_path / "qemu"
    allow = ("--allow-uri", f"qemu:///session?dir={qdir}")
    uri = f"qemu+unix:///session?dir={qdir}&socket={run_dir / 'jobd.sock'}"
    disk = create(tmp_path / "d.qcow2")
    write(disk, "write -P 0x5a 0 4M")

    def push(target: str, extra: str = "") -> str:
        return (
            f"<job type='backup'><domainbackup>{extra}<disks><disk name='vda' type='file'>"
            f"<target file='{tmp_path / target}'/></disk></disks></domainbackup>"
        )

    async def make() -> str:
        async with jobcore.connect(uri) as conn:
            dom = await conn.create_domain(domain_xml("d1", {"vda": disk}))
            job = await dom.job_begin(push("full.qcow2") + cp_xml("virtnbdbackup.0") + "</job>")
            assert (await job.wait(60)).state is JobState.COMPLETED
            return await (await dom.checkpoint_lookup("virtnbdbackup.0")).xml_desc()

    async def after(saved: str) -> None:
        async with jobcore.connect(uri) as conn:
            dom = await conn.lookup_domain("d1")  # the guest outlived jobd, re-adopted
            cp = await dom.checkpoint_lookup("virtnbdbackup.0")
            assert await cp.xml_desc() == saved
            assert "size='0'" in await cp.xml_desc(C.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
            # virtnbdbackup's redefinition of a checkpoint whose metadata was lost
            await cp.delete(C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            with pytest.raises(NoSuchCheckpoint):
                await dom.checkpoint_lookup("virtnbdbackup.0")
            back = await dom.checkpoint_create(saved, C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
            assert await back.xml_desc() == saved
            job = await dom.job_begin(
                push("inc.qcow2", "<incremental>virtnbdbackup.0</incremental>")
                + cp_xml("virtnbdbackup.1")
                + "</job>"
            )
            assert (await job.wait(60)).state is JobState.COMPLETED
            names = [c.name for c in await dom.list_checkpoints()]
            assert names == ["virtnbdbackup.0", "virtnbdbackup.1"]
            await dom.destroy()

    daemon = Jobd(run_dir, *allow).wait_ready()
    qpids: set[int] = set()
    try:
        saved = anyio.run(make)
        qpids = {int(p.read_text()) for p in qdir.glob("d1.*.pid")}
    finally:
        killed(daemon)
    try:
        with Jobd(run_dir, *allow).wait_ready() as daemon:
            anyio.run(after, saved)
    finally:
        with contextlib.suppress(ProcessLookupError):
            kill_and_reap(qpids)
