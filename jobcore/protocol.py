"""The jobd wire protocol: frames, typed messages and value codecs (design/daemon.md).

A frame is a 4-byte big-endian body length followed by a msgpack body of at most
``MAX_FRAME`` bytes. Every body is a msgpack array whose first item is the message type:

    REQUEST  [0, id, method, [args…]]            client -> daemon
    REPLY    [1, id, result]                     daemon -> client
    ERROR    [2, id, class, message, {fields}]   daemon -> client (id 0: not tied to a request)
    EVENT    [3, sub_id, [event…]]               daemon -> client (a subscribed job event)
    CANCEL   [4, id]                             client -> daemon (stop serving request id)
    SUB_END  [5, sub_id]                         daemon -> client (the subscription ended)
             [5, sub_id, lost, reason]           … ended for a reason other than 'closed'
                                                 (reason 'overflow': the client fell behind)

The first request of a connection is ``hello [version, driver_uri]``. UUIDs travel as 16
raw bytes. The methods, their argument types and result types are jobcore.methods' table.
Wire values are decoded into the typed messages and values below right at the edge
(``decode_message``, ``decode_result``); nothing else in jobcore sees wire lists or maps.
"""

from __future__ import annotations

import enum
import math
import os
import socket
import struct
import time
import typing
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import attrs
import cattrs
import msgpack  # type: ignore[import-untyped]
from attrs import frozen

from jobcore import errors
from jobcore.domaininfo import DiskInfo, DomainInfo
from jobcore.errors import AccessDenied as AccessDenied  # re-exported: part of the protocol
from jobcore.errors import ConnectionLost as ConnectionLost  # re-exported: part of the protocol
from jobcore.errors import DaemonUnreachable as DaemonUnreachable  # re-exported: as above
from jobcore.errors import JobError
from jobcore.events import EndReason, EventKind, JobEvent
from jobcore.info import Blocker, ClaimView, Explanation, GroupInfo, HostInfo, HostState, JobInfo
from jobcore.lifecycle import JobState
from jobcore.methods import BY_NAME, MAX_RESUME, Arg, Method, Result
from jobcore.rundir import user_run_dir
from jobcore.spec import Decision, JobType
from jobcore.uri import URI, parse_uri

if TYPE_CHECKING:
    from anyio.abc import SocketStream  # anyio only for a stream: a loop-free client never loads it

#: Bumped on any incompatible change; a daemon refuses a client of another version.
#: 2: JobInfo gained host and host_lost, DomainInfo its layers' formats, bus and virt_type
#: (design/daemon.md, "Versioning").
PROTOCOL_VERSION = 2
#: Largest frame body either side accepts (a bigger length prefix ends the connection).
MAX_FRAME = 4 << 20
HEADER = struct.Struct(">I")
#: Names of the sockets inside a run directory.
RW_SOCKET = "jobd.sock"
RO_SOCKET = "jobd-ro.sock"


class ProtocolError(JobError):
    """A peer sent something that is not the jobd protocol (bad frame, bad message)."""


