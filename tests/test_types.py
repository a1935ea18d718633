"""The job types' modules: each imports first in a fresh interpreter (their import layering
is pyproject.toml's [tool.importlinter], checked by `make lint`), the prepared specs drivers
get (every position, default and name resolved once), and each type's verb set, narrowed
by a driver's, checked before the driver is asked."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from anyio.abc import TaskGroup

import jobcore
from drivers.sim import SimConnection, SimDriver
from jobcore import drivers as driver_registry
from jobcore.backup import BackupMode, StoreType
from jobcore.driver import DiskInfo, DomainInfo, DriverState
from jobcore.errors import InvalidArgument
from jobcore.lifecycle import Verb
from jobcore.registry import BUILTIN_TYPES, registry
from jobcore.spec import ChainRef, JobType
from jobcore.testing import prepare_job, prepare_spec
from jobcore.types.backup import PreparedBackup
from jobcore.types.chain import BlockCommitSpec, BlockPullSpec, PreparedCommit, PreparedPull
from jobcore.uri import URI
from jobcore.xml import format_job, parse_job


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = [
        "jobcore.types.backup",
        "jobcore.types.chain",
        "jobcore.types.migration",
        "jobcore.types",
        "jobcore.registry",
        "jobcore.xml.common",
        "jobcore.xml.job",
        "jobcore.xml",
        "jobcore.driver",
        "jobcore.spec",
        "jobcore.scheduler",
        "jobcore.testing",
        "jobcore.docgen",
    ]
    for first in modules:
        code = (
            f"import {first}\n"
            "from jobcore.xml import parse_job, format_job\n"
            "s = parse_job(\"<job type='blockcommit'><disk name='vda'/></job>\")\n"
            "assert 'blockcommit' in format_job(s)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, f"import {first} first: {out.stderr}"


def test_the_registry_holds_the_builtins_from_the_start() -> None:
    names = {"backup", "blockpull", "blockcommit", "migration"}
    assert {str(i.type) for i in BUILTIN_TYPES} == names
    assert set(registry.all()) >= names


# ---- prepared specs --------------------------------------------------------------------

DOM = DomainInfo(
    "vm1",
    uuid.uuid4(),
    (
        DiskInfo("vda", ("/i/top.qcow2", "/i/mid.qcow2", "/i/base.qcow2")),
        DiskInfo("vdb", ("/i/vdb.qcow2",)),
    ),
)


def test_a_prepared_commit_carries_its_positions_and_files() -> None:
    shallow = prepare_spec(
        BlockCommitSpec("vda", top=ChainRef(file="/i/mid.qcow2"), shallow=True), DOM
    )
    assert isinstance(shallow, PreparedCommit)
    # shallow without a base: the top's own backing file (libvirt's rule), resolved here once
    assert (shallow.top_index, shallow.base_index) == (1, 2)
    assert (shallow.top_file, shallow.base_file) == ("/i/mid.qcow2", "/i/base.qcow2")
    assert shallow.committed == ("/i/mid.qcow2",) and not shallow.active
    active = prepare_spec(BlockCommitSpec("vda"), DOM)
    assert isinstance(active, PreparedCommit)
    assert (active.top_index, active.base_index, active.active) == (0, 2, True)
    assert active.committed == ("/i/top.qcow2", "/i/mid.qcow2")


def test_a_prepared_pull_carries_what_it_merges() -> None:
    pull = prepare_spec(BlockPullSpec("vda"), DOM)
    assert isinstance(pull, PreparedPull)
    assert (pull.top_index, pull.base_index, pull.base_file) == (0, None, None)
    assert pull.merged == ("/i/mid.qcow2", "/i/base.qcow2")
    partial = prepare_spec(BlockPullSpec("vda", base=ChainRef(index=2)), DOM)
    assert isinstance(partial, PreparedPull)
    assert partial.merged == ("/i/mid.qcow2",) and partial.base_file == "/i/base.qcow2"
    nothing = prepare_spec(BlockPullSpec("vdb"), DOM)
    assert isinstance(nothing, PreparedPull) and nothing.merged == ()


def test_a_prepared_backup_resolves_each_disks_defaults() -> None:
    xml = """<job type='backup'><domainbackup mode='pull'><incremental>c0</incremental>
      <server transport='unix' socket='/run/s.sock'/>
      <disks><disk name='vda'/><disk name='vdb' backupmode='full' exportname='b'/></disks>
      </domainbackup><domaincheckpoint><name>c1</name>
      <disks><disk name='vda' bitmap='bm'/><disk name='vdb' checkpoint='no'/></disks>
      </domaincheckpoint></job>"""
    spec = prepare_job(xml, DOM, wall=1000.0)
    assert isinstance(spec, PreparedBackup)
    assert spec.mode is BackupMode.PULL and spec.pull and spec.checkpoint_name == "c1"
    vda, vdb = spec.disks
    assert (vda.name, vda.incremental, vda.exportname, vda.exportbitmap) == (
        "vda",
        "c0",  # the backup's <incremental>, for a disk that names none
        "vda",  # the export is named after the disk
        "backup-vda",  # an incremental pull's export bitmap
    )
    assert (vda.store, vda.format, vda.store_type) == ("/i/top.qcow2.c1", "qcow2", StoreType.FILE)
    assert vda.checkpoint_bitmap == "bm"
    assert (vdb.incremental, vdb.exportname, vdb.exportbitmap) == (None, "b", None)
    assert vdb.checkpoint_bitmap is None  # the checkpoint skips it
    push = prepare_job("<job type='backup'/>", DOM, wall=1000.0)
    assert isinstance(push, PreparedBackup) and not push.pull
    assert [d.exportname for d in push.disks] == [None, None]
    assert push.checkpoint_name is None
    assert [d.checkpoint_bitmap for d in push.disks] == [None, None]


@pytest.mark.parametrize(
    "xml",
    [
        "<job type='blockcommit'><disk name='vda'/><top file='/i/mid.qcow2'/><shallow/></job>",
        "<job type='blockpull'><disk name='vda'/><base file='/i/base.qcow2'/></job>",
        "<job type='backup'><domainbackup mode='pull'/><domaincheckpoint/></job>",
        "<job type='migration'><destination uri='sim:///b'/></job>",
    ],
)
def test_a_prepared_spec_formats_as_its_job_and_prepares_again_to_itself(xml: str) -> None:
    """What jobs store and describe (format_job) reads back into the same prepared spec."""
    prepared = prepare_job(xml, DOM, wall=1000.0)
    again = prepare_spec(parse_job(format_job(prepared)), DOM, wall=2000.0)
    assert again == prepared


def test_prepare_refuses_what_no_driver_could_run() -> None:
    with pytest.raises(InvalidArgument, match="no backing file to commit into"):
        prepare_spec(BlockCommitSpec("vdb"), DOM)
    with pytest.raises(InvalidArgument, match="not in the backing chain"):
        prepare_spec(BlockPullSpec("vda", top=ChainRef(file="/elsewhere")), DOM)


# ---- verbs -----------------------------------------------------------------------------


class NarrowConnection(SimConnection):
    """sim with qemu's narrower migration verbs, and a record of the verbs it was asked."""

    job_verbs = {JobType.MIGRATION: frozenset({Verb.ABORT, Verb.SET_SPEED})}

    def __init__(self, uri: URI, tg: TaskGroup, state: DriverState | None = None) -> None:
        super().__init__(uri, tg, state)
        self.asked: list[str] = []

    async def pause(self, job: jobcore.driver.DriverJob) -> None:
        self.asked.append("pause")
        await super().pause(job)


