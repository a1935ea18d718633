"""jobd: the jobcore daemon (design/daemon.md).

    jobd --run-dir DIR [--config FILE] [--log-level LEVEL]

Serves the jobcore API over ``DIR/jobd.sock`` (read-write) and ``DIR/jobd-ro.sock``
(read-only). Driver connections are opened on demand, one per distinct driver URI that
clients name (the URI without ``socket``, query parameters sorted): every client naming
``sim:///default`` shares one simulated host; ``sim:///default?rate=0`` is another one.
They live until the daemon stops, so jobs outlive the clients that began them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time
import tomllib
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import click
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from attrs import Factory, define, field, frozen

from jobcore.api import Connection, Domain, Job, connect
from jobcore.engine import DEFAULT_RETENTION
from jobcore.errors import DriverError, InvalidArgument, InvalidURI, JobError
from jobcore.events import EventKind, Subscription
from jobcore.log import configure, get_logger
from jobcore.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    RO_SOCKET,
    RW_SOCKET,
    AccessDenied,
    ArgValue,
    BadRequest,
    Cancel,
    ErrorReply,
    EventPush,
    Message,
    Method,
    ProtocolError,
    Reply,
    Request,
    ServerHello,
    SubscriptionEnd,
    Wire,
    decode_message,
    default_run_dir,
    encode_domain_info,
    encode_domain_ref,
    encode_job_info,
    encode_job_ref,
    encode_message,
    encode_server_hello,
    error_reply,
    frame_length,
)
from jobcore.uri import parse_uri

#: jobd's exit status when another daemon holds the run directory.
EXIT_ALREADY_RUNNING = 9
#: jobd's exit status for a bad configuration (unreadable file, unknown key, bad value).
EXIT_CONFIG = 2

PID_FILE = "jobd.pid"
MAX_CLIENTS = 256
MAX_DRIVER_CONNECTIONS = 32
#: Requests one client may have running at once; the daemon stops reading it beyond.
MAX_IN_FLIGHT = 256
MAX_SUBSCRIPTIONS = 64
MAX_EVENT_BUFFER = 4096
#: Job and domain handles a client session keeps (so its handles outlive retention).
HANDLE_CACHE = 4096
#: A client that does not take a frame within this many seconds is disconnected.
SEND_TIMEOUT = 30.0
#: Seconds the driver connections get to close at shutdown.
SHUTDOWN_GRACE = 10.0
#: A line a client can provoke at will (malformed frame, refused request) is logged once
#: per connection; repeats are counted and the count logged at most this often, and at
#: disconnect.
NOISE_INTERVAL = 60.0

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
    max_clients: int = MAX_CLIENTS
    #: log to this file (JSON lines, reopened after logrotate moves it) instead of stderr
    log_file: Path | None = None


_CONFIG_KEYS = {"run_dir", "allowed_uids", "retention", "log_level", "max_clients", "log_file"}
_LEVELS = {"debug", "info", "warning", "error"}


def load_config(path: Path | None, **overrides: Any) -> DaemonConfig:
    """The configuration from a TOML file (keys: run_dir, allowed_uids, retention,
    log_level, max_clients, log_file), then ``overrides`` that are not None."""
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
            run_dir = values["run_dir"]
            if not isinstance(run_dir, str | Path):
                raise ConfigError("run_dir must be a string")
            config = _evolve(config, run_dir=Path(run_dir))
        if "allowed_uids" in values:
            uids = values["allowed_uids"]
            if not isinstance(uids, list | tuple | frozenset) or not all(
                isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids
            ):
                raise ConfigError("allowed_uids must be a list of uids")
            config = _evolve(config, allowed_uids=frozenset(uids))
        if "retention" in values:
            retention = values["retention"]
            if not isinstance(retention, int | float) or retention < 0:
                raise ConfigError("retention must be a number of seconds >= 0")
            config = _evolve(config, retention=float(retention))
        if "log_level" in values:
            level = _typed(values, "log_level", str).lower()
            if level not in _LEVELS:
                raise ConfigError(f"log_level must be one of {', '.join(sorted(_LEVELS))}")
            config = _evolve(config, log_level=level)
        if "max_clients" in values:
            limit = _typed(values, "max_clients", int)
            if not 1 <= limit <= 65536:
                raise ConfigError("max_clients must be between 1 and 65536")
            config = _evolve(config, max_clients=limit)
        if "log_file" in values:
            log_file = values["log_file"]
            if not isinstance(log_file, str | Path) or not str(log_file):
                raise ConfigError("log_file must be a file name")
            config = _evolve(config, log_file=Path(log_file))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return config


def _typed(values: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = values[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{key} must be a {kind.__name__}")
    return value


def _evolve(config: DaemonConfig, **changes: Any) -> DaemonConfig:
    import attrs

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


@frozen
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(stream: SocketStream) -> PeerCred | None:
    """The connecting process's pid/uid/gid (SO_PEERCRED; Linux)."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return None
    sock = stream.extra(SocketAttribute.raw_socket)
    raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def leaf_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _ClientGone(Exception):
    """Sending to a client failed or timed out: it is disconnected."""


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
    noise: _Noise = field(default=Factory(lambda self: _Noise(self.log), takes_self=True))

    async def send(self, msg: Message) -> None:
        try:
            frame = encode_message(msg)
        except ProtocolError as exc:  # a reply over the frame limit
            if not isinstance(msg, Reply):
                raise
            frame = encode_message(error_reply(msg.id, exc))
        try:
            async with self.send_lock:
                with anyio.fail_after(SEND_TIMEOUT):
                    await self.stream.send(frame)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.log.info("client dropped", reason=type(exc).__name__)
            self.tg.cancel_scope.cancel()
            raise _ClientGone from None

    def remember(self, job: Job) -> Job:
        self.jobs[job.uuid] = job
        self.jobs.move_to_end(job.uuid)
        if len(self.jobs) > HANDLE_CACHE:
            self.jobs.popitem(last=False)
        return job


