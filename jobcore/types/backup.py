"""The ``backup`` job type (libvirt's virDomainBackupBegin): everything jobcore knows
about it — the spec, its prepared form, the XML codec, claims, prepare, paths, legacy
classification, verbs and stats keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from attrs import field, frozen
from lxml import etree

from jobcore import constants as C
from jobcore.backup import (
    BackupDef,
    BackupDisk,
    BackupMode,
    CheckpointDef,
    CheckpointKind,
    DiskBackupMode,
    ServerTransport,
    StoreType,
)
from jobcore.errors import InvalidArgument
from jobcore.paths import Access, PathKind, PathUse
from jobcore.scheduler import (
    Claim,
    Mode,
    checkpoint_resource,
    disk_resource,
    domain_resource,
    file_resource,
    image_resource,
    normalize_path,
)
from jobcore.spec import JobOptions, JobType
from jobcore.types.base import JobTypeInfo, chain_uses, prepared
from jobcore.xml import _schema
from jobcore.xml import _types as T
from jobcore.xml._parse import repeated, trusted
from jobcore.xml.backup import align_backup, build_backup_element, parse_backup_element
from jobcore.xml.checkpoint import build_checkpoint_element, parse_checkpoint_element
from jobcore.xml.common import round_trips, round_trips_as

if TYPE_CHECKING:
    from jobcore.driver import DomainInfo


@frozen
class BackupJobSpec:
    backup: BackupDef = BackupDef()
    checkpoint: CheckpointDef | None = None
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()
    #: VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL: targets and scratch files exist already and
    #: are used as they are (after a format and size check), never created nor removed.
    #: Set by the engine from JobBegin's flags; not part of the job XML.
    reuse_external: bool = False

    TYPE: ClassVar[JobType] = JobType.BACKUP


@frozen
class PreparedBackupDisk:
    """One disk a prepared backup reads, every libvirt default applied."""

    name: str
    #: the target (push) or scratch file (pull), in scheduler.normalize_path's spelling
    store: str
    store_type: StoreType
    #: the store's image format
    format: str
    #: the checkpoint whose changes this disk's backup copies; None: a full backup
    incremental: str | None
    #: pull mode: the NBD export's name (push: None)
    exportname: str | None
    #: incremental pull: the bitmap the export shows, created by the job (else None)
    exportbitmap: str | None
    #: the bitmap the backup's checkpoint creates on this disk (None: none)
    checkpoint_bitmap: str | None


@frozen
class PreparedBackup(BackupJobSpec):
    """What a driver gets: the aligned spec (``backup``, as the job XML shows it) and the
    values it implies, resolved once here."""

    mode: BackupMode = field(kw_only=True)
    disks: tuple[PreparedBackupDisk, ...] = field(kw_only=True)
    #: the checkpoint the backup creates (None: none)
    checkpoint_name: str | None = field(kw_only=True)

    @property
    def pull(self) -> bool:
        return self.mode is BackupMode.PULL


# ---- XML ---------------------------------------------------------------------------------


@attrs.define
class BackupCodec:
    schema: str
    checks_datatypes: ClassVar[bool] = True

    def parse(
        self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions
    ) -> BackupJobSpec:
        backup_el = checkpoint_el = None
        for child in job:
            tag = child.tag
            if tag == "domainbackup":
                if backup_el is not None:
                    repeated(child)
                backup_el = child
            elif tag == "domaincheckpoint":
                if checkpoint_el is not None:
                    repeated(child)
                checkpoint_el = child
        backup = parse_backup_element(backup_el) if backup_el is not None else _NO_BACKUP
        checkpoint = parse_checkpoint_element(checkpoint_el) if checkpoint_el is not None else None
        return _new_backup_spec(backup, checkpoint, uuid, options, False)

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, BackupJobSpec)
        build_backup_element(spec.backup, job)
        if spec.checkpoint is not None:
            build_checkpoint_element(spec.checkpoint, job)


#: a job without <domainbackup> (BackupDef is frozen: one value serves all)
_NO_BACKUP = BackupDef()
#: BackupJobSpec without attrs' __init__ (it has no validator, converter or post-init)
_new_backup_spec = trusted(BackupJobSpec)

BACKUP_CODEC = BackupCodec(
    _schema.defines_text("jobtypes.rng", only=("job-backup",))
    + _schema.defines_text("backup.rng", "checkpoint.rng")
)


# ---- prepare -----------------------------------------------------------------------------


def prepare_backup(spec: BackupJobSpec, dom: DomainInfo, wall: float) -> PreparedBackup:
    checkpoint = spec.checkpoint
    if checkpoint is not None and checkpoint.name is None:
        checkpoint = attrs.evolve(checkpoint, name=str(int(wall)))
    # libvirt names default targets '<source>.<checkpoint name or Unix time>'; parallel
    # backups are possible here, so a time suffix also carries the job's UUID prefix.
    if checkpoint is not None and checkpoint.name:
        suffix = checkpoint.name
    else:
        suffix = f"{int(wall)}-{spec.uuid.hex[:8]}" if spec.uuid else f"{int(wall)}"
    backup = _normalized_files(
        align_backup(spec.backup, {d.name: d.source for d in dom.disks}, suffix)
    )
    included = [d for d in backup.disks if d.backup is not False]  # (included_disks())
    if not included:
        raise InvalidArgument("no disks selected for backup")
    mode = backup.effective_mode
    disks = tuple([_prepared_disk(d, mode, checkpoint) for d in included])
    result = prepared(
        PreparedBackup,
        spec,
        backup=backup,
        checkpoint=checkpoint,
        mode=mode,
        disks=disks,
        checkpoint_name=None if checkpoint is None else checkpoint.name,
    )
    if round_trips(spec) and _outside_values_valid(result):
        round_trips_as(result, spec)
    return result


def _outside_values_valid(prepared: PreparedBackup) -> bool:
    """Whether the values prepare took from outside the job's document (the domain's disk
    names and sources, the time suffix, resolved paths) are ones its parser accepts: then
    the aligned spec of a spec that round-trips round-trips too (align_backup keeps the
    format's rules; tests/test_xml_roundtrip.py)."""
    backup = prepared.backup
    for disk in backup.disks:
        if not T.valid(disk.name, "diskTargetDev"):
            return False
        if disk.store is not None and not T.valid(disk.store.path, "absFilePath"):
            return False
    socket = backup.server.socket if backup.server is not None else None
    if socket is not None and not T.valid(socket, "absFilePath"):
        return False
    name = prepared.checkpoint_name
    return name is None or T.valid(name, "checkpointName")


def _prepared_disk(
    d: BackupDisk, mode: BackupMode, checkpoint: CheckpointDef | None
) -> PreparedBackupDisk:
    assert d.store is not None and d.type is not None  # align_backup filled them
    incremental = None if d.backupmode is DiskBackupMode.FULL else d.incremental
    pull = mode is BackupMode.PULL
    return PreparedBackupDisk(
        name=d.name,
        store=d.store.path,
        store_type=d.type,
        format=d.store.format or "qcow2",
        incremental=incremental,
        exportname=(d.exportname or d.name) if pull else None,
        exportbitmap=(d.exportbitmap or f"backup-{d.name}") if pull and incremental else None,
        checkpoint_bitmap=_checkpoint_bitmap(checkpoint, d.name),
    )


def _checkpoint_bitmap(checkpoint: CheckpointDef | None, disk: str) -> str | None:
    """libvirt's rule: a checkpoint that lists disks covers only those, minus the ones it
    says checkpoint='no' for; a disk's bitmap is named as the checkpoint unless given."""
    if checkpoint is None:
        return None
    chosen = {c.name: c for c in checkpoint.disks}
    cd = chosen.get(disk)
    if checkpoint.disks and cd is None:
        return None
    if cd is not None and cd.checkpoint is CheckpointKind.NO:
        return None
    return (cd.bitmap if cd is not None else None) or checkpoint.name


def _normalized_files(backup: BackupDef) -> BackupDef:
    """Target/scratch files and the NBD socket in one spelling (scheduler.normalize_path):
    the file a job claims is the file its driver checks and writes, however it was
    written ('/d//t', '/d/./t', a symlinked directory). Values already so spelt are kept
    (no copy)."""
    disks: list[BackupDisk] | None = None  # a copy once a path changes
    for i, d in enumerate(backup.disks):
        store = d.store
        if store is not None and (path := normalize_path(store.path)) != store.path:
            if disks is None:
                disks = list(backup.disks)
            disks[i] = attrs.evolve(d, store=attrs.evolve(store, path=path))
    server = backup.server
    socket = server.socket if server is not None else None
    if server is not None and socket and (resolved := normalize_path(socket)) != socket:
        server = attrs.evolve(server, socket=resolved)
    elif disks is None:
        return backup
    return attrs.evolve(
        backup, disks=tuple(backup.disks if disks is None else disks), server=server
    )


def is_pull_backup(spec: BackupJobSpec) -> bool:
    return spec.backup.effective_mode is BackupMode.PULL


# ---- claims and paths --------------------------------------------------------------------


def backup_socket(spec: BackupJobSpec) -> str | None:
    """The UNIX socket a pull backup names for its NBD server, if it names one."""
    server = spec.backup.server
    if spec.backup.effective_mode is not BackupMode.PULL or server is None:
        return None
    if server.transport is not ServerTransport.UNIX or not server.socket:
        return None
    return server.socket


def backup_claims(spec: BackupJobSpec, dom: DomainInfo) -> tuple[Claim, ...]:
    """Shared on the domain, a read of each disk, of each image of its chain (as its
    paths name them: another domain may share one) and of each checkpoint an
    incremental starts from (deleting it is refused meanwhile), a write of each target
    or scratch file and of the NBD socket it names (a prepared backup's: its paths are
    normalised)."""
    assert isinstance(spec, PreparedBackup)
    claims = [Claim(domain_resource(dom.name), Mode.DOMAIN_SHARED)]
    files: dict[str, None] = {}
    bases: dict[str, None] = {}
    images: dict[str, None] = {}
    for disk in spec.disks:
        claims.append(Claim(disk_resource(dom.name, disk.name), Mode.READ))
        files[file_resource(disk.store)] = None
        if disk.incremental is not None:
            bases[checkpoint_resource(dom.name, disk.incremental)] = None
        found = dom.disk(disk.name)
        if found is not None:  # every layer read: image_claims(chain_uses(found, set()))
            for path in found.chain:
                images[image_resource(path)] = None
    claims.extend(Claim(name, Mode.READ) for name in images)
    claims.extend(Claim(name, Mode.READ) for name in bases)
    sock = backup_socket(spec)
    if sock is not None:  # the NBD server creates it: two jobs must not share it
        files[file_resource(sock)] = None
    claims.extend(Claim(name, Mode.WRITE) for name in files)
    return tuple(claims)


def backup_paths(spec: BackupJobSpec, dom: DomainInfo) -> Iterable[PathUse]:
    """A prepared backup: each included disk's chain (read), its target or scratch
    file (created or, reused, written) and a UNIX socket its NBD server names."""
    uses: list[PathUse] = []
    for d in spec.backup.included_disks():
        disk = dom.disk(d.name)
        if disk is not None:
            uses.extend(chain_uses(disk, set()))
        if d.store is not None:
            role = "scratch file" if is_pull_backup(spec) else "target"
            uses.append(PathUse(d.store.path, Access.WRITE, f"{role} of disk '{d.name}'"))
    server = spec.backup.server
    if server is not None and server.transport is ServerTransport.UNIX and server.socket:
        uses.append(PathUse(server.socket, Access.WRITE, "NBD server socket", PathKind.SOCKET))
    return uses


BACKUP = JobTypeInfo(
    JobType.BACKUP,
    BackupJobSpec,
    BACKUP_CODEC,
    backup_claims,
    domain_level=True,
    operation=C.VIR_DOMAIN_JOB_OPERATION_BACKUP,
    prepare=prepare_backup,
    abort_completes=is_pull_backup,
    paths=backup_paths,
)

INFOS = (BACKUP,)