@frozen
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(stream: SocketStream | socket.socket) -> PeerCred | None:
    """The process at the other end of a UNIX socket: pid/uid/gid (SO_PEERCRED; Linux)."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return None
    if isinstance(stream, socket.socket):
        sock = stream
    else:
        from anyio.abc import SocketAttribute

        sock = stream.extra(SocketAttribute.raw_socket)
    raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def check_daemon_peer(stream: SocketStream | socket.socket, path: Path) -> None:
    """Refuse a daemon socket served by another user than us or root: whoever could create
    the socket (a pre-made run directory, a shared /tmp) could otherwise read our requests
    and answer them."""
    try:
        peer = peer_credentials(stream)
    except OSError:
        peer = None
    if peer is None:
        return  # no SO_PEERCRED on this platform: the run directory's rules must do
    if peer.uid not in (os.getuid(), 0):
        raise AccessDenied(
            f"the daemon at '{path}' runs as uid {peer.uid} (pid {peer.pid}), neither you "
            f"(uid {os.getuid()}) nor root: refusing to talk to it; check who created "
            f"'{path.parent}'"
        )


class DaemonBusy(DaemonUnreachable):
    """The daemon refused the connection: it serves its maximum number of clients on that
    socket. Like an unreachable daemon, retrying later may work."""


class MsgType(enum.IntEnum):
    REQUEST = 0
    REPLY = 1
    ERROR = 2
    EVENT = 3
    CANCEL = 4
    SUB_END = 5


#: A validated request argument: what ``Arg`` converts a wire value to.
ArgValue: TypeAlias = (
    str
    | bytes
    | int
    | float
    | uuid.UUID
    | tuple[str, ...]
    | tuple[tuple[uuid.UUID, int], ...]
    | None
)
#: A plain wire value (what msgpack carries).
Wire: TypeAlias = Any


# ---- typed messages -------------------------------------------------------------------


@frozen
class Request:
    id: int
    method: Method
    args: tuple[ArgValue, ...]


@frozen
class Reply:
    id: int
    result: Wire  # decoded by the caller, which knows the method's result type


@frozen
class ErrorReply:
    id: int
    error: str  # exception class name
    message: str
    fields: Mapping[str, Wire]


@frozen
class EventPush:
    sub_id: int
    event: JobEvent


@frozen
class Cancel:
    id: int


@frozen
class SubscriptionEnd:
    sub_id: int
    #: every event the daemon-side subscription lost (carried when not 0)
    lost: int = 0
    reason: EndReason = EndReason.CLOSED


Message: TypeAlias = Request | Reply | ErrorReply | EventPush | Cancel | SubscriptionEnd


class BadRequest(ProtocolError):
    """A frame decoded but is not a valid message; ``request_id`` when one could be read."""

    def __init__(self, message: str, request_id: int = 0) -> None:
        self.request_id = request_id
        super().__init__(message)


# ---- busy-polling a socket (design/daemon.md "Busy-poll") ----------------------------

#: The second busy-poll in a row that caught nothing keeps the next BUSY_POLL_COOL waits
#: from polling, each further one twice as many (up to << BUSY_POLL_MAX_SHIFT): a job_wait,
#: a client that calls once a second.
BUSY_POLL_COOL = 64
BUSY_POLL_MAX_SHIFT = 4
#: Every this many waits, one takes the way not preferred, so both averages stay fresh.
BUSY_POLL_EXPLORE = 32


class BusyPoll:
    """Bounded, adaptive busy-polling of a non-blocking socket, the technique of
    SO_BUSY_POLL and the haltpoll cpuidle governor: on an idle VM, waking a halted CPU
    costs more than a small request's whole round trip, so a waiter that polls up to
    ``budget_us`` µs gets a prompt frame without that wake, and its peer's send wakes
    nobody; on a busy machine no CPU halts and polling only costs. So it measures: the
    average wait (until the first bytes, each counted up to twice the budget) of the
    waits that polled first and of those that slept at once, and polls while polling's
    is the smaller (unknown sleeping: polls), one wait in BUSY_POLL_EXPLORE taking the
    other way; after two polls in a row that caught nothing it does not poll for
    BUSY_POLL_COOL waits (twice as many after each further miss in a row). Never with a
    budget of 0 or on one CPU (polling there only delays the peer). It yields the CPU
    between polls: a busy kernel queues the woken peer on its waker's CPU."""

    __slots__ = ("_cool", "_misses", "_polled", "_slept", "_waits", "budget")

    def __init__(self, budget_us: int) -> None:
        self.budget = budget_us / 1e6 if budget_us > 0 and _spare_cpu() else 0.0
        self._polled = 0.0  # average wait that polled first (seconds)
        self._slept = math.inf  # average wait that slept at once (unknown yet)
        self._cool = 0
        self._misses = 0
        self._waits = 0

    def due(self) -> bool:
        """Whether the wait that starts now should poll first."""
        if not self.budget:
            return False
        if self._cool:
            self._cool -= 1
            return False
        self._waits += 1
        prefer = self._polled <= self._slept
        return prefer if self._waits % BUSY_POLL_EXPLORE else not prefer

    def waited(self, seconds: float, polled: bool) -> None:
        """The wait took ``seconds`` until its first bytes came; it polled first or not."""
        sample = min(seconds, 2 * self.budget)
        if polled:
            self._polled += (sample - self._polled) / 8
        elif self._slept == math.inf:
            self._slept = sample
        else:
            self._slept += (sample - self._slept) / 8

    def poll(self, sock: socket.socket, size: int) -> bytes | None:
        """What ``recv(size)`` brings within the budget (b"": the peer closed), or None;
        an OSError of ``recv`` is raised."""
        clock = time.perf_counter
        end = clock() + self.budget
        recv = sock.recv
        yield_cpu = os.sched_yield
        while True:
            try:
                chunk = recv(size)
            except (BlockingIOError, InterruptedError):
                if clock() < end:
                    yield_cpu()
                    continue
                if self._misses:  # a second miss in a row (one alone: a hiccup)
                    self._cool = BUSY_POLL_COOL << (self._misses - 1)
                self._misses = min(self._misses + 1, BUSY_POLL_MAX_SHIFT + 1)
                return None
            self._misses = 0
            return chunk