# ---- driver connections -----------------------------------------------------------------


@define(eq=False)
class _DriverSlot:
    ready: anyio.Event = field(factory=anyio.Event)
    conn: Connection | None = None
    error: JobError | None = None


def driver_key(uri_text: str) -> str:
    """The identity of a driver connection: the URI without transport and ``socket``,
    query parameters sorted."""
    uri = parse_uri(uri_text)
    if uri.transport is not None:
        raise InvalidURI(f"jobd serves driver URIs, not '{uri_text}'")
    params = sorted((k, v) for k, v in uri.params if k != "socket")
    query = urllib.parse.urlencode(params)
    return f"{uri.driver}://{uri.host}{uri.path}" + (f"?{query}" if query else "")


class DriverConnections:
    """Driver connections opened on demand, shared by all clients naming the same URI."""

    def __init__(self, tg: TaskGroup, retention: float) -> None:
        self._tg = tg
        self._retention = retention
        self._slots: dict[str, _DriverSlot] = {}
        self._stop = anyio.Event()

    async def get(self, uri_text: str) -> tuple[str, Connection]:
        key = driver_key(uri_text)
        slot = self._slots.get(key)
        if slot is None:
            if self._stop.is_set():
                raise JobError("jobd is shutting down")
            if len(self._slots) >= MAX_DRIVER_CONNECTIONS:
                raise JobError(f"jobd serves at most {MAX_DRIVER_CONNECTIONS} driver connections")
            slot = self._slots[key] = _DriverSlot()
            self._tg.start_soon(self._hold, key, slot)
        await slot.ready.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.conn is not None
        return key, slot.conn

    async def _hold(self, key: str, slot: _DriverSlot) -> None:
        try:
            async with connect(key, retention=self._retention) as conn:
                slot.conn = conn
                slot.ready.set()
                _log.info("driver connection opened", uri=key)
                await self._stop.wait()
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
            if self._slots.get(key) is slot:
                del self._slots[key]
            if slot.error is None and not slot.ready.is_set():
                slot.error = JobError("jobd is shutting down")
            slot.ready.set()

    def close(self) -> None:
        self._stop.set()


# ---- the daemon -------------------------------------------------------------------------

Handler = Callable[["Daemon", _Client, tuple[Any, ...]], Awaitable[Wire]]
_HANDLERS: dict[Method, Handler] = {}


