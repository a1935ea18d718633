"""The jobd client: ``DRIVER+unix:///PATH?socket=SOCKET`` connections.

``jobcore.connect("sim+unix:///default?socket=DIR/jobd.sock")`` yields a
``RemoteConnection``; its domains and jobs are ``RemoteDomain`` and ``RemoteJob``. They
implement jobcore.api's interfaces (as jobcore.local does in-process; neither subclasses
the other) with one round trip per call, as jobcore.methods declares it: the handle's
identity, then the call's arguments, and the reply decoded into the call's result type.
The async API and the blocking facade work unchanged. A job handle's ``uuid``, ``type``
and ``domain`` are local (no round trip); ``state`` is the state last seen by a call on
that handle. Engine internals (``conn.engine``, ``conn.driver``) do not exist remotely.

One connection is one UNIX socket at a time (``_Session``) with two tasks: a writer
draining a bounded queue of frames (so requests go out in call order) and a reader
dispatching replies to their callers and events to subscriptions. A lost socket fails the
calls in flight with ConnectionLost; the ``_Link`` then reconnects with a bounded
backoff, subscribes again and resumes the subscriptions from the last event seq each saw
(design/daemon.md, "Reconnecting"). Works on asyncio and trio.

The blocking facade's jobd connections use the same ``RemoteConnection`` over a blocking
socket instead (``connect_blocking``: ``_BlockingLink``, ``_BlockingSession``): each call
runs on its caller's thread, several threads' requests in flight together, and the handle
coroutines complete without suspending (design/daemon.md, "The lean remote path").
"""

from __future__ import annotations

import contextlib
import itertools
import math
import select
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from jobcore.domaininfo import DomainInfo
from jobcore.errors import ConnectionLost, InvalidArgument, InvalidURI, JobError
from jobcore.events import EndReason, EventFilter, EventHub, EventKind, JobEvent, Subscription
from jobcore.flags import check_flags
from jobcore.handles import CheckpointHandle
from jobcore.info import Explanation, GroupInfo, HostInfo, JobInfo
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.methods import MAX_RESUME, Method, Named, Result, as_uuid, uuid_prefix
from jobcore.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    RW_SOCKET,
    AccessDenied,
    ArgValue,
    BusyPoll,
    Cancel,
    DaemonUnreachable,
    ErrorReply,
    EventPush,
    InfoPage,
    JobPage,
    JobRef,
    Message,
    ProtocolError,
    Reply,
    Request,
    ServerHello,
    SubscriptionEnd,
    Wire,
    check_daemon_peer,
    decode_message,
    decode_result,
    default_run_dir,
    encode_message,
    frame_length,
    raise_error,
)
from jobcore.spec import DEFAULT_RETENTION, MAX_SECONDS, check_timeout
from jobcore.uri import URI, parse_uri

if TYPE_CHECKING:
    # anyio only where the async client runs: a loop-free (blocking) client never loads it
    from anyio.abc import SocketStream, TaskGroup

    from jobcore.paths import PathGuard

#: Frames queued for the writer before a caller waits (subscribe() never waits).
OUTGOING_BUFFER = 256
#: Calls in flight on one connection; more wait for a slot.
MAX_IN_FLIGHT = 1024
#: Seconds the reader gets to take the daemon's last frames when a write failed.
READ_AFTER_WRITE_FAILURE = 2.0
#: Seconds jobd has to answer hello (it may first open the driver connection) before the
#: connection is given up with DaemonUnreachable: a socket that accepts and never answers
#: (not jobd, or a hung one) does not hang the client.
HELLO_TIMEOUT = 30.0
#: Seconds jobd has to send the rest of a frame once its header arrived; then the
#: connection is lost (DaemonUnreachable). Waiting *between* frames has no limit.
FRAME_TIMEOUT = 30.0
#: A hung jobd (SIGSTOP, a deadlock) is noticed as libvirt's keepalive notices one: while
#: a call waits, a jobd silent for KEEPALIVE_INTERVAL s is pinged (a list_domains request),
#: and one silent for KEEPALIVE_TIMEOUT s is lost (ConnectionLost; the link reconnects).
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_TIMEOUT = 30.0
#: Jobs asked for per LIST_JOBS_PAGE round trip (jobd may send fewer).
LIST_PAGE = 1000
#: Reconnecting after a lost socket (design/daemon.md, "Reconnecting"): the first attempt
#: this many seconds after the loss, each next one twice as late, at most RECONNECT_MAX
#: seconds apart, for at most ``?reconnect=SECONDS`` (URI parameter; 0: never) in all.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
RECONNECT_TOTAL = 60.0
RECONNECT_PARAM = "reconnect"
#: Jobs whose last event seq one subscription remembers to resume from (the most recent).
RESUME_JOBS = 1024
#: Microseconds the blocking transport polls its socket without blocking, having sent a
#: request, before it sleeps in poll() (design/daemon.md "Busy-poll"; 0: never). Read when
#: a socket opens; adaptive (``jobcore.protocol.BusyPoll``).
BUSY_POLL_US = 200

_log = get_logger("jobcore.remote")


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        import anyio

        self.done = anyio.Event()
        self.result: Wire = None
        self.error: BaseException | None = None


class _RemoteHub(EventHub):
    """The client end of one daemon-side subscription: a hub with a single subscriber
    whose buffer (and loss policy) is jobcore.events' own. It outlives the socket it was
    made on: after a reconnect it is subscribed again with the same filter, and resumed
    from ``seen`` (each job's last numbered event delivered, the most recent jobs)."""

    def __init__(self, link: _Link, sub_id: int, flt: EventFilter, maxlen: int) -> None:
        super().__init__()
        self._link = link
        self.sub_id = sub_id
        self.flt = flt
        self.maxlen = maxlen
        #: events the daemon reported lost so far (the lost_before of delivered events)
        self._reported_lost = 0
        #: job -> the seq of its last STATE or FINAL event delivered (at most RESUME_JOBS)
        self.seen: OrderedDict[uuid.UUID, int] = OrderedDict()

    def deliver(self, ev: JobEvent) -> None:
        if ev.seq:
            if ev.seq <= self.seen.get(ev.job, 0):
                return  # delivered already (a resume's catch-up, then the live event)
            self.seen[ev.job] = ev.seq
            self.seen.move_to_end(ev.job)
            if len(self.seen) > RESUME_JOBS:
                self.seen.popitem(last=False)
        self._reported_lost += ev.lost_before
        for sub in self._subs:
            sub.lost += ev.lost_before  # events the daemon dropped for this subscriber
        self.emit(ev)

    def resumed(self) -> list[tuple[uuid.UUID, int]]:
        """What the ``resume`` requests of a new socket name: each job seen with its last
        seq, and the job the filter names with 0 if none of its events was seen."""
        self._reported_lost = 0  # the new daemon-side subscription counts from 0
        pairs = list(self.seen.items())
        if self.flt.job is not None and self.flt.job not in self.seen:
            pairs.append((self.flt.job, 0))
        return pairs

    def ended(self, end: SubscriptionEnd) -> None:
        """The daemon ended the subscription: the subscriber ends the same way, with the
        daemon's losses not yet reported added to its own."""
        unreported = max(0, end.lost - self._reported_lost)
        for sub in self._subs:
            sub.end(end.reason, unreported)

    def refused(self, error: JobError) -> None:
        """The daemon refused the subscription: its consumer gets ``error``."""
        for sub in self._subs:
            sub.refusal = error
            sub.end(EndReason.REFUSED)

    def unsubscribe(self, sub: Subscription) -> None:
        super().unsubscribe(sub)
        self._link.drop_subscription(self.sub_id)


