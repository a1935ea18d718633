"""Drivers are found by URI scheme: built-ins, and third parties through the
``jobcore.drivers`` entry-point group."""

from __future__ import annotations

from typing import Any

import pytest

import jobcore
from drivers.sim import SimDriver
from jobcore import drivers as driver_registry
from jobcore.uri import parse_uri


class ThirdPartyDriver(SimDriver):
    scheme = "acme"


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
