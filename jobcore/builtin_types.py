"""The four built-in job types: registration, and how each spec is checked against its
domain and completed with defaults before admission (``prepare``)."""

from __future__ import annotations

import attrs

from jobcore import constants as C
from jobcore import scheduler
from jobcore.backup import BackupDef, BackupMode
from jobcore.driver import DiskInfo, DomainInfo
from jobcore.errors import InvalidArgument, JobError
from jobcore.registry import JobTypeInfo
from jobcore.spec import (
    BackupJobSpec,
    BlockCommitSpec,
    BlockPullSpec,
    ChainRef,
    JobType,
    MigrationSpec,
)
from jobcore.uri import parse_uri
from jobcore.xml import align_backup, codecs


def prepare_backup(spec: BackupJobSpec, dom: DomainInfo, wall: float) -> BackupJobSpec:
    checkpoint = spec.checkpoint
    if checkpoint is not None and checkpoint.name is None:
        checkpoint = attrs.evolve(checkpoint, name=str(int(wall)))
    # libvirt names default targets '<source>.<checkpoint name or Unix time>'; parallel
    # backups are possible here, so a time suffix also carries the job's UUID prefix.
    if checkpoint is not None and checkpoint.name:
        suffix = checkpoint.name
    else:
        suffix = f"{int(wall)}" + (f"-{spec.uuid.hex[:8]}" if spec.uuid else "")
    backup = align_backup(spec.backup, {d.name: d.source for d in dom.disks}, suffix)
    if not backup.included_disks():
        raise InvalidArgument("no disks selected for backup")
    return attrs.evolve(spec, backup=_normalized_files(backup), checkpoint=checkpoint)


def _normalized_files(backup: BackupDef) -> BackupDef:
    """Target/scratch files and the NBD socket in one spelling (scheduler.normalize_path):
    the file a job claims is the file its driver checks and writes, however it was
    written ('/d//t', '/d/./t', a symlinked directory)."""
    disks = tuple(
        attrs.evolve(d, store=attrs.evolve(d.store, path=scheduler.normalize_path(d.store.path)))
        if d.store is not None
        else d
        for d in backup.disks
    )
    server = backup.server
    if server is not None and server.socket:
        server = attrs.evolve(server, socket=scheduler.normalize_path(server.socket))
    return attrs.evolve(backup, disks=disks, server=server)


def is_pull_backup(spec: BackupJobSpec) -> bool:
    return spec.backup.effective_mode is BackupMode.PULL


def _disk(dom: DomainInfo, name: str) -> DiskInfo:
    disk = dom.disk(name)
    if disk is None:
        raise InvalidArgument(f"disk '{name}' not found in domain '{dom.name}'")
    return disk


def _index(disk: DiskInfo, ref: ChainRef | None, what: str, default: int) -> int:
    if ref is None:
        return default
    if ref.file is not None:
        try:
            return disk.chain.index(ref.file)
        except ValueError:
            raise InvalidArgument(
                f"{what} '{ref.file}' is not in the backing chain of disk '{disk.name}'"
            ) from None
    assert ref.index is not None
    if ref.index >= len(disk.chain):
        raise InvalidArgument(
            f"{what} index {ref.index} is out of range: disk "
            f"'{disk.name}' has {len(disk.chain)} layers"
        )
    return ref.index


def prepare_pull(spec: BlockPullSpec, dom: DomainInfo, wall: float) -> BlockPullSpec:
    disk = _disk(dom, spec.disk)
    top = _index(disk, spec.top, "top", 0)
    base = None if spec.base is None else _index(disk, spec.base, "base", 0)
    if base is not None and base <= top:
        raise InvalidArgument(f"base (index {base}) must lie below top (index {top})")
    return attrs.evolve(
        spec, top=ChainRef(index=top), base=None if base is None else ChainRef(index=base)
    )


def prepare_commit(spec: BlockCommitSpec, dom: DomainInfo, wall: float) -> BlockCommitSpec:
    disk = _disk(dom, spec.disk)
    if len(disk.chain) < 2:
        raise InvalidArgument(f"disk '{disk.name}' has no backing file to commit into")
    top = _index(disk, spec.top, "top", 0)
    # as libvirt's VIR_DOMAIN_BLOCK_COMMIT_SHALLOW: without a base, shallow means the
    # top's own backing file instead of the bottom of the chain
    base = _index(disk, spec.base, "base", top + 1 if spec.shallow else len(disk.chain) - 1)
    if base <= top:
        raise InvalidArgument(f"base (index {base}) must lie below top (index {top})")
    return attrs.evolve(spec, top=ChainRef(index=top), base=ChainRef(index=base))


def prepare_migration(spec: MigrationSpec, dom: DomainInfo, wall: float) -> MigrationSpec:
    try:
        parse_uri(spec.destination)
    except JobError as exc:
        raise InvalidArgument(f"invalid migration destination: {exc}") from None
    return spec


def builtin_type_infos() -> tuple[JobTypeInfo, ...]:
    return (
        JobTypeInfo(
            JobType.BACKUP,
            BackupJobSpec,
            codecs.BACKUP_CODEC,
            scheduler.backup_claims,
            domain_level=True,
            operation=C.VIR_DOMAIN_JOB_OPERATION_BACKUP,
            prepare=prepare_backup,
            abort_completes=is_pull_backup,
        ),
        JobTypeInfo(
            JobType.BLOCKPULL,
            BlockPullSpec,
            codecs.BLOCKPULL_CODEC,
            scheduler.chain_claims,
            domain_level=False,
            operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
            prepare=prepare_pull,
        ),
        JobTypeInfo(
            JobType.BLOCKCOMMIT,
            BlockCommitSpec,
            codecs.BLOCKCOMMIT_CODEC,
            scheduler.chain_claims,
            domain_level=False,
            operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
            prepare=prepare_commit,
        ),
        JobTypeInfo(
            JobType.MIGRATION,
            MigrationSpec,
            codecs.MIGRATION_CODEC,
            scheduler.migration_claims,
            domain_level=True,
            operation=C.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
            progress_keys="data",
            prepare=prepare_migration,
        ),
    )
