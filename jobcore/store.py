"""Job records and the store that keeps them.

``JobRecord`` is the engine's mutable bookkeeping for one job. ``JobStore`` is the one
interface behind which records live (in memory here; a durable store can implement the
same methods). Every lookup is O(1): by UUID, a domain's earliest active domain-level job,
a domain's most recently ended retained domain-level job. A page of a domain's jobs (from
a cursor) and the jobs whose UUID starts with given hex digits are found by bisection.

Retention: an ended record stays until its deadline (``ended`` + its retention), and at
most ``max_retained_per_domain`` ended records per domain and ``max_retained`` in all
stay: past either cap the oldest ended go first. Active records are never evicted.
"""

from __future__ import annotations

import bisect
import heapq
import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from attrs import define, field

from jobcore.lifecycle import JobState
from jobcore.spec import DEFAULT_MAX_RETAINED as DEFAULT_MAX_RETAINED  # with the retention
from jobcore.spec import DEFAULT_MAX_RETAINED_PER_DOMAIN as DEFAULT_MAX_RETAINED_PER_DOMAIN
from jobcore.spec import JobType

if TYPE_CHECKING:
    import asyncio

    from structlog.stdlib import BoundLogger

    from jobcore.scheduler import Ticket
    from jobcore.types import JobTypeInfo


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
    #: the fleet member (jobd --host) that owns the job
    host: str = ""
    #: driver.start() is under way
    starting: bool = False
    #: set once driver.start() returned (or failed); verbs wait for it
    start_done: anyio.Event | None = None
    #: set when the job reaches a terminal state (the engine's ``_ended_event``)
    done: anyio.Event | asyncio.Event | None = None
    #: held while a verb is under way: verbs on one job run one at a time
    verb_lock: anyio.Lock | None = None
    #: the legacy jobStats(COMPLETED) without KEEP_COMPLETED consumed this job's stats
    legacy_stats_read: bool = False
    driver_job: Any = None
    log: BoundLogger | None = None
    #: how a preemptor took this job's resources (jobcore.engine): "pause" (paused; resumed
    #: once readmitted), "paused" (the user had paused it: readmitted, left paused),
    #: "cancel" (cancelled; requeued as a new job if it asked); None: not preempted
    preempt: str | None = None
    #: a preemptor's begin waits on it: set once the scheduler admitted the job
    admitted: anyio.Event | None = None
    #: the jobcore.snapshots.JobSnapshot the engine last published of it (None: none yet)
    snapshot: Any = None
    #: once ended: the deadline the store's purge forgets it at (clock.now() scale)
    expires: float | None = None

    @property
    def domain_level(self) -> bool:
        return self.info.domain_level


class JobStore(Protocol):
    def add(self, rec: JobRecord) -> None: ...
    def get(self, job: uuid.UUID) -> JobRecord | None: ...
    def ended(self, rec: JobRecord, expires: float) -> None: ...
    def purge(self, now: float) -> list[JobRecord]: ...
    def domain_jobs(self, domain: str) -> Iterator[JobRecord]: ...
    def domain_jobs_page(
        self, domain: str, after: int, limit: int
    ) -> tuple[list[JobRecord], int | None]: ...
    def find_prefix(self, digits: str, limit: int) -> list[JobRecord]: ...
    def retained_count(self) -> int: ...
    def active_domain_job(self, domain: str) -> JobRecord | None: ...
    def last_ended_domain_job(self, domain: str) -> JobRecord | None: ...
    def chain_job(self, domain: str, disk: str) -> JobRecord | None: ...
    def __len__(self) -> int: ...
    def active_count(self) -> int: ...
    def active_jobs(self) -> list[JobRecord]: ...


