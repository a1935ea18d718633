"""The narrow, async protocol between the engine and a hypervisor driver.

A driver never sees XML: it receives prepared specs (jobcore.types: every chain position,
default, file and name resolved by the job's type) wrapped in a ``DriverJob``, and reports
back through that job's ``JobReporter``, and a domain's definition parsed from libvirt's
domain XML (jobcore.xml.domain.DomainDef). It computes none of jobcore's semantics again.
The engine owns every state transition; a driver only *reports* (progress, ready,
completed, failed, cancelled, paused-by-error) and *acts* on verbs (start, cancel, pause,
resume, complete, set_speed).

Drivers register by URI scheme under the entry-point group ``jobcore.drivers``; the entry
point names a class with ``scheme`` and an async context manager ``connect(uri, tg)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from attrs import frozen

from jobcore.domaininfo import DiskInfo as DiskInfo  # defined below the driver protocol
from jobcore.domaininfo import DomainInfo as DomainInfo
from jobcore.errors import InvalidArgument
from jobcore.lifecycle import JobState
from jobcore.spec import JobSpec, JobType

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from jobcore.lifecycle import Verb
    from jobcore.uri import URI
    from jobcore.xml.domain import DomainDef  # the XML layer: not for a jobd client


# ---- backup targets and scratch files (libvirt's rule, the same text on every driver) --

REUSE_HINT = "VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL"


def store_exists(path: str, disk: str) -> InvalidArgument:
    """A target/scratch file that exists, for a backup that would create it."""
    return InvalidArgument(
        f"store '{path}' for backup of '{disk}' exists: name a file that does not exist, or "
        f"pass {REUSE_HINT} to reuse this one (it is never overwritten otherwise)"
    )


def store_missing(path: str, disk: str) -> InvalidArgument:
    """A target/scratch file that does not exist, for a backup told to reuse it."""
    return InvalidArgument(
        f"missing store '{path}' for backup of '{disk}': {REUSE_HINT} reuses an existing "
        "file; create it first (qemu-img create -f FORMAT FILE SIZE) or drop the flag"
    )


def store_unusable(path: str, disk: str, why: str) -> InvalidArgument:
    """A file given with REUSE_EXTERNAL that cannot hold the disk's backup."""
    return InvalidArgument(
        f"store '{path}' for backup of '{disk}' cannot be reused: {why}; "
        "create a fitting image or let the backup create a new file"
    )


def store_in_use(path: str, disk: str, owner: str) -> InvalidArgument:
    """A target/scratch file that is a disk image of a domain: never written."""
    return InvalidArgument(
        f"store '{path}' for backup of '{disk}' is {owner}: a backup never writes "
        "into a disk image; name another file"
    )


class JobReporter(Protocol):
    """How a driver tells the engine about a job. Call from the event loop's thread."""

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        """Bytes done of ``total``; ``extra``: more libvirt-named stats (memory_*, …)."""

    def ready(self) -> None:
        """The job converged and waits for ``complete`` (active commit, pull backup)."""

    def completed(self, extra: Mapping[str, int | str] | None = None) -> None:
        """The work finished successfully."""

    def failed(self, errmsg: str) -> None:
        """The work failed; ``errmsg`` carries the hypervisor's text."""

    def cancelled(self) -> None:
        """A cancel requested by the engine took effect."""

    def domain_moved(self, uri: str) -> None:
        """A migration moved the domain to the host of ``uri``."""


@frozen
class DriverJob:
    """A job as a driver sees it."""

    uuid: uuid.UUID
    type: JobType
    domain: str
    #: the prepared spec (its type's ``prepare`` ran against the domain): a built-in
    #: type's is a PreparedBackup, PreparedPull, PreparedCommit or MigrationSpec
    #: (jobcore.types); a registered type's is whatever its ``prepare`` returns
    spec: JobSpec
    reporter: JobReporter


# ---- recovery after a restart (design/store.md "Recovery") ---------------------------


