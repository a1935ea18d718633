"""Immutable snapshots of job records, published by the engine for readers on other threads.

The blocking facade answers its read-only queries (``jobStats``, ``jobInfo``,
``blockJobInfo``, ``JobGetInfo``, ``JobGetStats``, ``JobGetXMLDesc``, ``JobLookupByUUID``
of a job the store holds, ``listJobs``) on the caller's thread from these, without the
hop to the event loop's thread (design/legacy.md, "Queries without a thread hop").

Why a reader on another thread sees exactly what the loop would answer:

- Only the loop thread writes. Each time a record's visible fields change, the engine
  builds a new frozen ``JobSnapshot`` of all of them and publishes it by single reference
  stores: ``JobRecord.snapshot``, and its entries in ``Snapshots.active``, ``.legacy``
  (the domain's) and ``.chain`` (the disk's). A reader loads a reference once and reads only that
  frozen value: it sees one whole publication, never a record half-changed, and never
  the live store (no purge, no iteration of a structure the loop changes).
- A reference load or store, ``dict.get`` and a one-key ``dict`` store or pop are atomic
  under CPython's GIL (and under the free-threaded build's per-object locks).
- Publication happens in the same synchronous step as the change, before any event is
  emitted or waiter woken: whoever learns of a change (an event, a verb's return, a
  ``JobWait``) and then reads finds it published.
- Elapsed time: the reader reads the engine's clock *before* the snapshot, and never
  shows less than the snapshot's own elapsed time (taken on the loop when it was
  published). The result is then what the loop would have answered at one instant of the
  call: at the clock read if the snapshot was already published then, else at the
  publication. The clocks are safe to read from any thread (``Clock.now`` says so): the
  qemu driver's ``SystemClock`` and the sim's ``RealClock`` call ``time.monotonic()``;
  the sim's ``ManualClock.now`` loads one float that ``advance`` (on the loop) replaces.

Lists and ended jobs: the store forgets ended jobs lazily (a purge at a query, by each
one's deadline ``JobRecord.expires``) and by its caps; it tells ``Snapshots`` what it
forgets, so ``jobs`` and each listed domain's ``DomainJobs`` hold what the store holds,
and a reader drops what the purge at its clock reading would (``kept``).

What may write, or needs the driver, keeps the hop (design/legacy.md).
Nothing is published until a reader asks (``Engine.start_snapshots``): jobd's connections
and the async API pay one attribute test per change.
"""

from __future__ import annotations

import math
import operator
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from attrs import frozen

from jobcore.info import JobInfo, job_stats
from jobcore.store import MemoryJobStore

if TYPE_CHECKING:
    from jobcore.store import JobRecord, JobStore


def elapsed_ms(created: float, ended: float | None, now: float) -> int:
    """A job's ``time_elapsed``: milliseconds from its begin to its end, or to ``now``."""
    end = ended if ended is not None else now
    return max(0, math.floor((end - created) * 1000))


#: JobInfo's fields in ``__init__`` order, and where ``time_elapsed`` is among them
_INFO_FIELDS = tuple(f.name for f in attrs.fields(JobInfo))
_ELAPSED = _INFO_FIELDS.index("time_elapsed")
_info_values = operator.attrgetter(*_INFO_FIELDS)


@frozen(eq=False)
class JobSnapshot:
    """A record's visible fields at one publication (every field a value or frozen).

    The reader's work is kept to what must be done at call time: the live elapsed time
    and a new result; everything else was computed on the loop when it was published
    (``info``, its field values, the stats dict), never later."""

    #: the record, only for making handles (its uuid, type and domain never change)
    record: JobRecord
    #: ``engine.info(record)`` at publication (final once the job ended)
    info: JobInfo
    #: ``info``'s field values in JobInfo's ``__init__`` order
    info_values: tuple[Any, ...]
    #: ``engine.stats(record)`` at publication: never changed (readers copy it)
    stats: Mapping[str, Any]
    #: the stats' "time_elapsed" is the job's elapsed time (not an extra stat's)
    stats_elapsed: bool
    #: ``clock.now()`` at begin and at the end (None while active)
    created: float
    ended: float | None
    #: when the store's purge forgets the ended job (``JobRecord.expires``)
    expires: float | None
    spec: Any
    domain_level: bool

    def _elapsed_now(self, now: float) -> int | None:
        """The elapsed time at ``now`` if it is later than the published one, else None."""
        if self.ended is not None:  # final: the published value
            return None
        elapsed = math.floor((now - self.created) * 1000)
        return elapsed if elapsed > self.info.time_elapsed else None

    def info_at(self, now: float) -> JobInfo:
        """The job's info as the loop answers it at clock reading ``now`` (or later)."""
        elapsed = self._elapsed_now(now)
        if elapsed is None:  # ended, or no later than the publication
            return self.info
        values = list(self.info_values)
        values[_ELAPSED] = elapsed
        return JobInfo(*values)

    def stats_at(self, now: float) -> dict[str, Any]:
        """``engine.stats(record)`` at ``now`` (a new dict each call, as the loop's)."""
        stats = dict(self.stats)
        elapsed = self._elapsed_now(now)
        if elapsed is not None and self.stats_elapsed:
            stats["time_elapsed"] = elapsed
        return stats


