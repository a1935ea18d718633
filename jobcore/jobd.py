"""jobd: the jobcore daemon (design/daemon.md).

    jobd --run-dir DIR [--config FILE] [--log-level LEVEL]

Serves the jobcore API over ``DIR/jobd.sock`` (read-write) and ``DIR/jobd-ro.sock``
(read-only). Driver connections are opened on demand by read-write clients, one per
driver identity (``sim:///NAME`` whatever the query; ``qemu:///session`` and its ``dir``):
every client naming ``sim:///default`` shares one simulated host, configured by the hello
that opened it. They outlive the clients that began jobs on them and are closed once they
have had no client and no job for ``driver_idle_timeout`` seconds.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import logging
import math
import os
import resource
import signal
import sys
import time
import tomllib
import urllib.parse
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import click
from anyio.abc import SocketListener, SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from attrs import Factory, define, field, frozen

from jobcore.driver import Driver
from jobcore.drivers import check_uri_params, load_driver
from jobcore.engine import DEFAULT_RETENTION
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    InvalidURI,
    JobError,
    StoreError,
    SubscriptionOverflow,
)
from jobcore.events import EndReason, EventKind, Subscription

# jobd serves every session from an in-process connection (its engine is jobd's)
from jobcore.local import LocalConnection as Connection
from jobcore.local import LocalDomain as Domain
from jobcore.local import LocalJob as Job
from jobcore.local import connect_local as connect
from jobcore.log import configure, get_logger, reopen_log_files
from jobcore.methods import Method, On, Result, uuid_prefix
from jobcore.paths import PathGuard, owner_guard
from jobcore.protocol import (
    HEADER,
    MAX_FRAME,
    PROTOCOL_VERSION,
    REQUEST_LIMITS,
    RO_SOCKET,
    RW_SOCKET,
    AccessDenied,
    ArgValue,
    BadRequest,
    Cancel,
    DaemonBusy,
    DaemonUnreachable,
    DomainRef,
    ErrorReply,
    EventPush,
    Message,
    ProtocolError,
    Reply,
    Request,
    ServerHello,
    SubscriptionEnd,
    Wire,
    decode_message,
    default_run_dir,
    encode_job_ref,
    encode_message,
    encode_server_hello,
    encode_value,
    error_reply,
    frame_length,
    peer_credentials,
)
from jobcore.rundir import ensure_private_dir, reserve_dir, unreserve_dir
from jobcore.spec import MAX_SECONDS
from jobcore.store import DEFAULT_MAX_RETAINED, DEFAULT_MAX_RETAINED_PER_DOMAIN, DEFAULT_STORE_URL
from jobcore.store_sqlite import open_database, parse_store_url
from jobcore.uri import parse_uri

#: jobd's exit status when another daemon holds the run directory.
EXIT_ALREADY_RUNNING = 9
#: jobd's exit status for a bad configuration (unreadable file, unknown key, bad value).
EXIT_CONFIG = 2

PID_FILE = "jobd.pid"
#: Clients per socket (read-write and read-only are counted separately).
MAX_CLIENTS = 256
#: Seconds a connection has to complete ``hello``.
HELLO_TIMEOUT = 10.0
#: Seconds a driver connection without clients and jobs stays open.
DRIVER_IDLE_TIMEOUT = 60.0
#: Driver URIs clients may open by default (fnmatch patterns on the driver identity).
DEFAULT_ALLOWED_URIS = ("sim:///*", "qemu:///session")
#: Seconds a refused client gets to read the reason before the daemon closes.
FAREWELL_LINGER = 2.0
MAX_DRIVER_CONNECTIONS = 32
#: Requests one client may have running at once; the daemon stops reading it beyond.
MAX_IN_FLIGHT = 256
MAX_SUBSCRIPTIONS = 64
#: Subscriptions of all clients together (``max_subscriptions``).
MAX_ALL_SUBSCRIPTIONS = 16384
MAX_EVENT_BUFFER = 4096
#: Events a subscription may lose since its buffer was last empty before jobd ends it.
SUBSCRIBER_LOST_LIMIT = 10_000
#: Job refs one LIST_JOBS_PAGE or FIND_JOBS reply holds at most.
MAX_LIST_PAGE = 1000
#: Job and domain handles a client session keeps (so its handles outlive retention).
HANDLE_CACHE = 4096
#: A client that does not take a frame within this many seconds is disconnected.
SEND_TIMEOUT = 30.0
#: Bytes of encoded replies and events one client may have waiting to be sent; beyond, the
#: daemon reads no new request from it and starts no request of its until they drain.
MAX_QUEUED_SEND = 8 << 20
#: Requests of methods whose reply may be big (``_BULKY``) one client may have computing
#: at a time (their replies are counted in MAX_QUEUED_SEND only once encoded).
MAX_BULKY = 2
#: Seconds a client has to complete a frame once its header arrived.
FRAME_TIMEOUT = 30.0
#: Bytes the frames being received from all clients may hold at once.
MAX_RECEIVE_BUFFER = 64 << 20
#: Frame bodies up to this size are read without a share of MAX_RECEIVE_BUFFER (at most
#: max_clients + max_ro_clients of them are partly read at a time).
SMALL_FRAME = 64 << 10
#: File descriptors jobd needs beside one per client (listeners, driver connections, QMP
#: sockets, log file, …): max_clients + max_ro_clients + this must fit RLIMIT_NOFILE.
FD_HEADROOM = 64
#: accept() that fails for want of file descriptors or memory is retried after this many
#: seconds, doubling up to ACCEPT_BACKOFF_MAX while it keeps failing.
ACCEPT_BACKOFF = 0.1
ACCEPT_BACKOFF_MAX = 1.0
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about the one connection being accepted (it is dropped, jobd goes on).
_ACCEPT_TRANSIENT = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM, errno.ETIMEDOUT}
)
#: Seconds the driver connections get to close at shutdown.
SHUTDOWN_GRACE = 10.0
#: A line a client can provoke at will (malformed frame, refused request) is logged once
#: per connection; repeats are counted and the count logged at most this often, and at
#: disconnect.
NOISE_INTERVAL = 60.0

# Read-only fairness (design/daemon.md, "Read-only and read-write fairness"): the read-only
# socket (mode 0666: any local user) has budgets of its own, so whatever its clients do,
# read-write clients keep theirs.
#: Read-only connections one uid may hold (``max_ro_clients_per_uid``).
MAX_RO_CLIENTS_PER_UID = 64
#: Seconds a read-only client without a request in flight or subscription stays connected
#: (``ro_idle_timeout``; 0: never).
RO_IDLE_TIMEOUT = 300.0
#: Subscriptions of all read-only clients together (``max_ro_subscriptions``), and of the
#: read-only clients of one uid (``max_ro_subscriptions_per_uid``).
MAX_RO_SUBSCRIPTIONS = 4096
MAX_RO_SUBSCRIPTIONS_PER_UID = 256
#: A read-only subscription's buffer holds at most this many events (``ro_max_event_buffer``).
RO_MAX_EVENT_BUFFER = 256
#: A read-only subscription that lost more events than this since its buffer was last
#: empty is ended (``ro_subscriber_lost_limit``; as subscriber_lost_limit, 0: never), so a
#: never-reading one stops costing each event a push soon.
RO_SUBSCRIBER_LOST_LIMIT = 1000
#: Bytes of encoded frames waiting to be sent to all clients of one socket together
#: (``max_queued_send``, ``max_ro_queued_send``): past it, the daemon reads no new request
#: from that socket's clients and starts none of theirs until they drain.
MAX_QUEUED_SEND_TOTAL = 256 << 20
MAX_RO_QUEUED_SEND_TOTAL = 64 << 20
#: Requests of _BULKY methods all read-only clients together may have computing at a time.
MAX_RO_BULKY = 16
#: The read-only socket's own receive budget (``max_ro_receive_buffer``).
MAX_RO_RECEIVE_BUFFER = 16 << 20
#: Bytes of received frames one client may hold at once (at least one frame).
MAX_CLIENT_RECEIVE = 2 * MAX_FRAME
#: A frame before hello may be at most this big (hello is tiny): a bigger one is refused
#: with an error frame and the connection is closed.
PRE_HELLO_FRAME = 64 << 10

_log = get_logger("jobd")


class DaemonAlreadyRunning(JobError):
    """Another jobd holds the run directory's lock."""


