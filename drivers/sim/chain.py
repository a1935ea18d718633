"""Chain jobs in the simulation: block pull and block commit (active commit converges to
ready and pivots), each rewriting its disk's backing chain when it completes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.sim.job import Behaviour, Plan
from drivers.sim.world import SimDomain, SimWorld
from jobcore.driver import DriverJob
from jobcore.types.chain import PreparedCommit, PreparedPull


def plan(world: SimWorld, spec: Any, dom: SimDomain) -> Plan:
    assert isinstance(spec, PreparedPull | PreparedCommit)
    disk = dom.disks[spec.disk]
    share = disk.virtual_size // max(1, len(disk.chain))
    if isinstance(spec, PreparedPull):
        return share * len(spec.merged), False, {}
    return share * len(spec.committed), spec.active, {}


def apply(world: SimWorld, job: DriverJob, dom: SimDomain) -> Mapping[str, int | str]:
    spec = job.spec
    if isinstance(spec, PreparedPull):
        disk = dom.disks[spec.disk]
        top, base = spec.top_index, spec.base_index
        disk.chain = disk.chain[: top + 1] + ([] if base is None else disk.chain[base:])
        world.changed(world.host_of(dom.name))
        return {}
    if isinstance(spec, PreparedCommit):
        disk = dom.disks[spec.disk]
        disk.chain = disk.chain[: spec.top_index] + disk.chain[spec.base_index :]
        world.changed(world.host_of(dom.name))
        return {}
    return {}


BEHAVIOUR = Behaviour(plan=plan, apply=apply)
