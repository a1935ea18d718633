"""A third-party job type in the shape of jobcore/types/*.py: ``acme-snapshot`` takes an
external snapshot of one disk. Everything jobcore needs to know about it is here; a driver
that runs it registers ``INFOS`` (jobcore.registry.register) and handles
``PreparedSnapshot`` in its ``start``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from attrs import field, frozen
from lxml import etree

from jobcore import constants as C
from jobcore.lifecycle import Verb
from jobcore.paths import PathUse
from jobcore.scheduler import Claim, Mode, disk_resource, domain_resource
from jobcore.spec import JobOptions, JobType
from jobcore.types import JobTypeInfo
from jobcore.types.base import chain_uses, domain_disk
from jobcore.xml.common import checked_spec

if TYPE_CHECKING:
    from jobcore.driver import DomainInfo

SNAPSHOT = JobType("acme-snapshot")


@frozen
class SnapshotSpec:
    disk: str
    name: str | None = None  # None: named after the time it is taken
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = SNAPSHOT


@frozen
class PreparedSnapshot(SnapshotSpec):
    """``name`` is always set; ``source`` is the layer the snapshot freezes."""

    source: str = field(kw_only=True)


class SnapshotCodec:
    schema = """
    <define name='job-acme-snapshot'>
      <element name='disk'>
        <attribute name='name'><ref name='diskTargetDev'/></attribute>
        <optional><attribute name='snapshot'><ref name='nonEmpty'/></attribute></optional>
      </element>
    </define>
    """

    def parse(self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions) -> Any:
        disk = job.find("disk")
        assert disk is not None  # the schema requires it
        return checked_spec(
            job,
            SnapshotSpec,
            disk=disk.get("name"),
            name=disk.get("snapshot"),
            uuid=uuid,
            options=options,
        )

    def format(self, spec: Any, job: etree._Element) -> None:
        disk = etree.SubElement(job, "disk")
        disk.set("name", spec.disk)
        if spec.name is not None:
            disk.set("snapshot", spec.name)


def prepare_snapshot(spec: SnapshotSpec, dom: DomainInfo, wall: float) -> PreparedSnapshot:
    disk = domain_disk(dom, spec.disk)
    return PreparedSnapshot(
        disk=spec.disk,
        name=spec.name or f"snap-{int(wall)}",
        uuid=spec.uuid,
        options=spec.options,
        source=disk.source,
    )


def snapshot_claims(spec: SnapshotSpec, dom: DomainInfo) -> tuple[Claim, ...]:
    """It changes the disk's chain (a new active layer)."""
    return (
        Claim(domain_resource(dom.name), Mode.DOMAIN_SHARED),
        Claim(disk_resource(dom.name, spec.disk), Mode.CHAIN),
    )


def snapshot_paths(spec: PreparedSnapshot, dom: DomainInfo) -> Iterable[PathUse]:
    return chain_uses(domain_disk(dom, spec.disk), {0})


SNAPSHOT_INFO = JobTypeInfo(
    SNAPSHOT,
    SnapshotSpec,
    SnapshotCodec(),
    snapshot_claims,
    domain_level=False,
    operation=C.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT,
    prepare=prepare_snapshot,
    paths=snapshot_paths,
    verbs=frozenset({Verb.ABORT}),  # a snapshot is quick: it is never paused or slowed
)

INFOS = (SNAPSHOT_INFO,)
