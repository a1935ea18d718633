"""The four built-in job types: registration, and how each spec is checked against its
domain and completed with defaults before admission (``prepare``)."""

from __future__ import annotations

import attrs

from jobcore import constants as C
from jobcore import scheduler
from jobcore.backup import BackupDef, BackupMode, ServerTransport
from jobcore.driver import DiskInfo, DomainInfo
from jobcore.errors import InvalidArgument, JobError
from jobcore.paths import Access, PathKind, PathUse
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


def _chain_uses(disk: DiskInfo, writes: set[int]) -> list[PathUse]:
    return [
        PathUse(
            path,
            Access.WRITE if i in writes else Access.READ,
            f"layer {i} of disk '{disk.name}'",
        )
        for i, path in enumerate(disk.chain)
    ]


def backup_paths(spec: BackupJobSpec, dom: DomainInfo) -> list[PathUse]:
    """A prepared backup: each included disk's chain (read), its target or scratch
    file (created or, reused, written) and a UNIX socket its NBD server names."""
    uses: list[PathUse] = []
    for d in spec.backup.included_disks():
        disk = dom.disk(d.name)
        if disk is not None:
            uses.extend(_chain_uses(disk, set()))
        if d.store is not None:
            role = "scratch file" if is_pull_backup(spec) else "target"
            uses.append(PathUse(d.store.path, Access.WRITE, f"{role} of disk '{d.name}'"))
    server = spec.backup.server
    if server is not None and server.transport is ServerTransport.UNIX and server.socket:
        uses.append(PathUse(server.socket, Access.WRITE, "NBD server socket", PathKind.SOCKET))
    return uses


def pull_paths(spec: BlockPullSpec, dom: DomainInfo) -> list[PathUse]:
    """A prepared pull writes its top layer and reads the chain below."""
    disk = _disk(dom, spec.disk)
    top = 0 if spec.top is None or spec.top.index is None else spec.top.index
    return _chain_uses(disk, {top})


def commit_paths(spec: BlockCommitSpec, dom: DomainInfo) -> list[PathUse]:
    """A prepared commit writes its base (and, with ``delete``, removes the layers from
    top to just above base); it reads the rest of the chain."""
    disk = _disk(dom, spec.disk)
    top = 0 if spec.top is None or spec.top.index is None else spec.top.index
    base = len(disk.chain) - 1 if spec.base is None or spec.base.index is None else spec.base.index
    writes = {base} | (set(range(top, base)) if spec.delete else set())
    return _chain_uses(disk, writes)


def migration_paths(spec: MigrationSpec, dom: DomainInfo) -> list[PathUse]:
    """The destination opens every layer of every disk again (the active ones for
    writing); the files it makes for itself (sockets, logs) are the driver's own."""
    return [u for disk in dom.disks for u in _chain_uses(disk, {0})]


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
            paths=backup_paths,
        ),
        JobTypeInfo(
            JobType.BLOCKPULL,
            BlockPullSpec,
            codecs.BLOCKPULL_CODEC,
            scheduler.chain_claims,
            domain_level=False,
            operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
            prepare=prepare_pull,
            paths=pull_paths,
        ),
        JobTypeInfo(
            JobType.BLOCKCOMMIT,
            BlockCommitSpec,
            codecs.BLOCKCOMMIT_CODEC,
            scheduler.chain_claims,
            domain_level=False,
            operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
            prepare=prepare_commit,
            paths=commit_paths,
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
            paths=migration_paths,
        ),
    )