def _spare_cpu() -> bool:
    """More than one CPU to run on."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):  # not Linux
        return (os.cpu_count() or 1) > 1


# ---- frames ---------------------------------------------------------------------------


def _pack(body: Wire) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(data)) + data


def frame_length(header: bytes) -> int:
    """The body length a 4-byte header announces; ProtocolError if over the limit."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


def encode_message(msg: Message) -> bytes:
    """A complete frame (header and body) for ``msg``."""
    match msg:
        case Request(id=rid, method=method, args=args):
            return _pack([MsgType.REQUEST, rid, str(method), [_wire_arg(a) for a in args]])
        case Reply(id=rid, result=result):
            return _pack([MsgType.REPLY, rid, result])
        case ErrorReply(id=rid, error=name, message=text, fields=fields):
            return _pack([MsgType.ERROR, rid, name, text, dict(fields)])
        case EventPush(sub_id=sid, event=ev):
            return _pack([MsgType.EVENT, sid, encode_event(ev)])
        case Cancel(id=rid):
            return _pack([MsgType.CANCEL, rid])
        case SubscriptionEnd(sub_id=sid, lost=lost, reason=reason):
            if lost == 0 and reason is EndReason.CLOSED:  # the form every client reads
                return _pack([MsgType.SUB_END, sid])
            return _pack([MsgType.SUB_END, sid, lost, str(reason)])
    raise TypeError(f"not a protocol message: {msg!r}")


def _wire_arg(value: ArgValue) -> Wire:
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, tuple):
        return [
            list(_wire_arg(v) for v in item) if isinstance(item, tuple) else item for item in value
        ]
    return value


@frozen
class DecodeLimits:
    """Bounds on what one frame body may decode into. msgpack turns each 1-byte item (an
    empty map) into a Python object of ~70 bytes, so 4 MiB of them would cost ~300 MiB and
    a quarter second of the event loop before any type check: the lengths of one array or
    map are checked from their headers, and every decoded array and map (1 + its length)
    is counted against ``max_items`` as it completes, which stops the decode early."""

    max_array_len: int
    max_map_len: int
    max_items: int


#: What jobd decodes from a client: a request is ``[0, id, method, [args…]]`` whose widest
#: argument is a subscribe filter (a list of event kinds or job types); strings and bytes
#: (a job or domain XML document) may fill the frame.
REQUEST_LIMITS = DecodeLimits(max_array_len=256, max_map_len=32, max_items=4096)
#: What a client decodes from its daemon (already checked to be the expected peer): pages
#: of job refs, domain lists, events, error fields; bounded by the frame itself.
REPLY_LIMITS = DecodeLimits(max_array_len=MAX_FRAME, max_map_len=MAX_FRAME, max_items=MAX_FRAME)


class _ItemBudget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def _take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError("message has too many items")

    def array(self, value: list[Any]) -> list[Any]:
        self._take(1 + len(value))
        return value

    def map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self._take(1 + len(value))
        return value