@frozen
class Reattached:
    """The job still runs on the hypervisor; reports flow through the new reporter."""

    state: JobState  # RUNNING, PAUSED, READY or STANDBY: where the hypervisor has it
    processed: int = 0
    total: int = 0


@frozen
class Concluded:
    """The job ended while the daemon was away; this is its real outcome."""

    state: JobState  # COMPLETED, FAILED or CANCELLED
    errmsg: str | None = None
    extra: Mapping[str, int | str] | None = None  # libvirt-named final stats, as completed(extra)


@frozen
class Vanished:
    """Nothing left to ask: the guest or its QEMU job is gone without a readable outcome."""

    reason: str  # e.g. "QEMU of domain 'vm1' (pid 123) is gone"


@frozen
class NotStarted:
    """The hypervisor has no trace of the job and nothing of it ran: the process died
    after the engine wrote 'running' and before the driver's start was durable. The
    engine starts it again (it had been admitted: its claims are held)."""

    reason: str  # e.g. "the simulated host of 'sim:///default' has no record of job …"


Recovered = Reattached | Concluded | Vanished | NotStarted

# Optional DriverConnection method (looked up with getattr, like check_job):
#   async def recover_job(self, job: DriverJob, last_state: JobState) -> Recovered
# `job` carries the same uuid/type/domain and the same prepared spec the driver got at
# start() (the engine persists the prepared spec), and a fresh reporter. `last_state` is
# the state last written to the store (never QUEUED: queued jobs are requeued by the
# engine, not given to the driver). Called once per job, in begin order, after the driver
# connection is open and before the engine serves any call. Must not raise for an
# ordinary vanish (return Vanished); an exception is treated as Vanished(str(exc)).
# NotStarted only when the driver can tell that the job never ran on the hypervisor (no
# durable trace of its start, no effect of it): safe to start again from the beginning.
# After Reattached the driver keeps reporting as it would for a job it started; verbs
# (cancel/pause/resume/complete/set_speed) work on it as on any job.


class DriverState(Protocol):
    """A driver connection's own durable records: JSON-able values by key, kept in the job
    store beside the jobs of the connection's scope (in memory with the memory store).

    Optional attribute ``durable``: False when nothing saved can outlive the connection
    (the memory store's: no later process ever loads it), so a driver may skip records
    that only a restart would read (looked up with getattr; absent: durable)."""

    def load(self) -> Mapping[str, Any]:
        """Everything saved before (at connect: what the last process left)."""

    def save(self, key: str, value: Any) -> None:
        """Queue ``value`` (JSON-able) under ``key``; durable at the next store commit, which
        the engine waits for before a JobBegin returns and before a state change's event."""

    def delete(self, key: str) -> None: ...

    async def sync(self) -> None:
        """Return once everything saved so far is on disk."""


class FleetPeers(Protocol):
    """What jobd gives a driver connection when it is a fleet member (design/fleet.md
    "Cross-host migration"): set as ``dconn.fleet_peers`` after connect, on a connection
    that has that attribute (None otherwise)."""

    #: this member's host name
    host: str

    async def members(self) -> frozenset[str]:
        """The names of the fleet's other members (live or not; not fenced ones)."""

    async def adopt(self, host: str, uri: str, domain: str, record: Mapping[str, Any]) -> None:
        """Hand domain ``domain`` (the driver's JSON-able ``record`` of it) to member
        ``host``, whose connection of the same ``uri`` takes it in (its driver's
        ``adopt_domain(domain, record)``, durable before this returns). Raises JobError:
        StoreError or OperationInvalid when the host or the database cannot be reached
        now (retry later), another one when it refused the domain."""


class Clock(Protocol):
    """The connection's time: the engine's timers (a queue timeout) run on it, so a
    simulated clock moves them as it moves the hypervisor."""

    def now(self) -> float:
        """Monotonic seconds; safe to call from any thread (the blocking facade's
        snapshot readers call it on theirs: jobcore.snapshots)."""

    def wall(self) -> float:
        """Seconds since the epoch."""

    async def wait_until(self, deadline: float) -> None:
        """Return once ``now()`` has reached ``deadline``."""


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def wait_until(self, deadline: float) -> None:
        await wait_until_monotonic(deadline)


