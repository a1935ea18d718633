"""What a job type is to jobcore: ``JobTypeInfo`` and the protocols its parts follow.

A type module (jobcore.types.backup, .chain, .migration, or a third party's) defines its
spec class, its prepared spec, its XML codec and the functions below, and exports a
``JobTypeInfo``; jobcore.registry collects them.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from attrs import frozen

from jobcore.errors import InvalidArgument
from jobcore.lifecycle import ALL_VERBS, Verb
from jobcore.paths import Access, PathUse
from jobcore.scheduler import Claim, Mode, image_resource
from jobcore.spec import JobOptions, JobSpec, JobType, init_fields

if TYPE_CHECKING:
    import uuid

    from lxml import etree

    from jobcore.driver import DiskInfo, DomainInfo


class XMLCodec(Protocol):
    """Parse/format of one type's children of the universal ``<job>`` element.

    ``parse`` gets the ``<job>`` element (already validated against the schema, with
    ``<uuid>`` and the common options parsed by jobcore.xml) and returns the spec;
    ``format`` appends the type's children to an empty ``<job>`` element.
    ``schema`` is a RelaxNG fragment: a ``<define name='job-TYPE'>`` of those children.
    A codec whose parser checks types.rng's relaxed datatypes itself (the built-in ones,
    jobcore.xml._types) says so with a true ``checks_datatypes`` attribute.
    """

    schema: str

    def parse(
        self, job: etree._Element, uuid: uuid.UUID | None, options: JobOptions
    ) -> JobSpec: ...

    def format(self, spec: JobSpec, job: etree._Element) -> None: ...


@frozen
class JobTypeInfo:
    type: JobType
    spec_class: builtins.type[Any]
    codec: XMLCodec
    #: resources a prepared spec of this type needs on a domain (jobcore.scheduler)
    claims: Callable[[Any, DomainInfo], tuple[Claim, ...]]
    #: a domain-level job is what libvirt calls "the domain job": the legacy alias and
    #: jobInfo/jobStats/abortJob see it. Block pull and commit are not domain-level.
    domain_level: bool
    #: virDomainJobOperation reported in stats['operation']
    operation: int
    #: stats key family that progress maps to: 'disk' (disk_total, …) or 'data'
    progress_keys: str = "disk"
    #: checks a spec against the domain and returns the prepared spec the driver gets:
    #: every position, default and name resolved (spec, domain, wall time)
    prepare: Callable[[Any, DomainInfo, float], Any] | None = None
    #: ``abort`` of a job in 'ready' ends it successfully when this says so (libvirt's
    #: pull-mode backup: aborting tells the hypervisor its consumer is done)
    abort_completes: Callable[[Any], bool] | None = None
    #: the host files a prepared spec makes the driver read, create or write (its disk
    #: images, targets, sockets): what a path guard checks (jobcore.paths). A type without
    #: it cannot be begun by a client jobd confines to its own files.
    paths: Callable[[Any, DomainInfo], Iterable[PathUse]] | None = None
    #: the verbs a job of this type accepts at all (the verb table says in which state);
    #: a driver may narrow it further (DriverConnection.verbs)
    verbs: frozenset[Verb] = ALL_VERBS


# ---- helpers the chain-reading types share ---------------------------------------------


_Prepared = TypeVar("_Prepared")


def prepared(cls: builtins.type[_Prepared], spec: Any, **resolved: Any) -> _Prepared:
    """The prepared spec ``cls`` (a subclass of the spec's class) of ``spec``: every field
    of the spec, so one added to a spec class reaches its prepared spec, with the
    ``resolved`` ones set or replaced."""
    aliases, read = init_fields(type(spec))
    given = dict(zip(aliases, read(spec), strict=True))
    given.update(resolved)
    return cls(**given)


def domain_disk(dom: DomainInfo, name: str) -> DiskInfo:
    disk = dom.disk(name)
    if disk is None:
        raise InvalidArgument(f"disk '{name}' not found in domain '{dom.name}'")
    return disk


def image_claims(uses: Iterable[PathUse]) -> list[Claim]:
    """A claim on each image of ``uses`` (layers from ``chain_uses``): CHAIN on a layer
    written, READ on one only read."""
    return [
        Claim(image_resource(u.path), Mode.CHAIN if u.access is Access.WRITE else Mode.READ)
        for u in uses
    ]


def chain_uses(disk: DiskInfo, writes: set[int]) -> list[PathUse]:
    """Every layer of ``disk``'s chain, read, except those in ``writes`` (written)."""
    return [
        PathUse(
            path,
            Access.WRITE if i in writes else Access.READ,
            f"layer {i} of disk '{disk.name}'",
        )
        for i, path in enumerate(disk.chain)
    ]