class NarrowDriver(SimDriver):
    scheme = "narrow"
    persistent_state = False  # its connections keep no state
    connection_class = NarrowConnection


class _EntryPoint:
    name = "narrow"

    def load(self) -> type[NarrowDriver]:
        return NarrowDriver


MIGRATE = "<job type='migration'><destination uri='{}:///b'/></job>"


def test_a_driver_narrows_a_types_verbs_before_it_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_registry, "entry_points", lambda *, group: [_EntryPoint()])
    with jobcore.open("narrow:///a?rate=1") as conn:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), MIGRATE.format("sim"))
        with pytest.raises(jobcore.OperationInvalid) as err:
            jobcore.JobPause(job)
        assert (err.value.state, err.value.verb) == ("running", "pause")
        assert "never does" in str(err.value)
        dconn = conn.driver
        assert isinstance(dconn, NarrowConnection) and dconn.asked == []
        jobcore.JobSetSpeed(job, 1 << 20)  # still accepted
        jobcore.JobAbort(job)
    # the type itself accepts pause: plain sim pauses a migration, as before
    with jobcore.open("sim:///a?rate=1") as conn:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), MIGRATE.format("sim"))
        jobcore.JobPause(job)
        assert jobcore.JobGetInfo(job)["state"] == "paused"
        jobcore.JobAbort(job)