async def wait_until_monotonic(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``."""
    await anyio.sleep(max(0.0, deadline - time.monotonic()))


class DriverConnection(Protocol):
    """One open connection of a driver to its hypervisor (a host)."""

    uri: str
    clock: Clock

    # Optional: ``job_verbs: Mapping[str, frozenset[Verb]]``, job type -> the verbs this
    # driver accepts for it, where it accepts fewer than the type does (JobTypeInfo.verbs;
    # e.g. qemu cannot pause a migration). The engine refuses the others with
    # OperationInvalid before calling the driver; a type not listed keeps its own set.

    def supports(self, job_type: JobType) -> bool: ...

    async def list_domains(self) -> list[DomainInfo]: ...

    async def lookup_domain(self, name: str) -> DomainInfo:
        """Raise jobcore.errors.NoSuchDomain when there is none."""

    async def create_domain(self, definition: DomainDef) -> DomainInfo:
        """Start a domain from its definition (optional): the core parsed the libvirt
        domain XML (jobcore.xml.domain.parse_domain), the driver never sees it.

        Optional keyword ``path_guard`` (jobcore.paths.PathGuard): a driver that opens
        host files the definition names accepts it and, when given one, calls it with
        each of them before opening it: the disk sources first, then the backing files
        found in them (or, on sim, named by the definition's ``<backingStore>``). A
        driver without the parameter is refused a guard (jobd's confined clients cannot
        create domains on it)."""

    async def destroy_domain(self, name: str) -> None: ...

    # Optional (looked up with getattr; absent: Unsupported naming the driver):
    #   ``async def monitor_command(self, name: str, command: str, *, hmp: bool) -> str``
    # runs an admin's monitor command on domain ``name`` (libvirt-qemu's
    # qemuMonitorCommand): ``hmp`` True, ``command`` is HMP text and the result its text;
    # else ``command`` is a QMP command as JSON text and the result the JSON reply text.

    # Optional: ``async def check_job(self, spec: Any, dom: DomainInfo) -> None`` refuses a
    # prepared spec before the job exists (raise a JobError; e.g. a backup target that
    # exists). The engine calls it, when the driver has it, before admission; ``start``
    # must still re-check what may have changed since (a queued job starts later).

    # Optional: ``def start_inline(self, job: DriverJob) -> bool``: True promises that
    # ``start(job)`` runs to its end without waiting for anything (no await suspends it):
    # the engine then runs it without the shielded, bounded cancel scope a start that
    # waits gets (design/scheduling.md "Fast paths of an instant job"). A start that
    # waits after all is a driver bug: it is closed where it first waited, the job fails
    # (DriverError) and the driver is told to cancel it, as after a start timeout.

    # Optional: ``def settle(self, job: DriverJob) -> None``: if the driver would apply
    # something to ``job`` at the event loop's next step anyway (an instant job's end),
    # apply it now, with its usual reports (what is due with it may come along). The
    # engine's wait calls it before it waits (design/scheduling.md "Fast paths…").

    async def start(self, job: DriverJob) -> None:
        """Begin the work; return once it is under way. Raise DriverError if refused.

        Reports (progress, completion) may arrive before or after this returns.
        """

    async def cancel(self, job: DriverJob) -> None:
        """Request cancellation; report ``cancelled()`` (or failed/completed) when done."""

    async def pause(self, job: DriverJob) -> None: ...

    async def resume(self, job: DriverJob) -> None: ...

    async def complete(self, job: DriverJob) -> None:
        """Finish a job waiting in 'ready' (pivot, or end a pull backup); report completed."""

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None: ...

    # Optional (looked up with getattr, like check_job):
    #   ``async def recover_job(self, job: DriverJob, last_state: JobState) -> Recovered``
    # ``job`` carries the same uuid/type/domain and the same prepared spec the driver got
    # at start() (the store keeps the prepared spec), and a fresh reporter. ``last_state``
    # is the state last written to the store (never QUEUED: the engine requeues those).
    # Called once per job, in begin order, after the driver connection is open and before
    # the engine serves any call. Must not raise for an ordinary vanish (return
    # Vanished); an exception is treated as Vanished(str(exc)). After Reattached the
    # driver keeps reporting as for a job it started; verbs work on it as on any job.
    #
    # Optional (job groups, design/scheduling.md "Job groups"):
    #   ``async def start_all(self, jobs: Sequence[DriverJob]) -> None``
    # Start jobs of one domain, a group's members, together where the hypervisor can
    # (qemu: push backups in one QMP transaction), as start() each otherwise; if it
    # raises, every one of them fails and none may be left started.


def job_verbs(dconn: object, job_type: str, type_verbs: frozenset[Verb]) -> frozenset[Verb]:
    """The verbs a job of ``job_type`` accepts on ``dconn``: its type's (``type_verbs``),
    narrowed by the connection's ``job_verbs`` where it has an entry for the type."""
    narrowed: Mapping[str, frozenset[Verb]] = getattr(dconn, "job_verbs", None) or {}
    return type_verbs & narrowed.get(job_type, type_verbs)


class Driver(Protocol):
    """What the ``jobcore.drivers`` entry point names.

    Optional attributes (looked up with ``getattr``; see jobcore.drivers):
    ``uri_params`` (a frozenset of the URI query parameters the driver reads: any other
    is refused with InvalidArgument), ``identity(uri)`` (the parameters, normalised, that
    select a different host or state rather than configure one; jobd keys its shared
    driver connections by them) and ``state_dir(uri)`` (the directory the connection
    would write to, which jobd refuses when it overlaps its own run directory).
    """

    scheme: str

    # Optional: ``serve_daemon(keep_guests: bool)``: jobd calls it once when it loads the
    # driver; with True the driver's connections leave their guests (and the jobs on
    # them) running when they close, for the next jobd to re-attach (recover_job).

    # Optional: ``persistent_state = True``: the engine then calls
    # ``connect(uri, tg, state=STATE)`` with the connection's DriverState.

    def connect(self, uri: URI, tg: TaskGroup) -> AbstractAsyncContextManager[DriverConnection]:
        """Open a connection; its background tasks run in ``tg`` (owned by the engine)."""


# ---- checkpoints' bitmaps (jobcore.checkpoints keeps the checkpoints themselves) --------


@frozen
class BitmapInfo:
    """A persistent dirty bitmap on a disk, as the hypervisor has it (QEMU's
    ``dirty-bitmaps`` of the disk's format node)."""

    name: str
    #: bytes marked dirty since the bitmap was created (QEMU's ``count``)
    count: int
    persistent: bool = True
    recording: bool = True
    #: QEMU found it not written back cleanly (a crash): unusable for a backup
    inconsistent: bool = False


@frozen
class BitmapRemoval:
    """Remove ``bitmap`` from ``disk``, first merging it into ``merge_into`` (a bitmap of
    the same disk) when one is named: how a deleted checkpoint's changes stay in its
    parent's record."""

    disk: str
    bitmap: str
    merge_into: str | None = None


# Optional DriverConnection methods for checkpoints (looked up with getattr; a driver
# without them refuses checkpoint calls with Unsupported):
#   ``async def bitmaps(self, domain: str) -> Mapping[str, Sequence[BitmapInfo]]``
#       disk name -> the persistent bitmaps the disk has now;
#   ``async def add_bitmaps(self, domain: str, bitmaps: Sequence[tuple[str, str]]) -> None``
#       create persistent bitmaps (disk, name) all at once or none (DriverError naming
#       one that exists already);
#   ``async def remove_bitmaps(self, domain: str, removals: Sequence[BitmapRemoval]) -> None``
#       merge and remove, all at once or none.
# A backup's checkpoint bitmaps are created by the driver's own start() (atomically with
# the backup, PreparedBackupDisk.checkpoint_bitmap) and removed again by it when the
# backup fails or is cancelled.
