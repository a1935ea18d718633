"""Migration in the simulation: the domain moves to another host of the world (a new one
is added, at most MAX_HOSTS in all) when the job completes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.sim.job import Behaviour, Plan
from drivers.sim.world import MAX_HOSTS, SimDomain, SimWorld
from jobcore.driver import DriverJob
from jobcore.errors import DriverError, InvalidArgument, InvalidURI
from jobcore.types.migration import MigrationSpec
from jobcore.uri import parse_uri


def plan(world: SimWorld, spec: Any, dom: SimDomain) -> Plan:
    assert isinstance(spec, MigrationSpec)
    dest = parse_uri(spec.destination)
    if dest.driver != "sim":
        raise DriverError(f"cannot migrate from sim to '{spec.destination}'")
    if not dest.name or dest.host or dest.transport:
        raise InvalidURI(
            f"migration destination '{spec.destination[:200]}': a simulated host is "
            "named sim:///NAME"
        )
    if dest.name == world.domain_host(dom.name):
        raise DriverError("the migration destination is the source host")
    target = world.hosts.get(dest.name)
    if target is not None and dom.name in target.domains:
        raise DriverError(f"domain '{dom.name}' already exists on the destination")
    if target is None and len(world.hosts) >= MAX_HOSTS:
        raise InvalidArgument(
            f"cannot migrate to '{spec.destination[:200]}': the world of '{world.uri}' "
            f"has {len(world.hosts)} simulated hosts, the limit (drivers.sim.MAX_HOSTS);"
            " migrate to a host it has"
        )
    return plan_handover(dom)


def plan_handover(dom: SimDomain) -> Plan:
    """A migration to another fleet member: the same memory copy, the domain handed over
    at the end (SimConnection._hand_over)."""
    return (
        dom.memory,
        False,
        {
            "memory_total": dom.memory,
            "memory_processed": 0,
            "memory_remaining": dom.memory,
            "disk_total": 0,
            "disk_processed": 0,
            "disk_remaining": 0,
        },
    )


def apply(world: SimWorld, job: DriverJob, dom: SimDomain) -> Mapping[str, int | str]:
    spec = job.spec
    assert isinstance(spec, MigrationSpec)
    dest = parse_uri(spec.destination)
    name = dest.name
    target = world.hosts.get(name) or world.new_host(name, seed=False)
    if dom.name in target.domains:
        raise DriverError(f"domain '{dom.name}' already exists on the destination")
    source = world.hosts[world.domain_host(dom.name) or world.home.name]
    del source.domains[dom.name]
    target.domains[dom.name] = dom
    world.where[dom.name] = name
    world.changed(source)
    world.changed(target)
    job.reporter.domain_moved(str(dest))
    limit = spec.downtime_limit
    return {"downtime": 30 if limit is None else min(limit, 30)}


BEHAVIOUR = Behaviour(plan=plan, apply=apply)
