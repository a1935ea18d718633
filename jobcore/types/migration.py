"""The ``migration`` job type (libvirt's virDomainMigrate): everything jobcore knows about
it — the spec (already what a driver gets: nothing in it depends on the domain), the XML
codec, claims, prepare, paths, legacy classification, verbs and stats keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from attrs import field, frozen
from lxml import etree

from jobcore import constants as C
from jobcore.errors import InvalidArgument, JobError
from jobcore.paths import PathUse
from jobcore.scheduler import Claim, Mode, domain_resource
from jobcore.spec import JobOptions, JobType, int64
from jobcore.types.base import JobTypeInfo, chain_uses
from jobcore.uri import parse_uri
from jobcore.xml import _schema
from jobcore.xml import _types as T
from jobcore.xml._parse import repeated
from jobcore.xml.common import (
    build_bandwidth,
    build_flag,
    checked_spec,
    parse_bandwidth,
    parse_downtime,
)

if TYPE_CHECKING:
    from jobcore.driver import DomainInfo


@frozen
class MigrationSpec:
    destination: str  # a connection URI, e.g. 'sim:///other' or 'qemu:///session'
    live: bool = False
    postcopy: bool = False
    persistent: bool = False
    undefine_source: bool = False
    bandwidth: int | None = field(default=None, validator=int64)  # bytes/s
    downtime_limit: int | None = field(default=None, validator=int64)  # ms
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = JobType.MIGRATION


#: the migration's children of <job> -> the MigrationSpec field each sets
_FIELDS = {
    "destination": "destination",
    "live": "live",
    "postcopy": "postcopy",
    "persistent": "persistent",
    "undefine-source": "undefine_source",
    "bandwidth": "bandwidth",
    "downtime-limit": "downtime_limit",
}


@attrs.define
class MigrationCodec:
    schema: str
    checks_datatypes: ClassVar[bool] = True

    def parse(
        self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions
    ) -> MigrationSpec:
        # one walk of the children; the common ones (parsed, and refused twice, by
        # jobcore.xml.job before) and comments match no branch
        values: dict[str, Any] = {}
        for child in job:
            tag = child.tag
            key = _FIELDS.get(tag)  # None for the others and for a comment
            if key is None:
                continue
            if key in values:
                repeated(child)
            if tag == "destination":
                uri = child.get(b"uri")
                if uri == "":
                    T.check(child, "uri", uri, "nonEmpty")
                values["destination"] = uri
            elif tag == "bandwidth":
                values["bandwidth"] = parse_bandwidth(child)
            elif tag == "downtime-limit":
                values["downtime_limit"] = parse_downtime(child)
            else:
                values[key] = True
        spec: MigrationSpec = checked_spec(job, MigrationSpec, uuid=uuid, options=options, **values)
        return spec

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, MigrationSpec)
        etree.SubElement(job, "destination").set("uri", spec.destination)
        build_flag(job, "live", spec.live)
        build_flag(job, "postcopy", spec.postcopy)
        build_flag(job, "persistent", spec.persistent)
        build_flag(job, "undefine-source", spec.undefine_source)
        if spec.bandwidth is not None:
            build_bandwidth(job, spec.bandwidth)
        if spec.downtime_limit is not None:
            limit = etree.SubElement(job, "downtime-limit")
            limit.set("unit", "ms")
            limit.text = str(spec.downtime_limit)


MIGRATION_CODEC = MigrationCodec(_schema.defines_text("jobtypes.rng", only=("job-migration",)))


def prepare_migration(spec: MigrationSpec, dom: DomainInfo, wall: float) -> MigrationSpec:
    """The destination must be a connection URI (which host it names is the driver's)."""
    try:
        parse_uri(spec.destination)
    except JobError as exc:
        raise InvalidArgument(f"invalid migration destination: {exc}") from None
    return spec


def migration_claims(spec: MigrationSpec, dom: DomainInfo) -> tuple[Claim, ...]:
    """The whole domain, alone."""
    return (Claim(domain_resource(dom.name), Mode.DOMAIN_EXCLUSIVE),)


def migration_paths(spec: MigrationSpec, dom: DomainInfo) -> Iterable[PathUse]:
    """The destination opens every layer of every disk again (the active ones for
    writing); the files it makes for itself (sockets, logs) are the driver's own."""
    return [u for disk in dom.disks for u in chain_uses(disk, {0})]


MIGRATION = JobTypeInfo(
    JobType.MIGRATION,
    MigrationSpec,
    MIGRATION_CODEC,
    migration_claims,
    domain_level=True,
    operation=C.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
    progress_keys="data",
    prepare=prepare_migration,
    paths=migration_paths,
)

INFOS = (MIGRATION,)