def decode_message(body: bytes, limits: DecodeLimits = REPLY_LIMITS) -> Message:
    """A typed message from a frame body; BadRequest if it is not one or if it decodes
    into more than ``limits`` allow (jobd passes ``REQUEST_LIMITS``)."""
    # Every item takes a byte at least, and the budget counts each array or map once and
    # each of its items once more: a body of n bytes counts at most 2n, so one of at most
    # max_items/2 bytes cannot exceed it and is decoded without the counting hooks.
    hooks: dict[str, Any] = {}
    if 2 * len(body) > limits.max_items:
        budget = _ItemBudget(limits.max_items)
        hooks = {"list_hook": budget.array, "object_hook": budget.map}
    try:
        raw = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_FRAME,
            max_bin_len=MAX_FRAME,
            max_ext_len=0,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            **hooks,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(
            f"frame body is not msgpack within the message limits: {type(exc).__name__}: "
            f"{str(exc)[:120]}"
        ) from None
    if not isinstance(raw, list) or len(raw) < 2 or not _is_int(raw[0]) or not _is_int(raw[1]):
        raise BadRequest("a message is an array [type, id, …]")
    rid = int(raw[1])
    try:
        kind = MsgType(raw[0])
    except ValueError:
        raise BadRequest(f"unknown message type {raw[0]}", rid) from None
    try:
        return _decode_by_type(kind, rid, raw)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise BadRequest(f"malformed {kind.name} message: {exc}", rid) from None


def _decode_by_type(kind: MsgType, rid: int, raw: list[Wire]) -> Message:
    if kind is MsgType.REQUEST:
        if len(raw) != 4 or not isinstance(raw[2], str) or not isinstance(raw[3], list):
            raise BadRequest("a request is [0, id, method, [args]]", rid)
        try:
            method = BY_NAME[raw[2]]
        except KeyError:
            raise BadRequest(f"unknown method '{raw[2][:64]}'", rid) from None
        return Request(rid, method, _decode_args(method, raw[3], rid))
    if kind is MsgType.REPLY:
        _expect_len(raw, 3)
        return Reply(rid, raw[2])
    if kind is MsgType.ERROR:
        _expect_len(raw, 5)
        if (
            not isinstance(raw[2], str)
            or not isinstance(raw[3], str)
            or not isinstance(raw[4], dict)
        ):
            raise ValueError("an error is [2, id, class, message, {fields}]")
        return ErrorReply(rid, raw[2], raw[3], raw[4])
    if kind is MsgType.EVENT:
        _expect_len(raw, 3)
        return EventPush(rid, decode_event(raw[2]))
    if kind is MsgType.CANCEL:
        _expect_len(raw, 2)
        return Cancel(rid)
    if len(raw) == 2:
        return SubscriptionEnd(rid)
    _expect_len(raw, 4)
    # a reason this version does not know still ends the subscription
    reason = EndReason(raw[3]) if raw[3] in set(EndReason) else EndReason.CLOSED
    return SubscriptionEnd(rid, max(0, _int(raw[2])), reason)


def _expect_len(raw: list[Wire], n: int) -> None:
    if len(raw) != n:
        raise ValueError(f"expected {n} items, got {len(raw)}")


def _is_int(value: Wire) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: every method's argument types, the handle's identity first (computed once)
_WIRE_ARGS = {m: m.value.wire_args for m in Method}


def _decode_args(method: Method, raw: list[Wire], rid: int) -> tuple[ArgValue, ...]:
    kinds = _WIRE_ARGS[method]
    if len(raw) != len(kinds):
        raise BadRequest(f"'{method}' takes {len(kinds)} arguments, got {len(raw)}", rid)
    out: list[ArgValue] = []
    for i, (kind, value) in enumerate(zip(kinds, raw, strict=True)):
        converted = _convert_arg(kind, value)
        if converted is _INVALID:
            raise BadRequest(f"'{method}' argument {i + 1} must be {kind.value}", rid)
        out.append(converted)  # type: ignore[arg-type]
    return tuple(out)


