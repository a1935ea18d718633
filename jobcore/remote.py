"""The jobd client: ``DRIVER+unix:///PATH?socket=SOCKET`` connections.

``jobcore.connect("sim+unix:///default?socket=DIR/jobd.sock")`` yields a
``RemoteConnection``; its domains and jobs are ``RemoteDomain`` and ``RemoteJob``. They
implement jobcore.api's interfaces (as jobcore.local does in-process; neither subclasses
the other) with one round trip per call, as jobcore.methods declares it: the handle's
identity, then the call's arguments, and the reply decoded into the call's result type.
The async API and the blocking facade work unchanged. A job handle's ``uuid``, ``type``
and ``domain`` are local (no round trip); ``state`` is the state last seen by a call on
that handle. Engine internals (``conn.engine``, ``conn.driver``) do not exist remotely.

One connection is one UNIX socket with two tasks in the connection's task group: a writer
draining a bounded queue of frames (so requests go out in call order) and a reader
dispatching replies to their callers and events to subscriptions. Works on asyncio and
trio.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from jobcore.driver import DomainInfo
from jobcore.errors import InvalidArgument, InvalidURI, JobError
from jobcore.events import EndReason, EventFilter, EventHub, EventKind, JobEvent, Subscription
from jobcore.flags import check_flags
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.methods import Method, Named, Result, as_uuid, uuid_prefix
from jobcore.paths import PathGuard
from jobcore.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    RW_SOCKET,
    AccessDenied,
    ArgValue,
    Cancel,
    DaemonUnreachable,
    ErrorReply,
    EventPush,
    JobPage,
    JobRef,
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
from jobcore.spec import DEFAULT_RETENTION, check_timeout
from jobcore.uri import URI, parse_uri
from jobcore.xml import format_job
from jobcore.xml._parse import MAX_DOCUMENT_BYTES, parse_document

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
#: Jobs asked for per LIST_JOBS_PAGE round trip (jobd may send fewer).
LIST_PAGE = 1000

_log = get_logger("jobcore.remote")


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Wire = None
        self.error: BaseException | None = None


class _RemoteHub(EventHub):
    """The client end of one daemon-side subscription: a hub with a single subscriber
    whose buffer (and loss policy) is jobcore.events' own."""

    def __init__(self, session: _Session, sub_id: int) -> None:
        super().__init__()
        self._session = session
        self.sub_id = sub_id
        #: events the daemon reported lost so far (the lost_before of delivered events)
        self._reported_lost = 0

    def deliver(self, ev: JobEvent) -> None:
        self._reported_lost += ev.lost_before
        for sub in self._subs:
            sub.lost += ev.lost_before  # events the daemon dropped for this subscriber
        self.emit(ev)

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
        self._session.drop_subscription(self.sub_id)


class _Session:
    """One socket to jobd: request/reply matching, event routing, ordered writes."""

    def __init__(self, stream: SocketStream, tg: TaskGroup, where: str = "jobd") -> None:
        self._stream = stream
        self._tg = tg
        #: who is at the other end, for messages: "jobd at '/run/…/jobd.sock'"
        self.where = where
        self._out_send, self._out_recv = anyio.create_memory_object_stream[bytes](OUTGOING_BUFFER)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._hubs: dict[int, _RemoteHub] = {}
        self._slots = anyio.Semaphore(MAX_IN_FLIGHT)
        self._lost: JobError | None = None
        self._reader_done = anyio.Event()

    # ---- calls ------------------------------------------------------------------------

    async def call(self, method: Method, *args: ArgValue) -> Wire:
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
                raise self._lost or DaemonUnreachable("the connection to jobd is closed") from None
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
        try:
            self._out_send.send_nowait(encode_message(msg))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    # ---- subscriptions ----------------------------------------------------------------

    def subscribe(self, flt: EventFilter, maxlen: int) -> Subscription:
        """Register at once (the request is queued before any later call, so no event of
        a job begun afterwards is missed); the daemon filters, the hub buffers."""
        if self._lost is not None:
            raise self._lost
        sub_id = next(self._ids)
        hub = _RemoteHub(self, sub_id)
        sub = hub.subscribe(flt, maxlen)
        request = Request(
            sub_id,
            Method.SUBSCRIBE,
            (
                flt.domain,
                flt.job,
                None if flt.types is None else tuple(sorted(flt.types)),
                None if flt.kinds is None else tuple(sorted(map(str, flt.kinds))),
                maxlen,
            ),
        )
        if not self._send_nowait(request):
            raise JobError("too many requests queued for jobd; subscribe again later")
        self._hubs[sub_id] = hub
        return sub

    def drop_subscription(self, sub_id: int) -> None:
        if self._hubs.pop(sub_id, None) is not None and self._lost is None:
            self._send_nowait(Request(next(self._ids), Method.UNSUBSCRIBE, (sub_id,)))

    # ---- the two tasks ----------------------------------------------------------------

    async def writer(self) -> None:
        try:
            async with self._out_recv:
                async for frame in self._out_recv:
                    await self._stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # The daemon may have said why before it closed (a refusal, a timeout): the
            # reader takes that frame first, then the generic loss applies.
            with anyio.move_on_after(READ_AFTER_WRITE_FAILURE):
                await self._reader_done.wait()
            self.lose(DaemonUnreachable(f"the connection to jobd was lost: {exc}"))

    async def reader(self) -> None:
        receive = BufferedByteReceiveStream(self._stream)
        try:
            while True:
                length = frame_length(await receive.receive_exactly(HEADER.size))
                with anyio.move_on_after(FRAME_TIMEOUT):
                    self._dispatch(decode_message(await receive.receive_exactly(length)))
                    continue
                self.lose(
                    DaemonUnreachable(
                        f"{self.where} sent the header of a {length}-byte frame but not the "
                        f"rest within {FRAME_TIMEOUT:g} s"
                    )
                )
                return
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            self.lose(DaemonUnreachable("the connection to jobd was lost"))
        except ProtocolError as exc:
            self.lose(ProtocolError(f"jobd sent an invalid frame: {exc}"))
        finally:
            self._reader_done.set()

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
                self._hubs[msg.id].refused(
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

    def lose(self, error: BaseException) -> None:
        """The connection is gone: fail every call in flight, end every subscription."""
        if self._lost is not None:
            return
        self._lost = error if isinstance(error, JobError) else JobError(str(error))
        for pending in list(self._pending.values()):
            pending.error = self._lost
            pending.done.set()
        for hub in list(self._hubs.values()):
            hub.close()
        self._hubs.clear()
        self._out_send.close()

    def close(self) -> None:
        self.lose(DaemonUnreachable("the connection is closed"))


class RemoteConnection:
    """A connection served by jobd (see the module docstring)."""

    def __init__(self, uri: str, session: _Session, *, readonly: bool, driver_uri: str) -> None:
        self.uri = uri
        self._session = session
        #: the socket is the daemon's read-only one: writes raise AccessDenied
        self.readonly = readonly
        #: the URI of the driver connection the daemon serves this connection from
        self.driver_uri = driver_uri

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.uri!r}>"

    async def call(self, method: Method, *args: ArgValue) -> Any:
        """One round trip of ``method`` (arguments after the handle's identity), its
        reply decoded into the table's result type, refs turned into handles."""
        result = await self._session.call_as(method, *args)
        match method.value.result:
            case Result.DOMAIN_REF:
                return RemoteDomain(self, result.name, result.uuid)
            case Result.DOMAIN_REFS:
                return [RemoteDomain(self, r.name, r.uuid) for r in result]
            case Result.JOB_REF:
                return RemoteJob(self, result)
            case Result.JOB_REFS:
                return [RemoteJob(self, r) for r in result]
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
        return self._session.subscribe(EventFilter.of(domain, job, types, kinds), maxlen)