def _subscribe_request(hub: _RemoteHub) -> Request:
    flt = hub.flt
    return Request(
        hub.sub_id,
        Method.SUBSCRIBE,
        (
            flt.domain,
            flt.job,
            None if flt.types is None else tuple(sorted(flt.types)),
            None if flt.kinds is None else tuple(sorted(map(str, flt.kinds))),
            hub.maxlen,
        ),
    )


class _Session:
    """One socket to jobd: request/reply matching, event routing, ordered writes. The
    request ids and the subscriptions (hubs) belong to the ``_Link``: they outlive the
    socket."""

    def __init__(self, stream: SocketStream, link: _Link) -> None:
        import anyio

        self._stream = stream
        self._link = link
        #: who is at the other end, for messages: "jobd at '/run/…/jobd.sock'"
        self.where = link.where
        self._out_send, self._out_recv = anyio.create_memory_object_stream[bytes](OUTGOING_BUFFER)
        self._ids = link.ids
        self._pending: dict[int, _Pending] = {}
        self._hubs = link.hubs
        self._slots = anyio.Semaphore(MAX_IN_FLIGHT)
        self._lost: JobError | None = None
        #: the loss was the socket's (jobd died, a frame stalled): the link reconnects;
        #: not when jobd said why it dropped us, the protocol broke, or we closed
        self.retry = False
        #: set once the socket is lost
        self.gone = anyio.Event()
        self._reader_done = anyio.Event()
        #: hello was answered (no ping before: jobd takes nothing else first)
        self.greeted = False
        self._heard = anyio.current_time()  # the last frame from jobd

    @property
    def lost(self) -> JobError | None:
        return self._lost

    # ---- calls ------------------------------------------------------------------------

    async def call(self, method: Method, *args: ArgValue) -> Wire:
        import anyio

        if self._lost is not None:
            raise self._lost
        async with self._slots:
            rid = next(self._ids)
            try:
                frame = encode_message(Request(rid, method, args))
            except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int >= 2**64
                raise InvalidArgument(f"{method}: an argument cannot be sent: {exc}") from None
            pending = self._pending[rid] = _Pending()
            try:
                await self._out_send.send(frame)
                await pending.done.wait()
            except anyio.get_cancelled_exc_class():
                if not pending.done.is_set():
                    self._send_nowait(Cancel(rid))
                raise
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise self._lost or ConnectionLost("the connection to jobd is closed") from None
            finally:
                self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def call_as(self, method: Method, *args: ArgValue) -> Any:
        """``call``, its reply decoded into the method's result type (jobcore.methods)."""
        result = await self.call(method, *args)
        try:
            return decode_result(method, result)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed reply to '{method}': {exc}") from None

    def _send_nowait(self, msg: Request | Cancel) -> bool:
        import anyio

        try:
            self._out_send.send_nowait(encode_message(msg))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    # ---- subscriptions ----------------------------------------------------------------

    def subscribe(self, hub: _RemoteHub) -> None:
        """Queue the subscribe request at once (before any later call, so no event of a
        job begun afterwards is missed); the daemon filters, the hub buffers."""
        if not self._send_nowait(_subscribe_request(hub)):
            raise JobError("too many requests queued for jobd; subscribe again later")

    async def resubscribe(self, hub: _RemoteHub) -> None:
        """Subscribe ``hub`` again on this (new) socket, then resume it: the daemon serves
        both in its read loop, so the catch-up events come before any later event."""
        await self._out_send.send(encode_message(_subscribe_request(hub)))
        pairs = hub.resumed()
        for i in range(0, len(pairs), MAX_RESUME):
            chunk = tuple(pairs[i : i + MAX_RESUME])
            request = Request(next(self._ids), Method.RESUME, (hub.sub_id, chunk))
            await self._out_send.send(encode_message(request))

    def unsubscribe(self, sub_id: int) -> None:
        if self._lost is None:
            self._send_nowait(Request(next(self._ids), Method.UNSUBSCRIBE, (sub_id,)))

    # ---- the two tasks ----------------------------------------------------------------

    async def writer(self) -> None:
        import anyio

        try:
            async with self._out_recv:
                async for frame in self._out_recv:
                    await self._stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # The daemon may have said why before it closed (a refusal, a timeout): the
            # reader takes that frame first, then the generic loss applies.
            with anyio.move_on_after(READ_AFTER_WRITE_FAILURE):
                await self._reader_done.wait()
            self.lose(ConnectionLost(f"the connection to {self.where} was lost: {exc}"), True)

    async def reader(self) -> None:
        import anyio
        from anyio.streams.buffered import BufferedByteReceiveStream

        receive = BufferedByteReceiveStream(self._stream)
        try:
            while True:
                length = frame_length(await receive.receive_exactly(HEADER.size))
                self._heard = anyio.current_time()
                with anyio.move_on_after(FRAME_TIMEOUT):
                    self._dispatch(decode_message(await receive.receive_exactly(length)))
                    continue
                self.lose(
                    ConnectionLost(
                        f"{self.where} sent the header of a {length}-byte frame but not the "
                        f"rest within {FRAME_TIMEOUT:g} s"
                    ),
                    True,
                )
                return
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            self.lose(ConnectionLost(f"the connection to {self.where} was lost"), True)
        except ProtocolError as exc:
            self.lose(ProtocolError(f"jobd sent an invalid frame: {exc}"))
        finally:
            self._reader_done.set()

    async def keepalive(self) -> None:
        """Ping a jobd that is silent while a call waits; lose one silent too long."""
        import anyio

        while True:
            await anyio.sleep(KEEPALIVE_INTERVAL)
            if not self._pending or not self.greeted:  # silence is fine: nothing awaited
                self._heard = anyio.current_time()
                continue
            silent = anyio.current_time() - self._heard
            if silent >= KEEPALIVE_TIMEOUT:
                self.lose(
                    ConnectionLost(
                        f"{self.where} answered nothing for {silent:.0f} s while a call "
                        "waited (is it stopped or hung?)"
                    ),
                    True,
                )
                return
            if silent >= KEEPALIVE_INTERVAL:  # its reply (or any frame) proves it alive
                self._send_nowait(Request(next(self._ids), Method.LIST_DOMAINS, ()))

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, Reply):
            pending = self._pending.get(msg.id)
            if pending is not None:
                pending.result = msg.result
                pending.done.set()
        elif isinstance(msg, ErrorReply):
            pending = self._pending.get(msg.id)
            if pending is not None:
                pending.error = raise_error(msg)
                pending.done.set()
            elif msg.id in self._hubs:
                _log.debug("subscription refused", error=msg.error, message=msg.message)
                error = raise_error(msg)
                self._hubs.pop(msg.id).refused(
                    error if isinstance(error, JobError) else JobError(str(error))
                )
            else:
                if msg.id == 0:  # not tied to a request: the daemon is dropping us
                    self.lose(raise_error(msg))
                else:
                    _log.debug("error for a request nobody waits for", error=msg.error)
        elif isinstance(msg, EventPush):
            hub = self._hubs.get(msg.sub_id)
            if hub is not None:
                hub.deliver(msg.event)
        elif isinstance(msg, SubscriptionEnd):
            hub = self._hubs.pop(msg.sub_id, None)  # gone daemon-side: no UNSUBSCRIBE
            if hub is not None:
                hub.ended(msg)
        else:
            _log.warning("unexpected message from jobd", message=type(msg).__name__)

    def lose(self, error: BaseException, retry: bool = False) -> None:
        """The socket is gone: fail every call in flight (at once: ConnectionLost when the
        socket broke); the link decides what becomes of the subscriptions."""
        if self._lost is not None:
            return
        self._lost = error if isinstance(error, JobError) else JobError(str(error))
        self.retry = retry
        for pending in list(self._pending.values()):
            pending.error = self._lost
            pending.done.set()
        self._out_send.close()
        self.gone.set()

    def close(self) -> None:
        self.lose(DaemonUnreachable("the connection is closed"))