_INVALID = object()


def _convert_arg(kind: Arg, value: Wire) -> ArgValue | object:
    if value is None and kind in (Arg.OPT_STR, Arg.OPT_FLOAT, Arg.OPT_UUID, Arg.OPT_STRS):
        return None
    if kind in (Arg.STR, Arg.OPT_STR):
        return value if isinstance(value, str) else _INVALID
    if kind is Arg.TEXT:
        return value if isinstance(value, str | bytes) else _INVALID
    if kind is Arg.INT:
        return value if _is_int(value) else _INVALID
    if kind is Arg.OPT_FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _INVALID
    if kind in (Arg.UUID, Arg.OPT_UUID):
        return uuid.UUID(bytes=value) if isinstance(value, bytes) and len(value) == 16 else _INVALID
    if kind is Arg.SEQS:
        return _seqs(value)
    if isinstance(value, list) and len(value) <= 64 and all(isinstance(v, str) for v in value):
        return tuple(value)
    return _INVALID


def _seqs(value: Wire) -> tuple[tuple[uuid.UUID, int], ...] | object:
    if not isinstance(value, list) or len(value) > MAX_RESUME:
        return _INVALID
    out: list[tuple[uuid.UUID, int]] = []
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], bytes)
            and len(item[0]) == 16
            and _is_int(item[1])
            and 0 <= item[1] < 2**63
        ):
            return _INVALID
        out.append((uuid.UUID(bytes=item[0]), int(item[1])))
    return tuple(out)


# ---- scalar checks (error fields, subscription ends) ------------------------------------


def _uuid(value: Wire) -> uuid.UUID:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ValueError("a UUID travels as 16 bytes")
    return uuid.UUID(bytes=value)


def _opt_uuid(value: Wire) -> uuid.UUID | None:
    return None if value is None else _uuid(value)


def _str(value: Wire) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _opt_str(value: Wire) -> str | None:
    return None if value is None else _str(value)


def _int(value: Wire) -> int:
    if not _is_int(value):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return int(value)


def _opt_int(value: Wire) -> int | None:
    return None if value is None else _int(value)


# ---- values ---------------------------------------------------------------------------
#
# Values travel as arrays of their attrs fields in declaration order (JobInfo, HostInfo,
# JobEvent, DomainInfo with its DiskInfo, the refs, the pages, the server hello): the
# cattrs converter below turns each class into that layout and back from its attrs
# fields, so no field list is written by hand. Decoding is strict where cattrs is
# lenient: an array of exactly as many items as the class has fields, every scalar of its
# declared type (no str() or int() coercion), sequences as arrays only, typed parameters
# as maps of scalars. Anything else raises ValueError, which the caller turns into
# BadRequest or ProtocolError.


@frozen
class DomainRef:
    name: str
    uuid: uuid.UUID


@frozen
class JobRef:
    """What a job handle needs locally: identity (no round trip) and last known state."""

    uuid: uuid.UUID
    type: JobType
    domain: str
    state: JobState


@frozen
class JobPage:
    """A LIST_JOBS_PAGE reply: the page's job refs and the next page's cursor."""

    refs: tuple[JobRef, ...]
    cursor: int | None


@frozen
class InfoPage:
    """A LIST_FLEET_JOBS reply: the infos of the page's jobs (every host's) and the next
    page's cursor (None: the last page)."""

    infos: tuple[JobInfo, ...]
    cursor: int | None


@frozen
class ServerHello:
    version: int
    readonly: bool
    uri: str  # the driver URI the daemon opened for this client


def _check(kind: type, what: str) -> Callable[[Wire, Any], Any]:
    """A structure hook taking exactly ``kind`` (a bool is no int here)."""

    def structure(value: Wire, _: Any) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"expected {what}, got {type(value).__name__}")
        return value

    return structure


def _structure_uuid(value: Wire, _: Any) -> uuid.UUID:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ValueError("a UUID travels as 16 bytes")
    return uuid.UUID(bytes=value)