class ConfigError(JobError):
    """The configuration file is unreadable or has an unknown key or a bad value."""


@frozen
class DaemonConfig:
    run_dir: Path = field(factory=default_run_dir)
    #: uids allowed to talk to the daemon (checked with SO_PEERCRED)
    allowed_uids: frozenset[int] = field(factory=lambda: frozenset({os.getuid(), 0}))
    #: seconds ended jobs keep their info and stats unless their XML says otherwise
    retention: float = DEFAULT_RETENTION
    log_level: str = "info"
    #: clients on the read-write socket
    max_clients: int = MAX_CLIENTS
    #: clients on the read-only socket (counted apart: they cannot starve writers)
    max_ro_clients: int = MAX_CLIENTS
    #: fnmatch patterns of the driver identities a read-write client may open
    allowed_uris: tuple[str, ...] = DEFAULT_ALLOWED_URIS
    #: seconds a connection has to complete hello
    hello_timeout: float = HELLO_TIMEOUT
    #: seconds without a frame, request in flight or subscription before a client is
    #: disconnected; 0: never
    idle_timeout: float = 0.0
    #: seconds a driver connection with no client and no job (active or retained) stays
    driver_idle_timeout: float = DRIVER_IDLE_TIMEOUT
    #: a subscription that lost more events than this since its buffer was last empty is
    #: ended (SUB_END 'overflow' with the lost count); 0: never
    subscriber_lost_limit: int = SUBSCRIBER_LOST_LIMIT
    #: live subscriptions of all clients together (each client has at most 64)
    max_subscriptions: int = MAX_ALL_SUBSCRIPTIONS
    #: ended jobs kept at most per domain and in all, per driver connection (oldest go)
    max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN
    max_retained: int = DEFAULT_MAX_RETAINED
    #: log to this file (JSON lines, reopened after logrotate moves it) instead of stderr
    log_file: Path | None = None
    #: seconds a client has to complete a frame once its header arrived
    frame_timeout: float = FRAME_TIMEOUT
    #: bytes the partly received frames of all read-write clients may hold at once
    max_receive_buffer: int = MAX_RECEIVE_BUFFER
    #: the job store: 'memory:' or 'sqlite:///ABS/PATH' (interim default 'memory:' until
    #: recovery exists: design/store.md)
    store: str = DEFAULT_STORE_URL
    # ---- read-only fairness: the read-only socket's own budgets -------------------------
    #: read-only connections of one uid
    max_ro_clients_per_uid: int = MAX_RO_CLIENTS_PER_UID
    #: idle seconds before a read-only client is closed (as idle_timeout); 0: never
    ro_idle_timeout: float = RO_IDLE_TIMEOUT
    #: live subscriptions of all read-only clients together, and of one uid's
    max_ro_subscriptions: int = MAX_RO_SUBSCRIPTIONS
    max_ro_subscriptions_per_uid: int = MAX_RO_SUBSCRIPTIONS_PER_UID
    #: events one read-only subscription buffers at most (its maxlen is clamped to it)
    ro_max_event_buffer: int = RO_MAX_EVENT_BUFFER
    #: subscriber_lost_limit for read-only subscriptions
    ro_subscriber_lost_limit: int = RO_SUBSCRIBER_LOST_LIMIT
    #: bytes of replies and events waiting to be sent, all clients of a socket together
    max_queued_send: int = MAX_QUEUED_SEND_TOTAL
    max_ro_queued_send: int = MAX_RO_QUEUED_SEND_TOTAL
    #: bytes the partly received frames of all read-only clients may hold at once
    max_ro_receive_buffer: int = MAX_RO_RECEIVE_BUFFER


_CONFIG_KEYS = {
    "run_dir",
    "allowed_uids",
    "retention",
    "log_level",
    "max_clients",
    "max_ro_clients",
    "allowed_uris",
    "hello_timeout",
    "idle_timeout",
    "driver_idle_timeout",
    "subscriber_lost_limit",
    "max_subscriptions",
    "max_retained_per_domain",
    "max_retained",
    "log_file",
    "frame_timeout",
    "max_receive_buffer",
    "store",
    "max_ro_clients_per_uid",
    "ro_idle_timeout",
    "max_ro_subscriptions",
    "max_ro_subscriptions_per_uid",
    "ro_max_event_buffer",
    "ro_subscriber_lost_limit",
    "max_queued_send",
    "max_ro_queued_send",
    "max_ro_receive_buffer",
}
_LEVELS = {"debug", "info", "warning", "error"}


