"""JobInfo: a snapshot of one job, typed and also readable as a mapping."""

from __future__ import annotations

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
