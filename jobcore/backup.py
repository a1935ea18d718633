"""Typed models of libvirt's <domainbackup> and <domaincheckpoint> documents.

Values only: no XML here (see jobcore.xml) and no hypervisor knowledge. Fields that the
user left out stay ``None`` until ``jobcore.xml.align_backup`` fills libvirt's defaults.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable

from attrs import field, frozen


def _disks(value: Iterable[BackupDisk]) -> tuple[BackupDisk, ...]:
    return tuple(value)


def _seclabels(value: Iterable[SecLabel]) -> tuple[SecLabel, ...]:
    return tuple(value)


def _checkpoint_disks(value: Iterable[CheckpointDisk]) -> tuple[CheckpointDisk, ...]:
    return tuple(value)


class BackupMode(enum.StrEnum):
    PUSH = "push"
    PULL = "pull"


class DiskBackupMode(enum.StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class StoreType(enum.StrEnum):
    FILE = "file"
    BLOCK = "block"


class ServerTransport(enum.StrEnum):
    TCP = "tcp"
    UNIX = "unix"
    FD = "fd"


@frozen
class BackupServer:
    """<server>: where a pull-mode backup exports its NBD server."""

    transport: ServerTransport | None = None  # None: not written (tcp)
    name: str | None = None
    port: int | None = None
    socket: str | None = None
    fdgroup: str | None = None
    tls: bool | None = None


class EncryptionFormat(enum.StrEnum):
    LUKS = "luks"


@frozen
class SecLabel:
    """<seclabel> of a backup target or scratch file (libvirt's per-device override)."""

    model: str | None = None
    relabel: bool = True
    #: output-only in libvirt (labelling was skipped); written instead of ``relabel``
    labelskip: bool = False
    label: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.labelskip and not self.relabel:
            raise ValueError("labelskip='yes' is written instead of relabel")
        if self.label is not None and (not self.relabel or self.labelskip):
            raise ValueError("a seclabel with relabel='no' or labelskip takes no <label>")
        if self.label is None and self.relabel and not self.labelskip:
            raise ValueError("a seclabel needs relabel='no', labelskip='yes' or a <label>")


@frozen
class EncryptionSecret:
    """<secret type='passphrase'>: exactly one of ``uuid`` or ``usage``."""

    uuid: uuid.UUID | None = None
    usage: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.uuid is None) == (self.usage is None):
            raise ValueError("an encryption secret names exactly one of uuid or usage")


@frozen
class EncryptionCipher:
    name: str
    size: int
    mode: str | None = None
    hash: str | None = None


@frozen
class EncryptionIvgen:
    name: str
    hash: str | None = None


@frozen
class Encryption:
    """<encryption format='luks'> of a backup target or scratch file."""

    secret: EncryptionSecret
    format: EncryptionFormat = EncryptionFormat.LUKS
    engine: str | None = None
    cipher: EncryptionCipher | None = None
    ivgen: EncryptionIvgen | None = None

    def __attrs_post_init__(self) -> None:
        if (self.cipher is None) != (self.ivgen is None):
            raise ValueError("<cipher> and <ivgen> go together")


@frozen
class BackupStore:
    """<target> (push) or <scratch> (pull) of one disk: a file or a block device."""

    path: str
    format: str | None = None  # <driver type='…'/>
    seclabels: tuple[SecLabel, ...] = field(default=(), converter=_seclabels)
    encryption: Encryption | None = None


@frozen
class BackupDisk:
    name: str
    backup: bool | None = None
    type: StoreType | None = None
    backupmode: DiskBackupMode | None = None
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    store: BackupStore | None = None
    #: <driver type='…'/> of a disk that names no target/scratch yet; align_backup moves
    #: it into ``store.format`` when it chooses the file. Never set together with ``store``.
    driver: str | None = None
    #: output-only: the disk's index (libvirt's virDomainSetBlockThreshold target)
    index: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.driver is not None and self.store is not None:
            raise ValueError("a disk with a store keeps its driver type in store.format")
        if (
            self.backup is False
            and (
                self.type,
                self.backupmode,
                self.incremental,
                self.exportname,
                self.exportbitmap,
                self.store,
                self.driver,
                self.index,
            )
            != (None,) * 8
        ):
            raise ValueError(f"disk '{self.name}' has backup='no' and takes no other setting")


@frozen
class BackupDef:
    mode: BackupMode | None = None  # None: not written (push)
    incremental: str | None = None
    server: BackupServer | None = None
    disks: tuple[BackupDisk, ...] = field(default=(), converter=_disks)

    @property
    def effective_mode(self) -> BackupMode:
        return self.mode or BackupMode.PUSH

    def included_disks(self) -> tuple[BackupDisk, ...]:
        """Disks this backup reads (backup='yes' or unspecified)."""
        return tuple(d for d in self.disks if d.backup is not False)


class CheckpointKind(enum.StrEnum):
    BITMAP = "bitmap"
    NO = "no"


@frozen
class CheckpointDisk:
    name: str
    checkpoint: CheckpointKind | None = None
    bitmap: str | None = None
    size: int | None = None


@frozen
class CheckpointDef:
    name: str | None = None
    description: str | None = None
    disks: tuple[CheckpointDisk, ...] = field(default=(), converter=_checkpoint_disks)
    # read-only fields, accepted for redefinition
    creation_time: int | None = None
    parent: str | None = None
    #: the embedded <domain> (the domain's definition when the checkpoint was taken), kept
    #: verbatim as XML text, its indentation relative to column 0
    domain: str | None = None