def load_config(path: Path | None, **overrides: Any) -> DaemonConfig:
    """The configuration from a TOML file (keys: ``_CONFIG_KEYS``), then ``overrides``
    that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config '{path}': {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in '{path}': {exc}") from None
        unknown = sorted(set(values) - _CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) in '{path}': {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = DaemonConfig()
        if "run_dir" in values:
            config = _evolve(config, run_dir=_abs_path(values, "run_dir"))
        if "allowed_uids" in values:
            uids = values["allowed_uids"]
            if not isinstance(uids, list | tuple | frozenset) or not all(
                isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids
            ):
                raise ConfigError("allowed_uids must be a list of uids")
            config = _evolve(config, allowed_uids=frozenset(uids))
        if "log_level" in values:
            level = _typed(values, "log_level", str).lower()
            if level not in _LEVELS:
                raise ConfigError(f"log_level must be one of {', '.join(sorted(_LEVELS))}")
            config = _evolve(config, log_level=level)
        if "allowed_uris" in values:
            patterns = values["allowed_uris"]
            if not isinstance(patterns, list | tuple) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigError("allowed_uris must be a list of URI patterns")
            config = _evolve(config, allowed_uris=tuple(patterns))
        if "log_file" in values:
            config = _evolve(config, log_file=_abs_path(values, "log_file"))
        if "store" in values:
            store = _typed(values, "store", str)
            try:
                parse_store_url(store)
            except InvalidArgument as exc:
                raise ConfigError(f"store: {exc}") from None
            config = _evolve(config, store=store)
        for key, minimum, maximum in _COUNTS:
            if key in values:
                n = _typed(values, key, int)
                if not minimum <= n <= maximum:
                    raise ConfigError(f"{key} must be between {minimum} and {maximum}, not {n}")
                config = _evolve(config, **{key: n})
        for key, low, high in _SECONDS:
            if key in values:
                config = _evolve(config, **{key: _seconds(values, key, low, high)})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return config


def _abs_path(values: dict[str, Any], key: str) -> Path:
    """``values[key]`` as an absolute path: a non-empty string without NUL that starts with
    ``/`` (a relative one would depend on the directory jobd happens to start in; the CLI
    resolves its own options against the cwd first: ``cli_path``)."""
    value = values[key]
    if not isinstance(value, str | Path):
        raise ConfigError(f"{key} must be a string (an absolute path)")
    text = str(value)
    if not text or "\0" in text:
        raise ConfigError(f"{key} must be a non-empty absolute path without NUL, not {text!r}")
    if not os.path.isabs(text):
        raise ConfigError(f"{key} must be an absolute path, not {text!r}")
    return Path(text)


def cli_path(value: str | Path | None, option: str) -> Path | None:
    """A path from a command-line option, resolved against the current directory (as a
    shell user means it); empty or NUL-containing: ConfigError."""
    if value is None:
        return None
    text = str(value)
    if not text or "\0" in text:
        raise ConfigError(f"{option} must be a non-empty path without NUL, not {text!r}")
    return Path(os.path.abspath(text))


#: config keys that are counts or sizes: (key, minimum, maximum)
_COUNTS = (
    ("max_clients", 1, 65536),
    ("max_ro_clients", 1, 65536),
    ("subscriber_lost_limit", 0, 1 << 40),  # 0: never end one
    ("max_subscriptions", 1, 1 << 20),
    ("max_retained_per_domain", 0, 1 << 40),
    ("max_retained", 0, 1 << 40),
    ("max_receive_buffer", MAX_FRAME, 1 << 40),  # at least one frame
    # read-only fairness: the read-only socket's own budgets
    ("max_ro_clients_per_uid", 1, 65536),
    ("max_ro_subscriptions", 1, 1 << 20),
    ("max_ro_subscriptions_per_uid", 1, 1 << 20),
    ("ro_max_event_buffer", 1, MAX_EVENT_BUFFER),
    ("ro_subscriber_lost_limit", 0, 1 << 40),
    ("max_queued_send", MAX_QUEUED_SEND, 1 << 40),
    ("max_ro_queued_send", MAX_QUEUED_SEND, 1 << 40),
    ("max_ro_receive_buffer", MAX_FRAME, 1 << 40),
)
#: config keys that are seconds: (key, minimum, maximum)
_SECONDS = (
    ("retention", 0.0, MAX_SECONDS),
    ("hello_timeout", 0.01, 86400.0),
    ("idle_timeout", 0.0, 86400.0),
    ("driver_idle_timeout", 0.0, MAX_SECONDS),
    ("frame_timeout", 0.01, 86400.0),
    ("ro_idle_timeout", 0.0, 86400.0),
)


def _seconds(values: dict[str, Any], key: str, minimum: float, maximum: float) -> float:
    """``values[key]`` as a finite number of seconds in minimum…maximum (NaN and the
    infinities compare false with everything, so they are refused by name)."""
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(f"{key} must be between {minimum:g} and {maximum:g} seconds, not {value}")
    return float(value)


def _typed(values: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = values[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{key} must be a {kind.__name__}")
    return value


def _evolve(config: DaemonConfig, **changes: Any) -> DaemonConfig:
    return attrs.evolve(config, **changes)


# ---- the run directory lock ---------------------------------------------------------


class RunDirLock:
    """An fcntl lock on ``DIR/jobd.pid`` holding the daemon's pid: two daemons never
    share a run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / PID_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DaemonAlreadyRunning(
                    f"another jobd (pid {holder}) is already serving '{self.path.parent}'"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing drops the lock
                self._fd = None


# ---- peers ------------------------------------------------------------------------------


def leaf_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _ClientGone(Exception):
    """Sending to a client failed or timed out: it is disconnected."""


class _FrameLate(Exception):
    """A client did not complete a frame in time: ``error`` says why it is expelled."""

    def __init__(self, error: JobError) -> None:
        super().__init__(str(error))
        self.error = error


@define(eq=False)
class _Noise:
    """Rate limit for the log lines one connection can provoke at will: the first of each
    kind is logged; later ones are counted, and the count is logged (``"KIND repeated"``,
    ``count=N``, the last one's fields) once NOISE_INTERVAL has passed since the last line
    of that kind, and at disconnect (``flush``)."""

    log: Any
    clock: Callable[[], float] = time.monotonic
    #: kind -> [level, repeats not yet logged, clock time of the last line, last fields]
    _kinds: dict[str, list[Any]] = field(factory=dict)

    def line(self, level: str, kind: str, **fields: Any) -> None:
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is None:
            self._kinds[kind] = [level, 0, now, fields]
            getattr(self.log, level)(kind, **fields)
            return
        entry[1] += 1
        entry[3] = fields
        if now - entry[2] >= NOISE_INTERVAL:
            self._summary(kind, entry, now)

    def flush(self) -> None:
        now = self.clock()
        for kind, entry in self._kinds.items():
            if entry[1]:
                self._summary(kind, entry, now)

    def _summary(self, kind: str, entry: list[Any], now: float) -> None:
        getattr(self.log, entry[0])(f"{kind} repeated", count=entry[1], last=entry[3])
        entry[1], entry[2] = 0, now


@define(eq=False)
class _ByteBudget:
    """Bytes held against a limit; waiters are woken whenever some are given back."""

    limit: int
    used: int = 0
    _changed: anyio.Event = field(factory=anyio.Event)

    async def reserve(self, n: int) -> None:
        """Take ``n`` bytes once they fit (at once when nothing is held, so that one
        frame bigger than the limit still goes through, alone)."""
        while self.used and self.used + n > self.limit:
            await self._changed.wait()
        self.used += n

    async def below_limit(self) -> None:
        while self.used >= self.limit:
            await self._changed.wait()

    def add(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = anyio.Event()


@define(eq=False)
class _Client:
    """One client socket's session state."""

    id: int
    stream: SocketStream
    readonly: bool
    tg: TaskGroup
    log: Any
    send_lock: anyio.Lock = field(factory=anyio.Lock)
    conn: Connection | None = None
    requests: dict[int, anyio.CancelScope] = field(factory=dict)
    subs: dict[int, Subscription] = field(factory=dict)
    jobs: OrderedDict[uuid.UUID, Job] = field(factory=OrderedDict)
    domains: OrderedDict[str, Domain] = field(factory=OrderedDict)
    #: the driver connection this session is attached to (after hello)
    slot: _DriverSlot | None = None
    #: a hello is being served (it may wait for a driver connection to open)
    in_hello: bool = False
    #: set once a hello succeeded
    hello_done: anyio.Event = field(factory=anyio.Event)
    #: when the daemon last read a frame from this client (or saw it busy)
    last_frame: float = field(factory=anyio.current_time)
    #: the read loop's scope; the watchdog cancels it to expel the client
    reading: anyio.CancelScope = field(factory=anyio.CancelScope)
    #: why the watchdog expels the client (sent to it once the read loop stopped)
    expelled: JobError | None = None
    #: confines the files this client's requests may make jobd touch (a peer whose uid
    #: is neither jobd's own nor root: jobcore.paths.owner_guard); None: unconfined
    guard: PathGuard | None = None

    def expel(self, error: JobError) -> None:
        self.expelled = error
        self.reading.cancel()

    noise: _Noise = field(default=Factory(lambda self: _Noise(self.log), takes_self=True))
    #: bytes of encoded frames waiting for (or in) ``stream.send``: MAX_QUEUED_SEND
    queued: _ByteBudget = field(factory=lambda: _ByteBudget(MAX_QUEUED_SEND))
    #: requests of _BULKY methods being served and not yet counted in ``queued``
    bulky: anyio.Semaphore = field(factory=lambda: anyio.Semaphore(MAX_BULKY))
    #: the peer's uid (None: unknown)
    uid: int | None = None
    #: the socket's budget of queued frames, shared by all its clients
    socket_queued: _ByteBudget = field(factory=lambda: _ByteBudget(MAX_QUEUED_SEND_TOTAL))
    #: bytes of received frames this client holds (MAX_CLIENT_RECEIVE)
    receiving: _ByteBudget = field(factory=lambda: _ByteBudget(MAX_CLIENT_RECEIVE))

    async def drained(self) -> None:
        """Return once this client's and its socket's queued frames are below limit."""
        while True:
            await self.queued.below_limit()
            await self.socket_queued.below_limit()
            if self.queued.used < self.queued.limit:
                return

    async def send(self, msg: Message) -> None:
        await self.send_frame(self.encode(msg))

    def encode(self, msg: Message) -> bytes:
        try:
            return encode_message(msg)
        except ProtocolError as exc:  # a reply over the frame limit
            if not isinstance(msg, Reply):
                raise
            return encode_message(error_reply(msg.id, exc))
        except (OverflowError, TypeError, ValueError) as exc:  # a value msgpack cannot encode
            if not isinstance(msg, Reply):
                raise
            self.log.error("reply not encodable", id=msg.id, error=str(exc))
            return encode_message(
                error_reply(msg.id, JobError(f"internal error: the reply cannot be encoded: {exc}"))
            )

    async def send_frame(self, frame: bytes) -> None:
        """Send one encoded frame, counted in ``queued`` (and the socket's budget) until
        the client took it."""
        self.queued.add(len(frame))
        self.socket_queued.add(len(frame))
        try:
            async with self.send_lock:
                with anyio.fail_after(SEND_TIMEOUT):
                    await self.stream.send(frame)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.log.info("client dropped", reason=type(exc).__name__)
            self.tg.cancel_scope.cancel()
            raise _ClientGone from None
        finally:
            self.queued.release(len(frame))
            self.socket_queued.release(len(frame))

    def remember(self, job: Job) -> Job:
        self.jobs[job.uuid] = job
        self.jobs.move_to_end(job.uuid)
        if len(self.jobs) > HANDLE_CACHE:
            self.jobs.popitem(last=False)
        return job


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


@define(eq=False)
class _DriverSlot:
    target: DriverTarget
    ready: anyio.Event = field(factory=anyio.Event)
    #: set to close the connection (idle, or the daemon stops)
    closing: anyio.Event = field(factory=anyio.Event)
    #: set once the connection is closed and the slot is free
    gone: anyio.Event = field(factory=anyio.Event)
    conn: Connection | None = None
    error: JobError | None = None
    #: read-write client sessions attached (hello done, not yet disconnected)
    clients: int = 0
    #: read-only sessions attached: they neither keep the connection open nor stop its
    #: eviction; they are expelled when it closes
    readers: set[_Client] = field(factory=set)
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
        **retained: int,
    ) -> None:
        self._tg = tg
        self._retention = retention
        self._allowed = allowed
        self._run_dir = None if run_dir is None else run_dir.resolve()
        self._idle_timeout = idle_timeout
        self._retained = retained  # max_retained_per_domain, max_retained
        self._store = store  # the job store URL every driver connection uses
        self._slots: dict[str, _DriverSlot] = {}
        self._drivers: dict[str, Driver] = {}
        self._stop = anyio.Event()

    def resolve(self, uri_text: str) -> DriverTarget:
        uri = parse_uri(uri_text)
        driver = self._drivers.get(uri.driver)
        if driver is None and uri.transport is None:
            driver = self._drivers[uri.driver] = load_driver(uri)
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
            if (
                self._run_dir is not None
                and target.state_dir is not None
                and _overlaps(target.state_dir, self._run_dir)
            ):  # whatever allowed_uris says: the driver would clean up jobd's own files
                raise AccessDenied(
                    f"'{target.key}' would use '{target.state_dir}', which overlaps jobd's run "
                    f"directory '{self._run_dir}': name another directory"
                )
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
            if not any(fnmatch.fnmatchcase(target.key, p) for p in self._allowed):
                raise AccessDenied(
                    f"jobd does not open '{target.key}': it is not in allowed_uris "
                    f"({', '.join(self._allowed) or 'empty'})"
                )
            if self._stop.is_set():
                raise JobError("jobd is shutting down")
            if len(self._slots) >= MAX_DRIVER_CONNECTIONS:
                await self._evict(target.key)
                continue  # another hello may have opened this identity meanwhile
            slot = self._slots[target.key] = _DriverSlot(target, busy_at=anyio.current_time())
            self._tg.start_soon(self._hold, slot)
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
            async with connect(
                slot.target.uri, retention=self._retention, store=self._store, **self._retained
            ) as conn:
                slot.conn = conn
                conn.engine.uuid_owner = self.uuid_owner  # job UUIDs are unique daemon-wide
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


# ---- the daemon -------------------------------------------------------------------------

Handler = Callable[["Daemon", _Client, tuple[Any, ...]], Awaitable[Wire]]
_HANDLERS: dict[Method, Handler] = {}


def _handles(method: Method) -> Callable[[Handler], Handler]:
    """Serve ``method`` with the decorated function instead of the handler its entry in
    jobcore.methods implies (see the request handlers at the end)."""

    def register(fn: Handler) -> Handler:
        _HANDLERS[method] = fn
        return fn

    return register


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._client_ids = 0
        #: connected clients per socket (readonly flag)
        self._clients = {False: 0, True: 0}
        #: live subscriptions per socket (``max_subscriptions``, ``max_ro_subscriptions``)
        self._subscriptions = {False: 0, True: 0}
        #: read-only connections and subscriptions per uid
        self._ro_clients_of: Counter[int | None] = Counter()
        self._ro_subscriptions_of: Counter[int | None] = Counter()
        self.drivers: DriverConnections | None = None
        self._serving: anyio.CancelScope | None = None
        #: bytes of the frames being received, per socket (max_receive_buffer,
        #: max_ro_receive_buffer)
        self._receiving = {
            False: _ByteBudget(config.max_receive_buffer),
            True: _ByteBudget(config.max_ro_receive_buffer),
        }
        #: bytes of frames waiting to be sent, per socket (max_queued_send, max_ro_queued_send)
        self._queued = {
            False: _ByteBudget(config.max_queued_send),
            True: _ByteBudget(config.max_ro_queued_send),
        }
        #: bulky requests computing for all read-only clients together
        self._ro_bulky = anyio.Semaphore(MAX_RO_BULKY)
        self._accept_noise = _Noise(_log)

    @property
    def rw_path(self) -> Path:
        return self.config.run_dir / RW_SOCKET

    @property
    def ro_path(self) -> Path:
        return self.config.run_dir / RO_SOCKET

    def stop(self) -> None:
        """Stop accepting and close every client; driver connections then close."""
        if self._serving is not None:
            self._serving.cancel()

    async def run(
        self,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
        handle_signals: bool = True,
    ) -> None:
        cfg = self.config
        ensure_private_dir(cfg.run_dir, what="jobd run directory")
        lock = RunDirLock(cfg.run_dir)
        lock.acquire()
        store_db = None
        reserve_dir(cfg.run_dir)  # no job may name its files (an NBD socket) among jobd's
        try:
            store_url = parse_store_url(cfg.store)
            if store_url.path is not None:  # a bad store stops jobd here, before serving
                store_db = await anyio.to_thread.run_sync(
                    open_database, store_url.path, store_url.synchronous
                )
            async with anyio.create_task_group() as drivers_tg:
                self.drivers = DriverConnections(
                    drivers_tg,
                    cfg.retention,
                    allowed=cfg.allowed_uris,
                    run_dir=cfg.run_dir,
                    idle_timeout=cfg.driver_idle_timeout,
                    max_retained_per_domain=cfg.max_retained_per_domain,
                    max_retained=cfg.max_retained,
                    store=cfg.store,
                )
                try:
                    self._serving = anyio.CancelScope()
                    with self._serving:
                        await self._serve(task_status, handle_signals)
                finally:
                    self.drivers.close()
                    drivers_tg.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
        finally:
            if store_db is not None:
                store_db.release()
            for path in (self.rw_path, self.ro_path):
                path.unlink(missing_ok=True)
            unreserve_dir(cfg.run_dir)
            lock.release()
            _log.info("jobd stopped")

    async def _serve(self, task_status: anyio.abc.TaskStatus[None], handle_signals: bool) -> None:
        others = self.config.allowed_uids - {os.getuid(), 0}
        rw_mode = 0o666 if others else 0o600  # SO_PEERCRED decides; the mode is a fence
        rw = await anyio.create_unix_listener(self.rw_path, mode=rw_mode)
        ro = await anyio.create_unix_listener(self.ro_path, mode=0o666)
        async with rw, ro, anyio.create_task_group() as tg:
            if handle_signals:
                tg.start_soon(self._signals, tg.cancel_scope)
            tg.start_soon(self._accept_loop, rw, False, tg)
            tg.start_soon(self._accept_loop, ro, True, tg)
            _log.info(
                "jobd ready",
                pid=os.getpid(),
                rw_socket=str(self.rw_path),
                ro_socket=str(self.ro_path),
                allowed_uids=sorted(self.config.allowed_uids),
                protocol=PROTOCOL_VERSION,
            )
            task_status.started()

    async def _accept_loop(self, listener: SocketListener, readonly: bool, tg: TaskGroup) -> None:
        """Accept clients until cancelled. Running out of file descriptors (or kernel
        memory) is not fatal: it is logged (rate-limited), accept() is retried after a
        back-off, and the connections wait in the listen backlog meanwhile."""
        name = RO_SOCKET if readonly else RW_SOCKET
        backoff = ACCEPT_BACKOFF
        while True:
            try:
                stream = await listener.accept()
            except (anyio.BrokenResourceError, OSError) as exc:
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                code = getattr(cause, "errno", None)
                if code in _ACCEPT_TRANSIENT:
                    continue
                if code not in _ACCEPT_EXHAUSTED:
                    raise
                self._accept_noise.line(
                    "error",
                    "cannot accept connections",
                    socket=name,
                    error=os.strerror(code),
                    retry_s=backoff,
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            if backoff > ACCEPT_BACKOFF:
                _log.info("accepting connections again", socket=name)
                backoff = ACCEPT_BACKOFF
            tg.start_soon(partial(self._client, stream, readonly=readonly))

    async def _signals(self, scope: anyio.CancelScope) -> None:
        """SIGTERM and SIGINT stop jobd; SIGHUP reopens the log file if it was moved
        (logrotate's postrotate) and jobd goes on serving."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reopen_log_files()
                    _log.info("SIGHUP: log file reopened if it was moved; still serving")
                    continue
                _log.info("shutting down", signal=signal.Signals(signum).name)
                scope.cancel()
                return

    # ---- one client -------------------------------------------------------------------

    async def _client(self, stream: SocketStream, *, readonly: bool) -> None:
        """Serve one client; nothing it does (or fails to do) escapes this function."""
        self._client_ids += 1
        cid = self._client_ids
        try:
            peer = peer_credentials(stream)
        except OSError:
            peer = None
        allowed = peer is not None and peer.uid in self.config.allowed_uids
        log = _log.bind(
            client=cid,
            socket="ro" if readonly else "rw",
            peer_pid=None if peer is None else peer.pid,
            peer_uid=None if peer is None else peer.uid,
        )
        log.info("client connected", peer_gid=None if peer is None else peer.gid, allowed=allowed)
        # only admitted sessions count: refused peers (lingering to read why) do not
        cfg = self.config
        uid = None if peer is None else peer.uid
        limit = cfg.max_ro_clients if readonly else cfg.max_clients
        admitted = allowed and self._clients[readonly] < limit
        busy = (
            f"jobd is busy: {limit} clients are connected to "
            f"{RO_SOCKET if readonly else RW_SOCKET}; retry later"
        )
        if admitted and readonly and self._ro_clients_of[uid] >= cfg.max_ro_clients_per_uid:
            admitted = False
            busy = (
                f"jobd is busy: uid {uid} has {cfg.max_ro_clients_per_uid} connections to "
                f"{RO_SOCKET} (max_ro_clients_per_uid): close some, or retry later"
            )
        if admitted:
            self._clients[readonly] += 1
            if readonly:
                self._ro_clients_of[uid] += 1
        client: _Client | None = None
        try:
            async with stream, anyio.create_task_group() as tg:
                client = _Client(
                    cid,
                    stream,
                    readonly,
                    tg,
                    log,
                    uid=uid,
                    socket_queued=self._queued[readonly],
                )
                if peer is not None and peer.uid not in (os.getuid(), 0):
                    client.guard = owner_guard(peer.uid)
                try:
                    if not allowed:
                        await self._farewell(
                            client, AccessDenied("access denied: your uid is not allowed by jobd")
                        )
                    elif not admitted:
                        log.warning("too many clients", limit=limit)
                        await self._farewell(client, DaemonBusy(busy))
                    else:
                        tg.start_soon(self._watchdog, client)
                        with client.reading:
                            await self._read_loop(client)
                        if client.expelled is not None:
                            self._unadmit(readonly, uid)  # lingering does not hold a place
                            admitted = False
                            self._detach(client)
                            await self._farewell(client, client.expelled)
                except _ClientGone:
                    pass
                tg.cancel_scope.cancel()
        except Exception:
            log.exception("client session failed")
        finally:
            if admitted:
                self._unadmit(readonly, uid)
            if client is not None:
                self._detach(client)
                client.noise.flush()
            log.info("client disconnected")

    def _unadmit(self, readonly: bool, uid: int | None) -> None:
        self._clients[readonly] -= 1
        if readonly:
            self._ro_clients_of[uid] -= 1
            if not self._ro_clients_of[uid]:
                del self._ro_clients_of[uid]

    def _detach(self, client: _Client) -> None:
        """Let go of the client's driver connection (counted for read-write clients)."""
        slot, client.slot = client.slot, None
        if slot is None:
            return
        if client.readonly:
            slot.readers.discard(client)
        elif self.drivers is not None:
            self.drivers.release(slot)

    async def _farewell(self, client: _Client, error: JobError) -> None:
        """Refuse a client so that it reads why: send the error frame (id 0), shut our
        side, then read and discard until the client closes (at most FAREWELL_LINGER s).
        Closing at once while its hello is unread would make its write fail and it would
        report a lost connection instead of the reason."""
        await client.send(error_reply(0, error))
        with anyio.move_on_after(FAREWELL_LINGER):
            try:
                await client.stream.send_eof()
                while True:
                    await client.stream.receive(65536)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                pass

    async def _watchdog(self, client: _Client) -> None:
        """Close a connection that has not completed hello within ``hello_timeout``, and
        (when ``idle_timeout`` is set) one idle that long: no frame read, no request in
        flight, no subscription."""
        cfg = self.config
        with anyio.move_on_after(cfg.hello_timeout):
            await client.hello_done.wait()
        while not client.hello_done.is_set():
            if not client.in_hello:
                client.log.info("no hello in time", timeout=cfg.hello_timeout)
                client.expel(
                    ProtocolError(
                        f"no successful hello within {cfg.hello_timeout:g} s: jobd closed "
                        "the connection"
                    )
                )
                return
            await anyio.sleep(0.1)  # a hello is opening its driver connection
        timeout, key = cfg.idle_timeout, "idle_timeout"
        if client.readonly and cfg.ro_idle_timeout > 0 and not 0 < timeout <= cfg.ro_idle_timeout:
            timeout, key = cfg.ro_idle_timeout, "ro_idle_timeout"
        if timeout <= 0:
            return
        while True:
            now = anyio.current_time()
            if client.requests or client.subs:
                client.last_frame = now  # busy counts as activity
            idle_until = client.last_frame + timeout
            if now < idle_until:
                await anyio.sleep(max(idle_until - now, 0.05))
                continue
            client.log.info("idle client closed", timeout=timeout)
            client.expel(
                DaemonUnreachable(
                    f"jobd closed the connection after {timeout:g} s without a "
                    f"request or subscription ({key})"
                )
            )
            return

    async def _read_loop(self, client: _Client) -> None:
        receive = BufferedByteReceiveStream(client.stream)
        slots = anyio.Semaphore(MAX_IN_FLIGHT)
        try:
            while True:
                # replies first: the client (and, once it said hello, its socket) must drain
                if client.conn is None:
                    await client.queued.below_limit()
                else:
                    await client.drained()
                header = await receive.receive_exactly(HEADER.size)
                try:
                    length = frame_length(header)
                    if length > PRE_HELLO_FRAME and client.conn is None and not client.in_hello:
                        raise ProtocolError(
                            f"a frame of {length} bytes before hello: jobd takes at most "
                            f"{PRE_HELLO_FRAME} bytes until a hello succeeded; it closed the "
                            "connection"
                        )
                except ProtocolError as exc:  # framing is lost: answer and hang up
                    client.log.warning("oversized frame", error=str(exc))
                    await client.send(error_reply(0, exc))
                    return
                try:
                    msg, share = await self._receive_body(client, receive, length)
                except _FrameLate as late:
                    client.log.info("frame not completed in time", error=str(late.error))
                    client.expelled = late.error
                    return
                client.last_frame = anyio.current_time()
                held = share
                try:
                    if msg is not None and await self._accept(client, msg, slots, share):
                        held = 0  # the request's task gives it back
                finally:
                    msg = None  # not held while the next frame is awaited
                    if held:
                        self._release_received(client, held)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            ConnectionError,
        ):
            pass
        finally:
            for sub in list(client.subs.values()):
                sub.close()
            client.subs.clear()

    async def _receive_body(
        self, client: _Client, receive: BufferedByteReceiveStream, length: int
    ) -> tuple[Message | None, int]:
        """A frame's body, decoded (None if it was malformed: the client was answered),
        read within ``frame_timeout`` in chunks as the bytes arrive, and the share of
        ``max_receive_buffer`` it holds: bodies over SMALL_FRAME first take ``length``
        bytes of it, waiting (within the same deadline) while the frames of others hold
        it; the caller gives the share back once the request is served."""
        cfg = self.config
        share = length if length > SMALL_FRAME else 0
        reserved = False
        kept = False
        budget = self._receiving[client.readonly]
        try:
            with anyio.fail_after(cfg.frame_timeout):
                if share:
                    await client.receiving.reserve(share)  # its own share first
                    try:
                        await budget.reserve(share)
                    except BaseException:
                        client.receiving.release(share)
                        raise
                    reserved = True
                chunks: list[bytes] = []
                remaining = length
                while remaining:
                    chunk = await receive.receive(min(remaining, 65536))
                    chunks.append(chunk)
                    remaining -= len(chunk)
            body = b"".join(chunks)
            del chunks
            try:
                msg = decode_message(body, REQUEST_LIMITS)
            except BadRequest as exc:
                client.noise.line("warning", "malformed frame", error=str(exc))
                await client.send(error_reply(exc.request_id, exc))
                return None, 0
            kept = True
            return msg, share
        except TimeoutError:
            if share and not reserved:
                key = "max_ro_receive_buffer" if client.readonly else "max_receive_buffer"
                raise _FrameLate(
                    DaemonBusy(
                        f"jobd's receive buffers ({key}, {budget.limit} "
                        f"bytes) stayed full for {cfg.frame_timeout:g} s: a frame of {length} "
                        "bytes could not be read; jobd closed the connection, retry later"
                    )
                ) from None
            raise _FrameLate(
                ProtocolError(
                    f"a frame of {length} bytes was not completed within "
                    f"{cfg.frame_timeout:g} s (frame_timeout): jobd closed the connection"
                )
            ) from None
        finally:
            if reserved and not kept:
                self._release_received(client, share)

    def _release_received(self, client: _Client, share: int) -> None:
        client.receiving.release(share)
        self._receiving[client.readonly].release(share)

    async def _accept(
        self, client: _Client, msg: Message, slots: anyio.Semaphore, share: int = 0
    ) -> bool:
        """Serve or start serving one message; True if a request task took over ``share``
        (bytes of max_receive_buffer it gives back when done)."""
        if isinstance(msg, Cancel):
            scope = client.requests.get(msg.id)
            if scope is not None:
                scope.cancel()
            return False
        if not isinstance(msg, Request):
            await client.send(
                error_reply(
                    msg.id if isinstance(msg, Reply | ErrorReply) else 0,
                    BadRequest("clients send requests only"),
                )
            )
            return False
        try:
            if msg.method is Method.HELLO:
                await client.send(Reply(msg.id, await self._hello(client, msg.args)))
                return False
            if client.conn is None:
                raise BadRequest("the first request must be 'hello'", msg.id)
            if client.readonly and msg.method.value.writes:
                raise AccessDenied(f"operation forbidden: read-only access prevents '{msg.method}'")
            if msg.method is Method.SUBSCRIBE:
                self._subscribe(client, msg.id, msg.args)
                await client.send(Reply(msg.id, None))
                return False
            if msg.method is Method.UNSUBSCRIBE:
                sub = client.subs.pop(_arg_int(msg.args[0]), None)
                if sub is not None:
                    sub.close()
                await client.send(Reply(msg.id, None))
                return False
        except JobError as exc:
            client.noise.line(
                "info",
                "request refused",
                method=str(msg.method),
                error=f"{type(exc).__name__}: {exc}",
            )
            await client.send(error_reply(msg.id, exc))
            return False
        if msg.id in client.requests:  # its CANCEL could not tell the two apart
            client.noise.line("info", "request refused", method=str(msg.method), error="id reused")
            await client.send(
                error_reply(
                    msg.id,
                    BadRequest(
                        f"request id {msg.id} is already in flight on this connection: give "
                        "each request an id of its own",
                        msg.id,
                    ),
                )
            )
            return False
        await slots.acquire()
        client.requests[msg.id] = scope = anyio.CancelScope()  # a CANCEL finds it at once
        client.tg.start_soon(self._run_request, client, msg, scope, slots, share)
        return True

    async def _hello(self, client: _Client, args: tuple[ArgValue, ...]) -> Wire:
        version, uri = args
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version!r} is not supported (jobd speaks {PROTOCOL_VERSION})"
            )
        if client.conn is not None:
            raise BadRequest("'hello' was already sent")
        assert self.drivers is not None and isinstance(uri, str)
        client.in_hello = True
        try:
            slot = await self.drivers.attach(
                uri, readonly=client.readonly, confined=client.guard is not None
            )
        finally:
            client.in_hello = False
        client.slot, client.conn = slot, slot.conn
        if client.readonly:
            slot.readers.add(client)  # expelled if the connection closes
        client.hello_done.set()
        client.log.info("hello", uri=slot.target.uri)
        return encode_server_hello(ServerHello(PROTOCOL_VERSION, client.readonly, slot.target.uri))

    def _subscribe(self, client: _Client, sub_id: int, args: tuple[ArgValue, ...]) -> None:
        domain, job, types, kinds, maxlen = args
        assert client.conn is not None
        if len(client.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidArgument(f"at most {MAX_SUBSCRIPTIONS} subscriptions per client")
        if sub_id in client.subs:
            raise InvalidArgument(f"subscription {sub_id} exists")
        cfg, readonly = self.config, client.readonly
        cap, key = (
            (cfg.max_ro_subscriptions, "max_ro_subscriptions")
            if readonly
            else (cfg.max_subscriptions, "max_subscriptions")
        )
        if self._subscriptions[readonly] >= cap:
            where = "read-only clients" if readonly else "read-write clients"
            raise InvalidArgument(
                f"jobd serves its maximum of {cap} subscriptions (all {where} together, "
                f"{key} in its config): close subscriptions you no longer need, "
                f"retry later, or raise {key}"
            )
        per_uid = cfg.max_ro_subscriptions_per_uid
        if readonly and self._ro_subscriptions_of[client.uid] >= per_uid:
            raise InvalidArgument(
                f"uid {client.uid} has its maximum of {per_uid} subscriptions on {RO_SOCKET} "
                "(max_ro_subscriptions_per_uid in jobd's config): close subscriptions you no "
                "longer need, or retry later"
            )
        try:
            kind_set = [EventKind(str(k)) for k in kinds] if isinstance(kinds, tuple) else None
        except ValueError:
            raise InvalidArgument(f"unknown event kind in {kinds!r}") from None
        buffer = min(
            max(1, _arg_int(maxlen)), cfg.ro_max_event_buffer if readonly else MAX_EVENT_BUFFER
        )
        sub = client.conn.subscribe(
            domain=domain if isinstance(domain, str) else None,
            job=job if isinstance(job, uuid.UUID) else None,
            types=types if isinstance(types, tuple) else None,
            kinds=kind_set,
            maxlen=buffer,
        )
        sub.lost_limit = (
            cfg.ro_subscriber_lost_limit if readonly else cfg.subscriber_lost_limit
        ) or None
        self._subscriptions[readonly] += 1
        if readonly:
            self._ro_subscriptions_of[client.uid] += 1
        sub.on_end = partial(self._subscription_ended, readonly, client.uid)
        client.subs[sub_id] = sub
        client.tg.start_soon(self._forward, client, sub_id, sub)

    def _subscription_ended(self, readonly: bool, uid: int | None, sub: Subscription) -> None:
        self._subscriptions[readonly] -= 1
        if readonly:
            self._ro_subscriptions_of[uid] -= 1
            if not self._ro_subscriptions_of[uid]:
                del self._ro_subscriptions_of[uid]

    async def _forward(self, client: _Client, sub_id: int, sub: Subscription) -> None:
        """Push a subscription's events; a slow client fills its bounded buffer and loses
        events as jobcore.events documents, the engine never waits for it. One that stays
        behind past ``subscriber_lost_limit`` gets SUB_END 'overflow' with the count."""
        try:
            try:
                async for ev in sub:
                    await client.send(EventPush(sub_id, ev))
            except SubscriptionOverflow as exc:
                client.subs.pop(sub_id, None)
                client.log.warning("subscriber fell behind: subscription ended", lost=exc.lost)
                await client.send(SubscriptionEnd(sub_id, exc.lost, EndReason.OVERFLOW))
                return
            if client.subs.pop(sub_id, None) is not None:  # ended by the daemon side
                await client.send(SubscriptionEnd(sub_id))
        except _ClientGone:
            pass
        finally:
            sub.close()

    async def _run_request(
        self,
        client: _Client,
        req: Request,
        scope: anyio.CancelScope,
        slots: anyio.Semaphore,
        share: int,
    ) -> None:
        """Serve one request: ``share`` is the bytes of max_receive_buffer its frame holds
        (given back once the handler is done with its arguments)."""
        rid, method = req.id, req.method
        reply: Message | None = None
        bulky = False  # holding client.bulky: few big results at a time, each counted once
        ro_bulky = False  # and (read-only) the socket's
        try:
            with scope:
                if method in _BULKY:
                    await client.bulky.acquire()
                    bulky = True
                    if client.readonly:
                        await self._ro_bulky.acquire()
                        ro_bulky = True
                await anyio.lowlevel.checkpoint()  # a CANCEL that came first stops it here
                # a client (or socket) that does not take its replies gets no more computed
                await client.drained()
                try:
                    reply = Reply(rid, await _HANDLERS[method](self, client, req.args))
                except (JobError, TimeoutError) as exc:
                    reply = error_reply(rid, exc)
                except Exception as exc:
                    client.log.exception("request failed", method=str(method))
                    reply = error_reply(
                        rid, JobError(f"internal error in jobd: {type(exc).__name__}: {exc}")
                    )
            del req  # its arguments (an XML document, say) are not needed any more
            if share:
                self._release_received(client, share)
                share = 0
            if reply is not None:
                frame = client.encode(reply)
                reply = None  # the frame alone is held (and counted) while it waits
                if bulky:  # the next one starts once this frame is counted in queued
                    client.bulky.release()  # (send_frame counts it before it yields)
                    bulky = False
                    if ro_bulky:
                        self._ro_bulky.release()
                        ro_bulky = False
                await client.send_frame(frame)
        except _ClientGone:
            pass
        finally:
            if bulky:
                client.bulky.release()
            if ro_bulky:
                self._ro_bulky.release()
            if share:
                self._release_received(client, share)
            client.requests.pop(rid, None)
            slots.release()


def _arg_int(value: ArgValue) -> int:
    assert isinstance(value, int)
    return value


# ---- request handlers (validated arguments: see jobcore.methods) ------------------------
#
# Every call of jobcore.methods is served by ``getattr(handle, call.attr)(*args)`` on the
# session's in-process handle (its connection, a domain by name, a job by UUID), its result
# encoded by the table's result type. ``@_handles`` overrides that for the calls that need
# more of jobd (path guards, handle caches, paging within a frame); hello, subscribe and
# unsubscribe are served by the read loop itself (Daemon._accept).


def _conn(client: _Client) -> Connection:
    assert client.conn is not None
    return client.conn


async def _domain(client: _Client, name: str) -> Domain:
    dom = client.domains.get(name)
    if dom is None:
        dom = await _conn(client).lookup_domain(name)
        dom.path_guard = client.guard  # every job this client begins on it is checked
        client.domains[name] = dom
        if len(client.domains) > HANDLE_CACHE:
            client.domains.popitem(last=False)
    return dom


async def _job(client: _Client, job_id: uuid.UUID) -> Job:
    job = client.jobs.get(job_id)
    return job if job is not None else client.remember(await _conn(client).lookup_job(job_id))


def _ref(client: _Client, job: Job) -> Wire:
    client.remember(job)
    return encode_job_ref(job.uuid, job.type, job.domain, job.state)


def _dom_ref(dom: Domain) -> Wire:
    return encode_value(DomainRef(dom.name, dom.uuid))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _encoder(result: Result) -> Callable[[_Client, Any], Wire]:
    """How a handler's result of this type goes on the wire."""
    if result is Result.DOMAIN_REF:
        return lambda c, dom: _dom_ref(dom)
    if result is Result.DOMAIN_REFS:
        return lambda c, doms: [_dom_ref(x) for x in doms]
    if result is Result.JOB_REF:
        return _ref
    if result is Result.JOB_REFS:
        return lambda c, jobs: [_ref(c, j) for j in jobs]
    if result in (Result.JOB_INFO, Result.DOMAIN_INFO):
        return lambda c, value: encode_value(value)
    return lambda c, value: value  # already plain: nil, ints, text, typed params


def _table_handler(method: Method) -> Handler:
    """The handler the method table implies: the handle's method, its result encoded."""
    call = method.value
    assert call.attr is not None, f"'{method}' has no method to call"
    attr, encode = call.attr, _encoder(call.result)
    if call.on is On.CONNECTION:

        async def on_connection(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
            return encode(c, await getattr(_conn(c), attr)(*a))

        return on_connection
    if call.on is On.DOMAIN:

        async def on_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
            return encode(c, await getattr(await _domain(c, a[0]), attr)(*a[1:]))

        return on_domain

    async def on_job(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
        job = await _job(c, a[0])
        result = await getattr(job, attr)(*a[1:])
        if call.writes:  # a verb; info lines: begin and end only
            c.log.debug("job verb", job=str(job.uuid), verb=attr)
        return encode(c, result)

    return on_job


@_handles(Method.CREATE_DOMAIN)
async def _h_create_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _dom_ref(await _conn(c).create_domain(_text(a[0]), path_guard=c.guard))


@_handles(Method.JOB_LOOKUP_BY_UUID)
async def _h_job_lookup(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _conn(c).job_lookup_by_uuid(await _domain(c, a[0]), a[1]))


@_handles(Method.DOMAIN_DESTROY)
async def _h_domain_destroy(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    await (await _domain(c, a[0])).destroy()
    c.domains.pop(a[0], None)
    return None


@_handles(Method.JOB_BEGIN)
async def _h_job_begin(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    job = await (await _domain(c, a[0])).job_begin(a[1], a[2])
    # the engine logs the job's one "job began" info line; this adds who began it
    c.log.debug("job begun", job=str(job.uuid), type=str(job.type), domain=job.domain)
    return _ref(c, job)


def _ref_size(domain: str) -> int:
    """An upper bound of one job ref's wire size (the UUID, type, state and the domain's
    name): replies of refs stay within half a frame by it."""
    return 64 + len(domain.encode())


def _page_size(domain: str, limit: int) -> int:
    """Refs of one domain's jobs one page holds: ``limit`` within 1 and MAX_LIST_PAGE,
    and fewer if the domain's name is so long that they would not fit half a frame."""
    return max(1, min(limit, MAX_LIST_PAGE, MAX_FRAME // 2 // _ref_size(domain)))


@_handles(Method.LIST_JOBS)
async def _h_list_jobs(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    jobs = await dom.list_jobs()
    if len(jobs) * _ref_size(dom.name) > MAX_FRAME // 2:
        raise JobError(
            f"domain '{dom.name}' has {len(jobs)} jobs, more than one reply holds: list them "
            f"page by page with '{Method.LIST_JOBS_PAGE}' (as jobcore's client does)"
        )
    return [_ref(c, j) for j in jobs]


@_handles(Method.LIST_JOBS_PAGE)
async def _h_list_jobs_page(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _domain(c, a[0])
    conn = _conn(c)
    recs, cursor = conn.engine.domain_jobs_page(dom.name, a[1], _page_size(dom.name, a[2]))
    return [[_ref(c, Job(conn, r)) for r in recs], cursor]


@_handles(Method.FIND_JOBS)
async def _h_find_jobs(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    conn = _conn(c)
    refs: list[Wire] = []
    size = 0
    for rec in conn.engine.find_jobs(uuid_prefix(a[0]), max(1, min(a[1], MAX_LIST_PAGE))):
        size += _ref_size(rec.domain)
        if refs and size > MAX_FRAME // 2:
            break  # the caller asked for more than a reply holds: it gets the first ones
        refs.append(_ref(c, Job(conn, rec)))
    return refs


for _method in Method:
    if _method.value.on is not On.SESSION and _method not in _HANDLERS:
        _HANDLERS[_method] = _table_handler(_method)

#: Methods whose reply may be big (XML, lists, typed parameters): see MAX_BULKY. The others
#: reply with a few hundred bytes at most (a ref, a job's info, nil).
_BULKY = frozenset(
    m
    for m in Method
    if m.value.result
    in (Result.DOMAIN_REFS, Result.DOMAIN_INFO, Result.JOB_REFS, Result.JOB_PAGE, Result.PARAMS,
        Result.TEXT)
)  # fmt: skip


# ---- entry point ------------------------------------------------------------------------


def run_daemon(config: DaemonConfig, *, detach: bool = False) -> int:
    """Run jobd until SIGTERM/SIGINT; the process exit status.

    In the foreground, or with ``detach`` (``--daemon``) in a child process: the calling
    process returns 0 only once both sockets accept connections, or the child's exit status
    if it could not start (libvirtd's ``--daemon`` behaves the same way)."""
    fd_problem = raise_fd_limit(config)
    if fd_problem is not None:
        click.echo(f"jobd: {fd_problem}", err=True)
        return EXIT_CONFIG
    ready = _nothing
    if detach:
        status, ready = _detach(config)
        if status is not None:
            return status
    try:
        configure(getattr(logging, config.log_level.upper()), log_file=config.log_file)
    except OSError as exc:
        click.echo(f"jobd: cannot open log file '{config.log_file}': {exc.strerror}", err=True)
        return 1

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(Daemon(config).run)
            ready()

    try:
        anyio.run(serve)
    except Exception as exc:
        leaf = leaf_error(exc)
        if isinstance(leaf, DaemonAlreadyRunning):
            click.echo(f"jobd: {leaf}", err=True)
            return EXIT_ALREADY_RUNNING
        if isinstance(leaf, StoreError):  # corrupt, locked, newer schema: it says what
            click.echo(f"jobd: {leaf}", err=True)
            return 1
        if not isinstance(leaf, OSError | JobError):
            raise
        click.echo(f"jobd: cannot serve in '{config.run_dir}': {leaf}", err=True)
        return 1
    return 0


def _nothing() -> None:
    pass


def raise_fd_limit(config: DaemonConfig) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; what is wrong if the clients
    ``config`` allows, plus FD_HEADROOM, still do not fit (None when they do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        for target in (hard, 1 << 20):  # an infinite hard limit: the kernel's nr_open
            if target == resource.RLIM_INFINITY or target <= soft:
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError):
                continue
            soft = target
            break
    needed = config.max_clients + config.max_ro_clients + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"max_clients ({config.max_clients}) + max_ro_clients ({config.max_ro_clients}) + "
            f"{FD_HEADROOM} file descriptors for jobd itself = {needed}, more than the open "
            f"file limit allows ({soft}; hard limit {hard}): lower max_clients or "
            "max_ro_clients, or raise the limit (ulimit -n, systemd's LimitNOFILE=)"
        )
    return None


def _detach(config: DaemonConfig) -> tuple[int | None, Callable[[], None]]:
    """Fork. The parent gets the exit status to return: 0 once the child reports that it
    serves, else the child's own status. The child gets None and the function that reports
    readiness (and then, with a log file, lets go of the caller's stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            if pipe.read(1) == b"R":
                return 0, _nothing
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1, _nothing
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)

    def ready() -> None:
        os.write(write_end, b"R")
        os.close(write_end)
        if config.log_file is not None:
            os.dup2(null, 2)  # the caller's terminal or pipe is not held open
        os.close(null)

    return None, ready


def daemon_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """jobd's options, shared by ``jobd`` and ``jobctl daemon``."""
    for option in reversed(
        [
            click.option(
                "--run-dir",
                type=click.Path(file_okay=False),
                help=f"Directory of the sockets and pid file [default: {default_run_dir()}].",
            ),
            click.option(
                "--config",
                "config_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="TOML file: run_dir, allowed_uids, allowed_uris, retention, log_level, "
                "max_clients, max_ro_clients, hello_timeout, idle_timeout, driver_idle_timeout, "
                "subscriber_lost_limit, max_subscriptions, max_retained_per_domain, max_retained, "
                "log_file, frame_timeout, max_receive_buffer, max_ro_clients_per_uid, "
                "ro_idle_timeout, max_ro_subscriptions, max_ro_subscriptions_per_uid, "
                "ro_max_event_buffer, ro_subscriber_lost_limit, max_queued_send, "
                "max_ro_queued_send, max_ro_receive_buffer, store.",
            ),
            click.option(
                "--store",
                metavar="URL",
                help="Job store: 'memory:' or 'sqlite:///ABS/PATH' [default: memory:, "
                "interim until recovery exists].",
            ),
            click.option(
                "--log-level", type=click.Choice(sorted(_LEVELS)), help="Log level [default: info]."
            ),
            click.option(
                "--log-file",
                type=click.Path(dir_okay=False),
                help="Log to this file (JSON lines) instead of stderr; reopened when "
                "logrotate moves it away.",
            ),
            click.option(
                "--retention", type=float, help="Seconds ended jobs are kept [default: 600]."
            ),
            click.option(
                "--allow-uri",
                "allowed_uris",
                multiple=True,
                metavar="PATTERN",
                help="Driver URI clients may open (fnmatch; repeatable; replaces the config's "
                f"allowed_uris) [default: {' '.join(DEFAULT_ALLOWED_URIS)}].",
            ),
            click.option(
                "-d",
                "--daemon",
                "detach",
                is_flag=True,
                help="Detach: return (exit 0) once the sockets accept connections, or "
                "fail with jobd's exit status; the pid is in RUN_DIR/jobd.pid.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def start_from_options(
    run_dir: str | Path | None,
    config_file: Path | None,
    log_level: str | None,
    retention: float | None,
    allowed_uris: tuple[str, ...] = (),
    log_file: str | Path | None = None,
    detach: bool = False,
    store: str | None = None,
) -> int:
    try:
        config = load_config(
            config_file,
            run_dir=cli_path(run_dir, "--run-dir"),
            log_level=log_level,
            retention=retention,
            allowed_uris=list(allowed_uris) or None,
            log_file=cli_path(log_file, "--log-file"),
            store=store,
        )
    except ConfigError as exc:
        click.echo(f"jobd: {exc}", err=True)
        return EXIT_CONFIG
    return run_daemon(config, detach=detach)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@daemon_options
@click.version_option(package_name="jobcore", prog_name="jobd")
def main(**options: Any) -> None:
    """jobd: serve the jobcore API over UNIX sockets in RUN_DIR (jobd.sock read-write,
    jobd-ro.sock read-only) until SIGTERM or SIGINT (SIGHUP reopens a moved log file); in
    the foreground unless --daemon."""
    sys.exit(start_from_options(**options))


if __name__ == "__main__":
    main(prog_name="jobd")
