"""Backup in the simulation: push and pull, incremental from a checkpoint, the checkpoint
a backup creates, and libvirt's rules for its target and scratch files (design/xml.md).
A domain's ``checkpoints`` are its simulated persistent bitmaps (bitmap name -> the disks
that have one): a backup creates its checkpoint's at start and removes them again unless
it completes; jobcore.checkpoints keeps the checkpoints themselves.

The simulation never writes real files: what a backup creates goes into its host's
``files``, and leaves it again when the job fails or is aborted (scratch files always).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drivers.sim.job import Behaviour, Plan, SimJob
from drivers.sim.world import SimDomain, SimFile, SimWorld
from jobcore.backup import StoreType
from jobcore.driver import (
    DriverJob,
    store_exists,
    store_in_use,
    store_missing,
    store_unusable,
)
from jobcore.errors import DriverError, InvalidArgument
from jobcore.types.backup import PreparedBackup

INCREMENTAL_FRACTION = 8  # an incremental backup copies 1/8 of the disk


def check_stores(
    world: SimWorld, spec: PreparedBackup, dom: SimDomain
) -> list[tuple[str, SimFile]]:
    """Refuse targets/scratch files as libvirt does; return the files the job creates."""
    host = world.host_of(dom.name)
    creates: list[tuple[str, SimFile]] = []
    named: dict[str, str] = {}
    for bdisk in spec.disks:
        if bdisk.store_type is StoreType.BLOCK:
            continue  # a block device is the caller's (libvirt checks files only)
        path = bdisk.store
        if path in named:
            raise InvalidArgument(
                f"store '{path}' is named for disks '{named[path]}' and '{bdisk.name}'"
            )
        named[path] = bdisk.name
        owner = world.image_owner(path)
        if owner is not None:
            raise store_in_use(path, bdisk.name, owner)
        fmt = bdisk.format
        size = dom.disks[bdisk.name].virtual_size
        existing = world.existing(host, path)
        if not spec.reuse_external:
            if existing is not None:
                raise store_exists(path, bdisk.name)
            creates.append((path, SimFile(fmt, size)))
        elif existing is None:
            raise store_missing(path, bdisk.name)
        elif isinstance(existing, str):
            raise store_unusable(path, bdisk.name, existing)
        elif existing.format != fmt:
            raise store_unusable(
                path, bdisk.name, f"its format is '{existing.format}', not '{fmt}'"
            )
        elif existing.virtual_size != size:
            raise store_unusable(
                path,
                bdisk.name,
                f"its virtual size is {existing.virtual_size} bytes, "
                f"disk '{bdisk.name}' has {size}",
            )
    return creates


def plan(world: SimWorld, spec: Any, dom: SimDomain) -> Plan:
    assert isinstance(spec, PreparedBackup)
    total = 0
    for bdisk in spec.disks:
        sim_disk = dom.disks[bdisk.name]
        incremental = bdisk.incremental
        if incremental is not None:
            if bdisk.name not in dom.checkpoints.get(incremental, ()):
                raise DriverError(
                    f"Checkpoint '{incremental}' for incremental "
                    f"backup of disk '{bdisk.name}' not found"
                )
            total += sim_disk.virtual_size // INCREMENTAL_FRACTION
        else:
            total += sim_disk.virtual_size
    if spec.pull:
        return total, True, {"disk_temp_used": 0, "disk_temp_total": total}
    return total, False, {}


def checkpoint_bitmaps(spec: PreparedBackup) -> list[tuple[str, str]]:
    """(disk, bitmap) of the checkpoint the backup creates."""
    return [(d.name, d.checkpoint_bitmap) for d in spec.disks if d.checkpoint_bitmap]


def add_bitmaps(world: SimWorld, dom: SimDomain, bitmaps: list[tuple[str, str]]) -> None:
    """Create persistent bitmaps (disk, name), all or none, as QEMU's transaction does."""
    for disk, name in bitmaps:
        if disk not in dom.disks:
            raise DriverError(f"domain '{dom.name}' has no disk '{disk}'")
        if disk in dom.checkpoints.get(name, ()):
            raise DriverError(f"Bitmap already exists: {name} (disk '{disk}')")
    for disk, name in bitmaps:
        dom.checkpoints[name] = (*dom.checkpoints.get(name, ()), disk)
    world.changed(world.host_of(dom.name))


def remove_bitmaps(world: SimWorld, dom: SimDomain, bitmaps: list[tuple[str, str]]) -> None:
    """Remove bitmaps (disk, name) that exist; a merge changes nothing simulated."""
    for disk, name in bitmaps:
        left = tuple(d for d in dom.checkpoints.get(name, ()) if d != disk)
        if left:
            dom.checkpoints[name] = left
        else:
            dom.checkpoints.pop(name, None)
    world.changed(world.host_of(dom.name))


def apply(world: SimWorld, job: DriverJob, dom: SimDomain) -> Mapping[str, int | str]:
    return {}  # the checkpoint's bitmaps exist since the start


def ended(world: SimWorld, sj: SimJob, outcome: str) -> None:
    spec = sj.job.spec
    assert isinstance(spec, PreparedBackup)
    # files the job created: scratch files always go, push targets stay only after
    # success; reused files (REUSE_EXTERNAL) are never the job's to remove
    if spec.pull or outcome != "completed":
        host = world.host_of(sj.job.domain)
        for path in sj.created:
            world.remove_file(host, path)
    # a backup that did not complete leaves no checkpoint (as the qemu driver)
    if outcome != "completed" and spec.checkpoint_name is not None:
        dom = world.host_of(sj.job.domain).domains.get(sj.job.domain)
        if dom is not None:
            remove_bitmaps(world, dom, checkpoint_bitmaps(spec))


BEHAVIOUR = Behaviour(plan=plan, apply=apply, ended=ended)
