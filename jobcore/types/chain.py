"""The chain job types, ``blockpull`` and ``blockcommit`` (libvirt's virDomainBlockPull /
BlockRebase and virDomainBlockCommit): everything jobcore knows about them — the specs,
their prepared forms (chain positions resolved to indices and files), the XML codec,
claims, prepare, paths, legacy classification and verbs."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from attrs import field, frozen
from lxml import etree

from jobcore import constants as C
from jobcore.errors import InvalidArgument
from jobcore.paths import PathUse
from jobcore.scheduler import Claim, Mode, disk_resource, domain_resource
from jobcore.spec import ChainRef, JobOptions, JobType, int64
from jobcore.types.base import JobTypeInfo, chain_uses, domain_disk, image_claims, prepared
from jobcore.xml import _schema
from jobcore.xml import _types as T
from jobcore.xml._parse import repeated
from jobcore.xml.common import (
    build_bandwidth,
    build_chain_ref,
    build_flag,
    checked_spec,
    parse_bandwidth,
    parse_chain_ref,
)

if TYPE_CHECKING:
    from jobcore.driver import DiskInfo, DomainInfo


@frozen
class BlockPullSpec:
    disk: str
    base: ChainRef | None = None  # None: pull everything below top
    top: ChainRef | None = None  # None: the active layer (index 0)
    bandwidth: int | None = field(default=None, validator=int64)  # bytes/s
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = JobType.BLOCKPULL


@frozen
class BlockCommitSpec:
    disk: str
    top: ChainRef | None = None  # None: the active layer -> active commit
    base: ChainRef | None = None  # None: the deepest layer
    pivot: bool = False  # active commit: pivot once ready instead of waiting in 'ready'
    delete: bool = False
    shallow: bool = False
    bandwidth: int | None = field(default=None, validator=int64)
    uuid: uuid.UUID | None = None
    options: JobOptions = JobOptions()

    TYPE: ClassVar[JobType] = JobType.BLOCKCOMMIT

    @property
    def active(self) -> bool:
        """True when the commit's top is the active layer (it goes through 'ready')."""
        return self.top is None or self.top.index == 0


@frozen
class PreparedPull(BlockPullSpec):
    """A pull with its positions resolved (``top``/``base`` hold the same indices, as the
    job XML shows them): the layers from ``top_index + 1`` up to ``base_index`` (or the
    bottom of the chain) are merged into the top layer."""

    top_index: int = field(kw_only=True)
    #: None: everything below top is pulled in
    base_index: int | None = field(kw_only=True)
    #: the disk's backing chain when the job was prepared, active layer first
    chain: tuple[str, ...] = field(kw_only=True)

    @property
    def top_file(self) -> str:
        return self.chain[self.top_index]

    @property
    def base_file(self) -> str | None:
        return None if self.base_index is None else self.chain[self.base_index]

    @property
    def merged(self) -> tuple[str, ...]:
        """The files pulled into top (they leave the chain)."""
        stop = len(self.chain) if self.base_index is None else self.base_index
        return self.chain[self.top_index + 1 : stop]


@frozen
class PreparedCommit(BlockCommitSpec):
    """A commit with its positions resolved (``top``/``base`` hold the same indices, as
    the job XML shows them): the layers ``top_index`` … ``base_index - 1`` are written
    into ``base_index`` and leave the chain."""

    top_index: int = field(kw_only=True)
    base_index: int = field(kw_only=True)
    #: the disk's backing chain when the job was prepared, active layer first
    chain: tuple[str, ...] = field(kw_only=True)

    @property
    def top_file(self) -> str:
        return self.chain[self.top_index]

    @property
    def base_file(self) -> str:
        return self.chain[self.base_index]

    @property
    def committed(self) -> tuple[str, ...]:
        """The files written into base (they leave the chain; ``delete`` removes them)."""
        return self.chain[self.top_index : self.base_index]


# ---- XML ---------------------------------------------------------------------------------


@attrs.define
class ChainJobCodec:
    """Block pull and block commit: a disk, chain positions, flags, a bandwidth."""

    schema: str
    spec_class: type[BlockPullSpec] | type[BlockCommitSpec]
    #: the chain positions in the order they are written
    refs: tuple[str, ...]
    #: the type's empty flag elements (``<pivot/>`` …), in the order they are written
    flags: tuple[str, ...] = ()
    checks_datatypes: ClassVar[bool] = True

    def parse(self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions) -> Any:
        # one walk of the children; the common ones (parsed, and refused twice, by
        # jobcore.xml.job before) and comments match no branch
        values: dict[str, Any] = {}
        refs, flags = self.refs, self.flags
        for child in job:
            tag = child.tag
            if tag == "disk":
                if "disk" in values:
                    repeated(child)
                name = child.get(b"name")
                if name == "":
                    T.check(child, "name", name, "nonEmpty")
                values["disk"] = name
            elif tag in refs:
                if tag in values:
                    repeated(child)
                values[tag] = parse_chain_ref(child)
            elif tag in flags:
                if tag in values:
                    repeated(child)
                values[tag] = True
            elif tag == "bandwidth":
                if "bandwidth" in values:
                    repeated(child)
                values["bandwidth"] = parse_bandwidth(child)
        return checked_spec(job, self.spec_class, uuid=uuid, options=options, **values)

    def format(self, spec: Any, job: etree._Element) -> None:
        assert isinstance(spec, self.spec_class)
        etree.SubElement(job, "disk").set("name", spec.disk)
        for tag in self.refs:
            ref = getattr(spec, tag)
            if ref is not None:
                build_chain_ref(job, tag, ref)
        for tag in self.flags:
            build_flag(job, tag, getattr(spec, tag))
        if spec.bandwidth is not None:
            build_bandwidth(job, spec.bandwidth)