def _structure_float(value: Wire, _: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _structure_params(value: Wire, _: Any = None) -> dict[str, Any]:
    """A typed-parameter map (stats, block job info): string keys, scalar values."""
    if not isinstance(value, dict):
        raise ValueError("expected a map of typed parameters")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, int | float | str | bool | type(None)):
            raise ValueError(f"bad typed parameter {k!r}")
    return dict(value)


def _is_tuple(cls: Any) -> bool:
    return typing.get_origin(cls) is tuple


def _same(value: Wire, _: Any) -> Wire:
    return value


def _field_hooks(conv: cattrs.Converter, cls: type) -> list[tuple[Callable[[Wire, Any], Any], Any]]:
    """The structure hook of each attrs field of ``cls`` and its type, in order: what
    cattrs' ``structure_attrs_fromtuple`` looks up per field and per value (a field
    without a type, or without a hook but with an attrs converter, takes the value)."""
    plan: list[tuple[Callable[[Wire, Any], Any], Any]] = []
    for a in attrs.fields(cls):
        if a.type is None:
            plan.append((_same, None))
            continue
        try:
            plan.append((conv.get_structure_hook(a.type), a.type))
        except cattrs.errors.StructureHandlerNotFoundError:
            if a.converter is None:
                raise
            plan.append((_same, None))
    return plan


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(unstruct_strat=cattrs.UnstructureStrategy.AS_TUPLE)
    for cls in (
        JobInfo,
        HostInfo,
        JobEvent,
        DiskInfo,
        DomainInfo,
        DomainRef,
        JobRef,
        JobPage,
        InfoPage,
        ServerHello,
    ):
        attrs.resolve_types(cls)
    attrs.resolve_types(GroupInfo)  # groups
    for explain_cls in (Explanation, ClaimView, Blocker):  # explain
        attrs.resolve_types(explain_cls)

    def attrs_fromtuple(cls: type) -> Callable[[Wire, Any], Any]:
        n = len(attrs.fields(cls))
        name = cls.__name__
        plan: list[tuple[Callable[[Wire, Any], Any], Any]] = []

        def structure(value: Wire, _: Any) -> Any:
            if not isinstance(value, list) or len(value) != n:
                raise ValueError(f"a {name} is an array of {n} items")
            if not plan:  # each field's hook, looked up once (on first use: no recursion)
                plan.extend(_field_hooks(conv, cls))
            return cls(*[hook(v, t) for (hook, t), v in zip(plan, value, strict=True)])

        return structure

    def tuple_of(cls: Any) -> Callable[[Wire, Any], Any]:
        (item, _ellipsis) = typing.get_args(cls)
        hook = conv.get_structure_hook(item)

        def structure(value: Wire, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise ValueError("expected an array")
            return tuple(hook(v, item) for v in value)

        return structure

    def attrs_astuple(cls: type) -> Callable[[Any], tuple[Any, ...]]:
        plan: list[tuple[str, Callable[[Any], Any] | None]] = []

        def unstructure(obj: Any) -> tuple[Any, ...]:
            if obj.__class__ is not cls:
                return conv.unstructure_attrs_astuple(obj)
            if not plan:  # each field's hook, looked up once (on first use: no recursion)
                plan.extend(
                    (a.name, None if a.type is None else conv.get_unstructure_hook(a.type))
                    for a in attrs.fields(cls)
                )
            return tuple(
                conv.unstructure(v) if hook is None else hook(v)
                for name, hook in plan
                for v in (getattr(obj, name),)
            )

        return unstructure

    conv.register_structure_hook_factory(attrs.has, attrs_fromtuple)
    # JobInfo and HostInfo are also Mappings: their attrs fields, not its mapping view, travel
    conv.register_unstructure_hook_factory(attrs.has, attrs_astuple)
    conv.register_structure_hook_factory(_is_tuple, tuple_of)
    conv.register_unstructure_hook(uuid.UUID, lambda u: u.bytes)
    conv.register_structure_hook(uuid.UUID, _structure_uuid)
    structure_str = _check(str, "a string")
    conv.register_structure_hook(str, structure_str)
    conv.register_structure_hook(int, _check(int, "an integer"))
    conv.register_structure_hook(bool, _check(bool, "a boolean"))
    conv.register_structure_hook(float, _structure_float)
    # states, kinds and types travel as their names
    for named in (JobType, JobState, EventKind, HostState, Decision):
        conv.register_structure_hook(named, lambda v, t: t(structure_str(v, t)))
        conv.register_unstructure_hook(named, str)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Any], _structure_params)
    return conv