def _handles(method: Method) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[method] = fn
        return fn

    return register


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._client_ids = 0
        self._clients = 0
        self.drivers: DriverConnections | None = None
        self._serving: anyio.CancelScope | None = None

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
        cfg.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = RunDirLock(cfg.run_dir)
        lock.acquire()
        try:
            async with anyio.create_task_group() as drivers_tg:
                self.drivers = DriverConnections(drivers_tg, cfg.retention)
                try:
                    self._serving = anyio.CancelScope()
                    with self._serving:
                        await self._serve(task_status, handle_signals)
                finally:
                    self.drivers.close()
                    drivers_tg.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
        finally:
            for path in (self.rw_path, self.ro_path):
                path.unlink(missing_ok=True)
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
            tg.start_soon(rw.serve, partial(self._client, readonly=False), tg)
            tg.start_soon(ro.serve, partial(self._client, readonly=True), tg)
            _log.info(
                "jobd ready",
                pid=os.getpid(),
                rw_socket=str(self.rw_path),
                ro_socket=str(self.ro_path),
                allowed_uids=sorted(self.config.allowed_uids),
                protocol=PROTOCOL_VERSION,
            )
            task_status.started()

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
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
        self._clients += 1
        client: _Client | None = None
        try:
            async with stream, anyio.create_task_group() as tg:
                client = _Client(cid, stream, readonly, tg, log)
                try:
                    if not allowed:
                        await client.send(
                            error_reply(
                                0, AccessDenied("access denied: your uid is not allowed by jobd")
                            )
                        )
                    elif self._clients > self.config.max_clients:
                        log.warning("too many clients", limit=self.config.max_clients)
                        await client.send(
                            error_reply(
                                0,
                                JobError(
                                    f"jobd is busy: {self.config.max_clients} clients connected"
                                ),
                            )
                        )
                    else:
                        await self._read_loop(client)
                except _ClientGone:
                    pass
                tg.cancel_scope.cancel()
        except Exception:
            log.exception("client session failed")
        finally:
            self._clients -= 1
            if client is not None:
                client.noise.flush()
            log.info("client disconnected")

    async def _read_loop(self, client: _Client) -> None:
        receive = BufferedByteReceiveStream(client.stream)
        slots = anyio.Semaphore(MAX_IN_FLIGHT)
        try:
            while True:
                header = await receive.receive_exactly(HEADER.size)
                try:
                    length = frame_length(header)
                except ProtocolError as exc:  # framing is lost: answer and hang up
                    client.log.warning("oversized frame", error=str(exc))
                    await client.send(error_reply(0, exc))
                    return
                body = await receive.receive_exactly(length)
                try:
                    msg = decode_message(body)
                except BadRequest as exc:
                    client.noise.line("warning", "malformed frame", error=str(exc))
                    await client.send(error_reply(exc.request_id, exc))
                    continue
                await self._accept(client, msg, slots)
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

    async def _accept(self, client: _Client, msg: Message, slots: anyio.Semaphore) -> None:
        if isinstance(msg, Cancel):
            scope = client.requests.get(msg.id)
            if scope is not None:
                scope.cancel()
            return
        if not isinstance(msg, Request):
            await client.send(
                error_reply(
                    msg.id if isinstance(msg, Reply | ErrorReply) else 0,
                    BadRequest("clients send requests only"),
                )
            )
            return
        try:
            if msg.method is Method.HELLO:
                await client.send(Reply(msg.id, await self._hello(client, msg.args)))
                return
            if client.conn is None:
                raise BadRequest("the first request must be 'hello'", msg.id)
            if client.readonly and msg.method.spec.writes:
                raise AccessDenied(f"operation forbidden: read-only access prevents '{msg.method}'")
            if msg.method is Method.SUBSCRIBE:
                self._subscribe(client, msg.id, msg.args)
                await client.send(Reply(msg.id, None))
                return
            if msg.method is Method.UNSUBSCRIBE:
                sub = client.subs.pop(_arg_int(msg.args[0]), None)
                if sub is not None:
                    sub.close()
                await client.send(Reply(msg.id, None))
                return
        except JobError as exc:
            client.noise.line(
                "info",
                "request refused",
                method=str(msg.method),
                error=f"{type(exc).__name__}: {exc}",
            )
            await client.send(error_reply(msg.id, exc))
            return
        await slots.acquire()
        client.tg.start_soon(self._run_request, client, msg, slots)

    async def _hello(self, client: _Client, args: tuple[ArgValue, ...]) -> Wire:
        version, uri = args
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version!r} is not supported (jobd speaks {PROTOCOL_VERSION})"
            )
        if client.conn is not None:
            raise BadRequest("'hello' was already sent")
        assert self.drivers is not None and isinstance(uri, str)
        key, client.conn = await self.drivers.get(uri)
        client.log.info("hello", uri=key)
        return encode_server_hello(ServerHello(PROTOCOL_VERSION, client.readonly, key))

    def _subscribe(self, client: _Client, sub_id: int, args: tuple[ArgValue, ...]) -> None:
        domain, job, types, kinds, maxlen = args
        assert client.conn is not None
        if len(client.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidArgument(f"at most {MAX_SUBSCRIPTIONS} subscriptions per client")
        if sub_id in client.subs:
            raise InvalidArgument(f"subscription {sub_id} exists")
        try:
            kind_set = [EventKind(str(k)) for k in kinds] if isinstance(kinds, tuple) else None
        except ValueError:
            raise InvalidArgument(f"unknown event kind in {kinds!r}") from None
        buffer = min(max(1, _arg_int(maxlen)), MAX_EVENT_BUFFER)
        sub = client.conn.subscribe(
            domain=domain if isinstance(domain, str) else None,
            job=job if isinstance(job, uuid.UUID) else None,
            types=types if isinstance(types, tuple) else None,
            kinds=kind_set,
            maxlen=buffer,
        )
        client.subs[sub_id] = sub
        client.tg.start_soon(self._forward, client, sub_id, sub)

    async def _forward(self, client: _Client, sub_id: int, sub: Subscription) -> None:
        """Push a subscription's events; a slow client fills its bounded buffer and loses
        events as jobcore.events documents, the engine never waits for it."""
        try:
            async for ev in sub:
                await client.send(EventPush(sub_id, ev))
            if client.subs.pop(sub_id, None) is not None:  # ended by the daemon side
                await client.send(SubscriptionEnd(sub_id))
        except _ClientGone:
            pass
        finally:
            sub.close()

    async def _run_request(self, client: _Client, req: Request, slots: anyio.Semaphore) -> None:
        reply: Message | None = None
        try:
            with anyio.CancelScope() as scope:
                client.requests[req.id] = scope
                try:
                    reply = Reply(req.id, await _HANDLERS[req.method](self, client, req.args))
                except (JobError, TimeoutError) as exc:
                    reply = error_reply(req.id, exc)
                except Exception as exc:
                    client.log.exception("request failed", method=str(req.method))
                    reply = error_reply(
                        req.id, JobError(f"internal error in jobd: {type(exc).__name__}: {exc}")
                    )
            if reply is not None:
                await client.send(reply)
        except _ClientGone:
            pass
        finally:
            client.requests.pop(req.id, None)
            slots.release()


def _arg_int(value: ArgValue) -> int:
    assert isinstance(value, int)
    return value


# ---- request handlers (validated arguments: see jobcore.protocol.METHODS) ---------------


def _conn(client: _Client) -> Connection:
    assert client.conn is not None
    return client.conn


async def _domain(client: _Client, name: str) -> Domain:
    dom = client.domains.get(name)
    if dom is None:
        dom = await _conn(client).lookup_domain(name)
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


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


@_handles(Method.LIST_DOMAINS)
async def _h_list_domains(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return [encode_domain_ref(x.name, x.uuid) for x in await _conn(c).list_domains()]


@_handles(Method.LOOKUP_DOMAIN)
async def _h_lookup_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _conn(c).lookup_domain(a[0])
    return encode_domain_ref(dom.name, dom.uuid)


@_handles(Method.CREATE_DOMAIN)
async def _h_create_domain(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    dom = await _conn(c).create_domain(_text(a[0]))
    return encode_domain_ref(dom.name, dom.uuid)


@_handles(Method.JOB_LOOKUP_BY_UUID)
async def _h_job_lookup(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _conn(c).job_lookup_by_uuid(await _domain(c, a[0]), a[1]))


@_handles(Method.LOOKUP_JOB)
async def _h_lookup_job(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return _ref(c, await _conn(c).lookup_job(a[0]))


@_handles(Method.DOMAIN_INFO)
async def _h_domain_info(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_domain_info(await (await _domain(c, a[0])).info())


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


@_handles(Method.LIST_JOBS)
async def _h_list_jobs(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return [_ref(c, j) for j in await (await _domain(c, a[0])).list_jobs()]


def _domain_call(name: str) -> Handler:
    """A legacy virDomain call: the Domain method ``name`` with the request's other
    arguments, its plain result sent back as is."""

    async def handler(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
        result: Wire = await getattr(await _domain(c, a[0]), name)(*a[1:])
        return result

    return handler


for _method, _name in (
    (Method.LEGACY_JOB_INFO, "job_info"),
    (Method.LEGACY_JOB_STATS, "job_stats"),
    (Method.LEGACY_ABORT_JOB, "abort_job"),
    (Method.BACKUP_BEGIN, "backup_begin"),
    (Method.BACKUP_GET_XML_DESC, "backup_get_xml_desc"),
    (Method.BLOCK_JOB_INFO, "block_job_info"),
    (Method.BLOCK_JOB_ABORT, "block_job_abort"),
    (Method.BLOCK_PULL, "block_pull"),
    (Method.BLOCK_COMMIT, "block_commit"),
):
    _HANDLERS[_method] = _domain_call(_name)


@_handles(Method.JOB_INFO)
async def _h_job_info(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_job_info(await (await _job(c, a[0])).info())


@_handles(Method.JOB_STATS)
async def _h_job_stats(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return await (await _job(c, a[0])).stats()


@_handles(Method.JOB_WAIT)
async def _h_job_wait(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return encode_job_info(await (await _job(c, a[0])).wait(a[1]))


def _verb(name: str) -> Handler:
    async def handler(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
        job = await _job(c, a[0])
        await getattr(job, name)()
        c.log.debug("job verb", job=str(job.uuid), verb=name)  # info: begin and end only
        return None

    return handler


for _method, _name in (
    (Method.JOB_ABORT, "abort"),
    (Method.JOB_PAUSE, "pause"),
    (Method.JOB_RESUME, "resume"),
    (Method.JOB_COMPLETE, "complete"),
):
    _HANDLERS[_method] = _verb(_name)


@_handles(Method.JOB_SET_SPEED)
async def _h_set_speed(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    await (await _job(c, a[0])).set_speed(a[1] or None)
    return None


@_handles(Method.JOB_XML_DESC)
async def _h_xml_desc(d: Daemon, c: _Client, a: tuple[Any, ...]) -> Wire:
    return await (await _job(c, a[0])).xml_desc()


_MISSING = set(Method) - set(_HANDLERS) - {Method.HELLO, Method.SUBSCRIBE, Method.UNSUBSCRIBE}
assert not _MISSING, f"methods without a handler: {_MISSING}"


# ---- entry point ------------------------------------------------------------------------


def run_daemon(config: DaemonConfig, *, detach: bool = False) -> int:
    """Run jobd until SIGTERM/SIGINT; the process exit status.

    In the foreground, or with ``detach`` (``--daemon``) in a child process: the calling
    process returns 0 only once both sockets accept connections, or the child's exit status
    if it could not start (libvirtd's ``--daemon`` behaves the same way)."""
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
        if not isinstance(leaf, OSError | JobError):
            raise
        click.echo(f"jobd: cannot serve in '{config.run_dir}': {leaf}", err=True)
        return 1
    return 0


def _nothing() -> None:
    pass


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
                type=click.Path(file_okay=False, path_type=Path),
                help=f"Directory of the sockets and pid file [default: {default_run_dir()}].",
            ),
            click.option(
                "--config",
                "config_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="TOML file: run_dir, allowed_uids, retention, log_level, max_clients, "
                "log_file.",
            ),
            click.option(
                "--log-level", type=click.Choice(sorted(_LEVELS)), help="Log level [default: info]."
            ),
            click.option(
                "--log-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Log to this file (JSON lines) instead of stderr; reopened when "
                "logrotate moves it away.",
            ),
            click.option(
                "--retention", type=float, help="Seconds ended jobs are kept [default: 600]."
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
    run_dir: Path | None,
    config_file: Path | None,
    log_level: str | None,
    retention: float | None,
    log_file: Path | None = None,
    detach: bool = False,
) -> int:
    try:
        config = load_config(
            config_file,
            run_dir=run_dir,
            log_level=log_level,
            retention=retention,
            log_file=log_file,
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
    jobd-ro.sock read-only) until SIGTERM or SIGINT; in the foreground unless --daemon."""
    sys.exit(start_from_options(**options))


if __name__ == "__main__":
    main(prog_name="jobd")