def _check_size(xml: str | bytes, root: str) -> None:
    """Refuse a document over the XML size limit here, with the parser's own XMLError,
    rather than let it fail as an oversized frame (jobd checks again)."""
    if not isinstance(xml, str | bytes):
        return  # the protocol's argument check names the wrong type
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

    async def job_begin(self, job_xml: str | bytes, flags: int = 0) -> RemoteJob:
        check_flags("JobBegin", flags)
        _check_size(job_xml, "job")
        return await self._call(Method.JOB_BEGIN, job_xml, flags)  # type: ignore[no-any-return]

    async def job_begin_spec(self, spec: Any, flags: int = 0) -> RemoteJob:
        """A typed spec travels as its job XML (jobcore.xml.format_job)."""
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


def socket_path(uri: URI) -> Path:
    """The daemon socket a ``DRIVER+unix`` URI names (``?socket=``), else the default
    run directory's read-write socket."""
    given = uri.param("socket")
    return Path(given) if given else default_run_dir() / RW_SOCKET


@asynccontextmanager
async def connect_remote(
    uri: str | URI, *, retention: float = DEFAULT_RETENTION
) -> AsyncIterator[RemoteConnection]:
    """Open a connection to jobd. ``retention`` is the daemon's business (its config);
    it is accepted for signature compatibility with ``jobcore.connect``."""
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.transport != "unix":
        raise InvalidURI(f"'{parsed}' is not a DRIVER+unix URI")
    path = socket_path(parsed)
    try:
        stream = await anyio.connect_unix(path)
    except OSError as exc:
        raise DaemonUnreachable(f"cannot reach jobd at '{path}': {exc.strerror or exc}") from None
    try:
        check_daemon_peer(stream, path)
    except AccessDenied:
        await stream.aclose()
        raise
    body_error: Exception | None = None
    async with stream, anyio.create_task_group() as tg:
        session = _Session(stream, tg, f"jobd at '{path}'")
        tg.start_soon(session.reader)
        tg.start_soon(session.writer)
        try:
            with anyio.move_on_after(HELLO_TIMEOUT) as hello_scope:
                hello: ServerHello = await session.call_as(
                    Method.HELLO, PROTOCOL_VERSION, parsed.without_transport()
                )
            if hello_scope.cancelled_caught:
                raise DaemonUnreachable(
                    f"jobd at '{path}' did not answer hello within {HELLO_TIMEOUT:g} s "
                    "(is it jobd? is it hung?)"
                )
            conn = RemoteConnection(
                str(parsed), session, readonly=hello.readonly, driver_uri=hello.uri
            )
        except Exception as exc:  # raised as is below, not wrapped by the task group
            body_error = exc
        else:
            try:
                yield conn
            except Exception as exc:
                body_error = exc
        finally:
            session.close()
            tg.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
