"""The job-type registry: what jobcore knows about each job type.

A driver adds a type without editing jobcore by calling ``register(JobTypeInfo(...))``:
its name, spec class, XML codec (parse/format of the type's children of ``<job>`` and a
RelaxNG fragment), how its spec claims resources, and how it shows up in legacy calls.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from attrs import frozen

from jobcore.errors import Unsupported
from jobcore.spec import JobOptions, JobType

if TYPE_CHECKING:
    import uuid

    from lxml import etree

    from jobcore.driver import DomainInfo
    from jobcore.paths import PathUse
    from jobcore.scheduler import Claim


class JobSpec(Protocol):
    """What every spec class offers, built-in or registered."""

    TYPE: ClassVar[JobType]

    @property
    def uuid(self) -> uuid.UUID | None: ...

    @property
    def options(self) -> JobOptions: ...


class XMLCodec(Protocol):
    """Parse/format of one type's children of the universal ``<job>`` element.

    ``parse`` gets the ``<job>`` element (already validated against the schema, with
    ``<uuid>`` and the common options parsed by jobcore.xml) and returns the spec;
    ``format`` appends the type's children to an empty ``<job>`` element.
    ``schema`` is a RelaxNG fragment: a ``<define name='job-TYPE'>`` of those children.
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
    #: resources a spec of this type needs on a domain (jobcore.scheduler)
    claims: Callable[[Any, DomainInfo], tuple[Claim, ...]]
    #: a domain-level job is what libvirt calls "the domain job": the legacy alias and
    #: jobInfo/jobStats/abortJob see it. Block pull and commit are not domain-level.
    domain_level: bool
    #: virDomainJobOperation reported in stats['operation']
    operation: int
    #: stats key family that progress maps to: 'disk' (disk_total, …) or 'data'
    progress_keys: str = "disk"
    #: checks a spec against the domain and fills defaults (spec, domain, wall time)
    prepare: Callable[[Any, DomainInfo, float], Any] | None = None
    #: ``abort`` of a job in 'ready' ends it successfully when this says so (libvirt's
    #: pull-mode backup: aborting tells the hypervisor its consumer is done)
    abort_completes: Callable[[Any], bool] | None = None
    #: the host files a prepared spec makes the driver read, create or write (its disk
    #: images, targets, sockets): what a path guard checks (jobcore.paths). A type without
    #: it cannot be begun by a client jobd confines to its own files.
    paths: Callable[[Any, DomainInfo], Iterable[PathUse]] | None = None


class Registry:
    """Job types by name. The built-in types are loaded on first use (they import
    jobcore.xml, which imports this module); every thread waits for that load to finish,
    so no caller ever sees a registry without them."""

    def __init__(self) -> None:
        self._types: dict[str, JobTypeInfo] = {}
        self._lock = threading.RLock()
        self._builtins_loaded = False
        self._loading = False

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        with self._lock:
            # _loading: a call made by the load itself, on this thread (the lock is ours)
            if self._builtins_loaded or self._loading:
                return
            self._loading = True
            try:
                from jobcore import builtin_types

                for info in builtin_types.builtin_type_infos():
                    self._types.setdefault(str(info.type), info)
                self._builtins_loaded = True  # only once they are all there
            finally:
                self._loading = False

    def register(self, info: JobTypeInfo, *, replace: bool = False) -> None:
        self._load_builtins()
        with self._lock:
            if not replace and str(info.type) in self._types:
                raise ValueError(f"job type '{info.type}' is already registered")
            self._types[str(info.type)] = info

    def get(self, name: str) -> JobTypeInfo:
        self._load_builtins()
        try:
            return self._types[name]
        except KeyError:
            raise Unsupported(f"unknown job type '{name}'") from None

    def for_spec(self, spec: object) -> JobTypeInfo:
        return self.get(str(getattr(spec, "TYPE", "")))

    def all(self) -> Mapping[str, JobTypeInfo]:
        self._load_builtins()
        return dict(self._types)


#: The process-wide registry used by jobcore.xml and the engine.
registry = Registry()


def register(info: JobTypeInfo, *, replace: bool = False) -> None:
    registry.register(info, replace=replace)
