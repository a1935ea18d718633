"""Checkpoints: libvirt's named points in a domain's disk history, first-class and
persistent (design/checkpoints.md).

A checkpoint is metadata kept here (name, description, parent, creation time, the disks
it covers with the bitmap of each) plus, on the hypervisor, one persistent dirty bitmap per
covered disk, named as the checkpoint, that records every write since. This module holds
the model and every rule: creation (with a backup or on its own), REDEFINE and
REDEFINE_VALIDATE, the listing filters, the XML description, deletion (the bitmap merged
into the parent's, children re-parented, DELETE_CHILDREN / _CHILDREN_ONLY /
_METADATA_ONLY) and the refusal to delete a checkpoint a running backup reads from.
Drivers only add, merge and remove bitmaps (jobcore.driver: ``bitmaps``, ``add_bitmaps``,
``remove_bitmaps``); the engine calls the backup hooks (``check_backup``,
``backup_started``, ``backup_ended``).

The records are kept in a DriverState (the job store's ``driver_state`` table with a
durable store), one value per domain under ``checkpoints:DOMAIN``, so they survive a
restart of the process that owns the connection (jobd).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from attrs import evolve, frozen

from jobcore import constants as C
from jobcore.backup import CheckpointDef, CheckpointDisk, CheckpointKind
from jobcore.driver import BitmapInfo, BitmapRemoval, DomainInfo, DriverState
from jobcore.errors import (
    InvalidArgument,
    NoSuchCheckpoint,
    OperationInvalid,
    Unsupported,
)
from jobcore.log import get_logger
from jobcore.scheduler import Scheduler, checkpoint_resource
from jobcore.types.backup import PreparedBackup
from jobcore.xml.documents import format_checkpoint

_log = get_logger(__name__)

#: the DriverState key prefix of a domain's checkpoints (followed by the domain's name)
KEY = "checkpoints:"


@frozen
class CoveredDisk:
    """One disk of a checkpoint: the bitmap recording its changes (None: checkpoint='no')."""

    name: str
    bitmap: str | None


@frozen
class CheckpointRecord:
    """A checkpoint as kept: what ``xml_desc`` shows and REDEFINE accepts back."""

    domain: str
    name: str
    creation_time: int
    disks: tuple[CoveredDisk, ...]
    description: str | None = None
    parent: str | None = None
    #: the backup job whose begin created it: it goes again if that backup fails
    job: uuid.UUID | None = None

    def bitmap(self, disk: str) -> str | None:
        return next((d.bitmap for d in self.disks if d.name == disk), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "creation_time": self.creation_time,
            "disks": [[d.name, d.bitmap] for d in self.disks],
            "description": self.description,
            "parent": self.parent,
            "job": None if self.job is None else str(self.job),
        }

    @classmethod
    def from_json(cls, domain: str, v: Mapping[str, Any]) -> CheckpointRecord:
        return cls(
            domain,
            str(v["name"]),
            int(v["creation_time"]),
            tuple(CoveredDisk(str(n), None if b is None else str(b)) for n, b in v["disks"]),
            v.get("description"),
            v.get("parent"),
            None if v.get("job") is None else uuid.UUID(v["job"]),
        )

    def definition(self, sizes: Mapping[str, int] | None = None) -> CheckpointDef:
        """The ``<domaincheckpoint>`` of it (libvirt's output shape; ``sizes``: disk ->
        dirty bytes, for VIR_DOMAIN_CHECKPOINT_XML_SIZE). ``<domain>`` is never part of it."""
        disks = tuple(
            CheckpointDisk(d.name, CheckpointKind.NO)
            if d.bitmap is None
            else CheckpointDisk(
                d.name,
                CheckpointKind.BITMAP,
                d.bitmap,
                None if sizes is None else sizes.get(d.name, 0),
            )
            for d in self.disks
        )
        return CheckpointDef(
            name=self.name,
            description=self.description,
            disks=disks,
            creation_time=self.creation_time,
            parent=self.parent,
        )


@frozen
class _DomainCheckpoints:
    #: by name, in creation order
    records: Mapping[str, CheckpointRecord]
    #: the one a new checkpoint gets as its parent
    current: str | None


_EMPTY = _DomainCheckpoints({}, None)


def not_found(domain: str, name: str) -> NoSuchCheckpoint:
    return NoSuchCheckpoint(
        f"Domain checkpoint not found: no domain checkpoint with matching name '{name}' "
        f"on domain '{domain}'"
    )


def _bitmap_ops(dconn: object, domain: str) -> Any:
    """The driver connection, if it implements the bitmap calls; else Unsupported."""
    if not all(hasattr(dconn, m) for m in ("bitmaps", "add_bitmaps", "remove_bitmaps")):
        raise Unsupported(
            f"driver '{getattr(dconn, 'uri', '?')}' does not support checkpoints "
            f"(domain '{domain}')"
        )
    return dconn


def align_disks(defn: CheckpointDef, dom: DomainInfo, name: str) -> tuple[CoveredDisk, ...]:
    """libvirt's alignment: no disks listed covers every disk; a list covers those it names
    (checkpoint='no' excluded) and leaves the others out; every disk is named, in the
    domain's order. The bitmap is named as the checkpoint (QEMU driver's rule)."""
    by_source = {d.source: d.name for d in dom.disks}
    listed: dict[str, CheckpointDisk] = {}
    for cd in defn.disks:
        disk = cd.name if dom.disk(cd.name) is not None else by_source.get(cd.name)
        if disk is None:
            raise InvalidArgument(f"no disk named '{cd.name}' in domain '{dom.name}'")
        if disk in listed:
            raise InvalidArgument(f"disk '{disk}' specified twice in checkpoint '{name}'")
        listed[disk] = cd
        if cd.checkpoint is not CheckpointKind.NO and cd.bitmap not in (None, name):
            raise Unsupported(f"bitmap for disk '{disk}' must match checkpoint name '{name}'")
    covered = []
    for d in dom.disks:
        got = listed.get(d.name)
        if (listed and got is None) or (got is not None and got.checkpoint is CheckpointKind.NO):
            covered.append(CoveredDisk(d.name, None))
        else:
            covered.append(CoveredDisk(d.name, name))
    if all(c.bitmap is None for c in covered):
        raise InvalidArgument(f"checkpoint '{name}' covers no disk of domain '{dom.name}'")
    return tuple(covered)


class Checkpoints:
    """Every checkpoint of one driver connection's domains, and the rules on them."""

    def __init__(self, dconn: object, scheduler: Scheduler, state: DriverState | None) -> None:
        self.dconn = dconn
        self.scheduler = scheduler
        self.state = state
        self._domains: dict[str, _DomainCheckpoints] = {}
        self._dirty = False
        #: one create or delete at a time: each reads the tree, asks the driver, writes
        self._lock = anyio.Lock()
        if state is not None:
            for key, value in state.load().items():
                if key.startswith(KEY):
                    domain = key[len(KEY) :]
                    records = [CheckpointRecord.from_json(domain, v) for v in value["list"]]
                    self._domains[domain] = _DomainCheckpoints(
                        {r.name: r for r in records}, value.get("current")
                    )

    # ---- reading -----------------------------------------------------------------------

    def _of(self, domain: str) -> _DomainCheckpoints:
        return self._domains.get(domain, _EMPTY)

    def find(self, domain: str, name: str) -> CheckpointRecord | None:
        return self._of(domain).records.get(name)

    def get(self, domain: str, name: str) -> CheckpointRecord:
        rec = self.find(domain, name)
        if rec is None:
            raise not_found(domain, name)
        return rec

    def current(self, domain: str) -> str | None:
        return self._of(domain).current

    def children(self, domain: str, name: str) -> list[CheckpointRecord]:
        return [r for r in self._of(domain).records.values() if r.parent == name]

    def descendants(self, domain: str, name: str) -> list[CheckpointRecord]:
        found: list[CheckpointRecord] = []
        todo = [name]
        while todo:
            kids = self.children(domain, todo.pop())
            found += kids
            todo += [k.name for k in kids]
        return found

    def listed(self, domain: str, flags: int = 0) -> list[CheckpointRecord]:
        """In creation order, filtered as libvirt's LIST_* flags say: ROOTS (no parent),
        LEAVES / NO_LEAVES (both: no filter), TOPOLOGICAL (parents before children)."""
        records = list(self._of(domain).records.values())
        if flags & C.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS:
            records = [r for r in records if r.parent is None]
        leaves = flags & C.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES
        no_leaves = flags & C.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES
        if bool(leaves) != bool(no_leaves):
            parents = {r.parent for r in self._of(domain).records.values()}
            records = [r for r in records if (r.name not in parents) == bool(leaves)]
        if flags & C.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL:
            records = self._topological(domain, records)
        return records

    def _topological(self, domain: str, records: list[CheckpointRecord]) -> list[CheckpointRecord]:
        wanted = {r.name for r in records}
        ordered: list[CheckpointRecord] = []
        todo = [r for r in self._of(domain).records.values() if r.parent is None][::-1]
        while todo:  # depth first, each level in creation order
            rec = todo.pop()
            if rec.name in wanted:
                ordered.append(rec)
            todo += self.children(domain, rec.name)[::-1]
        return ordered

    async def xml_desc(self, dom: DomainInfo, name: str, flags: int = 0) -> str:
        """libvirt's ``<domaincheckpoint>`` output (SECURE and NO_DOMAIN change nothing:
        no secret and no ``<domain>`` is ever shown); SIZE adds each disk's dirty bytes
        since the checkpoint, from the hypervisor's bitmap."""
        rec = self.get(dom.name, name)
        sizes = None
        if flags & C.VIR_DOMAIN_CHECKPOINT_XML_SIZE:
            have = await _bitmap_ops(self.dconn, dom.name).bitmaps(dom.name)
            sizes = {}
            for d in rec.disks:
                if d.bitmap is None:
                    continue
                info = _bitmap_named(have, d.name, d.bitmap)
                if info is None:
                    raise InvalidArgument(
                        f"missing or broken bitmap '{d.bitmap}' for disk '{d.name}' of "
                        f"checkpoint '{name}': no size to show"
                    )
                sizes[d.name] = info.count
        return format_checkpoint(rec.definition(sizes))

    # ---- writing -----------------------------------------------------------------------

    def _put(self, domain: str, dc: _DomainCheckpoints) -> None:
        if dc.records:
            self._domains[domain] = dc
        else:
            self._domains.pop(domain, None)
        if self.state is not None:
            if dc.records:
                self.state.save(
                    KEY + domain,
                    {"current": dc.current, "list": [r.to_json() for r in dc.records.values()]},
                )
            else:
                self.state.delete(KEY + domain)
            self._dirty = True

    def _add(self, rec: CheckpointRecord, *, make_current: bool = True) -> None:
        dc = self._of(rec.domain)
        records = dict(dc.records)
        records[rec.name] = rec
        self._put(rec.domain, _DomainCheckpoints(records, rec.name if make_current else dc.current))

    async def flush(self) -> None:
        """Return once every change so far is durable (a no-op for the memory store)."""
        if self._dirty and self.state is not None:
            self._dirty = False
            with anyio.CancelScope(shield=True):
                await self.state.sync()

    async def create(
        self, dom: DomainInfo, defn: CheckpointDef, flags: int, wall: float
    ) -> CheckpointRecord:
        """checkpointCreateXML: a new checkpoint and its bitmaps, or with REDEFINE the
        metadata of one whose bitmaps exist already (REDEFINE_VALIDATE: and are sound)."""
        redefine = bool(flags & C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        validate = bool(flags & C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
        if flags & C.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE:
            raise Unsupported(
                "QEMU guest agent is not configured: cannot quiesce the file systems of "
                f"domain '{dom.name}' (VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)"
            )
        if validate and not redefine:
            raise InvalidArgument(
                "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE requires "
                "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE"
            )
        ops = _bitmap_ops(self.dconn, dom.name)
        async with self._lock:
            if redefine:
                rec = await self._redefine(ops, dom, defn, validate)
            else:
                # libvirt ignores <parent>, <creationTime> and <domain> unless redefining
                name = defn.name if defn.name is not None else str(int(wall))
                if self.find(dom.name, name) is not None:
                    raise OperationInvalid(f"domain '{dom.name}' already has checkpoint '{name}'")
                disks = align_disks(defn, dom, name)
                await ops.add_bitmaps(
                    dom.name, [(d.name, d.bitmap) for d in disks if d.bitmap is not None]
                )
                rec = CheckpointRecord(
                    dom.name, name, int(wall), disks, defn.description, self.current(dom.name)
                )
                self._add(rec)
            await self.flush()
        _log.info("checkpoint created", domain=dom.name, checkpoint=rec.name, redefine=redefine)
        return rec

    async def _redefine(
        self, ops: Any, dom: DomainInfo, defn: CheckpointDef, validate: bool
    ) -> CheckpointRecord:
        if defn.name is None:
            raise InvalidArgument("a redefined checkpoint needs its <name>")
        name = defn.name
        if defn.creation_time is None:
            raise InvalidArgument(f"missing creationTime from existing checkpoint '{name}'")
        if defn.parent is not None:
            if defn.parent == name:
                raise InvalidArgument(f"checkpoint '{name}' cannot be its own parent")
            if self.find(dom.name, defn.parent) is None:
                raise InvalidArgument(
                    f"parent '{defn.parent}' for checkpoint '{name}' not found: redefine "
                    "the parent first"
                )
            if defn.parent in {r.name for r in self.descendants(dom.name, name)}:
                raise InvalidArgument(
                    f"parent '{defn.parent}' of checkpoint '{name}' is one of its descendants"
                )
        disks = align_disks(defn, dom, name)
        have = await ops.bitmaps(dom.name)
        for d in disks:
            if d.bitmap is None:
                continue
            info = _bitmap_named(have, d.name, d.bitmap)
            if info is None or (
                validate and (info.inconsistent or not info.persistent or not info.recording)
            ):
                raise InvalidArgument(
                    f"missing or broken bitmap '{d.bitmap}' for disk '{d.name}': a redefined "
                    "checkpoint describes a bitmap the disk has (create it without "
                    "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE instead)"
                )
        old = self.find(dom.name, name)
        rec = CheckpointRecord(
            dom.name, name, defn.creation_time, disks, defn.description, defn.parent,
            None if old is None else old.job,
        )  # fmt: skip
        current = self.current(dom.name)
        cur = None if current is None else self.find(dom.name, current)
        # the newest one becomes current: redefining a history in order ends at its tip
        self._add(rec, make_current=cur is None or cur.name == name or
                  rec.creation_time >= cur.creation_time)  # fmt: skip
        return rec

    async def delete(self, dom: DomainInfo, name: str, flags: int = 0) -> None:
        """checkpointDelete: the checkpoint (and with DELETE_CHILDREN its descendants;
        DELETE_CHILDREN_ONLY: only those) and its bitmaps, each merged into the bitmap of
        the surviving parent; children of a deleted one get its parent. METADATA_ONLY
        leaves the bitmaps alone. Refused while a running backup reads from one."""
        children = bool(flags & C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
        only = bool(flags & C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY)
        if children and only:
            raise InvalidArgument(
                "flags VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN and "
                "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY are mutually exclusive"
            )
        metadata_only = bool(flags & C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        ops = None if metadata_only else _bitmap_ops(self.dconn, dom.name)
        async with self._lock:
            top = self.get(dom.name, name)
            doomed = self.descendants(dom.name, name) if children or only else []
            if not only:
                doomed.insert(0, top)
            for rec in doomed:
                holders = self.scheduler.holders(checkpoint_resource(dom.name, rec.name))
                users = [j for held in holders.values() for j in held]
                if users:
                    raise OperationInvalid(
                        f"checkpoint '{rec.name}' of domain '{dom.name}' is the base of "
                        f"the running incremental backup '{users[0]}': delete it once the "
                        "backup ended"
                    )
            if not doomed:
                return
            if ops is not None:
                await ops.remove_bitmaps(dom.name, await self._removals(ops, dom, doomed))
            self._forget(dom.name, doomed)
            await self.flush()
        _log.info(
            "checkpoint deleted",
            domain=dom.name,
            checkpoint=name,
            deleted=[r.name for r in doomed],
            metadata_only=metadata_only,
        )

    async def _removals(
        self, ops: Any, dom: DomainInfo, doomed: Sequence[CheckpointRecord]
    ) -> list[BitmapRemoval]:
        """The bitmaps to remove (those the disks still have), each deleted checkpoint's
        merged into its nearest surviving ancestor's on the same disk."""
        have = await ops.bitmaps(dom.name)
        gone = {r.name for r in doomed}
        removals = []
        for rec in doomed:
            survivor = rec.parent
            while survivor is not None and survivor in gone:
                survivor = self.get(dom.name, survivor).parent
            keeper = None if survivor is None else self.get(dom.name, survivor)
            if keeper is not None and self.scheduler.holders(
                checkpoint_resource(dom.name, keeper.name)
            ):
                # a running incremental reads the ancestor's bitmap: QEMU would refuse to
                # merge into it (busy), and it holds the child's changes already (every
                # checkpoint's bitmap keeps recording from its creation on)
                keeper = None
            for d in rec.disks:
                if d.bitmap is None or _bitmap_named(have, d.name, d.bitmap) is None:
                    continue  # already gone (a QEMU started afresh): nothing to remove
                into = None if keeper is None else keeper.bitmap(d.name)
                if into is not None and _bitmap_named(have, d.name, into) is None:
                    into = None
                removals.append(BitmapRemoval(d.name, d.bitmap, into))
        return removals

    def _forget(self, domain: str, doomed: Sequence[CheckpointRecord]) -> None:
        """Drop ``doomed`` (metadata): the children of each go to its nearest surviving
        ancestor, and so does "current"."""
        dc = self._of(domain)
        gone = {r.name for r in doomed}

        def survivor(name: str | None) -> str | None:
            while name is not None and name in gone:
                name = dc.records[name].parent
            return name

        records = {
            n: r if r.parent not in gone else evolve(r, parent=survivor(r.parent))
            for n, r in dc.records.items()
            if n not in gone
        }
        self._put(domain, _DomainCheckpoints(records, survivor(dc.current)))

    # ---- with a backup (called by the engine) ----------------------------------------

    def check_backup(self, spec: Any, dom: DomainInfo) -> None:
        """Before admission: each incremental's checkpoint exists and covers the disk,
        and the checkpoint the backup creates is new (and names its bitmaps as itself)."""
        if not isinstance(spec, PreparedBackup):
            return
        for d in spec.disks:
            if d.incremental is None:
                continue
            rec = self.find(dom.name, d.incremental)
            if rec is None:
                raise NoSuchCheckpoint(
                    f"Checkpoint '{d.incremental}' for incremental backup of disk "
                    f"'{d.name}' not found"
                )
            if rec.bitmap(d.name) is None:
                raise InvalidArgument(
                    f"missing or broken bitmap '{d.incremental}' for disk '{d.name}': "
                    f"checkpoint '{d.incremental}' does not cover it"
                )
        name = spec.checkpoint_name
        if name is None:
            return
        if self.find(dom.name, name) is not None:
            raise OperationInvalid(f"domain '{dom.name}' already has checkpoint '{name}'")
        for d in spec.disks:
            if d.checkpoint_bitmap not in (None, name):
                raise Unsupported(f"bitmap for disk '{d.name}' must match checkpoint name '{name}'")

    def backup_started(self, job: uuid.UUID, spec: Any, dom: DomainInfo, wall: float) -> None:
        """The backup's driver created its checkpoint's bitmaps: record the checkpoint
        (visible once JobBegin returns)."""
        if not isinstance(spec, PreparedBackup) or spec.checkpoint_name is None:
            return
        name = spec.checkpoint_name
        if self.find(dom.name, name) is not None:  # taken while the backup was queued
            _log.warning("checkpoint exists already", domain=dom.name, checkpoint=name)
            return
        bitmaps = {d.name: d.checkpoint_bitmap for d in spec.disks}
        disks = tuple(CoveredDisk(d.name, bitmaps.get(d.name)) for d in dom.disks)
        definition = spec.checkpoint
        self._add(
            CheckpointRecord(
                dom.name,
                name,
                int(wall),  # as libvirt, a new checkpoint's own <creationTime> is ignored
                disks,
                None if definition is None else definition.description,
                self.current(dom.name),
                job,
            )
        )

    async def backup_recovered(
        self, job: uuid.UUID, spec: Any, dom: DomainInfo, wall: float
    ) -> None:
        """A backup recovered after a restart: if its checkpoint's record was lost (the
        owner died between the driver's start and the record's commit) while the disks
        have its bitmaps, it is recorded now, as ``backup_started`` would have."""
        if not isinstance(spec, PreparedBackup) or spec.checkpoint_name is None:
            return
        if self.find(dom.name, spec.checkpoint_name) is not None:
            return
        have = await _bitmap_ops(self.dconn, dom.name).bitmaps(dom.name)
        wanted = [(d.name, d.checkpoint_bitmap) for d in spec.disks if d.checkpoint_bitmap]
        if all(_bitmap_named(have, disk, name) is not None for disk, name in wanted):
            self.backup_started(job, spec, dom, wall)
            _log.info("checkpoint recovered", domain=dom.name, checkpoint=spec.checkpoint_name)

    def backup_ended(self, job: uuid.UUID, spec: Any, domain: str, completed: bool) -> None:
        """A backup that failed or was cancelled leaves no checkpoint (its driver removed
        the bitmaps): the record goes too, its children re-parented."""
        if completed or not isinstance(spec, PreparedBackup) or spec.checkpoint_name is None:
            return
        rec = self.find(domain, spec.checkpoint_name)
        if rec is not None and rec.job == job:
            self._forget(domain, [rec])


def _bitmap_named(
    have: Mapping[str, Sequence[BitmapInfo]], disk: str, name: str
) -> BitmapInfo | None:
    return next((b for b in have.get(disk, ()) if b.name == name), None)
