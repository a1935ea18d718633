"""Chain jobs in the simulation: block pull and block commit (active commit converges to
ready and pivots), each rewriting its disk's backing chain when it completes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.sim.job import Behaviour, Plan
from drivers.sim.world import SimDomain, SimWorld
from jobcore.driver import DriverJob
from jobcore.spec import BlockCommitSpec, BlockPullSpec


def plan(world: SimWorld, spec: Any, dom: SimDomain) -> Plan:
    assert isinstance(spec, BlockPullSpec | BlockCommitSpec)
    disk = dom.disks[spec.disk]
    top = spec.top.index if spec.top and spec.top.index is not None else 0
    if isinstance(spec, BlockPullSpec):
        base = spec.base.index if spec.base and spec.base.index is not None else len(disk.chain)
        layers = base - top - 1
        return disk.virtual_size * layers // max(1, len(disk.chain)), False, {}
    base = spec.base.index if spec.base and spec.base.index is not None else len(disk.chain) - 1
    layers = base - top
    return (disk.virtual_size * layers // max(1, len(disk.chain)), top == 0, {})


def apply(world: SimWorld, job: DriverJob, dom: SimDomain) -> Mapping[str, int | str]:
    spec = job.spec
    if isinstance(spec, BlockPullSpec):
        disk = dom.disks[spec.disk]
        top = spec.top.index if spec.top and spec.top.index is not None else 0
        base = spec.base.index if spec.base and spec.base.index is not None else None
        disk.chain = disk.chain[: top + 1] + ([] if base is None else disk.chain[base:])
        return {}
    if isinstance(spec, BlockCommitSpec):
        disk = dom.disks[spec.disk]
        top = spec.top.index if spec.top and spec.top.index is not None else 0
        base = spec.base.index if spec.base and spec.base.index is not None else len(disk.chain) - 1
        disk.chain = disk.chain[:top] + disk.chain[base:]
        return {}
    return {}


BEHAVIOUR = Behaviour(plan=plan, apply=apply)
