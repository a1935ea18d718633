"""jobcore.testing's lifecycle kit with its jobs spread over several jobd connections
(``FleetLifecycleMachine``): two connections to one jobd, and two members of one
PostgreSQL fleet, each job begun on either, each verb sent through either (forwarded to
the owner when sent to the other member), every invariant of the kit checked.

Knob: ``JOBCORE_FLEET_KIT_EXAMPLES`` (default 8) examples per machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from fleet_helpers import JobdFleet
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from jobd_helpers import Jobd
from pg_helpers import PgServer

from jobcore.store import default_host
from jobcore.testing import FleetLifecycleMachine, Member

EXAMPLES = int(os.environ.get("JOBCORE_FLEET_KIT_EXAMPLES", "8"))
#: sim jobs at 256 MiB/s: a backup of vda (1 GiB) runs 4 s, so verbs meet running jobs
RATE = 256 << 20

#: derandomized: the counts asserted after a run ("some job was begun on each member")
#: cannot miss by the luck of the draw
KIT_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Counted(FleetLifecycleMachine):
    """Counts what its examples did, so a test can say jobs were spread."""

    begun: ClassVar[dict[str, int]] = {}
    forwarded_verbs: ClassVar[int] = 0
    watched_ends: ClassVar[int] = 0

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            cls = type(self)
            cls.forwarded_verbs += self.forwarded
            for seen in self.seen.values():
                host = self._host_of(seen)
                cls.begun[host] = cls.begun.get(host, 0) + 1
            cls.watched_ends += sum(
                1 for m in self.mirrors.values() if any(e.kind.value == "final" for e in m.events)
            )


def _member_uri(jobd: Jobd) -> str:
    return f"sim+unix:///kit?socket={jobd.sock}&rate={RATE}"


@pytest.fixture
def one_jobd(tmp_path: Path) -> Iterator[Jobd]:
    with Jobd(tmp_path / "run", "--allow-uri", "sim:///*") as jobd:
        yield jobd.wait_ready()


class TwoConnections(Counted):
    pass


def test_the_kit_over_two_connections_to_one_jobd(one_jobd: Jobd) -> None:
    uri = _member_uri(one_jobd)
    host = default_host()  # jobd's --host by default
    TwoConnections.MEMBERS = (Member(host, uri), Member(host, uri))
    TwoConnections.begun, TwoConnections.watched_ends = {}, 0
    run_state_machine_as_test(TwoConnections, settings=KIT_SETTINGS)
    assert TwoConnections.begun.get(host, 0) > 0
    assert TwoConnections.watched_ends > 0


class TwoMembers(Counted):
    pass


def test_the_kit_over_two_members_of_one_fleet(tmp_path: Path, private_pg: PgServer) -> None:
    fleet = JobdFleet(tmp_path, private_pg, 2)
    try:
        fleet.start()
        hv1, hv2 = fleet.members
        assert hv1.jobd is not None and hv2.jobd is not None
        TwoMembers.MEMBERS = (
            Member("hv1", _member_uri(hv1.jobd)),
            Member("hv2", _member_uri(hv2.jobd)),
        )
        TwoMembers.begun, TwoMembers.forwarded_verbs, TwoMembers.watched_ends = {}, 0, 0
        run_state_machine_as_test(TwoMembers, settings=KIT_SETTINGS)
    finally:
        fleet.close()
    assert TwoMembers.begun.get("hv1", 0) > 0 and TwoMembers.begun.get("hv2", 0) > 0
    assert TwoMembers.forwarded_verbs > 0
    assert TwoMembers.watched_ends > 0
