"""Driver connections, opened on demand for the clients' hellos (and at start for every
scope the job store holds jobs of: ``recover``) and shared by every client naming the same
identity (``DriverTarget``, ``resolve_driver_uri``), closed once idle.
"""

from __future__ import annotations

import fnmatch
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
import attrs
from anyio.abc import TaskGroup
from attrs import define, field, frozen

from jobcore.daemon.config import DEFAULT_ALLOWED_URIS, DRIVER_IDLE_TIMEOUT, MAX_DRIVER_CONNECTIONS
from jobcore.driver import Driver
from jobcore.drivers import check_uri_params, load_driver
from jobcore.errors import DriverError, InvalidArgument, InvalidURI, JobError, leaf_error
from jobcore.local import LocalConnection, LocalJob, connect_local
from jobcore.log import get_logger
from jobcore.protocol import AccessDenied, DaemonUnreachable
from jobcore.store_sqlite import StoredScope
from jobcore.uri import parse_uri

if TYPE_CHECKING:
    from jobcore.fleet import FleetView

_log = get_logger("jobd")

# ---- driver connections -----------------------------------------------------------------


@frozen
class DriverTarget:
    """What a hello names, resolved: ``key`` is the driver connection's identity (the URI
    without transport, ``socket`` and configuration parameters, with the driver's identity
    parameters normalised); ``config`` the other parameters, sorted."""

    key: str
    config: tuple[tuple[str, str], ...]
    #: the directory the driver connection would write to, when the driver says
    state_dir: Path | None = None
    #: the driver's defaults for configuration parameters it declares (``uri_defaults``)
    defaults: tuple[tuple[str, str], ...] = ()

    @property
    def uri(self) -> str:
        """The URI the driver connection is opened with."""
        return _with_query(self.key, self.config)


def _with_query(base: str, params: tuple[tuple[str, str], ...]) -> str:
    if not params:
        return base
    sep = "&" if "?" in base else "?"
    return base + sep + urllib.parse.urlencode(params, safe="/")


def resolve_driver_uri(uri_text: str, driver: Driver | None = None) -> DriverTarget:
    """The driver connection a client's URI names; unknown parameters (for drivers that
    declare theirs) are refused with InvalidArgument."""
    uri = parse_uri(uri_text)
    if uri.transport is not None:
        raise InvalidURI(f"jobd serves driver URIs, not '{uri_text}'")
    if driver is None:
        driver = load_driver(uri)
    params = tuple((k, v) for k, v in uri.params if k != "socket")
    check_uri_params(driver, attrs.evolve(uri, params=params))
    identity_of = getattr(driver, "identity", None)
    state_of = getattr(driver, "state_dir", None)
    try:
        # a driver that says nothing: every parameter is part of the identity
        identity = tuple(sorted(params if identity_of is None else identity_of(uri)))
        state_dir = None if state_of is None else Path(state_of(uri)).resolve()
    except (OSError, ValueError) as exc:  # e.g. a NUL byte or a loop in a dir= path
        raise InvalidArgument(f"invalid parameter in '{uri_text}': {exc}") from None
    names = {k for k, _ in identity}
    config = tuple(sorted((k, v) for k, v in params if k not in names))
    key = _with_query(f"{uri.driver}://{uri.host}{uri.path}", identity)
    defaults = tuple(sorted(getattr(driver, "uri_defaults", {}).items()))
    return DriverTarget(key, config, state_dir, defaults)


def driver_key(uri_text: str) -> str:
    """The identity of the driver connection a URI names (see DriverTarget)."""
    return resolve_driver_uri(uri_text).key


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


class _Reader(Protocol):
    """A read-only client session attached to a driver connection (a ``_Client``)."""

    def expel(self, error: JobError) -> None: ...


