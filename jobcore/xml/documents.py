"""libvirt's standalone ``<domainbackup>`` and ``<domaincheckpoint>`` documents (below the
job types: the backup type embeds the same elements in ``<job>``)."""

from __future__ import annotations

from jobcore.backup import BackupDef, CheckpointDef
from jobcore.xml import _schema
from jobcore.xml._parse import MAX_DOCUMENT_BYTES, parse_document, validate
from jobcore.xml._types import RELAXED
from jobcore.xml._write import serialize
from jobcore.xml.backup import build_backup_element, parse_backup_element
from jobcore.xml.checkpoint import build_checkpoint_element, parse_checkpoint_element
from jobcore.xml.common import guarded, self_checked


def parse_backup(doc: str | bytes) -> BackupDef:
    """A ``<domainbackup>`` document -> BackupDef (nothing aligned: see align_backup)."""
    return guarded(_parse_backup, doc)


def _parse_backup(doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> BackupDef:
    el = parse_document(doc, "domainbackup", max_bytes)
    validate(_schema.document_schema("domainbackup", ("backup.rng",), RELAXED), el, "domainbackup")
    return parse_backup_element(el)


def format_backup(defn: BackupDef) -> str:
    return guarded(lambda d: self_checked(serialize(build_backup_element(d)), _parse_backup), defn)


def parse_checkpoint(doc: str | bytes) -> CheckpointDef:
    """A ``<domaincheckpoint>`` document (creation or redefinition) -> CheckpointDef."""
    return guarded(_parse_checkpoint, doc)


def _parse_checkpoint(
    doc: str | bytes, max_bytes: int | None = MAX_DOCUMENT_BYTES
) -> CheckpointDef:
    el = parse_document(doc, "domaincheckpoint", max_bytes)
    validate(
        _schema.document_schema("domaincheckpoint", ("checkpoint.rng",), RELAXED),
        el,
        "domaincheckpoint",
    )
    return parse_checkpoint_element(el)


def format_checkpoint(defn: CheckpointDef) -> str:
    return guarded(
        lambda d: self_checked(serialize(build_checkpoint_element(d)), _parse_checkpoint), defn
    )
