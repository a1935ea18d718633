"""One client connection's session: its state (``_Client``), its send and receive budgets,
the rate limit of the log lines it can provoke, and the errors that end it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from attrs import Factory, define, field

from jobcore.daemon.config import (
    HANDLE_CACHE,
    MAX_BULKY,
    MAX_CLIENT_RECEIVE,
    MAX_QUEUED_SEND,
    MAX_QUEUED_SEND_TOTAL,
    NOISE_INTERVAL,
    SEND_TIMEOUT,
)
from jobcore.daemon.drivers import _DriverSlot
from jobcore.daemon.fleet import FleetJob, FleetService
from jobcore.errors import JobError
from jobcore.events import Subscription
from jobcore.local import LocalConnection, LocalDomain, LocalJob
from jobcore.paths import PathGuard
from jobcore.protocol import (
    BusyPoll,
    Message,
    ProtocolError,
    Reply,
    encode_message,
    error_reply,
)


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
    #: made by the first waiter, set (and dropped) by the next release: no event per
    #: release while nobody waits
    _changed: anyio.Event | None = None

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def reserve(self, n: int) -> None:
        """Take ``n`` bytes once they fit (at once when nothing is held, so that one
        frame bigger than the limit still goes through, alone)."""
        while self.used and self.used + n > self.limit:
            await self._wait()
        self.used += n

    async def below_limit(self) -> None:
        while self.used >= self.limit:
            await self._wait()

    def add(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


#: Bytes read ahead of the frame being read (a few pipelined requests per recv); with
#: frames up to SMALL_FRAME read unaccounted, what one client holds stays bounded.
READ_AHEAD = 4096
#: Frames read one after another without waiting for the socket before the read loop
#: lets the other tasks run (a client that floods requests cannot starve them).
READS_BEFORE_YIELD = 16


#: A frame from another client within this many seconds of one from a client means
#: several clients are busy: then no read loop busy-polls (for SHARED_WINDOW s after).
SHARED_WINDOW = 0.01


class _BusyPollGate:
    """Whether jobd's read loops may busy-poll now (``busy_poll_us``; design/daemon.md
    "Busy-poll"): only while one client is busy (``frame``: no other client's frame came
    within SHARED_WINDOW s) and no other task is ready to run (``_others_ready``), so a
    poll delays nobody; each ``_Receiver``'s ``BusyPoll`` decides whether it pays."""

    __slots__ = ("_last_client", "_last_frame", "_shared_until", "budget_us")

    def __init__(self, budget_us: int) -> None:
        self.budget_us = budget_us
        self._last_client = 0
        self._last_frame = -math.inf
        self._shared_until = -math.inf

    def frame(self, client_id: int, now: float) -> None:
        """A frame came from ``client_id`` at ``now`` (time.monotonic)."""
        if client_id != self._last_client:
            if now - self._last_frame < SHARED_WINDOW:
                self._shared_until = now + SHARED_WINDOW
            self._last_client = client_id
        self._last_frame = now

    def shared(self, now: float) -> bool:
        """Several clients are busy at ``now``."""
        return now < self._shared_until

    def open(self, now: float) -> bool:
        """A read loop may poll at ``now``: one client busy, no other task ready."""
        return not self.shared(now) and not _others_ready()