class MemoryJobStore:
    """Records in dicts; ended records expire by a heap of deadlines and by the caps.
    The dicts are keyed by a job's UUID as an int (``uuid.int``): hashing an int is
    CPython's own, a UUID's hash is a Python method, and a job's way through the store
    hashes its key a dozen times."""

    def __init__(
        self,
        *,
        max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
        max_retained: int = DEFAULT_MAX_RETAINED,
    ) -> None:
        if max_retained_per_domain < 0 or max_retained < 0:
            raise ValueError("retained-job caps must be >= 0")
        self.max_retained_per_domain = max_retained_per_domain
        self.max_retained = max_retained
        self._jobs: dict[int, JobRecord] = {}
        self._by_domain: dict[str, dict[int, JobRecord]] = {}
        # domain -> the seqs of its jobs, ascending (begin order); seq -> record
        self._domain_seqs: dict[str, list[int]] = {}
        self._by_seq: dict[int, JobRecord] = {}
        # every job's UUID as an int, ascending: prefix lookups bisect it
        self._uuid_ints: list[int] = []
        # domain -> active domain-level jobs in begin order
        self._active_dl: dict[str, dict[int, JobRecord]] = {}
        # domain -> retained domain-level jobs in end order
        self._ended_dl: dict[str, dict[int, JobRecord]] = {}
        # retained ended jobs in end order, in all and per domain (the caps evict the first)
        self._retained: dict[int, JobRecord] = {}
        self._retained_by_domain: dict[str, dict[int, JobRecord]] = {}
        self._expiry: list[tuple[float, int, int]] = []
        self._active: dict[int, JobRecord] = {}
        #: told of each record the store forgets (jobcore.snapshots sets it)
        self.removed: Callable[[JobRecord], None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def active_count(self) -> int:
        return len(self._active)

    def retained_count(self) -> int:
        return len(self._retained)

    def active_jobs(self) -> list[JobRecord]:
        return list(self._active.values())

    def add(self, rec: JobRecord) -> None:
        key = rec.uuid.int
        self._jobs[key] = rec
        domain = rec.domain
        in_domain = self._by_domain.get(domain)
        if in_domain is None:
            in_domain = self._by_domain[domain] = {}
        in_domain[key] = rec
        seqs = self._domain_seqs.get(domain)
        if seqs is None:
            seqs = self._domain_seqs[domain] = []
        if seqs and seqs[-1] > rec.seq:
            bisect.insort(seqs, rec.seq)
        else:
            seqs.append(rec.seq)  # the usual case: seqs grow
        self._by_seq[rec.seq] = rec
        ints = self._uuid_ints
        if ints and ints[-1] > key:
            ints.insert(bisect.bisect_left(ints, key), key)
        else:
            ints.append(key)
        self._active[key] = rec
        if rec.info.domain_level:
            self._active_dl.setdefault(domain, {})[key] = rec

    def get(self, job: uuid.UUID) -> JobRecord | None:
        return self._jobs.get(job.int)

    def ended(self, rec: JobRecord, expires: float) -> None:
        rec.expires = expires
        key = rec.uuid.int
        domain = rec.domain
        self._active.pop(key, None)
        if rec.info.domain_level:
            _pop(self._active_dl, domain, key)
            ended_dl = self._ended_dl.get(domain)
            if ended_dl is None:
                ended_dl = self._ended_dl[domain] = {}
            ended_dl[key] = rec
        retained = self._retained
        retained[key] = rec
        in_domain = self._retained_by_domain.get(domain)
        if in_domain is None:
            in_domain = self._retained_by_domain[domain] = {}
        in_domain[key] = rec
        heapq.heappush(self._expiry, (expires, rec.seq, key))
        while len(in_domain) > self.max_retained_per_domain:
            self._remove(next(iter(in_domain.values())))
        while len(retained) > self.max_retained:
            self._remove(next(iter(retained.values())))
        if len(self._expiry) > 2 * len(retained) + 1024:
            # deadlines of evicted records: drop them before they pile up
            self._expiry = [e for e in self._expiry if self._is_current(e[2], e[1])]
            heapq.heapify(self._expiry)

    def _is_current(self, key: int, seq: int) -> bool:
        rec = self._jobs.get(key)
        return rec is not None and rec.seq == seq

    def purge(self, now: float) -> list[JobRecord]:
        expiry = self._expiry
        if not expiry or expiry[0][0] > now:
            return []
        gone: list[JobRecord] = []
        while expiry and expiry[0][0] <= now:
            _, seq, key = heapq.heappop(expiry)
            rec = self._jobs.get(key)
            if rec is None or rec.seq != seq:  # evicted already (the UUID may be reused)
                continue
            self._remove(rec)
            gone.append(rec)
        return gone

    def _remove(self, rec: JobRecord) -> None:
        """Forget an ended record everywhere."""
        key = rec.uuid.int
        domain = rec.domain
        del self._jobs[key]
        _pop(self._by_domain, domain, key)
        seqs = self._domain_seqs[domain]
        if seqs[0] == rec.seq:
            del seqs[0]
        else:
            del seqs[bisect.bisect_left(seqs, rec.seq)]
        if not seqs:
            del self._domain_seqs[domain]
        del self._by_seq[rec.seq]
        ints = self._uuid_ints
        del ints[bisect.bisect_left(ints, key)]
        if rec.info.domain_level:
            _pop(self._ended_dl, domain, key)
        self._retained.pop(key, None)
        in_domain = self._retained_by_domain.get(domain)
        if in_domain is not None:
            in_domain.pop(key, None)
            if not in_domain:
                del self._retained_by_domain[domain]
        if self.removed is not None:
            self.removed(rec)

    def domain_jobs(self, domain: str) -> Iterator[JobRecord]:
        return iter(list(self._by_domain.get(domain, {}).values()))

    def domain_jobs_page(
        self, domain: str, after: int, limit: int
    ) -> tuple[list[JobRecord], int | None]:
        """Up to ``limit`` of the domain's jobs that began after the one whose seq is
        ``after`` (-1: from the first), in begin order, and the cursor of the next page
        (None: this was the last)."""
        seqs = self._domain_seqs.get(domain, [])
        start = bisect.bisect_right(seqs, after)
        chunk = seqs[start : start + max(1, limit)]
        more = start + len(chunk) < len(seqs)
        return [self._by_seq[s] for s in chunk], chunk[-1] if more else None

    def find_prefix(self, digits: str, limit: int) -> list[JobRecord]:
        """Up to ``limit`` jobs whose UUID's 32 hex digits start with ``digits`` (1 to 32
        hex digits, any case), in UUID order."""
        if not 1 <= len(digits) <= 32:
            raise ValueError("a UUID prefix has 1 to 32 hex digits")
        shift = 4 * (32 - len(digits))
        low = int(digits, 16) << shift
        high = low + (1 << shift)
        found: list[JobRecord] = []
        i = bisect.bisect_left(self._uuid_ints, low)
        while i < len(self._uuid_ints) and self._uuid_ints[i] < high and len(found) < limit:
            found.append(self._jobs[self._uuid_ints[i]])
            i += 1
        return found

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


def _pop(index: dict[str, dict[int, JobRecord]], domain: str, key: int) -> None:
    jobs = index.get(domain)
    if jobs is not None:
        jobs.pop(key, None)
        if not jobs:
            del index[domain]


class MemoryDriverState:
    """A driver connection's DriverState (jobcore.driver) with the memory store: kept for
    as long as the connection, like its jobs. What ``load`` returns is a JSON copy, as the
    durable store's, so a driver sees the same values on both. The copy is made when
    loaded, not when saved (nothing loads what this connection saved but a test, and a
    save is on a job's hot path): a value saved is the driver's to leave alone — the
    drivers save records they build for the save."""

    #: nothing saved here outlives the connection (jobcore.driver.DriverState)
    durable = False

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}  # key -> the value as saved

    def load(self) -> dict[str, Any]:
        return {key: json.loads(json.dumps(value)) for key, value in self._values.items()}

    def save(self, key: str, value: Any) -> None:
        self._values[key] = value

    def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def sync(self) -> None:
        return None


#: the store a connection uses unless it names one
DEFAULT_STORE_URL = "memory:"


def default_host() -> str:
    """The host a job record carries unless one is named (``jobd --host``): the
    machine's hostname."""
    return socket.gethostname() or "localhost"