BLOCKPULL_CODEC = ChainJobCodec(
    _schema.defines_text("jobtypes.rng", only=("job-blockpull",)), BlockPullSpec, ("base", "top")
)
BLOCKCOMMIT_CODEC = ChainJobCodec(
    _schema.defines_text("jobtypes.rng", only=("job-blockcommit",)),
    BlockCommitSpec,
    ("top", "base"),
    ("pivot", "delete", "shallow"),
)


# ---- prepare -----------------------------------------------------------------------------


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


def prepare_pull(spec: BlockPullSpec, dom: DomainInfo, wall: float) -> PreparedPull:
    disk = domain_disk(dom, spec.disk)
    top = _index(disk, spec.top, "top", 0)
    base = None if spec.base is None else _index(disk, spec.base, "base", 0)
    if base is not None and base <= top:
        raise InvalidArgument(f"base (index {base}) must lie below top (index {top})")
    return prepared(
        PreparedPull,
        spec,
        top=ChainRef(index=top),
        base=None if base is None else ChainRef(index=base),
        top_index=top,
        base_index=base,
        chain=disk.chain,
    )


def prepare_commit(spec: BlockCommitSpec, dom: DomainInfo, wall: float) -> PreparedCommit:
    disk = domain_disk(dom, spec.disk)
    if len(disk.chain) < 2:
        raise InvalidArgument(f"disk '{disk.name}' has no backing file to commit into")
    top = _index(disk, spec.top, "top", 0)
    # as libvirt's VIR_DOMAIN_BLOCK_COMMIT_SHALLOW: without a base, shallow means the
    # top's own backing file instead of the bottom of the chain
    base = _index(disk, spec.base, "base", top + 1 if spec.shallow else len(disk.chain) - 1)
    if base <= top:
        raise InvalidArgument(f"base (index {base}) must lie below top (index {top})")
    return prepared(
        PreparedCommit,
        spec,
        top=ChainRef(index=top),
        base=ChainRef(index=base),
        top_index=top,
        base_index=base,
        chain=disk.chain,
    )


# ---- claims and paths --------------------------------------------------------------------


def chain_claims(spec: BlockPullSpec | BlockCommitSpec, dom: DomainInfo) -> tuple[Claim, ...]:
    """Shared on the domain, the disk's chain alone, and each image of the chain its
    paths name: CHAIN on a layer it writes, READ on one it reads (another domain may
    share it: a common base image, or one on shared storage)."""
    claims = [
        Claim(domain_resource(dom.name), Mode.DOMAIN_SHARED),
        Claim(disk_resource(dom.name, spec.disk), Mode.CHAIN),
    ]
    if isinstance(spec, PreparedPull):
        claims.extend(image_claims(pull_paths(spec, dom)))
    elif isinstance(spec, PreparedCommit):
        claims.extend(image_claims(commit_paths(spec, dom)))
    return tuple(claims)


def pull_paths(spec: PreparedPull, dom: DomainInfo) -> Iterable[PathUse]:
    """A prepared pull writes its top layer and reads the chain below."""
    return chain_uses(domain_disk(dom, spec.disk), {spec.top_index})


def commit_paths(spec: PreparedCommit, dom: DomainInfo) -> Iterable[PathUse]:
    """A prepared commit writes its base (and, with ``delete``, removes the layers from
    top to just above base); it reads the rest of the chain."""
    top, base = spec.top_index, spec.base_index
    writes = {base} | (set(range(top, base)) if spec.delete else set())
    return chain_uses(domain_disk(dom, spec.disk), writes)


BLOCKPULL = JobTypeInfo(
    JobType.BLOCKPULL,
    BlockPullSpec,
    BLOCKPULL_CODEC,
    chain_claims,
    domain_level=False,
    operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
    prepare=prepare_pull,
    paths=pull_paths,
)

BLOCKCOMMIT = JobTypeInfo(
    JobType.BLOCKCOMMIT,
    BlockCommitSpec,
    BLOCKCOMMIT_CODEC,
    chain_claims,
    domain_level=False,
    operation=C.VIR_DOMAIN_JOB_OPERATION_UNKNOWN,
    prepare=prepare_commit,
    paths=commit_paths,
)

INFOS = (BLOCKPULL, BLOCKCOMMIT)
