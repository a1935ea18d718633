"""The daemon: its two listening sockets, the accept loop, one task per client (hello,
framing, budgets, subscriptions) and the dispatch of requests to ``handlers``.
"""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel
from anyio.abc import SocketListener, SocketStream, TaskGroup

from jobcore.daemon.config import (
    ACCEPT_BACKOFF,
    ACCEPT_BACKOFF_MAX,
    FAREWELL_LINGER,
    MAX_EVENT_BUFFER,
    MAX_IN_FLIGHT,
    MAX_RO_BULKY,
    MAX_SUBSCRIPTIONS,
    PRE_HELLO_FRAME,
    SHUTDOWN_GRACE,
    SMALL_FRAME,
    DaemonConfig,
)
from jobcore.daemon.drivers import DriverConnections
from jobcore.daemon.fleet import FleetJob, FleetService
from jobcore.daemon.handlers import _BULKY, _HANDLERS
from jobcore.daemon.rundir import RunDirLock
from jobcore.daemon.sessions import (
    _BusyPollGate,
    _ByteBudget,
    _Client,
    _ClientGone,
    _FrameLate,
    _Noise,
    _Receiver,
)
from jobcore.errors import InvalidArgument, JobError, StoreError, SubscriptionOverflow
from jobcore.events import EndReason, EventKind, Subscription
from jobcore.fleet import Fleet
from jobcore.fleet_commands import FleetCommands, WatchHandle
from jobcore.local import LocalJob
from jobcore.log import get_logger, reopen_log_files
from jobcore.methods import Method
from jobcore.paths import owner_guard
from jobcore.protocol import (
    HEADER,
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
    encode_server_hello,
    error_reply,
    frame_length,
    peer_credentials,
)
from jobcore.rundir import ensure_private_dir, reserve_dir, unreserve_dir
from jobcore.store import default_host
from jobcore.store_pg import PostgresDatabase, open_store_database
from jobcore.store_sqlite import parse_store_url

_log = get_logger("jobd")

_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about the one connection being accepted (it is dropped, jobd goes on).
_ACCEPT_TRANSIENT = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EPERM, errno.ETIMEDOUT}
)


