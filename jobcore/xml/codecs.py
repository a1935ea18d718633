"""The XML codecs of the four built-in job types (see jobcore.registry.XMLCodec).

Each codec's ``schema`` is its ``job-TYPE`` RelaxNG define (plus, for backup, the
``<domainbackup>`` and ``<domaincheckpoint>`` defines), taken from the packaged files.
"""

from __future__ import annotations

import uuid
from typing import Any

from attrs import define
from lxml import etree

from jobcore.spec import BackupJobSpec, BlockCommitSpec, BlockPullSpec, JobOptions, MigrationSpec
from jobcore.xml import _schema
from jobcore.xml import _types as T
from jobcore.xml._parse import fail, once
from jobcore.xml.backup import build_backup_element, parse_backup_element
from jobcore.xml.checkpoint import build_checkpoint_element, parse_checkpoint_element
from jobcore.xml.job import (
    build_bandwidth,
    build_chain_ref,
    parse_bandwidth,
    parse_chain_ref,
    parse_downtime,
)

_ELEMENT = etree.Element


def _flag(parent: etree._Element, tag: str, on: bool) -> None:
    if on:
        etree.SubElement(parent, tag)


def _checked(job: etree._Element, spec_class: type[Any], **values: Any) -> Any:
    for required in ("disk", "destination"):
        if required in spec_class.__init__.__annotations__ and required not in values:
            fail(job, f"a {job.get('type')} job needs a <{required}>")
    try:
        return spec_class(**values)
    except (ValueError, TypeError) as exc:
        fail(job, str(exc))


@define
class BackupCodec:
    schema: str

    def parse(
        self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions
    ) -> BackupJobSpec:
        seen: set[str] = set()
        for child in job.iterchildren("domainbackup", "domaincheckpoint"):
            once(seen, child)
        backup_el = job.find("domainbackup")
        checkpoint_el = job.find("domaincheckpoint")
        backup = parse_backup_element(backup_el) if backup_el is not None else None
        checkpoint = parse_checkpoint_element(checkpoint_el) if checkpoint_el is not None else None
        spec: BackupJobSpec = _checked(
            job,
            BackupJobSpec,
            checkpoint=checkpoint,
            uuid=uuid,
            options=options,
            **({"backup": backup} if backup is not None else {}),
        )
        return spec

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, BackupJobSpec)
        build_backup_element(spec.backup, job)
        if spec.checkpoint is not None:
            build_checkpoint_element(spec.checkpoint, job)


@define
class ChainJobCodec:
    """Block pull and block commit: a disk, chain positions, flags, a bandwidth."""

    schema: str
    spec_class: type[BlockPullSpec] | type[BlockCommitSpec]
    #: the chain positions in the order they are written
    refs: tuple[str, ...]
    #: the type's empty flag elements (``<pivot/>`` …), in the order they are written
    flags: tuple[str, ...] = ()

    def parse(self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions) -> Any:
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for child in job.iterchildren(_ELEMENT):
            once(seen, child)
            tag = child.tag
            if tag == "disk":
                values["disk"] = T.attr(child, "name", "nonEmpty")
            elif tag in self.refs:
                values[tag] = parse_chain_ref(child)
            elif tag in self.flags:
                values[tag] = True
            elif tag == "bandwidth":
                values["bandwidth"] = parse_bandwidth(child)
        return _checked(job, self.spec_class, uuid=uuid, options=options, **values)

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, self.spec_class)
        etree.SubElement(job, "disk").set("name", spec.disk)
        for tag in self.refs:
            ref = getattr(spec, tag)
            if ref is not None:
                build_chain_ref(job, tag, ref)
        for tag in self.flags:
            _flag(job, tag, getattr(spec, tag))
        if spec.bandwidth is not None:
            build_bandwidth(job, spec.bandwidth)


@define
class MigrationCodec:
    schema: str

    def parse(
        self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions
    ) -> MigrationSpec:
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for child in job.iterchildren(_ELEMENT):
            once(seen, child)
            tag = child.tag
            if tag == "destination":
                values["destination"] = T.attr(child, "uri", "nonEmpty")
            elif tag in ("live", "postcopy", "persistent"):
                values[tag] = True
            elif tag == "undefine-source":
                values["undefine_source"] = True
            elif tag == "bandwidth":
                values["bandwidth"] = parse_bandwidth(child)
            elif tag == "downtime-limit":
                values["downtime_limit"] = parse_downtime(child)
        spec: MigrationSpec = _checked(job, MigrationSpec, uuid=uuid, options=options, **values)
        return spec

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, MigrationSpec)
        etree.SubElement(job, "destination").set("uri", spec.destination)
        _flag(job, "live", spec.live)
        _flag(job, "postcopy", spec.postcopy)
        _flag(job, "persistent", spec.persistent)
        _flag(job, "undefine-source", spec.undefine_source)
        if spec.bandwidth is not None:
            build_bandwidth(job, spec.bandwidth)
        if spec.downtime_limit is not None:
            limit = etree.SubElement(job, "downtime-limit")
            limit.set("unit", "ms")
            limit.text = str(spec.downtime_limit)


BACKUP_CODEC = BackupCodec(
    _schema.defines_text("jobtypes.rng", only=("job-backup",))
    + _schema.defines_text("backup.rng", "checkpoint.rng")
)
BLOCKPULL_CODEC = ChainJobCodec(
    _schema.defines_text("jobtypes.rng", only=("job-blockpull",)), BlockPullSpec, ("base", "top")
)
BLOCKCOMMIT_CODEC = ChainJobCodec(
    _schema.defines_text("jobtypes.rng", only=("job-blockcommit",)),
    BlockCommitSpec,
    ("top", "base"),
    ("pivot", "delete", "shallow"),
)
MIGRATION_CODEC = MigrationCodec(_schema.defines_text("jobtypes.rng", only=("job-migration",)))

BUILTIN_CODEC_CLASSES = (BackupCodec, ChainJobCodec, MigrationCodec)
