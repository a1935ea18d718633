"""jobd as a fleet member: ``FleetService`` (the fleet and its commands, what
``LocalConnection.fleet`` and the handlers use) and ``FleetJob``, the handle of another
host's job (LocalJob's interface; its verbs reach the owner through the database:
design/fleet.md "Commands").
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio

from jobcore.errors import InvalidArgument, NoSuchJob, Unsupported
from jobcore.events import EventFilter, EventHub, EventKind, JobEvent, Subscription
from jobcore.fleet import Fleet, RemoteJob
from jobcore.fleet_commands import NO_JOB, VERBS, FleetCommands, WatchHandle
from jobcore.info import Explanation, HostInfo, HostState, JobInfo
from jobcore.lifecycle import JobState
from jobcore.spec import JobType, check_timeout

if TYPE_CHECKING:
    from jobcore.daemon.drivers import DriverConnections


class FleetService:
    """The fleet jobd is a member of: ``fleet`` (hosts, leases, every host's rows) and
    ``commands`` (verbs and events across hosts). Satisfies ``jobcore.fleet.FleetView``."""

    def __init__(self, fleet: Fleet, commands: FleetCommands, drivers: DriverConnections) -> None:
        self.fleet = fleet
        self.commands = commands
        self.drivers = drivers

    @property
    def host(self) -> str:
        return self.fleet.host

    async def hosts(self) -> list[HostInfo]:
        return await self.fleet.hosts()

    async def fence(self, name: str, reason: str | None, *, force: bool = False) -> HostInfo:
        return await self.fleet.fence(name, reason, force=force)

    async def jobs_page(self, after: int, limit: int) -> tuple[list[JobInfo], int | None]:
        return await self.fleet.jobs_page(after, limit)

    async def lookup(self, job: uuid.UUID) -> FleetJob | None:
        """The handle of ``job`` if another host owns it (None: no such row, or a row of
        this host's own, which only its driver connection may serve)."""
        remote = await self.fleet.job(job)
        if remote is None or remote.info.host == self.host:
            return None
        return FleetJob(self, remote.info, remote.event_seq)

    async def find(self, digits: str, limit: int) -> list[FleetJob]:
        """Other hosts' jobs whose UUID's hex digits start with ``digits``, in UUID order."""
        found = await self.fleet.find_prefix(digits, limit)
        return [FleetJob(self, info) for info in found if info.host != self.host]

    def watch_for(
        self, job: uuid.UUID, hub: EventHub, sub: Subscription, *, since: int | None = None
    ) -> WatchHandle:
        """Events of ``job``, if another host owns it, for ``sub`` alone (a subscription
        of ``hub``, an engine's); the function that ends the watch."""
        return self.commands.watch(job, _ToSubscription(hub, sub), since=since)

    async def execute(self, job: uuid.UUID, verb: str, args: tuple[Any, ...]) -> Any:
        """Another member's command, on this host's job (FleetCommands.run's ``execute``):
        the job on any of jobd's driver connections, the verb as a local call makes it;
        or on this host itself (``NO_JOB``: a domain a migration hands over)."""
        if job == NO_JOB and verb == "adopt_domain":
            kinds = (str, str, dict)
            if len(args) != 3 or not all(map(isinstance, args, kinds)):
                raise InvalidArgument(f"adopt_domain takes a URI, a name, a record: not {args!r}")
            await self.adopt_domain(*args)
            return None
        found = self.drivers.lookup_job(job)
        if found is None:
            raise NoSuchJob(f"no job with UUID '{job}' on host '{self.host}'")
        if verb not in VERBS:
            raise InvalidArgument(f"'{verb}' is not a verb another member may ask for")
        if verb == "set_speed":
            if len(args) != 1 or (
                args[0] is not None and (isinstance(args[0], bool) or not isinstance(args[0], int))
            ):
                raise InvalidArgument(f"set_speed takes one bandwidth in bytes/s, not {args!r}")
        elif args:
            raise InvalidArgument(f"{verb} takes no arguments, not {args!r}")
        return await getattr(found, verb)(*args)

    async def adopt_domain(self, uri: str, domain: str, record: dict[str, Any]) -> None:
        """Take in a domain another member's migration handed over: on this jobd's
        connection of ``uri`` (opened as a client's hello would), through its driver's
        ``adopt_domain``, durable before it returns."""
        # its identity alone: the parameters that configure it (a rate) are the source's
        slot = await self.drivers.attach(self.drivers.resolve(uri).key, readonly=False)
        try:
            assert slot.conn is not None
            dconn = slot.conn.engine.dconn
            adopt = getattr(dconn, "adopt_domain", None)
            if adopt is None:
                raise Unsupported(f"driver '{uri}' cannot take in a migrated domain")
            await adopt(domain, record)
        finally:
            self.drivers.release(slot)

    def peers(self) -> _Peers:
        """What a driver connection of this jobd gets as ``fleet_peers``."""
        return _Peers(self)


class _Peers:
    """jobcore.driver.FleetPeers for jobd's driver connections."""

    def __init__(self, service: FleetService) -> None:
        self._service = service
        self.host = service.host

    async def members(self) -> frozenset[str]:
        hosts = await self._service.hosts()
        return frozenset(h.name for h in hosts if h.state is HostState.LIVE and h.name != self.host)

    async def adopt(self, host: str, uri: str, domain: str, record: Mapping[str, Any]) -> None:
        await self._service.commands.call_host(host, "adopt_domain", (uri, domain, dict(record)))


class _ToSubscription(EventHub):
    """What a watch of another host's job emits into for one subscription of an
    engine's hub: each event goes to that subscription alone (not to the engine's
    domain- or type-filtered ones: the job is not on that engine's host)."""

    def __init__(self, hub: EventHub, sub: Subscription) -> None:
        super().__init__()
        self._target = hub
        self._sub = sub

    def emit(self, ev: JobEvent) -> None:
        self._target.emit_to(self._sub, ev)


class FleetJob:
    """A handle on another host's job: what the row says (``info``, read again each
    call), its verbs forwarded to the owner, its end awaited through notifications."""

    def __init__(self, service: FleetService, info: JobInfo, event_seq: int | None = None) -> None:
        self._service = service
        self._info = info
        #: the job's event number when its row was last read (None: not read yet)
        self.event_seq = event_seq
        self.uuid: uuid.UUID = info.uuid
        self.type: JobType = info.type
        self.domain: str = info.domain

    def __repr__(self) -> str:
        return f"<Job {self.uuid} {self.type} on {self.domain!r} of host {self.host!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FleetJob) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    @property
    def state(self) -> JobState:
        """The state when the row was last read (no round trip)."""
        return self._info.state

    @property
    def host(self) -> str:
        return self._info.host

    async def _row(self) -> RemoteJob:
        remote = await self._service.fleet.job(self.uuid)
        if remote is None:
            raise NoSuchJob(f"no job with UUID '{self.uuid}' (it was on host '{self.host}')")
        self._info, self.event_seq = remote.info, remote.event_seq
        return remote

    async def info(self) -> JobInfo:
        return (await self._row()).info

    async def stats(self) -> dict[str, Any]:
        """The owner's stats; once the job ended, its final stats from the row (the
        owner need not be live)."""
        remote = await self._row()
        if remote.info.state.terminal:
            return dict(remote.stats)
        result: dict[str, Any] = await self._call("stats")
        return result

    async def wait(self, timeout: float | None = None) -> JobInfo:
        """Until the job's row says it ended (notified: its FINAL event); its final info.
        TimeoutError after ``timeout``."""
        timeout = check_timeout(timeout)
        remote = await self._row()
        if remote.info.state.terminal:
            return remote.info
        hub = EventHub()
        sub = hub.subscribe(EventFilter(job=self.uuid, kinds=frozenset({EventKind.FINAL})), 1)
        unwatch = self._service.commands.watch(self.uuid, hub, since=remote.event_seq)
        try:
            with anyio.fail_after(timeout):
                await sub.get()
        finally:
            unwatch()
            sub.close()
        return (await self._row()).info

    async def _call(self, verb: str, *args: Any) -> Any:
        return await self._service.commands.call(self.uuid, verb, args)

    async def abort(self) -> None:
        await self._call("abort")

    async def pause(self) -> None:
        await self._call("pause")

    async def resume(self) -> None:
        await self._call("resume")

    async def complete(self) -> None:
        await self._call("complete")

    async def set_speed(self, bandwidth: int | None) -> None:
        """Bandwidth in bytes/s; None or 0 lifts the limit."""
        await self._call("set_speed", bandwidth or None)

    async def xml_desc(self) -> str:
        result: str = await self._call("xml_desc")
        return result

    # explain
    async def explain(self) -> Explanation:
        """Refused: a job's queue place lives in its owner's scheduler."""
        raise Unsupported(
            f"job '{self.uuid}' runs on host '{self.host}': explain it there "
            "(a queued job's blockers and position are its owner's)"
        )
