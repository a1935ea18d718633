"""Typed models of libvirt's <domainbackup> and <domaincheckpoint> documents.

Values only: no XML here (see jobcore.xml) and no hypervisor knowledge. Fields that the
user left out stay ``None`` until ``jobcore.xml.align_backup`` fills libvirt's defaults.
"""

from __future__ import annotations

import enum

from attrs import field, frozen


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


@frozen
class BackupStore:
    """<target> (push) or <scratch> (pull) of one disk: a file or a block device."""

    path: str
    format: str | None = None  # <driver type='…'/>


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


@frozen
class BackupDef:
    mode: BackupMode | None = None  # None: not written (push)
    incremental: str | None = None
    server: BackupServer | None = None
    disks: tuple[BackupDisk, ...] = field(default=(), converter=tuple)

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
    disks: tuple[CheckpointDisk, ...] = field(default=(), converter=tuple)
    # read-only fields, accepted for redefinition
    creation_time: int | None = None
    parent: str | None = None