def _count_down(counts: Counter[int | None], uid: int | None) -> None:
    """One fewer for ``uid``; a uid whose count reaches 0 leaves (a counter of uids keeps
    only those with connections or subscriptions)."""
    counts[uid] -= 1
    if not counts[uid]:
        del counts[uid]


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        #: the fleet member this jobd is: every job record carries it
        self.host = config.host or default_host()
        self._client_ids = 0
        #: connected clients per socket (readonly flag)
        self._clients = {False: 0, True: 0}
        #: live subscriptions per socket (``max_subscriptions``, ``max_ro_subscriptions``)
        self._subscriptions = {False: 0, True: 0}
        #: read-only connections and subscriptions per uid
        self._ro_clients_of: Counter[int | None] = Counter()
        self._ro_subscriptions_of: Counter[int | None] = Counter()
        self.drivers: DriverConnections | None = None
        #: the fleet jobd is a member of (a PostgreSQL store; design/fleet.md)
        self.fleet: FleetService | None = None
        #: the watches of other hosts' jobs, by the subscription they feed
        self._fleet_watches: dict[Subscription, WatchHandle] = {}
        #: why the fleet fenced this host (jobd then stops, exit status 1)
        self._fenced: str | None = None
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
        #: the read loops' busy-poll (busy_poll_us), shared: only while one client is busy
        self._busy_poll = _BusyPollGate(config.busy_poll_us)

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
            store_url = parse_store_url(cfg.store_url)
            # a bad or unreachable store stops jobd here, before serving
            store_db = await anyio.to_thread.run_sync(open_store_database, store_url, self.host)
            fleet = None
            if isinstance(store_db, PostgresDatabase):  # a fleet member: joined before recovery
                fleet = Fleet(store_db, lease_ttl=cfg.lease_ttl, shared_roots=cfg.shared_roots)
                warning = await anyio.to_thread.run_sync(fleet.join)
                if warning is not None:
                    _log.warning("fleet member rejoins after a fence", host=self.host, note=warning)
                _log.info("fleet joined", host=self.host, lease_ttl=cfg.lease_ttl)
            async with anyio.create_task_group() as fleet_tg:  # the lease outlives the drivers
                if fleet is not None:
                    fleet_tg.start_soon(partial(fleet.run, on_fenced=self._on_fenced))
                async with anyio.create_task_group() as drivers_tg:
                    self.drivers = DriverConnections(
                        drivers_tg,
                        cfg.retention,
                        allowed=cfg.allowed_uris,
                        run_dir=cfg.run_dir,
                        idle_timeout=cfg.driver_idle_timeout,
                        max_retained_per_domain=cfg.max_retained_per_domain,
                        max_retained=cfg.max_retained,
                        store=cfg.store_url,
                        keep_jobs=not cfg.stop_guests,
                        host=self.host,
                        policy=cfg.policy,
                    )
                    if fleet is not None:
                        self.fleet = FleetService(fleet, FleetCommands(fleet), self.drivers)
                        self.drivers.fleet = self.fleet
                    commands = anyio.CancelScope()
                    try:
                        self._serving = anyio.CancelScope()
                        with self._serving:
                            if store_db is not None:  # every stored scope, before serving
                                stored = await anyio.to_thread.run_sync(
                                    store_db.stored_scopes, time.time()
                                )
                                await self.drivers.recover(stored)
                            if self.fleet is not None:  # other members' verbs, once recovered
                                await drivers_tg.start(self._fleet_commands, self.fleet, commands)
                            await self._serve(task_status, handle_signals)
                    finally:
                        commands.cancel()
                        self.drivers.close()
                        drivers_tg.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
                fleet_tg.cancel_scope.cancel()
            if self._fenced is not None:
                raise StoreError(f"{self._fenced}: jobd stopped")
            if fleet is not None:  # a clean stop: the others see it stopped, not lost
                try:
                    await anyio.to_thread.run_sync(fleet.leave)
                except StoreError as exc:  # they see its lease expire instead
                    _log.warning("fleet not told of the stop", host=self.host, error=str(exc))
        finally:
            if store_db is not None:
                store_db.release()
            for path in (self.rw_path, self.ro_path):
                path.unlink(missing_ok=True)
            unreserve_dir(cfg.run_dir)
            lock.release()
            _log.info("jobd stopped")

    @staticmethod
    async def _fleet_commands(
        service: FleetService,
        scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:  # cancelled as jobd stops, before its driver connections close
            await service.commands.run(service.execute, task_status=task_status)

    def _on_fenced(self, message: str) -> None:
        """An operator fenced this host (its lease row says so): its writes are refused,
        its jobs were failed elsewhere; jobd stops (exit status 1)."""
        _log.error("this host was fenced: jobd stops", host=self.host, reason=message)
        self._fenced = message
        self.stop()

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
            _count_down(self._ro_clients_of, uid)

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
        receive = _Receiver(client.stream, self._busy_poll)
        spin = self._busy_poll if self._busy_poll.budget_us else None
        slots = anyio.Semaphore(MAX_IN_FLIGHT)
        try:
            while True:
                # replies first: the client (and, once it said hello, its socket) must drain
                if client.conn is None:
                    await client.queued.below_limit()
                elif not client.is_drained():
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
                if spin is not None:
                    spin.frame(client.id, time.monotonic())
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
        self, client: _Client, receive: _Receiver, length: int
    ) -> tuple[Message | None, int]:
        """A frame's body, decoded (None if it was malformed: the client was answered),
        read within ``frame_timeout`` in chunks as the bytes arrive, and the share of
        ``max_receive_buffer`` it holds: bodies over SMALL_FRAME first take ``length``
        bytes of it, waiting (within the same deadline) while the frames of others hold
        it; the caller gives the share back once the request is served."""
        cfg = self.config
        if length <= len(receive.buffer):  # read with its header already (a small frame)
            return await self._decode_body(client, receive.take(length)), 0
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
            msg = await self._decode_body(client, body)
            if msg is None:
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

    async def _decode_body(self, client: _Client, body: bytes) -> Message | None:
        """The message a frame body holds; None if it is malformed (the client was
        answered)."""
        try:
            return decode_message(body, REQUEST_LIMITS)
        except BadRequest as exc:
            client.noise.line("warning", "malformed frame", error=str(exc))
            await client.send(error_reply(exc.request_id, exc))
            return None

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
            if msg.method is Method.RESUME:
                sub_id = _arg_int(msg.args[0])
                sub = client.subs.get(sub_id)
                if sub is None:
                    raise InvalidArgument(f"no subscription {sub_id} on this connection")
                await client.send(Reply(msg.id, self._resume(client, sub, msg.args[1])))
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
        if (
            not share
            and client.fleet is None
            and (msg.method in _INLINE or (msg.method is Method.JOB_WAIT and _ended(client, msg)))
        ):
            await self._serve_inline(client, msg)
            return False
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
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
        client.fleet = self.fleet
        client.elsewhere = partial(self.drivers.lookup_job, besides=slot)
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
        job_id = job if isinstance(job, uuid.UUID) else None
        sub = client.conn.subscribe(
            domain=domain if isinstance(domain, str) else None,
            job=job_id,
            types=[str(t) for t in types] if isinstance(types, tuple) else None,
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
        if job_id is not None and self.fleet is not None and not self._is_local(job_id):
            # another host's job (or none yet): its row's changes, for this subscription
            known = client.jobs.get(job_id)
            since = known.event_seq if isinstance(known, FleetJob) else None
            watch = self.fleet.watch_for(job_id, client.conn.engine.events, sub, since=since)
            self._fleet_watches[sub] = watch
        client.subs[sub_id] = sub
        client.tg.start_soon(self._forward, client, sub_id, sub)

    def _resume(self, client: _Client, sub: Subscription, seen: ArgValue) -> int:
        """A resumed subscription (the client reconnected): for each job it names with the
        last event seq it saw, the job's catch-up event (Engine.catch_up) goes into the
        subscription before any later event; how many."""
        assert client.conn is not None and isinstance(seen, tuple)
        engine, count = client.conn.engine, 0
        for pair in seen:
            assert isinstance(pair, tuple)
            job, seq = pair
            ev = engine.catch_up(job, seq)
            if ev is not None and sub.filter.matches(ev):
                engine.events.emit_to(sub, ev)
                count += 1
            elif ev is None and (watch := self._fleet_watches.get(sub)) and watch.job == job:
                watch.resume(seq)  # another host's job: caught up from its row (not counted)
        return count

    def _is_local(self, job: uuid.UUID) -> bool:
        """Whether one of jobd's driver connections has the job."""
        return self.drivers is not None and self.drivers.lookup_job(job) is not None

    def _subscription_ended(self, readonly: bool, uid: int | None, sub: Subscription) -> None:
        watch = self._fleet_watches.pop(sub, None)
        if watch is not None:  # the watch of another host's job goes with it
            watch()
        self._subscriptions[readonly] -= 1
        if readonly:
            _count_down(self._ro_subscriptions_of, uid)

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

    async def _serve_inline(self, client: _Client, req: Request) -> None:
        """Serve a read answered from the engine's records (``_INLINE``) in the read loop
        itself: no task, no cancel scope, no slot. It waits for nothing, so the client's
        next frame is read as soon as it would be with a task; one at a time holds the
        bulky bound by itself (the read-only socket's shared one is still taken)."""
        ro_bulky = client.readonly and req.method in _BULKY
        if ro_bulky:
            await self._ro_bulky.acquire()
        try:
            if not client.is_drained():
                await client.drained()
            reply = await self._reply(client, req)
            frame = client.encode(reply)
        finally:
            if ro_bulky:
                self._ro_bulky.release()
        del req, reply
        await client.send_frame(frame)

    @staticmethod
    async def _reply(client: _Client, req: Request) -> Message:
        """The handler's reply to ``req``, or the error reply it raised."""
        try:
            return Reply(req.id, await _HANDLERS[req.method](client, req.args))
        except (JobError, TimeoutError) as exc:
            return error_reply(req.id, exc)
        except Exception as exc:
            client.log.exception("request failed", method=str(req.method))
            return error_reply(
                req.id, JobError(f"internal error in jobd: {type(exc).__name__}: {exc}")
            )

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
                if scope.cancel_called:  # a CANCEL read before the request's task began
                    await anyio.lowlevel.checkpoint()  # ends it here, as the scope says
                # a client (or socket) that does not take its replies gets no more computed
                await client.drained()
                reply = await self._reply(client, req)
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


#: Reads answered from the engine's records, waiting for no driver, store or timer: jobd
#: serves them in the client's read loop (``Daemon._serve_inline``); every other request
#: gets a task of its own (it may wait: a job's end, QEMU, the store, another host).
_INLINE = frozenset(
    {
        Method.LOOKUP_DOMAIN,
        Method.LOOKUP_JOB,
        Method.JOB_LOOKUP_BY_UUID,
        Method.LIST_JOBS_PAGE,
        Method.LEGACY_JOB_INFO,
        Method.LEGACY_JOB_STATS,
        Method.BLOCK_JOB_INFO,
        Method.JOB_INFO,
        Method.JOB_STATS,
    }
)


def _ended(client: _Client, req: Request) -> bool:
    """A ``JobWait`` of a job this session knows that has ended with its outcome on
    disk: it waits for nothing (``Engine.wait_ready``), so the read loop serves it."""
    job = client.jobs.get(req.args[0]) if isinstance(req.args[0], uuid.UUID) else None
    return isinstance(job, LocalJob) and job.conn.engine.wait_ready(job._rec)


def _arg_int(value: ArgValue) -> int:
    assert isinstance(value, int)
    return value