def _disk(rec: JobRecord) -> str | None:
    disk = getattr(rec.spec, "disk", None)
    return disk if isinstance(disk, str) else None


@frozen(eq=False)
class DomainJobs:
    """A domain's jobs as the store holds them at one publication (purge aside: a
    reader drops those whose ``expires`` has passed, as the loop's purge would)."""

    #: ``store.domain_jobs(domain)``: active and retained, in the order they began
    jobs: tuple[JobRecord, ...]
    #: ``store.last_ended_domain_job(domain)``: the legacy job when none is active
    last_ended: JobRecord | None


def kept(rec: JobRecord, now: float) -> bool | None:
    """Whether the loop's purge at ``now`` keeps ``rec`` (None: it has no snapshot)."""
    snap: JobSnapshot | None = rec.snapshot
    if snap is None:
        return None
    return snap.expires is None or snap.expires > now


class Snapshots:
    """One engine's published snapshots; written on the loop thread only."""

    def __init__(self) -> None:
        #: publishing (set once by ``Engine.start_snapshots``, never cleared)
        self.on = False
        #: the store tells us what it forgets (``MemoryJobStore.removed``): then the
        #: lists and lookups of ended jobs are published too
        self.lists = False
        #: domain -> snapshot of its legacy active job (the store's earliest-begun active
        #: domain-level job); no entry: none is active
        self.legacy: dict[str, JobSnapshot] = {}
        #: (domain, disk) -> snapshot of the disk's active block job (``store.chain_job``)
        self.chain: dict[tuple[str, str], JobSnapshot] = {}
        #: job -> snapshot of every active job (an ended one may be purged: not here)
        self.active: dict[uuid.UUID, JobSnapshot] = {}
        #: job -> every published record the store still holds (``lists`` only; an
        #: entry leaves when the store forgets the record)
        self.jobs: dict[uuid.UUID, JobRecord] = {}
        #: domain -> its jobs (``lists`` only; a domain enters on its first list query,
        #: ``publish_domain``, and is then kept current)
        self.domains: dict[str, DomainJobs] = {}
        self._store: JobStore | None = None

    def start(self, store: JobStore) -> None:
        """Before the first publication: learn from ``store`` what it forgets, if it can
        say (the memory store and its durable subclasses)."""
        if isinstance(store, MemoryJobStore):
            self._store = store
            store.removed = self._removed
            self.lists = True

    def publish(self, rec: JobRecord, info: JobInfo, store: JobStore) -> None:
        """Publish ``rec`` as it is now (``info``: ``engine.info(rec)``), after the store
        saw the change (its active/ended indexes say who is the domain's or disk's job)."""
        previous = rec.snapshot
        snap = JobSnapshot(
            rec,
            info,
            _info_values(info),
            job_stats(info, rec.info.operation, rec.info.progress_keys, rec.extra),
            "time_elapsed" not in rec.extra,
            rec.created,
            rec.ended,
            None if rec.ended is None else rec.expires,
            rec.spec,
            rec.domain_level,
        )
        rec.snapshot = snap
        moved = previous is None or previous.info.state.active != info.state.active
        if info.state.active:
            self.active[rec.uuid] = snap
        elif previous is not None and self.active.get(rec.uuid) is previous:
            del self.active[rec.uuid]  # (not a later job that reuses a purged UUID)
        if self.lists and moved:  # a new record, or one that ended
            if previous is None and store.get(rec.uuid) is rec:  # (not one purged)
                self.jobs[rec.uuid] = rec
            if rec.domain in self.domains:
                self._publish_domain(rec.domain)
        if rec.domain_level:
            first = store.active_domain_job(rec.domain)
            if first is None:
                self.legacy.pop(rec.domain, None)
            elif first.snapshot is not None:
                self.legacy[rec.domain] = first.snapshot
            return
        disk = _disk(rec)
        if disk is None:
            return
        key = (rec.domain, disk)
        current = self.chain.get(key)
        if moved:  # a block job began or ended: the store says whose the disk is now
            holder = store.chain_job(rec.domain, disk)
            if holder is None:
                self.chain.pop(key, None)
            elif holder.snapshot is not None:
                self.chain[key] = holder.snapshot
        elif current is not None and current.record is rec:
            self.chain[key] = snap

    def publish_domain(self, domain: str, publish: Callable[[JobRecord], None]) -> None:
        """Publish ``domain``'s jobs from now on (``publish``: the engine's, for a record
        without a snapshot yet: an ended one nobody read since the snapshots started)."""
        if not self.lists or self._store is None or domain in self.domains:
            return
        for rec in self._store.domain_jobs(domain):
            if rec.snapshot is None:
                publish(rec)  # (its domain is not in ``domains`` yet: no rebuild)
            self.jobs[rec.uuid] = rec
        self._publish_domain(domain)

    def _publish_domain(self, domain: str) -> None:
        store = self._store
        assert store is not None
        self.domains[domain] = DomainJobs(
            tuple(store.domain_jobs(domain)), store.last_ended_domain_job(domain)
        )

    def _removed(self, rec: JobRecord) -> None:
        """The store forgot ``rec`` (purged, or evicted by a cap)."""
        if self.jobs.get(rec.uuid) is rec:
            del self.jobs[rec.uuid]
        if rec.domain in self.domains:
            self._publish_domain(rec.domain)