#: the one attrs <-> wire converter (see above)
converter = _make_converter()

T = TypeVar("T")


def encode_value(value: object) -> Wire:
    """The wire form of a value (an attrs class above, or a list of them)."""
    return converter.unstructure(value)


def decode_value(wire: Wire, cls: type[T]) -> T:
    """A ``cls`` from its wire form; ValueError if it is not one."""
    try:
        return converter.structure(wire, cls)
    except (TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"malformed {getattr(cls, '__name__', cls)}: {exc}") from None


def encode_job_ref(job_uuid: uuid.UUID, job_type: str, domain: str, state: JobState) -> Wire:
    return encode_value(JobRef(job_uuid, JobType(job_type), domain, state))


def encode_event(ev: JobEvent) -> Wire:
    return encode_value(ev)


def decode_event(value: Wire) -> JobEvent:
    return decode_value(value, JobEvent)


def encode_server_hello(hello: ServerHello) -> Wire:
    return encode_value(hello)


#: what the wire form of each Result decodes into
RESULT_TYPES: dict[Result, Any] = {
    Result.NONE: type(None),
    Result.INT: int,
    Result.BOOL: bool,
    Result.TEXT: str,
    Result.INTS: list[int],
    Result.PARAMS: Mapping[str, Any],
    Result.DOMAIN_REF: DomainRef,
    Result.DOMAIN_REFS: list[DomainRef],
    Result.DOMAIN_INFO: DomainInfo,
    Result.JOB_REF: JobRef,
    Result.JOB_REFS: list[JobRef],
    Result.JOB_PAGE: JobPage,
    Result.JOB_INFO: JobInfo,
    Result.INFO_PAGE: InfoPage,
    Result.HOST_INFOS: list[HostInfo],
    Result.HOST_INFO: HostInfo,
    Result.HELLO: ServerHello,
    Result.CHECKPOINT_REF: str,
    Result.CHECKPOINT_REFS: list[str],
    Result.OPT_CHECKPOINT_REF: str | None,
    # groups
    Result.GROUP_REF: uuid.UUID,
    Result.GROUP_INFO: GroupInfo,
    # explain
    Result.EXPLANATION: Explanation,
}


def _list_of(item: Any) -> Callable[[Wire], list[Any]]:
    hook = converter.get_structure_hook(item)

    def decode(value: Wire) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError("expected an array")
        return [hook(v, item) for v in value]

    return decode


def _none(value: Wire) -> None:
    if value is not None:
        raise ValueError("expected no result")


def _decoder(result: Result) -> Callable[[Wire], Any]:
    cls = RESULT_TYPES[result]
    if result is Result.NONE:
        return _none
    if result is Result.PARAMS:
        return _structure_params
    if typing.get_origin(cls) is list:
        return _list_of(typing.get_args(cls)[0])
    hook = converter.get_structure_hook(cls)
    return lambda value: hook(value, cls)


#: the decoder of each Result (built once; a reply is decoded with one dict lookup)
RESULT_DECODERS: dict[Result, Callable[[Wire], Any]] = {r: _decoder(r) for r in Result}


def decode_result(method: Method, value: Wire) -> Any:
    """The typed result of ``method`` from its reply; ValueError if it is not one."""
    try:
        return RESULT_DECODERS[method.value.result](value)
    except (TypeError, KeyError, IndexError) as exc:
        raise ValueError(str(exc)) from None


# ---- errors ---------------------------------------------------------------------------

_ERROR_CLASSES: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, JobError)
}
_ERROR_CLASSES.update(
    {
        c.__name__: c
        for c in (
            ProtocolError,
            BadRequest,
            DaemonUnreachable,
            DaemonBusy,
            TimeoutError,
        )
    }
)


