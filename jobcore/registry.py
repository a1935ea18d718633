"""The job-type registry: every job type jobcore knows, by name.

Built eagerly from the type modules (jobcore.types.backup, .chain, .migration), which sit
below it. A driver or a third party adds a type — one module of the same shape — without
editing jobcore: ``register(JobTypeInfo(...))`` (design/README.md, "Adding a job type").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from jobcore.errors import Unsupported
from jobcore.types import backup, chain, migration
from jobcore.types.base import JobTypeInfo

#: the built-in types, in the order they are documented
BUILTIN_TYPES: tuple[JobTypeInfo, ...] = (*backup.INFOS, *chain.INFOS, *migration.INFOS)


class Registry:
    """Job types by name; the built-in ones are there from the start."""

    def __init__(self, types: Iterable[JobTypeInfo] = BUILTIN_TYPES) -> None:
        self._types: dict[str, JobTypeInfo] = {str(info.type): info for info in types}
        self._lock = threading.Lock()

    def register(self, info: JobTypeInfo, *, replace: bool = False) -> None:
        with self._lock:
            if not replace and str(info.type) in self._types:
                raise ValueError(f"job type '{info.type}' is already registered")
            self._types[str(info.type)] = info

    def unregister(self, name: str) -> None:
        with self._lock:
            self._types.pop(name, None)

    def get(self, name: str) -> JobTypeInfo:
        try:
            return self._types[name]
        except KeyError:
            raise Unsupported(f"unknown job type '{name}'") from None

    def for_spec(self, spec: object) -> JobTypeInfo:
        return self.get(str(getattr(spec, "TYPE", "")))

    def all(self) -> Mapping[str, JobTypeInfo]:
        return dict(self._types)


#: The process-wide registry used by jobcore.xml and the engine.
registry = Registry()


def register(info: JobTypeInfo, *, replace: bool = False) -> None:
    registry.register(info, replace=replace)