def _others_ready() -> bool:
    """Another task (or callback) of the event loop is ready to run; True when unknown."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        try:
            import trio.lowlevel  # only jobd's tests run it on trio
        except ImportError:
            return True
        try:
            return trio.lowlevel.current_statistics().tasks_runnable > 0
        except RuntimeError:  # no event loop at all
            return True
    ready = getattr(loop, "_ready", None)  # asyncio's queue of ready callbacks
    return not isinstance(ready, collections.deque) or bool(ready)


class _Receiver:
    """Reads a client's socket without a scheduling round per read: ``recv`` straight
    from the non-blocking socket, waiting for it only when it has nothing (anyio's
    buffered stream takes one checkpoint and one recv per header and per body); at a
    frame boundary, first busy-polling it (``_BusyPollGate``, ``BusyPoll``)."""

    def __init__(self, stream: SocketStream, gate: _BusyPollGate | None = None) -> None:
        self._sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.buffer = bytearray()
        self._unyielded = 0
        self._gate = gate if gate is not None and gate.budget_us > 0 else None
        self._spin = BusyPoll(self._gate.budget_us if self._gate is not None else 0)

    def take(self, n: int) -> bytes:
        """``n`` bytes the buffer holds already."""
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _fill(self, want: int, spin: bool = False) -> None:
        """Read at least one chunk of at most ``want`` bytes (READ_AHEAD at least); with
        ``spin`` (a frame boundary), busy-poll first if the socket has nothing and the
        gate and ``BusyPoll`` allow."""
        size = max(want, READ_AHEAD)
        waiting = 0.0  # when the wait for the next frame began (with spin)
        polled = False
        while True:
            try:
                chunk = self._sock.recv(size)
            except BlockingIOError:
                self._unyielded = 0
                if spin and not waiting and self._gate is not None:
                    waiting = time.perf_counter()
                    polled = self._gate.open(time.monotonic()) and self._spin.due()
                    if polled:
                        try:
                            got = self._spin.poll(self._sock, size)
                        except OSError as exc:
                            raise anyio.BrokenResourceError from exc
                        if got is not None:
                            chunk = got
                            break
                try:
                    await anyio.wait_readable(self._sock)
                except OSError as exc:  # closed meanwhile
                    raise anyio.BrokenResourceError from exc
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            break
        if waiting:
            self._spin.waited(time.perf_counter() - waiting, polled)
        if not chunk:
            if self.buffer:
                raise anyio.IncompleteRead
            raise anyio.EndOfStream
        self.buffer += chunk

    async def receive_exactly(self, n: int) -> bytes:
        self._unyielded += 1
        if self._unyielded >= READS_BEFORE_YIELD:  # frames came without a wait: let others run
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()
        spin = not self.buffer  # a header after the last frame: the client may ask again
        while len(self.buffer) < n:
            await self._fill(n - len(self.buffer), spin)
            spin = False
        return self.take(n)

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``: what is buffered, else what one read brings."""
        if not self.buffer:
            await self._fill(max_bytes)
        return self.take(min(max_bytes, len(self.buffer)))


@define(eq=False)
class _Client:
    """One client socket's session state."""

    id: int
    stream: SocketStream
    readonly: bool
    tg: TaskGroup
    log: Any
    send_lock: anyio.Lock = field(factory=anyio.Lock)
    conn: LocalConnection | None = None
    requests: dict[int, anyio.CancelScope] = field(factory=dict)
    subs: dict[int, Subscription] = field(factory=dict)
    #: job handles it has seen: its host's, and other hosts' (FleetJob) in a fleet
    jobs: OrderedDict[uuid.UUID, LocalJob | FleetJob] = field(factory=OrderedDict)
    domains: OrderedDict[str, LocalDomain] = field(factory=OrderedDict)
    #: the driver connection this session is attached to (after hello)
    slot: _DriverSlot | None = None
    #: a job by UUID on jobd's other driver connections (after hello; None: not found)
    elsewhere: Callable[[uuid.UUID], LocalJob | None] | None = None
    #: the fleet jobd is a member of (a PostgreSQL store), for other hosts' jobs
    fleet: FleetService | None = None
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
    #: the stream's socket (looked up once: anyio's ``extra`` builds a mapping per call)
    _raw: socket.socket | None = None

    def is_drained(self) -> bool:
        """This client's and its socket's queued frames are below limit (``drained``
        would return at once: the read loop's common case, without its coroutines)."""
        return (
            self.queued.used < self.queued.limit
            and self.socket_queued.used < self.socket_queued.limit
        )

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
        the client took it. When no other frame is going out, what the socket takes now
        is written at once (no lock, no scheduling round); only a rest waits, in order."""
        sent = 0
        if not self.send_lock.locked():
            sent = self._send_now(frame)
            if sent == len(frame):
                return
        self.queued.add(len(frame))
        self.socket_queued.add(len(frame))
        try:
            async with self.send_lock:
                with anyio.fail_after(SEND_TIMEOUT):
                    await self.stream.send(frame[sent:] if sent else frame)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._dropped(exc)
        finally:
            self.queued.release(len(frame))
            self.socket_queued.release(len(frame))

    def _send_now(self, frame: bytes) -> int:
        """Write what the socket takes of ``frame`` without waiting; the bytes written."""
        sock = self._raw
        if sock is None:
            sock = self._raw = self.stream.extra(SocketAttribute.raw_socket)
        try:
            return sock.send(frame, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._dropped(exc)

    def _dropped(self, exc: BaseException) -> NoReturn:
        self.log.info("client dropped", reason=type(exc).__name__)
        self.tg.cancel_scope.cancel()
        raise _ClientGone from None

    def remember(self, job: LocalJob | FleetJob) -> LocalJob | FleetJob:
        self.jobs[job.uuid] = job
        self.jobs.move_to_end(job.uuid)
        if len(self.jobs) > HANDLE_CACHE:
            self.jobs.popitem(last=False)
        return job