def error_reply(request_id: int, exc: BaseException) -> ErrorReply:
    """The ERROR message for an exception (class name, message, typed fields)."""
    fields: dict[str, Wire] = {}
    if isinstance(exc, errors.JobConflict):
        fields = {"holder": exc.holder.bytes, "resource": exc.resource}
    elif isinstance(exc, errors.OperationInvalid):
        fields = {
            "job": None if exc.job is None else exc.job.bytes,
            "state": exc.state,
            "verb": exc.verb,
        }
    elif isinstance(exc, errors.XMLError):
        fields = {"line": exc.line}
    # a driver's own subclass (e.g. the qemu driver's QmpTimeout) travels as its jobcore class
    name = next(
        (c.__name__ for c in type(exc).__mro__ if _ERROR_CLASSES.get(c.__name__) is c), "JobError"
    )
    message = str(exc)
    if isinstance(exc, errors.XMLError) and exc.line is not None:
        message = message.removesuffix(f" (line {exc.line})")
    return ErrorReply(request_id, name, message, fields)


def _field(fields: Mapping[str, Wire], key: str, conv: Callable[[Wire], Any]) -> Any:
    try:
        return conv(fields.get(key))
    except ValueError:
        return None


def raise_error(reply: ErrorReply) -> Exception:
    """The exception an ERROR message stands for, as the same jobcore class."""
    cls = _ERROR_CLASSES.get(reply.error, JobError)
    f = reply.fields
    if cls is errors.JobConflict:
        holder = _field(f, "holder", _uuid) or uuid.UUID(int=0)
        return errors.JobConflict(
            reply.message, holder=holder, resource=_field(f, "resource", _str) or ""
        )
    if cls is errors.OperationInvalid:
        return errors.OperationInvalid(
            reply.message,
            job=_field(f, "job", _opt_uuid),
            state=_field(f, "state", _opt_str),
            verb=_field(f, "verb", _opt_str),
        )
    if cls is errors.XMLError:
        return errors.XMLError(reply.message, line=_field(f, "line", _opt_int))
    if cls is BadRequest:
        return BadRequest(reply.message, reply.id)
    try:
        return cls(reply.message)
    except TypeError:  # a class with required keyword fields this version does not know
        return JobError(reply.message)


def default_run_dir() -> Path:
    """Where jobd and jobctl look by default: ``$XDG_RUNTIME_DIR/jobcore``, else
    ``/tmp/jobcore-UID`` (``jobcore.rundir.user_run_dir``)."""
    return user_run_dir("jobcore")


#: drivers whose plain URIs (``qemu:///session``, ``sim:///NAME``) reach the default jobd
DAEMON_DRIVERS = ("qemu", "sim")
#: how long a probe of jobd's socket may take
PROBE_TIMEOUT = 1.0


def daemon_answers(path: Path) -> bool:
    """Whether a jobd accepts connections on socket ``path`` now."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def resolve_default_daemon(uri: str, *, readonly: bool = False) -> tuple[str, bool]:
    """The URI that serves ``uri``, and whether it is a jobd's: the one rule jobctl and
    jobcore.libvirt share, as libvirt clients reach libvirtd. A plain ``qemu:///…`` or
    ``sim:///…`` becomes ``DRIVER+unix:///…?socket=RUN/jobd.sock`` (``jobd-ro.sock`` when
    ``readonly``) when the default run directory's jobd answers there; any other URI, or
    no jobd, is returned as it is (in-process). InvalidURI for a malformed one."""
    parsed = parse_uri(uri)
    if parsed.transport is not None:
        return uri, True
    if parsed.driver not in DAEMON_DRIVERS:
        return uri, False
    sock = default_run_dir() / (RO_SOCKET if readonly else RW_SOCKET)
    if not daemon_answers(sock):
        return uri, False
    params = (*parsed.params, ("socket", str(sock)))
    return str(URI(parsed.driver, "unix", parsed.host, parsed.path, params)), True