def _hello_uri(parsed: URI) -> str:
    """The driver URI hello names: the client's URI without transport, socket, reconnect."""
    params = tuple((k, v) for k, v in parsed.params if k != RECONNECT_PARAM)
    return attrs.evolve(parsed, params=params).without_transport()


def _reconnect_pauses(reconnect: float, now: Callable[[], float]) -> Iterator[float]:
    """The pauses before each reconnect attempt: RECONNECT_FIRST s, each next one twice
    as long, at most RECONNECT_MAX s, until ``reconnect`` s from now are spent."""
    deadline = now() + reconnect
    delay = RECONNECT_FIRST
    while (pause := min(delay, deadline - now())) > 0:
        yield pause
        delay = min(delay * 2, RECONNECT_MAX)


def _gave_up(where: str, reconnect: float, attempts: int, last: JobError) -> DaemonUnreachable:
    return DaemonUnreachable(
        f"the connection to {where} was lost and jobd did not come back "
        f"within {reconnect:g} s ({attempts} attempts; reconnect="
        f"{reconnect:g} in the URI sets how long): {last}"
    )


def _unreachable(path: Path, exc: OSError) -> DaemonUnreachable:
    return DaemonUnreachable(f"cannot reach jobd at '{path}': {exc.strerror or exc}")


def _no_hello(path: Path) -> DaemonUnreachable:
    return DaemonUnreachable(
        f"jobd at '{path}' did not answer hello within {HELLO_TIMEOUT:g} s "
        "(is it jobd? is it hung?)"
    )


class _Link:
    """A connection's link to jobd across sockets: the current ``_Session``, the request
    ids and subscriptions that outlive it, and the reconnection after a lost socket
    (design/daemon.md, "Reconnecting"): the first attempt RECONNECT_FIRST s after the
    loss, each next one twice as late, at most RECONNECT_MAX s apart, for at most
    ``reconnect`` s in all; each sends hello again, subscribes every live subscription
    again and resumes it. Calls made meanwhile wait for the outcome."""

    def __init__(self, parsed: URI, path: Path, tg: TaskGroup, reconnect: float) -> None:
        import anyio

        self.parsed = parsed
        self.path = path
        self.where = f"jobd at '{path}'"
        self.tg = tg
        self.reconnect = reconnect
        self.ids = itertools.count(1)
        self.hubs: dict[int, _RemoteHub] = {}
        self.session: _Session | None = None
        self.hello: ServerHello | None = None
        #: set when the link gave up (or closed): every later call raises it
        self.failed: JobError | None = None
        self._changed = anyio.Event()
        self._closing = False

    async def open(self) -> _Session:
        """A new socket to jobd, hello answered (DaemonUnreachable if it is not)."""
        import anyio

        try:
            stream = await anyio.connect_unix(self.path)
        except OSError as exc:
            raise _unreachable(self.path, exc) from None
        try:
            check_daemon_peer(stream, self.path)
        except AccessDenied:
            await stream.aclose()
            raise
        session = _Session(stream, self)
        self.tg.start_soon(self._run, stream, session)
        try:
            with anyio.move_on_after(HELLO_TIMEOUT) as hello_scope:
                self.hello = await session.call_as(
                    Method.HELLO, PROTOCOL_VERSION, _hello_uri(self.parsed)
                )
            if hello_scope.cancelled_caught:
                raise _no_hello(self.path)
        except BaseException:
            session.close()
            raise
        session.greeted = True
        return session

    async def _run(self, stream: SocketStream, session: _Session) -> None:
        import anyio

        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(session.reader)
            tg.start_soon(session.writer)
            tg.start_soon(session.keepalive)
            await session.gone.wait()
            tg.cancel_scope.cancel()

    def start(self, session: _Session) -> None:
        self.session = session
        self.tg.start_soon(self._supervise)

    async def current(self) -> _Session:
        """The live session; while reconnecting, the one that comes (or the error)."""
        while True:
            session = self.session
            if self.failed is not None:
                raise self.failed
            if session is not None and session.lost is None:
                return session
            await self._changed.wait()

    def _publish(self) -> None:
        import anyio

        self._changed.set()
        self._changed = anyio.Event()

    async def _supervise(self) -> None:
        while True:
            session = self.session
            assert session is not None
            await session.gone.wait()
            lost = session.lost
            assert lost is not None
            if self._closing or not session.retry or self.reconnect <= 0:
                self._give_up(lost)
                return
            _log.info("connection to jobd lost: reconnecting", socket=str(self.path))
            self.session = None
            try:
                self.session = await self._reconnect(lost)
            except JobError as exc:
                self._give_up(exc)
                return
            self._publish()

    async def _reconnect(self, cause: JobError) -> _Session:
        import anyio

        started = anyio.current_time()
        attempts, last = 0, cause
        for pause in _reconnect_pauses(self.reconnect, anyio.current_time):
            if self._closing:
                break
            await anyio.sleep(pause)
            attempts += 1
            try:
                session = await self.open()
            except JobError as exc:  # not up yet, busy, not serving that URI yet: again
                last = exc
                continue
            for hub in sorted(self.hubs.values(), key=lambda h: h.sub_id):
                await session.resubscribe(hub)
            _log.info(
                "reconnected to jobd",
                socket=str(self.path),
                attempts=attempts,
                down_s=round(anyio.current_time() - started, 3),
                subscriptions=len(self.hubs),
            )
            return session
        raise _gave_up(self.where, self.reconnect, attempts, last)

    def _give_up(self, error: JobError) -> None:
        self.failed = error
        for hub in list(self.hubs.values()):
            hub.close()
        self.hubs.clear()
        self._publish()

    def subscribe(self, flt: EventFilter, maxlen: int) -> Subscription:
        """Register at once; on the live socket the request is queued now, while
        reconnecting it is sent with the others once jobd is back."""
        if self.failed is not None:
            raise self.failed
        sub_id = next(self.ids)
        hub = _RemoteHub(self, sub_id, flt, maxlen)
        sub = hub.subscribe(flt, maxlen)
        session = self.session
        if session is not None and session.lost is None:
            session.subscribe(hub)
        self.hubs[sub_id] = hub
        return sub

    def drop_subscription(self, sub_id: int) -> None:
        if self.hubs.pop(sub_id, None) is not None and self.session is not None:
            self.session.unsubscribe(sub_id)

    def close(self) -> None:
        self._closing = True
        if self.session is not None:
            self.session.close()
        if self.failed is None:
            self._give_up(DaemonUnreachable("the connection is closed"))


