"""The async API: the connection, domain and job interfaces, and ``connect()``.

Two implementations, neither a subclass of the other nor of these interfaces:
jobcore.local (in-process: the connection owns its engine and driver connection) and
jobcore.remote (served by jobd over a UNIX socket). The layers import one way:
methods/protocol → local, remote → api, so ``connect()`` picks one without a cycle (and
imports only the one it picks).
The assignments at the end make mypy prove that each implementation is complete: a
method one of them lacks, or whose signature differs, fails the type check, not a call
at run time. Every call of these interfaces is declared once in jobcore.methods.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jobcore import constants as C
from jobcore.domaininfo import DomainInfo
from jobcore.errors import InvalidArgument
from jobcore.events import EventHub, EventKind, Subscription
from jobcore.info import Explanation, GroupInfo, HostInfo, JobInfo
from jobcore.lifecycle import JobState
from jobcore.spec import (
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_PER_DOMAIN,
    DEFAULT_RETENTION,
    JobType,
)
from jobcore.uri import parse_uri

if TYPE_CHECKING:
    from jobcore.local import (
        LocalCheckpoint,
        LocalConnection,
        LocalDomain,
        LocalJob,
        LocalJobGroup,
    )
    from jobcore.paths import PathGuard
    from jobcore.remote import (
        RemoteCheckpoint,
        RemoteConnection,
        RemoteDomain,
        RemoteJob,
        RemoteJobGroup,
    )
    from jobcore.scheduler import PolicyTable

LEGACY_DOMAIN_JOB_UUID = C.LEGACY_DOMAIN_JOB_UUID


@runtime_checkable
class Connection(Protocol):
    """An open connection to a hypervisor driver (in-process or through jobd)."""

    uri: str

    async def lookup_domain(self, name: str) -> Domain: ...

    async def list_domains(self) -> Sequence[Domain]: ...

    async def create_domain(self, xml: str, *, path_guard: PathGuard | None = None) -> Domain:
        """Start a domain from its XML; ``path_guard`` (jobcore.paths, in-process only)
        sees the files the driver would open before it opens them."""
        ...

    async def job_lookup_by_uuid(self, dom: Domain, job: str | bytes | uuid.UUID) -> Job:
        """Look a job up by UUID; ``LEGACY_DOMAIN_JOB_UUID`` resolves to the domain's
        legacy job at call time (the handle returned is that concrete job)."""
        ...

    async def lookup_job(self, job: str | bytes | uuid.UUID) -> Job:
        """A job of any domain by UUID (the legacy alias needs a domain)."""
        ...

    async def find_jobs(self, prefix: str, limit: int = 16) -> Sequence[Job]:
        """Up to ``limit`` jobs whose UUID starts with ``prefix`` (hex digits), in UUID
        order: how a short form of a UUID is resolved."""
        ...

    # the fleet (jobd on a postgresql:// store; design/fleet.md): Unsupported elsewhere
    async def list_fleet_jobs(
        self, cursor: int = -1, limit: int = 1000
    ) -> tuple[list[JobInfo], int | None]:
        """One page of every fleet member's jobs in begin order, after ``cursor`` (-1: the
        start), and the next page's cursor (None: this was the last). A page may hold
        fewer than ``limit`` (jobd keeps a reply within a frame)."""
        ...

    async def fleet_hosts(self) -> list[HostInfo]:
        """The fleet's members by name: state, lease age, job counts."""
        ...

    async def fence_host(self, name: str, reason: str | None = None, flags: int = 0) -> HostInfo:
        """Fence a member that is not LIVE (``JOB_FENCE_FORCE``: even a LIVE one): its
        shared claims are released and its active jobs fail with ``reason``."""
        ...

    def subscribe(
        self,
        *,
        domain: str | None = None,
        job: uuid.UUID | None = None,
        types: Iterable[str] | None = None,
        kinds: Iterable[EventKind] | None = None,
        maxlen: int = EventHub.DEFAULT_BUFFER,
    ) -> Subscription:
        """A bounded, filtered event queue; close it (or use ``with``) when done."""
        ...

    # groups

    async def job_group_begin(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> JobGroup:
        """Begin a ``<jobgroup>``'s members as one: all admitted (or all queued) or none
        (design/scheduling.md "Job groups"); ``path_guard`` (in-process only) sees every
        member's files first."""
        ...

    async def job_group_explain(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> Explanation:
        """What ``job_group_begin(group_xml, flags)`` would do now (admit, queue, conflict,
        preempt; every member's claims and blockers), changing nothing."""
        ...

    async def job_group_lookup(self, group: str | bytes | uuid.UUID) -> JobGroup:
        """A job group of this connection by UUID."""
        ...


@runtime_checkable
class Domain(Protocol):
    """A domain handle."""

    name: str
    uuid: uuid.UUID

    @property
    def conn(self) -> Connection: ...

    @property
    def uri(self) -> str:
        """The URI of the host the domain runs on now (remote: the one it was reached by)."""
        ...

    async def info(self) -> DomainInfo: ...

    async def destroy(self) -> None: ...

    async def job_begin(self, job_xml: str | bytes, flags: int = 0) -> Job:
        """Parse a ``<job>`` document and begin it (JobBegin)."""
        ...

    # domain description and the QEMU monitor (slice domxml)
    async def xml_desc(self, flags: int = 0) -> str:
        """libvirt's domain XML of the domain now, with each disk's backing chain."""
        ...

    async def is_active(self) -> bool: ...

    async def qemu_monitor_command(self, cmd: str, flags: int = 0) -> str:
        """An HMP line (flags VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP) or QMP JSON straight to
        the domain's QEMU (qemu driver only); its reply text."""
        ...

    async def job_begin_spec(self, spec: Any, flags: int = 0) -> Job:
        """Begin a job from a typed spec (what ``job_begin`` does after parsing)."""
        ...

    # explain
    async def job_explain(self, job_xml: str | bytes, flags: int = 0) -> Explanation:
        """What ``job_begin(job_xml, flags)`` would do now (admit, queue, conflict,
        preempt), its claims and blockers; changes nothing."""
        ...

    async def list_jobs(self) -> Sequence[Job]:
        """Active and retained jobs of the domain, in the order they began."""
        ...

    # legacy calls (libvirt-python virDomain methods)
    async def job_info(self) -> list[int]: ...

    async def job_stats(self, flags: int = 0) -> dict[str, Any]: ...

    async def abort_job(self) -> int: ...

    async def backup_begin(
        self, backup_xml: str | None, checkpoint_xml: str | None = None, flags: int = 0
    ) -> int: ...

    async def backup_get_xml_desc(self, flags: int = 0) -> str: ...

    async def block_job_info(self, disk: str, flags: int = 0) -> dict[str, int]: ...

    async def block_job_abort(self, disk: str, flags: int = 0) -> int: ...

    async def block_pull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int: ...

    async def block_commit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int: ...

    # checkpoints (jobcore.checkpoints; libvirt's virDomainCheckpoint* calls)
    async def checkpoint_create(self, xml: str, flags: int = 0) -> Checkpoint:
        """A checkpoint from its ``<domaincheckpoint>`` (flags: VIR_DOMAIN_CHECKPOINT_
        CREATE_REDEFINE, _REDEFINE_VALIDATE; _QUIESCE is refused: no guest agent)."""
        ...

    async def list_checkpoints(self, flags: int = 0) -> Sequence[Checkpoint]:
        """In creation order (VIR_DOMAIN_CHECKPOINT_LIST_* filters)."""
        ...

    async def checkpoint_lookup(self, name: str) -> Checkpoint:
        """NoSuchCheckpoint when the domain has none of that name."""
        ...


@runtime_checkable
class Checkpoint(Protocol):
    """A handle on one checkpoint of a domain (by name: it needs no round trip)."""

    @property
    def name(self) -> str: ...

    @property
    def domain(self) -> str:
        """The name of its domain."""
        ...

    async def xml_desc(self, flags: int = 0) -> str:
        """libvirt's ``<domaincheckpoint>``; VIR_DOMAIN_CHECKPOINT_XML_SIZE adds each
        disk's dirty bytes since the checkpoint."""
        ...

    async def parent(self) -> Checkpoint | None: ...

    async def delete(self, flags: int = 0) -> None:
        """VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN, _CHILDREN_ONLY, _METADATA_ONLY."""
        ...


@runtime_checkable
class Job(Protocol):
    """A handle on one concrete job. ``uuid``, ``type`` and ``domain`` need no round trip."""

    uuid: uuid.UUID
    type: JobType
    domain: str

    @property
    def conn(self) -> Connection: ...

    @property
    def state(self) -> JobState:
        """The job's state (remote: the one last seen by a call on this handle)."""
        ...

    async def info(self) -> JobInfo: ...

    async def stats(self) -> dict[str, Any]: ...

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """Until the job ends; returns its final info. TimeoutError after ``timeout``."""
        ...

    async def abort(self) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def complete(self) -> None: ...

    async def set_speed(self, bandwidth: int | None) -> None:
        """Bandwidth in bytes/s; None or 0 lifts the limit."""
        ...

    async def xml_desc(self) -> str:
        """The job XML with its UUID, its state and the effective values."""
        ...

    def events(self, maxlen: int = EventHub.DEFAULT_BUFFER) -> Subscription: ...

    # explain
    async def explain(self) -> Explanation:
        """A queued job: what it waits for and its position (an admitted one: ``admit``)."""
        ...


# groups


@runtime_checkable
class JobGroup(Protocol):
    """A handle on a job group of one connection. ``uuid`` needs no round trip."""

    uuid: uuid.UUID

    async def jobs(self) -> Sequence[Job]:
        """The member jobs, in document order."""
        ...

    async def info(self) -> GroupInfo: ...

    async def wait(self, timeout: float | None = None) -> GroupInfo:
        """Until every member ended (and the group's rollback is done); TimeoutError
        after ``timeout``."""
        ...

    async def abort(self) -> None:
        """Abort every active member."""
        ...


def refuse_daemon_settings(uri: str, *, store: object, policy: object) -> None:
    """A jobd URI's store and policy are the daemon's config: InvalidArgument if given."""
    if store is not None:
        raise InvalidArgument(
            f"'{uri}' is served by jobd, whose job store is the daemon's config "
            "(jobd --store URL): connect without store="
        )
    if policy is not None:
        raise InvalidArgument(
            f"'{uri}' is served by jobd, whose conflict policy is the daemon's config "
            "(jobd --policy NAME): connect without policy="
        )


@asynccontextmanager
async def connect(
    uri: str = "sim:///default",
    *,
    retention: float = DEFAULT_RETENTION,
    max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
    max_retained: int = DEFAULT_MAX_RETAINED,
    store: str | None = None,
    policy: str | PolicyTable | None = None,
) -> AsyncIterator[Connection]:
    """Open a connection; everything it started is cancelled when the block exits.
    ``DRIVER+unix:///PATH?socket=SOCKET`` URIs are served by jobd (jobcore.remote),
    every other URI in-process (jobcore.local).

    Ended jobs are kept ``retention`` seconds (unless their XML says otherwise), at most
    ``max_retained_per_domain`` per domain and ``max_retained`` in all: past a cap the
    oldest ended go first. Through jobd, the daemon's configuration decides these.

    ``store`` names the job store (``memory:``, the default, ``sqlite:///ABS/PATH`` or
    ``postgresql://…``: jobs are written there and the ended jobs already in it are
    loaded; design/store.md). Job records carry the machine's hostname as their host.
    Through jobd the daemon's store is the daemon's config: ``store`` is refused.

    ``policy`` is the conflict policy table (design/scheduling.md "Policy"), by name
    (``"default"``, ``"kubevirt"``: ``jobcore.scheduler.POLICY_TABLES``) or as a
    ``PolicyTable``; through jobd it is the daemon's (``jobd --policy``): refused."""
    parsed = parse_uri(uri)
    # each side imported when used: a jobd client never loads the engine nor a driver
    if parsed.transport == "unix":
        refuse_daemon_settings(uri, store=store, policy=policy)
        from jobcore.remote import connect_remote

        async with connect_remote(parsed, retention=retention) as remote:
            yield remote
        return
    from jobcore.local import connect_local

    async with connect_local(
        uri,
        retention=retention,
        max_retained_per_domain=max_retained_per_domain,
        max_retained=max_retained,
        store=store,
        policy=policy,
    ) as local:
        yield local


if TYPE_CHECKING:  # mypy proves both implementations complete (members, signatures)
    _local: tuple[type[Connection], type[Domain], type[Job]] = (
        LocalConnection,
        LocalDomain,
        LocalJob,
    )
    _remote: tuple[type[Connection], type[Domain], type[Job]] = (
        RemoteConnection,
        RemoteDomain,
        RemoteJob,
    )
    _checkpoints: tuple[type[Checkpoint], type[Checkpoint]] = (LocalCheckpoint, RemoteCheckpoint)
    _groups: tuple[type[JobGroup], type[JobGroup]] = (LocalJobGroup, RemoteJobGroup)
