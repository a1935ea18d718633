"""Job records and the store that keeps them.

``JobRecord`` is the engine's mutable bookkeeping for one job. ``JobStore`` is the one
interface behind which records live (in memory here; a durable store can implement the
same methods). Every lookup is O(1): by UUID, a domain's earliest active domain-level job,
a domain's most recently ended retained domain-level job.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from attrs import define, field

from jobcore.lifecycle import JobState
from jobcore.spec import JobType

if TYPE_CHECKING:
    from structlog.stdlib import BoundLogger

    from jobcore.registry import JobTypeInfo
    from jobcore.scheduler import Ticket


@define(eq=False)
class JobRecord:
    uuid: uuid.UUID
    type: JobType
    info: JobTypeInfo
    domain: str
    spec: Any
    state: JobState
    seq: int
    ticket: Ticket
    retention: float
    created_wall: float
    created: float  # clock.now() at begin
    started: float | None = None  # clock.now() when the driver started it
    ended: float | None = None
    ended_wall: float | None = None
    processed: int = 0
    total: int = 0
    extra: dict[str, int | str] = field(factory=dict)
    errmsg: str | None = None
    bandwidth: int | None = None
    #: driver.start() is under way
    starting: bool = False
    #: set once driver.start() returned (or failed); verbs wait for it
    start_done: anyio.Event | None = None
    #: set when the job reaches a terminal state
    done: anyio.Event | None = None
    #: held while a verb is under way: verbs on one job run one at a time
    verb_lock: anyio.Lock | None = None
    #: the legacy jobStats(COMPLETED) without KEEP_COMPLETED consumed this job's stats
    legacy_stats_read: bool = False
    driver_job: Any = None
    log: BoundLogger | None = None

    @property
    def domain_level(self) -> bool:
        return self.info.domain_level


class JobStore(Protocol):
    def add(self, rec: JobRecord) -> None: ...
    def get(self, job: uuid.UUID) -> JobRecord | None: ...
    def ended(self, rec: JobRecord, expires: float) -> None: ...
    def purge(self, now: float) -> list[JobRecord]: ...
    def domain_jobs(self, domain: str) -> Iterator[JobRecord]: ...
    def active_domain_job(self, domain: str) -> JobRecord | None: ...
    def last_ended_domain_job(self, domain: str) -> JobRecord | None: ...
    def chain_job(self, domain: str, disk: str) -> JobRecord | None: ...
    def __len__(self) -> int: ...
    def active_count(self) -> int: ...
    def active_jobs(self) -> list[JobRecord]: ...


class MemoryJobStore:
    """Records in dicts; ended records expire by a heap of deadlines."""

    def __init__(self) -> None:
        self._jobs: dict[uuid.UUID, JobRecord] = {}
        self._by_domain: dict[str, dict[uuid.UUID, JobRecord]] = {}
        # domain -> active domain-level jobs in begin order
        self._active_dl: dict[str, dict[uuid.UUID, JobRecord]] = {}
        # domain -> retained domain-level jobs in end order
        self._ended_dl: dict[str, dict[uuid.UUID, JobRecord]] = {}
        self._expiry: list[tuple[float, int, uuid.UUID]] = []
        self._active: dict[uuid.UUID, JobRecord] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def active_count(self) -> int:
        return len(self._active)

    def active_jobs(self) -> list[JobRecord]:
        return list(self._active.values())

    def add(self, rec: JobRecord) -> None:
        self._jobs[rec.uuid] = rec
        self._by_domain.setdefault(rec.domain, {})[rec.uuid] = rec
        self._active[rec.uuid] = rec
        if rec.domain_level:
            self._active_dl.setdefault(rec.domain, {})[rec.uuid] = rec

    def get(self, job: uuid.UUID) -> JobRecord | None:
        return self._jobs.get(job)

    def ended(self, rec: JobRecord, expires: float) -> None:
        self._active.pop(rec.uuid, None)
        if rec.domain_level:
            _pop(self._active_dl, rec.domain, rec.uuid)
            self._ended_dl.setdefault(rec.domain, {})[rec.uuid] = rec
        heapq.heappush(self._expiry, (expires, rec.seq, rec.uuid))

    def purge(self, now: float) -> list[JobRecord]:
        gone: list[JobRecord] = []
        while self._expiry and self._expiry[0][0] <= now:
            _, _, job = heapq.heappop(self._expiry)
            rec = self._jobs.pop(job, None)
            if rec is None:
                continue
            _pop(self._by_domain, rec.domain, job)
            if rec.domain_level:
                _pop(self._ended_dl, rec.domain, job)
            gone.append(rec)
        return gone

    def domain_jobs(self, domain: str) -> Iterator[JobRecord]:
        return iter(list(self._by_domain.get(domain, {}).values()))

    def active_domain_job(self, domain: str) -> JobRecord | None:
        jobs = self._active_dl.get(domain)
        return next(iter(jobs.values())) if jobs else None

    def last_ended_domain_job(self, domain: str) -> JobRecord | None:
        jobs = self._ended_dl.get(domain)
        return next(reversed(jobs.values())) if jobs else None

    def chain_job(self, domain: str, disk: str) -> JobRecord | None:
        for rec in self._by_domain.get(domain, {}).values():
            if (
                rec.state.active
                and not rec.domain_level
                and getattr(rec.spec, "disk", None) == disk
            ):
                return rec
        return None


def _pop(index: dict[str, dict[uuid.UUID, JobRecord]], domain: str, job: uuid.UUID) -> None:
    jobs = index.get(domain)
    if jobs is not None:
        jobs.pop(job, None)
        if not jobs:
            del index[domain]