class RemoteConnection:
    """A connection served by jobd (see the module docstring)."""

    def __init__(self, uri: str, link: _Link | None, blocking: _BlockingLink | None = None) -> None:
        self.uri = uri
        self._link = link
        #: the blocking transport (connect_blocking): calls from any thread but the event
        #: loop's run on it, without suspending
        self._blocking = blocking
        self._loop_thread: int | None = None

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.uri!r}>"

    @property
    def _hello(self) -> ServerHello:
        hello = self._blocking.hello if self._blocking is not None else None
        if hello is None and self._link is not None:
            hello = self._link.hello
        assert hello is not None
        return hello

    @property
    def readonly(self) -> bool:
        """The socket is the daemon's read-only one: writes raise AccessDenied."""
        return self._hello.readonly

    @property
    def driver_uri(self) -> str:
        """The URI of the driver connection the daemon serves this connection from."""
        return self._hello.uri

    @property
    def _session(self) -> _Session:
        """The current socket's session (tests send raw requests through it)."""
        assert self._link is not None and self._link.session is not None
        return self._link.session

    def attach_link(self, other: RemoteConnection, loop_thread: int) -> None:
        """Serve this (blocking) connection's calls made on the event loop's thread, and
        its subscriptions, by ``other``'s link (a second socket, opened on that loop)."""
        self._link = other._link
        self._loop_thread = loop_thread

    def close_blocking(self) -> None:
        """Close the blocking transport (the event loop's link closes with its loop)."""
        if self._blocking is not None:
            self._blocking.close()

    async def call(self, method: Method, *args: ArgValue) -> Any:
        """One round trip of ``method`` (arguments after the handle's identity), its
        reply decoded into the table's result type, refs turned into handles."""
        blocking, link = self._blocking, self._link
        if blocking is not None and (link is None or threading.get_ident() != self._loop_thread):
            result = blocking.call_as(method, *args)  # on this thread, never suspends
        else:
            assert link is not None
            session = link.session
            if session is None or session.lost is not None or link.failed is not None:
                session = await link.current()  # reconnecting (or given up: raises)
            result = await session.call_as(method, *args)
        match method.value.result:
            case Result.DOMAIN_REF:
                return RemoteDomain(self, result.name, result.uuid)
            case Result.DOMAIN_REFS:
                return [RemoteDomain(self, r.name, r.uuid) for r in result]
            case Result.JOB_REF:
                return RemoteJob(self, result)
            case Result.JOB_REFS:
                return [RemoteJob(self, r) for r in result]
            case Result.GROUP_REF:  # groups
                return RemoteJobGroup(self, result)
        return result

    async def lookup_domain(self, name: str) -> RemoteDomain:
        return await self.call(Method.LOOKUP_DOMAIN, name)  # type: ignore[no-any-return]

    async def list_domains(self) -> list[RemoteDomain]:
        return await self.call(Method.LIST_DOMAINS)  # type: ignore[no-any-return]

    async def create_domain(self, xml: str, *, path_guard: PathGuard | None = None) -> RemoteDomain:
        if path_guard is not None:  # the files are on jobd's host: jobd guards them
            raise InvalidArgument("a path guard applies to in-process connections only")
        return await self.call(Method.CREATE_DOMAIN, xml)  # type: ignore[no-any-return]

    async def job_lookup_by_uuid(self, dom: Named, job: str | bytes | uuid.UUID) -> RemoteJob:
        return await self.call(Method.JOB_LOOKUP_BY_UUID, dom.name, as_uuid(job))  # type: ignore[no-any-return]

    async def lookup_job(self, job: str | bytes | uuid.UUID) -> RemoteJob:
        return await self.call(Method.LOOKUP_JOB, as_uuid(job))  # type: ignore[no-any-return]

    async def find_jobs(self, prefix: str, limit: int = 16) -> list[RemoteJob]:
        return await self.call(Method.FIND_JOBS, uuid_prefix(prefix), limit)  # type: ignore[no-any-return]

    async def list_fleet_jobs(
        self, cursor: int = -1, limit: int = LIST_PAGE
    ) -> tuple[list[JobInfo], int | None]:
        page: InfoPage = await self.call(Method.LIST_FLEET_JOBS, cursor, limit)
        return list(page.infos), page.cursor

    async def fleet_hosts(self) -> list[HostInfo]:
        return await self.call(Method.FLEET_HOSTS)  # type: ignore[no-any-return]

    async def fence_host(self, name: str, reason: str | None = None, flags: int = 0) -> HostInfo:
        check_flags("fenceHost", flags)
        return await self.call(Method.FENCE_HOST, name, reason, flags)  # type: ignore[no-any-return]

    # groups

    async def job_group_begin(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> RemoteJobGroup:
        if path_guard is not None:  # the files are on jobd's host: jobd guards them
            raise InvalidArgument("a path guard applies to in-process connections only")
        return await self.call(Method.JOB_GROUP_BEGIN, group_xml, flags)  # type: ignore[no-any-return]

    async def job_group_explain(
        self, group_xml: str | bytes, flags: int = 0, *, path_guard: PathGuard | None = None
    ) -> Explanation:
        if path_guard is not None:  # the files are on jobd's host: jobd guards them
            raise InvalidArgument("a path guard applies to in-process connections only")
        return await self.call(Method.JOB_GROUP_EXPLAIN, group_xml, flags)  # type: ignore[no-any-return]

    async def job_group_lookup(self, group: str | bytes | uuid.UUID) -> RemoteJobGroup:
        return await self.call(Method.JOB_GROUP_LOOKUP, as_uuid(group))  # type: ignore[no-any-return]

    def subscribe(
        self,
        *,
        domain: str | None = None,
        job: uuid.UUID | None = None,
        types: Iterable[str] | None = None,
        kinds: Iterable[EventKind] | None = None,
        maxlen: int = EventHub.DEFAULT_BUFFER,
    ) -> Subscription:
        if maxlen < 1:
            raise ValueError("an event buffer holds at least one event")
        if self._link is None:
            raise JobError(
                "this blocking connection's events need its event loop: subscribe through "
                "BlockingConnection.subscribe (or run_sync)"
            )
        return self._link.subscribe(EventFilter.of(domain, job, types, kinds), maxlen)

    async def events_barrier(self) -> None:
        """One round trip on the events' socket: every subscription sent on it before is
        registered by jobd once this returns (it serves both in its read loop, in order;
        UNSUBSCRIBE of id 0, which no subscription has, changes nothing)."""
        assert self._link is not None
        session = await self._link.current()
        await session.call(Method.UNSUBSCRIBE, 0)


def _check_size(xml: str | bytes, root: str) -> None:
    """Refuse a document over the XML size limit here, with the parser's own XMLError,
    rather than let it fail as an oversized frame (jobd checks again)."""
    if not isinstance(xml, str | bytes):
        return  # the protocol's argument check names the wrong type
    from jobcore.xml._parse import MAX_DOCUMENT_BYTES, parse_document  # lxml: only to write

    size = len(xml) if isinstance(xml, bytes) else len(xml.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        parse_document(xml, root)  # raises the size XMLError before any parsing


class RemoteDomain:
    """A domain handle served by jobd. Flag masks are checked here too: a bad one never
    goes on the wire."""

    def __init__(self, conn: RemoteConnection, name: str, dom_uuid: uuid.UUID) -> None:
        self.conn = conn
        self.name = name
        self.uuid = dom_uuid

    def __repr__(self) -> str:
        return f"<Domain {self.name!r} on {self.uri!r}>"

    @property
    def uri(self) -> str:
        """The URI this handle was reached through."""
        return self.conn.uri

    async def _call(self, method: Method, *args: ArgValue) -> Any:
        return await self.conn.call(method, self.name, *args)

    async def info(self) -> DomainInfo:
        return await self._call(Method.DOMAIN_INFO)  # type: ignore[no-any-return]

    async def destroy(self) -> None:
        await self._call(Method.DOMAIN_DESTROY)

    # domain description and the QEMU monitor (slice domxml)
    async def xml_desc(self, flags: int = 0) -> str:
        check_flags("XMLDesc", flags)
        return await self._call(Method.DOMAIN_XML_DESC, flags)  # type: ignore[no-any-return]

    async def is_active(self) -> bool:
        return await self._call(Method.DOMAIN_IS_ACTIVE)  # type: ignore[no-any-return]

    async def qemu_monitor_command(self, cmd: str, flags: int = 0) -> str:
        check_flags("qemuMonitorCommand", flags)
        return await self._call(Method.QEMU_MONITOR_COMMAND, cmd, flags)  # type: ignore[no-any-return]

    async def job_begin(self, job_xml: str | bytes, flags: int = 0) -> RemoteJob:
        check_flags("JobBegin", flags)
        _check_size(job_xml, "job")
        return await self._call(Method.JOB_BEGIN, job_xml, flags)  # type: ignore[no-any-return]

    # explain
    async def job_explain(self, job_xml: str | bytes, flags: int = 0) -> Explanation:
        check_flags("JobBegin", flags)
        _check_size(job_xml, "job")
        return await self._call(Method.JOB_EXPLAIN, job_xml, flags)  # type: ignore[no-any-return]

    async def job_begin_spec(self, spec: Any, flags: int = 0) -> RemoteJob:
        """A typed spec travels as its job XML (jobcore.xml.format_job)."""
        from jobcore.xml import format_job  # the registry and the job types: only here

        return await self.job_begin(format_job(spec), flags)

    async def list_jobs(self) -> list[RemoteJob]:
        """Every job of the domain, fetched page by page (no reply outgrows a frame)."""
        jobs: list[RemoteJob] = []
        cursor: int | None = -1
        while cursor is not None:
            page: JobPage = await self._call(Method.LIST_JOBS_PAGE, cursor, LIST_PAGE)
            jobs += [RemoteJob(self.conn, r) for r in page.refs]
            cursor = page.cursor
        return jobs

    async def job_info(self) -> list[int]:
        return await self._call(Method.LEGACY_JOB_INFO)  # type: ignore[no-any-return]

    async def job_stats(self, flags: int = 0) -> dict[str, Any]:
        check_flags("jobStats", flags)
        return await self._call(Method.LEGACY_JOB_STATS, flags)  # type: ignore[no-any-return]

    async def abort_job(self) -> int:
        return await self._call(Method.LEGACY_ABORT_JOB)  # type: ignore[no-any-return]

    async def backup_begin(
        self, backup_xml: str | None, checkpoint_xml: str | None = None, flags: int = 0
    ) -> int:
        check_flags("backupBegin", flags)
        if backup_xml is not None:
            _check_size(backup_xml, "domainbackup")
        if checkpoint_xml is not None:
            _check_size(checkpoint_xml, "domaincheckpoint")
        return await self._call(Method.BACKUP_BEGIN, backup_xml, checkpoint_xml, flags)  # type: ignore[no-any-return]

    async def backup_get_xml_desc(self, flags: int = 0) -> str:
        check_flags("backupGetXMLDesc", flags)
        return await self._call(Method.BACKUP_GET_XML_DESC, flags)  # type: ignore[no-any-return]

    async def block_job_info(self, disk: str, flags: int = 0) -> dict[str, int]:
        check_flags("blockJobInfo", flags)
        return await self._call(Method.BLOCK_JOB_INFO, disk, flags)  # type: ignore[no-any-return]

    async def block_job_abort(self, disk: str, flags: int = 0) -> int:
        check_flags("blockJobAbort", flags)
        return await self._call(Method.BLOCK_JOB_ABORT, disk, flags)  # type: ignore[no-any-return]

    async def block_pull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int:
        check_flags("blockPull", flags)
        return await self._call(Method.BLOCK_PULL, disk, bandwidth, flags)  # type: ignore[no-any-return]

    async def block_commit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        check_flags("blockCommit", flags)
        return await self._call(Method.BLOCK_COMMIT, disk, base, top, bandwidth, flags)  # type: ignore[no-any-return]

    # ---- checkpoints ---------------------------------------------------------------------

    async def checkpoint_create(self, xml: str, flags: int = 0) -> RemoteCheckpoint:
        check_flags("checkpointCreateXML", flags)
        _check_size(xml, "domaincheckpoint")
        return RemoteCheckpoint(self, await self._call(Method.CHECKPOINT_CREATE, xml, flags))

    async def list_checkpoints(self, flags: int = 0) -> list[RemoteCheckpoint]:
        check_flags("listAllCheckpoints", flags)
        names: list[str] = await self._call(Method.LIST_CHECKPOINTS, flags)
        return [RemoteCheckpoint(self, n) for n in names]

    async def checkpoint_lookup(self, name: str) -> RemoteCheckpoint:
        return RemoteCheckpoint(self, await self._call(Method.CHECKPOINT_LOOKUP, name))


class RemoteCheckpoint(CheckpointHandle):
    """A checkpoint handle served by jobd: its domain's name and its own."""

    _dom: RemoteDomain

    def __init__(self, dom: RemoteDomain, name: str) -> None:
        super().__init__(dom, name)

    async def _call(self, method: Method, *args: ArgValue) -> Any:
        return await self._dom.conn.call(method, self._dom.name, self._name, *args)

    async def xml_desc(self, flags: int = 0) -> str:
        check_flags("checkpointGetXMLDesc", flags)
        return await self._call(Method.CHECKPOINT_XML_DESC, flags)  # type: ignore[no-any-return]

    async def parent(self) -> RemoteCheckpoint | None:
        name = await self._call(Method.CHECKPOINT_PARENT)
        return None if name is None else RemoteCheckpoint(self._dom, name)

    async def delete(self, flags: int = 0) -> None:
        check_flags("checkpointDelete", flags)
        await self._call(Method.CHECKPOINT_DELETE, flags)


class RemoteJob:
    """A job handle served by jobd. ``uuid``, ``type`` and ``domain`` need no round trip;
    ``state`` is the state last seen by a call on this handle."""

    def __init__(self, conn: RemoteConnection, ref: JobRef) -> None:
        self.conn = conn
        self.uuid = ref.uuid
        self.type = ref.type
        self.domain = ref.domain
        self._state = ref.state

    def __repr__(self) -> str:
        return f"<Job {self.uuid} {self.type} on {self.domain!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteJob) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    @property
    def state(self) -> JobState:
        return self._state

    async def _call(self, method: Method, *args: ArgValue) -> Any:
        result = await self.conn.call(method, self.uuid, *args)
        if isinstance(result, JobInfo):
            self._state = result.state
        return result

    async def info(self) -> JobInfo:
        return await self._call(Method.JOB_INFO)  # type: ignore[no-any-return]

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self._call(Method.JOB_STATS)
        if isinstance(stats.get("state"), str):
            self._state = JobState(stats["state"])
        return stats

    async def wait(self, timeout: float | None = None) -> JobInfo:
        return await self._call(Method.JOB_WAIT, check_timeout(timeout))  # type: ignore[no-any-return]

    async def abort(self) -> None:
        await self._call(Method.JOB_ABORT)

    async def pause(self) -> None:
        await self._call(Method.JOB_PAUSE)

    async def resume(self) -> None:
        await self._call(Method.JOB_RESUME)

    async def complete(self) -> None:
        await self._call(Method.JOB_COMPLETE)

    async def set_speed(self, bandwidth: int | None) -> None:
        await self._call(Method.JOB_SET_SPEED, bandwidth or 0)

    async def xml_desc(self) -> str:
        return await self._call(Method.JOB_XML_DESC)  # type: ignore[no-any-return]

    def events(self, maxlen: int = EventHub.DEFAULT_BUFFER) -> Subscription:
        return self.conn.subscribe(job=self.uuid, maxlen=maxlen)

    # explain
    async def explain(self) -> Explanation:
        return await self._call(Method.JOB_EXPLAIN_QUEUED)  # type: ignore[no-any-return]


def socket_path(uri: URI) -> Path:
    """The daemon socket a ``DRIVER+unix`` URI names (``?socket=``), else the default
    run directory's read-write socket."""
    given = uri.param("socket")
    return Path(given) if given else default_run_dir() / RW_SOCKET


def reconnect_limit(uri: URI) -> float:
    """Seconds the client keeps trying to reconnect after a lost socket: the URI's
    ``reconnect=`` (0: never), else RECONNECT_TOTAL."""
    given = uri.param(RECONNECT_PARAM)
    if given is None:
        return RECONNECT_TOTAL
    try:
        value = float(given)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_SECONDS:
        raise InvalidArgument(
            f"URI parameter '{RECONNECT_PARAM}' must be a number of seconds within 0 and "
            f"{MAX_SECONDS:g}, not '{given}'"
        )
    return value


@asynccontextmanager
async def connect_remote(
    uri: str | URI, *, retention: float = DEFAULT_RETENTION
) -> AsyncIterator[RemoteConnection]:
    """Open a connection to jobd. ``retention`` is the daemon's business (its config);
    it is accepted for signature compatibility with ``jobcore.connect``."""
    import anyio

    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.transport != "unix":
        raise InvalidURI(f"'{parsed}' is not a DRIVER+unix URI")
    reconnect = reconnect_limit(parsed)
    body_error: Exception | None = None
    async with anyio.create_task_group() as tg:
        link = _Link(parsed, socket_path(parsed), tg, reconnect)
        try:
            link.start(await link.open())
            conn = RemoteConnection(str(parsed), link)
        except Exception as exc:  # raised as is below, not wrapped by the task group
            body_error = exc
        else:
            try:
                yield conn
            except Exception as exc:
                body_error = exc
        finally:
            link.close()
            tg.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


# groups


class RemoteJobGroup:
    """A job group served by jobd. ``uuid`` needs no round trip."""

    def __init__(self, conn: RemoteConnection, group_id: uuid.UUID) -> None:
        self.conn = conn
        self.uuid = group_id

    def __repr__(self) -> str:
        return f"<JobGroup {self.uuid}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteJobGroup) and other.uuid == self.uuid

    def __hash__(self) -> int:
        return hash(self.uuid)

    async def jobs(self) -> list[RemoteJob]:
        return await self.conn.call(Method.JOB_GROUP_JOBS, self.uuid)  # type: ignore[no-any-return]

    async def info(self) -> GroupInfo:
        return await self.conn.call(Method.JOB_GROUP_INFO, self.uuid)  # type: ignore[no-any-return]

    async def wait(self, timeout: float | None = None) -> GroupInfo:
        return await self.conn.call(Method.JOB_GROUP_WAIT, self.uuid, check_timeout(timeout))  # type: ignore[no-any-return]

    async def abort(self) -> None:
        await self.conn.call(Method.JOB_GROUP_ABORT, self.uuid)


# ---- the blocking transport (the blocking facade's calls, no event loop) ------------------


class _BlockingSession:
    """One blocking socket to jobd, shared by the threads of a blocking connection: the
    same frames, requests and replies as ``_Session``, on the caller's thread. Requests
    are pipelined: each thread writes its whole frame (under the send lock) and waits for
    its reply; whichever waiting thread holds the reader's role reads frames and hands
    every reply to the thread that waits for it, then gives the role to another waiter
    once its own reply came. No thread is started; nothing needs an event loop."""

    def __init__(self, sock: socket.socket, link: _BlockingLink) -> None:
        self._sock = sock
        self._ids = link.ids
        self.where = link.where
        self._send_lock = threading.Lock()
        #: guards what follows; waits go through ``_cond`` (``_sleep``), and it is
        #: notified only while a thread sleeps in it (``_notify``)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0
        #: request id -> its reply once read (only ids some thread waits for)
        self._replies: dict[int, Reply | ErrorReply] = {}
        #: calls in flight on this socket (at most MAX_IN_FLIGHT, as ``_Session``'s)
        self._waiting: set[int] = set()
        self._reading = False
        self._buffer = bytearray()
        #: only the reader polls (one thread at a time)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._lost: JobError | None = None
        #: the loss was the socket's: the link reconnects (as ``_Session.retry``)
        self.retry = False
        self.greeted = False
        self._heard = time.monotonic()
        # non-blocking: each recv and send is one syscall (a socket with a timeout polls
        # before each); the waits are our own polls, with the same timeouts
        sock.setblocking(False)
        self._wpoll = select.poll()  # only a sender polls it (under the send lock)
        self._wpoll.register(sock, select.POLLOUT)
        self._spin = BusyPoll(BUSY_POLL_US)

    @property
    def lost(self) -> JobError | None:
        return self._lost

    def call(self, method: Method, *args: ArgValue, timeout: float | None = None) -> Wire:
        """One round trip: the reply's wire result, or the error it stands for."""
        if self._lost is not None:
            raise self._lost
        rid = next(self._ids)
        try:
            frame = encode_message(Request(rid, method, args))
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int >= 2**64
            raise InvalidArgument(f"{method}: an argument cannot be sent: {exc}") from None
        lock = self._lock
        with lock:
            while len(self._waiting) >= MAX_IN_FLIGHT:  # a slot first
                self._sleep()
            if not self._waiting:  # idle until now: silence counts from this call on
                self._heard = time.monotonic()
            self._waiting.add(rid)
        try:
            self._send(frame)
            reply = self._wait(rid, timeout)
        except BaseException:
            with lock:
                answered = self._replies.pop(rid, None) is not None
            if self._lost is None and not answered:
                self._send_nowait(Cancel(rid))  # interrupted (KeyboardInterrupt): jobd stops
            raise
        finally:
            with lock:
                self._waiting.discard(rid)
                self._notify()  # its slot is free
        if isinstance(reply, ErrorReply):
            raise raise_error(reply)
        return reply.result

    def call_as(self, method: Method, *args: ArgValue) -> Any:
        """``call``, its reply decoded into the method's result type (jobcore.methods)."""
        result = self.call(method, *args)
        try:
            return decode_result(method, result)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed reply to '{method}': {exc}") from None

    # ---- writing ------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            if self._lost is not None:
                raise self._lost
            try:
                self._send_all(frame)
            except OSError as exc:  # a timeout too: jobd took nothing for KEEPALIVE_TIMEOUT s
                # jobd may have said why before it closed (a refusal): read that first
                self._read_farewell()
                self.lose(ConnectionLost(f"the connection to {self.where} was lost: {exc}"), True)
                raise self._lost or ConnectionLost(str(exc)) from None
            except BaseException:  # interrupted mid-frame: the framing cannot be trusted
                self.lose(ConnectionLost(f"the connection to {self.where} was interrupted"), True)
                raise

    def _send_all(self, frame: bytes) -> None:
        """``sendall`` on the non-blocking socket (the send lock is held): TimeoutError if
        jobd takes nothing for KEEPALIVE_TIMEOUT s."""
        sock = self._sock
        try:
            sent = sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(frame):
            return
        view = memoryview(frame)[sent:]
        while view:
            ms = math.ceil(KEEPALIVE_TIMEOUT * 1000)
            if not self._wpoll.poll(ms):
                raise TimeoutError("timed out")
            try:
                view = view[sock.send(view) :]
            except (BlockingIOError, InterruptedError):
                continue

    def _send_nowait(self, msg: Request | Cancel) -> None:
        if not self._send_lock.acquire(blocking=False):
            return  # a frame is going out: this best-effort one (a ping, a cancel) is skipped
        try:
            self._send_all(encode_message(msg))
        except OSError:
            pass  # the reader sees the loss
        finally:
            self._send_lock.release()

    def _read_farewell(self) -> None:
        """After a failed write: take an error frame jobd sent before closing, if any."""
        with self._lock:
            if self._reading:
                return  # the reader takes it
            self._reading = True
        try:
            deadline = time.monotonic() + READ_AFTER_WRITE_FAILURE
            while self._lost is None:
                msg = self._read_message(deadline)
                if msg is None:
                    return
                with self._lock:
                    self._route(msg)
        except (OSError, ProtocolError, ConnectionLost, TimeoutError):
            pass
        finally:
            with self._lock:
                self._reading = False
                self._notify()

    # ---- reading ------------------------------------------------------------------------

    def _wait(self, rid: int, timeout: float | None) -> Reply | ErrorReply:
        """Wait for the reply to ``rid``, reading frames while no other thread does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                reply = self._replies.pop(rid, None)
                if reply is not None:
                    return reply
                if self._lost is not None:
                    raise self._lost
                if not self._reading:
                    self._reading = True
                    break
                self._sleep()
        try:
            while True:
                msg = self._read_message(deadline)
                if msg is None:  # only hello has a deadline: the link says why
                    raise TimeoutError(f"{self.where} did not answer within {timeout:g} s")
                if isinstance(msg, Reply | ErrorReply) and msg.id == rid:
                    return msg  # its own reply (what _route would hand it)
                with self._lock:
                    self._route(msg)
                    reply = self._replies.pop(rid, None)
                    if reply is not None:
                        return reply
        except ProtocolError as exc:
            self.lose(ProtocolError(f"jobd sent an invalid frame: {exc}"))
            raise self._lost from None  # type: ignore[misc]
        except BaseException:
            if self._lost is None:  # interrupted mid-frame: the framing cannot be trusted
                self.lose(ConnectionLost(f"the connection to {self.where} was interrupted"), True)
            raise
        finally:
            with self._lock:
                self._reading = False
                self._notify()

    def _sleep(self) -> None:
        """Wait for a notification (the lock is held)."""
        self._sleepers += 1
        try:
            self._cond.wait()
        finally:
            self._sleepers -= 1

    def _notify(self) -> None:
        """Wake the sleeping threads, if any (the lock is held)."""
        if self._sleepers:
            self._cond.notify_all()

    def _route(self, msg: Message) -> None:
        """Hand one message to the thread waiting for it (the lock is held)."""
        if isinstance(msg, Reply | ErrorReply):
            if msg.id in self._waiting:
                self._replies[msg.id] = msg
                self._notify()
            elif isinstance(msg, ErrorReply) and msg.id == 0:  # jobd is dropping us
                self.lose(raise_error(msg), locked=True)
            # else: the reply to a ping or a cancelled call
        else:  # no subscription lives on this socket (they are the event loop's)
            _log.warning("unexpected message from jobd", message=type(msg).__name__)

    def _read_message(self, deadline: float | None) -> Message | None:
        """The next message (None: ``deadline`` passed first). A silent jobd is pinged
        while a call waits and lost after KEEPALIVE_TIMEOUT s, as ``_Session.keepalive``."""
        header = self._read_exactly(HEADER.size, deadline, keepalive=True, spin=True)
        if header is None:
            return None
        length = frame_length(header)
        frame_deadline = time.monotonic() + FRAME_TIMEOUT
        if deadline is not None and deadline < frame_deadline:
            body = self._read_exactly(length, deadline, keepalive=False)
            if body is None:
                return None
        else:
            body = self._read_exactly(length, frame_deadline, keepalive=False)
        if body is None:
            self.lose(
                ConnectionLost(
                    f"{self.where} sent the header of a {length}-byte frame but not the "
                    f"rest within {FRAME_TIMEOUT:g} s"
                ),
                True,
            )
            raise self._lost  # type: ignore[misc]
        return decode_message(body)

    def _read_exactly(
        self, n: int, deadline: float | None, *, keepalive: bool, spin: bool = False
    ) -> bytes | None:
        """``n`` bytes (None: ``deadline`` passed first). With ``spin``, the first time the
        socket has nothing it is polled without blocking for the busy-poll budget when
        ``BusyPoll`` says it pays, before the thread sleeps in poll()."""
        buf = self._buffer
        sock = self._sock
        waiting = 0.0  # when the first wait for this frame began (with spin)
        polled = False
        while len(buf) < n:
            chunk: bytes | None
            try:
                chunk = sock.recv(max(n - len(buf), 65536))
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError as exc:
                self._lose_reading(exc)
            if chunk is None and spin and not waiting:
                waiting = time.perf_counter()
                polled = self._spin.due()
                if polled:
                    try:
                        chunk = self._spin.poll(sock, 65536)
                    except OSError as exc:
                        self._lose_reading(exc)
            if waiting and chunk is not None:
                self._spin.waited(time.perf_counter() - waiting, polled)
                waiting, spin = 0.0, False
            if chunk is None:
                wait = KEEPALIVE_INTERVAL if keepalive and self.greeted else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                if not self._readable(wait) and keepalive and self.greeted:
                    self._keepalive()
                continue
            if not chunk:
                self.lose(ConnectionLost(f"the connection to {self.where} was lost"), True)
                raise self._lost  # type: ignore[misc]
            self._heard = time.monotonic()
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _lose_reading(self, exc: OSError) -> NoReturn:
        self.lose(ConnectionLost(f"the connection to {self.where} was lost: {exc}"), True)
        raise self._lost from None  # type: ignore[misc]

    def _readable(self, timeout: float | None) -> bool:
        # poll, not select: a process with over 1024 descriptors may hand us a higher one
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return bool(self._poll.poll(ms))

    def _keepalive(self) -> None:
        silent = time.monotonic() - self._heard
        if silent >= KEEPALIVE_TIMEOUT:
            self.lose(
                ConnectionLost(
                    f"{self.where} answered nothing for {silent:.0f} s while a call "
                    "waited (is it stopped or hung?)"
                ),
                True,
            )
            raise self._lost  # type: ignore[misc]
        if silent >= KEEPALIVE_INTERVAL:  # its reply (or any frame) proves it alive
            self._send_nowait(Request(next(self._ids), Method.LIST_DOMAINS, ()))

    # ---- the end --------------------------------------------------------------------------

    def lose(self, error: BaseException, retry: bool = False, *, locked: bool = False) -> None:
        """The socket is gone: every waiting call fails with ``error`` (the link decides
        whether to reconnect for the next call)."""
        if self._lost is not None:
            return
        self._lost = error if isinstance(error, JobError) else JobError(str(error))
        self.retry = retry
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if locked:
            self._cond.notify_all()
        else:
            with self._lock:
                self._cond.notify_all()

    def close(self) -> None:
        self.lose(DaemonUnreachable("the connection is closed"))
        with self._send_lock:  # no thread is writing to it any more
            self._sock.close()


class _BlockingLink:
    """The blocking connection's link to jobd across sockets, as ``_Link``: a lost socket
    fails the calls in flight; the next call reconnects (RECONNECT_FIRST s after the loss,
    each attempt twice as late, at most RECONNECT_MAX s apart, for at most ``reconnect``
    s in all) while the other threads' calls wait for the outcome."""

    def __init__(self, parsed: URI, path: Path, reconnect: float) -> None:
        self.parsed = parsed
        self.path = path
        self.where = f"jobd at '{path}'"
        self.reconnect = reconnect
        self.ids = itertools.count(1)
        self.hello: ServerHello | None = None
        self.failed: JobError | None = None
        self._lock = threading.Lock()
        self._closing = False
        self.session = self.open()

    def open(self) -> _BlockingSession:
        """A new socket to jobd, hello answered (DaemonUnreachable if it is not)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(KEEPALIVE_TIMEOUT)  # a write jobd takes nothing of: lost
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _unreachable(self.path, exc) from None
        try:
            check_daemon_peer(sock, self.path)
        except AccessDenied:
            sock.close()
            raise
        session = _BlockingSession(sock, self)
        try:
            wire = session.call(
                Method.HELLO, PROTOCOL_VERSION, _hello_uri(self.parsed), timeout=HELLO_TIMEOUT
            )
            try:
                self.hello = decode_result(Method.HELLO, wire)
            except (ValueError, TypeError) as exc:
                raise ProtocolError(f"malformed reply to '{Method.HELLO}': {exc}") from None
        except TimeoutError:
            session.close()
            raise _no_hello(self.path) from None
        except BaseException:
            session.close()
            raise
        session.greeted = True
        return session

    def current(self) -> _BlockingSession:
        """The live session; after a loss, a new one (or the error that ended the link)."""
        session = self.session
        if session.lost is None and self.failed is None:
            return session
        with self._lock:
            if self.failed is not None:
                raise self.failed
            session = self.session
            if session.lost is None:
                return session
            lost = session.lost
            if self._closing or not session.retry or self.reconnect <= 0:
                self.failed = lost
                raise lost
            _log.info("connection to jobd lost: reconnecting", socket=str(self.path))
            try:
                session = self._reconnect(lost)
            except JobError as exc:
                self.failed = exc
                raise
            if self._closing:  # closed while the attempt was connecting
                session.close()
                raise self.failed or DaemonUnreachable("the connection is closed")
            self.session = session
            return session

    def _reconnect(self, cause: JobError) -> _BlockingSession:
        started = time.monotonic()
        attempts, last = 0, cause
        for pause in _reconnect_pauses(self.reconnect, time.monotonic):
            if self._closing:
                break
            time.sleep(pause)
            attempts += 1
            try:
                session = self.open()
            except JobError as exc:  # not up yet, busy, not serving that URI yet: again
                last = exc
                continue
            _log.info(
                "reconnected to jobd",
                socket=str(self.path),
                attempts=attempts,
                down_s=round(time.monotonic() - started, 3),
            )
            return session
        raise _gave_up(self.where, self.reconnect, attempts, last)

    def call_as(self, method: Method, *args: ArgValue) -> Any:
        return self.current().call_as(method, *args)

    def close(self) -> None:
        self._closing = True
        self.session.close()
        if self.failed is None:
            self.failed = DaemonUnreachable("the connection is closed")


def connect_blocking(uri: str | URI) -> RemoteConnection:
    """A connection to jobd whose calls run on the calling thread over a blocking socket
    (the blocking facade's): its handles' coroutines complete without suspending, so
    ``coro.send(None)`` runs one call. Its events need an event loop: ``attach_link``
    gives it one (a second socket, served there). Close it with ``close_blocking``."""
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.transport != "unix":
        raise InvalidURI(f"'{parsed}' is not a DRIVER+unix URI")
    link = _BlockingLink(parsed, socket_path(parsed), reconnect_limit(parsed))
    return RemoteConnection(str(parsed), None, link)


#: Handles whose coroutine methods complete without suspending on a blocking connection
#: (connect_blocking): the blocking facade runs them on the caller's thread.
INLINE_HANDLES: frozenset[type] = frozenset(
    {RemoteConnection, RemoteDomain, RemoteJob, RemoteCheckpoint, RemoteJobGroup}
)
