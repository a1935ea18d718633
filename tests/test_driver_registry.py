"""Drivers are found by URI scheme: built-ins, and third parties through the
``jobcore.drivers`` entry-point group. A third party's driver may bring its own job type:
one module of the same shape as jobcore/types/*.py (tests/acme_snapshot.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import acme_snapshot
import pytest
from acme_snapshot import PreparedSnapshot
from anyio.abc import TaskGroup

import jobcore
from drivers.sim import SimConnection, SimDriver
from jobcore import drivers as driver_registry
from jobcore.driver import DriverJob, DriverState
from jobcore.registry import registry
from jobcore.spec import JobType
from jobcore.uri import URI, parse_uri


class AcmeConnection(SimConnection):
    """sim, plus the acme-snapshot type: a snapshot runs until it is aborted."""

    def __init__(self, uri: URI, tg: TaskGroup, state: DriverState | None = None) -> None:
        super().__init__(uri, tg, state)
        self.snapshots: dict[Any, DriverJob] = {}
        self.calls: list[str] = []

    def supports(self, job_type: JobType) -> bool:
        return job_type == acme_snapshot.SNAPSHOT or super().supports(job_type)

    async def start(self, job: DriverJob) -> None:
        if not isinstance(job.spec, PreparedSnapshot):
            await super().start(job)
            return
        self.snapshots[job.uuid] = job
        job.reporter.progress(0, 1)

    async def cancel(self, job: DriverJob) -> None:
        if job.uuid not in self.snapshots:
            await super().cancel(job)
            return
        self.calls.append("cancel")
        self.snapshots.pop(job.uuid).reporter.cancelled()

    async def pause(self, job: DriverJob) -> None:
        self.calls.append("pause")
        await super().pause(job)


class ThirdPartyDriver(SimDriver):
    scheme = "acme"
    persistent_state = False  # its connections keep no state
    connection_class = AcmeConnection


class FakeEntryPoint:
    name = "acme"

    def load(self) -> type[ThirdPartyDriver]:
        return ThirdPartyDriver


def test_entry_point_driver_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_entry_points(*, group: str) -> list[Any]:
        assert group == "jobcore.drivers"
        return [FakeEntryPoint()]

    monkeypatch.setattr(driver_registry, "entry_points", fake_entry_points)
    assert isinstance(driver_registry.load_driver(parse_uri("acme:///lab")), ThirdPartyDriver)
    with jobcore.open("acme:///lab?rate=0") as conn:
        job = jobcore.JobBegin(conn.lookupByName("vm1"), "<job type='backup'/>")
        assert jobcore.JobWait(job, timeout=10)["state"] == "completed"


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def fake_entry_points(*, group: str) -> list[Any]:
        return [FakeEntryPoint()]

    monkeypatch.setattr(driver_registry, "entry_points", fake_entry_points)
    for info in acme_snapshot.INFOS:
        registry.register(info)
    try:
        yield
    finally:
        for info in acme_snapshot.INFOS:
            registry.unregister(str(info.type))


def test_a_third_party_type_module_runs_on_its_driver(acme: None) -> None:
    with jobcore.open("acme:///lab") as conn:
        dom = conn.lookupByName("vm1")
        job = jobcore.JobBegin(dom, "<job type='acme-snapshot'><disk name='vda'/></job>")
        dconn = conn.driver
        assert isinstance(dconn, AcmeConnection)
        (got,) = dconn.snapshots.values()
        # the driver got the type's prepared spec: the name defaulted, the layer resolved
        assert isinstance(got.spec, PreparedSnapshot)
        assert got.spec.name is not None and got.spec.name.startswith("snap-")
        assert got.spec.source == "/var/lib/sim/vm1/vda.qcow2"
        # the described job shows the effective values, and parses back
        desc = jobcore.JobGetXMLDesc(job)
        assert f"snapshot='{got.spec.name}'" in desc
        # claims: a chain job on the disk conflicts with it
        with pytest.raises(jobcore.JobConflict):
            jobcore.JobBegin(dom, "<job type='blockpull'><disk name='vda'/></job>")
        # verbs: the type accepts abort only; pause is refused before the driver is asked
        with pytest.raises(jobcore.OperationInvalid) as err:
            jobcore.JobPause(job)
        assert (err.value.state, err.value.verb) == ("running", "pause")
        assert dconn.calls == []
        jobcore.JobAbort(job)
        assert jobcore.JobWait(job, timeout=10)["state"] == "cancelled"
        assert dconn.calls == ["cancel"]
        stats = jobcore.JobGetStats(job)
        assert stats["operation"] == jobcore.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT


def test_installed_entry_points_name_both_reference_drivers() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="jobcore.drivers")}
    assert {"sim", "qemu"} <= names


@pytest.mark.parametrize(
    "uri", ["nosuch:///x", "sim", "", "sim+tcp:///default", "sim://host/default"]
)
def test_bad_uris_are_refused(uri: str) -> None:
    with pytest.raises(jobcore.InvalidURI):
        jobcore.open(uri)
