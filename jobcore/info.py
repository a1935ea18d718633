"""JobInfo: a snapshot of one job; HostInfo: one fleet member's; typed and also readable
as mappings."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from attrs import fields, frozen

from jobcore.lifecycle import JobState
from jobcore.spec import JobType


@frozen
class JobInfo(Mapping[str, Any]):
    """What ``job.info()`` and ``JobGetInfo`` return.

    As a mapping, values are plain: UUID, type and state as strings, ``progress`` as a
    percentage (0.0–100.0), times as seconds since the epoch (``None`` until they happen),
    ``time_elapsed`` in milliseconds.
    """

    uuid: uuid.UUID
    type: JobType
    domain: str
    state: JobState
    processed: int
    total: int
    time_elapsed: int
    created: float
    started: float | None
    ended: float | None
    errmsg: str | None
    bandwidth: int | None
    #: the fleet member that owns the job (``jobd --host``; in-process: the hostname)
    host: str = ""
    #: the job is active and its host's state is not LIVE (rows of other hosts only)
    host_lost: bool = False

    @property
    def progress(self) -> float:
        if self.total <= 0:
            return 100.0 if self.state is JobState.COMPLETED else 0.0
        return min(100.0, 100.0 * self.processed / self.total)

    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        if key in ("uuid", "type", "state"):
            return str(value)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _KEYS}


def _mapping_keys() -> tuple[str, ...]:
    """The mapping's keys: the attrs fields, with ``progress`` after ``total``."""
    names = [f.name for f in fields(JobInfo)]
    names.insert(names.index("total") + 1, "progress")
    return tuple(names)


_KEYS = _mapping_keys()


class HostState(enum.StrEnum):
    """A fleet member's state, from its lease row (design/fleet.md)."""

    LIVE = "live"  # lease renewed within its ttl
    STOPPED = "stopped"  # left cleanly (jobd stopped); its jobs may still be active
    LOST = "lost"  # lease older than its ttl, not left, not fenced
    FENCED = "fenced"  # an operator fenced it; cleared when it rejoins


@frozen
class HostInfo(Mapping[str, Any]):
    """One fleet member (``jobctl hosts``). As a mapping: its fields, the state as a string."""

    name: str
    state: HostState
    #: seconds since its last renewal, by the database's clock
    lease_age: float
    lease_ttl: float
    #: its jobs in an active state
    active_jobs: int
    #: all its job rows (retained ended ones too)
    jobs: int
    pid: int
    fenced_by: str | None = None
    fence_reason: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in _HOST_KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        return str(value) if key == "state" else value

    def __iter__(self) -> Iterator[str]:
        return iter(_HOST_KEYS)

    def __len__(self) -> int:
        return len(_HOST_KEYS)

    def as_dict(self) -> dict[str, Any]:
        return {k: self[k] for k in _HOST_KEYS}


_HOST_KEYS = tuple(f.name for f in fields(HostInfo))