@define(eq=False)
class _DriverSlot:
    target: DriverTarget
    ready: anyio.Event = field(factory=anyio.Event)
    #: set to close the connection (idle, or the daemon stops)
    closing: anyio.Event = field(factory=anyio.Event)
    #: set once the connection is closed and the slot is free
    gone: anyio.Event = field(factory=anyio.Event)
    conn: LocalConnection | None = None
    error: JobError | None = None
    #: read-write client sessions attached (hello done, not yet disconnected)
    clients: int = 0
    #: read-only sessions attached: they neither keep the connection open nor stop its
    #: eviction; they are expelled when it closes
    readers: set[_Reader] = field(factory=set)
    #: when the slot was last seen with a client or a job
    busy_at: float = 0.0

    def has_jobs(self) -> bool:
        """Active or retained jobs (ended jobs keep their info for the retention period,
        so the connection holding them stays)."""
        if self.conn is None:
            return False
        engine = self.conn.engine
        engine.store.purge(engine.clock.now())
        return len(engine.store) > 0

    def contradiction(self, config: tuple[tuple[str, str], ...]) -> str | None:
        """The first parameter of ``config`` that differs from the connection's own
        (given when it was opened, else the driver's declared default), as text."""
        have = dict(self.target.defaults) | dict(self.target.config)
        for k, v in config:
            if have.get(k) != v:
                current = f"{k}={have[k]}" if k in have else f"no {k} (the driver's default)"
                return f"{k}={v} where the open connection has {current}"
        return None


