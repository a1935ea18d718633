"""jobd's configuration: every limit and default (the numbers below), ``DaemonConfig``, and
``load_config``, which checks a TOML file and command-line overrides against the tables of
counts (``_COUNTS``) and seconds (``_SECONDS``) (design/daemon.md, "Connections: limits
and timeouts").
"""

from __future__ import annotations

import math
import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
from attrs import field, frozen

from jobcore.errors import InvalidArgument, JobError
from jobcore.fleet import LEASE_TTL, SharedRoot, parse_shared_root
from jobcore.protocol import MAX_FRAME, default_run_dir
from jobcore.scheduler import POLICY_TABLES
from jobcore.spec import DEFAULT_RETENTION, MAX_SECONDS
from jobcore.store import DEFAULT_MAX_RETAINED, DEFAULT_MAX_RETAINED_PER_DOMAIN
from jobcore.store_sqlite import parse_store_url

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


#: Microseconds a client's read loop busy-polls its socket after answering a frame before
#: it waits for the event loop (``busy_poll_us``; 0: never; design/daemon.md "Busy-poll").
BUSY_POLL_US = 200
MAX_BUSY_POLL_US = 10_000


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
    #: the job store: 'memory:', 'sqlite:///ABS/PATH' or 'postgresql://…'; None:
    #: 'sqlite:///RUN_DIR/jobs.sqlite' (``store_url``, design/store.md)
    store: str | None = None
    #: the fleet member jobd is (every job record carries it); None: the machine's hostname
    host: str | None = None
    #: SIGTERM (jobd stopping) ends active jobs, as a closing in-process connection does;
    #: by default they and their guests run on and are recovered at the next start
    stop_guests: bool = False
    #: storage shared by the fleet's hosts (``--shared-root [ID=]PATH``): claims on image
    #: files below them are taken fleet-wide (design/fleet.md "Shared-storage claims")
    shared_roots: tuple[SharedRoot, ...] = ()
    #: seconds a fleet member's lease lasts unless renewed (renewed every quarter of it)
    lease_ttl: float = LEASE_TTL
    #: the conflict policy table every driver connection's scheduler uses, by name
    #: (``jobcore.scheduler.POLICY_TABLES``: default, kubevirt; design/scheduling.md "Policy")
    policy: str = "default"
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
    #: µs a read loop busy-polls its client's socket after a reply (0: never)
    busy_poll_us: int = BUSY_POLL_US

    @property
    def store_url(self) -> str:
        """The job store jobd uses: ``store``, else RUN_DIR/jobs.sqlite."""
        if self.store is not None:
            return self.store
        return "sqlite://" + urllib.parse.quote(str(self.run_dir / "jobs.sqlite"))


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
    "host",
    "stop_guests",
    "shared_roots",
    "lease_ttl",
    "policy",
    "max_ro_clients_per_uid",
    "ro_idle_timeout",
    "max_ro_subscriptions",
    "max_ro_subscriptions_per_uid",
    "ro_max_event_buffer",
    "ro_subscriber_lost_limit",
    "max_queued_send",
    "max_ro_queued_send",
    "max_ro_receive_buffer",
    "busy_poll_us",
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
        if "host" in values:
            host = _typed(values, "host", str)
            if not host or len(host) > 255 or not host.isprintable() or "/" in host:
                raise ConfigError(
                    "host must be a printable name of 1 to 255 characters without '/', "
                    f"not {host!r}"
                )
            config = _evolve(config, host=host)
        if "policy" in values:
            policy = _typed(values, "policy", str)
            if policy not in POLICY_TABLES:
                raise ConfigError(
                    f"policy must be one of {', '.join(sorted(POLICY_TABLES))}, not {policy!r}"
                )
            config = _evolve(config, policy=policy)
        if "stop_guests" in values:
            if not isinstance(values["stop_guests"], bool):
                raise ConfigError("stop_guests must be true or false")
            config = _evolve(config, stop_guests=values["stop_guests"])
        if "shared_roots" in values:
            roots = values["shared_roots"]
            if not isinstance(roots, list | tuple) or not all(isinstance(r, str) for r in roots):
                raise ConfigError("shared_roots must be a list of '[ID=]PATH' strings")
            try:
                config = _evolve(config, shared_roots=tuple(parse_shared_root(r) for r in roots))
            except InvalidArgument as exc:
                raise ConfigError(f"shared_roots: {exc}") from None
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
    ("busy_poll_us", 0, MAX_BUSY_POLL_US),  # 0: never busy-poll
)
#: config keys that are seconds: (key, minimum, maximum)
_SECONDS = (
    ("retention", 0.0, MAX_SECONDS),
    ("hello_timeout", 0.01, 86400.0),
    ("idle_timeout", 0.0, 86400.0),
    ("driver_idle_timeout", 0.0, MAX_SECONDS),
    ("frame_timeout", 0.01, 86400.0),
    ("ro_idle_timeout", 0.0, 86400.0),
    ("lease_ttl", 0.2, 86400.0),
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