class DriverConnections:
    """Driver connections opened on demand, shared by all clients naming the same
    identity, closed when they stay without client and job for ``idle_timeout``."""

    def __init__(
        self,
        tg: TaskGroup,
        retention: float,
        *,
        allowed: tuple[str, ...] = DEFAULT_ALLOWED_URIS,
        run_dir: Path | None = None,
        idle_timeout: float = DRIVER_IDLE_TIMEOUT,
        store: str | None = None,
        keep_jobs: bool = True,
        host: str | None = None,
        policy: str = "default",
        **retained: int,
    ) -> None:
        self._tg = tg
        self._retention = retention
        self._allowed = allowed
        self._run_dir = None if run_dir is None else run_dir.resolve()
        self._idle_timeout = idle_timeout
        self._retained = retained  # max_retained_per_domain, max_retained
        self._store = store  # the job store URL every driver connection uses
        self._keep_jobs = keep_jobs  # stopping leaves jobs a durable store recovers
        #: the fleet jobd is a member of: every driver connection's ``fleet``
        self.fleet: FleetView | None = None
        self._host = host  # the fleet member every job record carries
        self._policy = policy  # every driver connection's conflict policy table, by name
        self._slots: dict[str, _DriverSlot] = {}
        self._drivers: dict[str, Driver] = {}
        self._stop = anyio.Event()

    def resolve(self, uri_text: str) -> DriverTarget:
        uri = parse_uri(uri_text)
        driver = self._drivers.get(uri.driver)
        if driver is None and uri.transport is None:
            driver = self._drivers[uri.driver] = load_driver(uri)
            serve = getattr(driver, "serve_daemon", None)
            if serve is not None:  # guests outlive jobd unless it stops them
                serve(self._keep_jobs)
        return resolve_driver_uri(uri_text, driver)

    def uuid_owner(self, job: uuid.UUID) -> str | None:
        """The driver connection (its URI) that has a job ``job``, live or retained."""
        for slot in self._slots.values():
            if slot.conn is None:
                continue
            engine = slot.conn.engine
            engine.store.purge(engine.clock.now())
            if engine.store.get(job) is not None:
                return slot.target.key
        return None

    def lookup_job(self, job: uuid.UUID, *, besides: _DriverSlot | None = None) -> LocalJob | None:
        """The job ``job`` on any open driver connection but ``besides``, live or retained."""
        for slot in list(self._slots.values()):
            if slot is besides or slot.conn is None or slot.closing.is_set():
                continue
            engine = slot.conn.engine
            engine.store.purge(engine.clock.now())
            rec = engine.store.get(job)
            if rec is not None:
                return LocalJob(slot.conn, rec)
        return None

    async def attach(self, uri_text: str, *, readonly: bool, confined: bool = False) -> _DriverSlot:
        """The driver connection a hello names, opened if needed (read-write clients
        only; a ``confined`` one only in the driver's default state directory); a
        read-write caller holds it until ``release``, a read-only one (not counted: it adds
        itself to ``readers``) does not hold it."""
        target = self.resolve(uri_text)
        while True:
            slot = self._slots.get(target.key)
            if slot is not None and slot.closing.is_set():
                await slot.gone.wait()  # closing for idleness: open it afresh
                continue
            if slot is not None:
                conflict = slot.contradiction(target.config)
                if conflict is not None:
                    raise InvalidArgument(
                        f"'{target.key}' is open as '{slot.target.uri}'; '{uri_text}' "
                        f"contradicts it with {conflict}: name the same parameters or none, "
                        "or another host"
                    )
                break
            if readonly:
                raise AccessDenied(
                    f"the read-only socket can only attach to connections jobd already "
                    f"serves, and '{target.key}' is not open: open it on the read-write "
                    "socket first"
                )
            refused = self._refusal(target)
            if refused is not None:
                raise refused
            if (
                confined
                and target.state_dir is not None
                and target.state_dir != self.resolve(target.key.split("?", 1)[0]).state_dir
            ):  # jobd would create, lock and clean up a directory this client chose
                raise AccessDenied(
                    f"'{target.key}' would use state directory '{target.state_dir}', which "
                    "your uid (neither jobd's own nor root) may not choose: name none, or "
                    "attach to a connection jobd's own user opened"
                )
            if self._stop.is_set():
                raise JobError("jobd is shutting down")
            if len(self._slots) >= MAX_DRIVER_CONNECTIONS:
                await self._evict(target.key)
                continue  # another hello may have opened this identity meanwhile
            slot = self._open(target)
            break
        if readonly:
            await slot.ready.wait()
            if slot.error is not None:
                raise slot.error
            if slot.closing.is_set():
                raise DaemonUnreachable(
                    f"the driver connection '{slot.target.key}' is closing: retry later"
                )
            return slot
        slot.clients += 1
        try:
            await slot.ready.wait()
        except BaseException:
            self.release(slot)
            raise
        if slot.error is not None:
            self.release(slot)
            raise slot.error
        return slot

    def _refusal(self, target: DriverTarget) -> AccessDenied | None:
        """Why jobd does not open ``target`` for anyone (None: it may)."""
        if (
            self._run_dir is not None
            and target.state_dir is not None
            and _overlaps(target.state_dir, self._run_dir)
        ):  # whatever allowed_uris says: the driver would clean up jobd's own files
            return AccessDenied(
                f"'{target.key}' would use '{target.state_dir}', which overlaps jobd's run "
                f"directory '{self._run_dir}': name another directory"
            )
        if not any(fnmatch.fnmatchcase(target.key, p) for p in self._allowed):
            return AccessDenied(
                f"jobd does not open '{target.key}': it is not in allowed_uris "
                f"({', '.join(self._allowed) or 'empty'})"
            )
        return None

    def _open(self, target: DriverTarget) -> _DriverSlot:
        slot = self._slots[target.key] = _DriverSlot(target, busy_at=anyio.current_time())
        self._tg.start_soon(self._hold, slot)
        return slot

    async def recover(self, stored: Sequence[StoredScope]) -> None:
        """Open every driver connection the store holds jobs or domains of, with the URI
        it was last opened with, and return once each has recovered its jobs (or failed:
        logged). A scope jobd may no longer open is logged and left as it is in the store
        (design/daemon.md "Recovery at start")."""
        opening = []
        for scope in stored:
            try:
                target = self.resolve(scope.uri)
            except JobError as exc:
                refused: JobError | None = exc
            else:
                refused = self._refusal(target)
                if refused is None and target.key != scope.scope:
                    refused = InvalidArgument(f"'{scope.uri}' now names '{target.key}'")
                if refused is None and len(self._slots) >= MAX_DRIVER_CONNECTIONS:
                    refused = JobError(
                        f"jobd serves at most {MAX_DRIVER_CONNECTIONS} driver connections"
                    )
            if refused is not None:
                _log.warning(
                    "stored driver connection not recovered: its jobs stay as they are in "
                    "the job store until jobd may open it",
                    uri=scope.scope,
                    jobs=scope.jobs,
                    reason=str(refused),
                )
                continue
            if target.key not in self._slots:
                opening.append(self._open(target))
        for slot in opening:
            await slot.ready.wait()
        if opening:
            _log.info(
                "stored driver connections recovered",
                uris=[s.target.key for s in opening if s.error is None],
                failed=[s.target.key for s in opening if s.error is not None],
            )

    def release(self, slot: _DriverSlot) -> None:
        slot.clients -= 1
        slot.busy_at = anyio.current_time()

    async def _evict(self, key: str) -> None:
        """Make room: close the driver connection idle the longest (no read-write client,
        no job; read-only clients attached to it are expelled), else refuse."""
        idle = [s for s in self._slots.values() if not s.clients and not s.has_jobs()]
        if not idle:
            raise JobError(
                f"jobd serves at most {MAX_DRIVER_CONNECTIONS} driver connections and all "
                f"have clients or jobs: '{key}' cannot be opened now, retry later"
            )
        victim = min(idle, key=lambda s: s.busy_at)
        _log.info("closing idle driver connection to make room", uri=victim.target.key)
        victim.closing.set()
        await victim.gone.wait()

    async def _hold(self, slot: _DriverSlot) -> None:
        key = slot.target.key
        try:
            async with connect_local(
                slot.target.uri,
                retention=self._retention,
                store=self._store,
                keep_jobs=self._keep_jobs,
                scope=key,
                host=self._host,
                policy=self._policy,
                **self._retained,
            ) as conn:
                slot.conn = conn
                conn.engine.uuid_owner = self.uuid_owner  # job UUIDs are unique daemon-wide
                conn.fleet = self.fleet
                dconn = conn.engine.dconn
                if self.fleet is not None and hasattr(dconn, "fleet_peers"):
                    dconn.fleet_peers = self.fleet.peers()  # cross-host migration
                slot.ready.set()
                _log.info("driver connection opened", uri=slot.target.uri)
                await self._until_idle(slot)
                _log.info("closing driver connection", uri=key)
        except Exception as exc:  # a driver failure must not take the daemon down
            leaf = leaf_error(exc)
            if isinstance(leaf, JobError):
                _log.warning("driver connection failed", uri=key, error=str(leaf))
                slot.error = leaf
            else:
                _log.exception("driver connection failed", uri=key)
                slot.error = DriverError(f"{type(leaf).__name__}: {leaf}")
        finally:
            slot.closing.set()
            for reader in list(slot.readers):
                reader.expel(
                    DaemonUnreachable(
                        f"jobd closed the driver connection '{key}' (no read-write client "
                        "and no job on it, or jobd stops): reconnect once a read-write "
                        "client opened it again"
                    )
                )
            slot.readers.clear()
            if self._slots.get(key) is slot:
                del self._slots[key]
            if slot.error is None and not slot.ready.is_set():
                slot.error = JobError("jobd is shutting down")
            slot.ready.set()
            slot.gone.set()

    async def _until_idle(self, slot: _DriverSlot) -> None:
        """Return when the daemon stops, or when the connection has had no client and
        no job for the idle timeout."""
        interval = min(max(self._idle_timeout / 4, 0.05), 1.0)
        while not slot.closing.is_set():
            with anyio.move_on_after(interval):
                await slot.closing.wait()
            now = anyio.current_time()
            if slot.clients or slot.has_jobs():
                slot.busy_at = now
            elif now - slot.busy_at >= self._idle_timeout:
                _log.info("driver connection idle", uri=slot.target.key, idle_s=self._idle_timeout)
                return

    def close(self) -> None:
        self._stop.set()
        for slot in list(self._slots.values()):
            slot.closing.set()
