"""Verbs and events across a fleet, through the database alone (design/fleet.md,
"Commands" and "Events of other hosts' jobs").

A member asks another member's job for a verb by inserting a ``commands`` row (target
host, job, verb, JSON arguments, a deadline by the database's clock) and notifying
``jobcore_cmd``; the owner, which LISTENs on a connection of its own, picks its pending
rows (``FOR UPDATE SKIP LOCKED``, and every POLL_INTERVAL besides: a lost notification
delays a command, never loses it), runs each through its engine (the same checks as a
local call), writes the result or the error's class name and message into the row and
notifies ``jobcore_reply``. The asker takes the answer (deleting the row) and returns it,
or raises the owner's error class. No member needs a network path to another.

Events of another host's job come from the ``jobcore_jobs`` notifications its commits
send: a watched job's row is read again and its new state becomes a STATE event (and,
once terminal, the FINAL event with the row's stats), numbered as the owner numbers its
own (the row's ``event_seq``); a watched job whose host's lease expired gets a HOST_LOST
event (its state unchanged).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from attrs import define, field

from jobcore import errors
from jobcore.errors import InvalidArgument, JobError, NoSuchJob, OperationInvalid, StoreError
from jobcore.events import EventHub, EventKind, JobEvent
from jobcore.info import HostInfo, HostState
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.spec import MAX_SECONDS

if TYPE_CHECKING:
    import psycopg

    from jobcore.fleet import Fleet, RemoteJob

_log = get_logger("jobcore.fleet")

#: the notification channels: a command for a host (payload: the host), an answered
#: command (payload: its id), a job row written (H1: "UUID HOST EVENT_SEQ"), a host joined,
#: left or was fenced (payload: the host)
CMD_CHANNEL = "jobcore_cmd"
REPLY_CHANNEL = "jobcore_reply"
JOBS_CHANNEL = "jobcore_jobs"
HOSTS_CHANNEL = "jobcore_hosts"
_CHANNELS = (CMD_CHANNEL, REPLY_CHANNEL, JOBS_CHANNEL, HOSTS_CHANNEL)

#: the verbs another member may ask of a job (its handle's methods of the same names)
VERBS = frozenset({"abort", "pause", "resume", "complete", "set_speed", "stats", "xml_desc"})
#: what a member may ask another member itself (not one of its jobs): a domain handed
#: over by a migration to it (jobcore.driver.FleetPeers.adopt)
HOST_VERBS = frozenset({"adopt_domain"})
#: the job a host command names (none)
NO_JOB = uuid.UUID(int=0)
#: seconds a call waits for the owner's answer by default
CALL_TIMEOUT = 30.0
#: the listener thread looks at its stop flag at least this often (seconds)
LISTEN_TICK = 0.5
#: seconds between two looks for pending commands when no notification came
POLL_INTERVAL = 1.0
#: seconds between two reads of a waiting call's row when no notification came
REPLY_POLL = 0.2
#: answered commands nobody took, and unanswered ones past their deadline, are deleted
#: this many seconds later (the table stays bounded whoever went away)
KEEP_ANSWERED = 60.0
#: seconds between two such clean-ups
CLEANUP_INTERVAL = 10.0
#: commands one pick takes at most
MAX_PICK = 64
#: seconds to wait for a pooled connection

Execute = Callable[[uuid.UUID, str, tuple[Any, ...]], Awaitable[Any]]
#: a command picked to run: (id, job, verb, arguments)
_Picked = tuple[int, uuid.UUID, str, tuple[Any, ...]]


@define(eq=False)
class _Wakeup:
    """A flag the event loop waits on, set from the dispatch of notifications; cleared
    by the one task that waits on it."""

    _event: anyio.Event = field(factory=anyio.Event)

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> None:
        with anyio.move_on_after(timeout):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()


@define(eq=False)
class _Watch:
    """One watcher of another host's job: the events it has been given so far."""

    job: uuid.UUID
    hub: EventHub
    #: the last event number it was given (None: the row's number at the first read)
    seen: int | None
    state: JobState | None = None
    #: the job's host, type and domain (known once its row was read)
    host: str | None = None
    type: str = ""
    domain: str = ""
    #: its progress when its row was last read (a HOST_LOST event carries it)
    processed: int = 0
    total: int = 0
    #: a HOST_LOST was given since its host was last seen live
    lost_reported: bool = False
    ended: bool = False


@define(eq=False)
class WatchHandle:
    """One watch (``FleetCommands.watch``): calling it ends the watch."""

    _commands: FleetCommands
    _watch: _Watch

    @property
    def job(self) -> uuid.UUID:
        return self._watch.job

    def __call__(self) -> None:
        self._commands._unwatch(self._watch)

    def resume(self, seen: int) -> None:
        """The watcher (a subscriber that reconnected) last saw event number ``seen``:
        the job's newer events come again from its row (its FINAL if it ended meanwhile;
        older ones are not repeated by a client that saw them)."""
        watch = self._watch
        watch.seen, watch.ended = seen, False
        self._commands._look_again(watch.job)


class FleetCommands:
    """The command and event paths between the members of one fleet (see the module's
    text). ``run`` serves this member's side; ``call`` and ``watch`` need it running."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.host = fleet.host
        self._cmd_wakeup = _Wakeup()
        self._watch_wakeup = _Wakeup()
        self._hosts_wakeup = _Wakeup()
        #: waiting calls by command id
        self._replies: dict[int, anyio.Event] = {}
        #: watchers by job
        self._watches: dict[uuid.UUID, list[_Watch]] = {}
        #: watched jobs whose row is to be read again
        self._dirty: set[uuid.UUID] = set()

    # ---- this member's side -------------------------------------------------------------

    async def run(
        self,
        execute: Execute,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen for notifications, run the commands addressed to this host through
        ``execute(job, verb, args)`` (the owner's engine) and answer them, and feed the
        watchers; until cancelled."""
        try:
            await anyio.to_thread.run_sync(self._abandon_stale)
        except StoreError as exc:  # their askers time out; the clean-up deletes them
            _log.warning("fleet commands of a previous process left", error=str(exc))
        stop = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_on_cancel, stop)
            await tg.start(self._listen, stop)
            tg.start_soon(self._serve, execute, tg)
            tg.start_soon(self._watch_loop)
            tg.start_soon(self._host_loop)
            task_status.started()

    @staticmethod
    async def _stop_on_cancel(stop: threading.Event) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()  # the listener thread ends within LISTEN_TICK

    async def _listen(
        self, stop: threading.Event, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """The listener thread, started once it listens (or found the database away)."""
        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            # a thread of its own (not one of the default limiter's): it runs as long as jobd
            tg.start_soon(
                partial(
                    anyio.to_thread.run_sync,
                    self._listen_thread,
                    stop,
                    ready.set,
                    limiter=anyio.CapacityLimiter(1),
                )
            )
            await ready.wait()
            task_status.started()

    def _listen_thread(self, stop: threading.Event, started: Callable[[], None]) -> None:
        """LISTEN on a connection of its own; hand each notification to the event loop.
        A lost connection is made again (logged once per outage); until then the polls
        carry on."""
        import psycopg

        conn: psycopg.Connection[Any] | None = None
        outage = False
        try:
            while not stop.is_set():
                if conn is None:
                    try:
                        conn = psycopg.connect(
                            self.fleet.db.dsn, autocommit=True, connect_timeout=2
                        )
                        for channel in _CHANNELS:
                            conn.execute(f"LISTEN {channel}".encode())
                    except psycopg.Error as exc:
                        if conn is not None:
                            conn.close()
                            conn = None
                        if not outage:
                            outage = True
                            _log.warning(
                                "fleet notifications lost: polling until the database is back",
                                host=self.host,
                                error=" ".join(str(exc).split()),
                            )
                        anyio.from_thread.run_sync(started)
                        stop.wait(LISTEN_TICK)
                        continue
                    if outage:
                        outage = False
                        _log.info("fleet notifications back", host=self.host)
                    # whatever happened meanwhile: everyone looks again
                    anyio.from_thread.run_sync(self._deliver, "", "")
                    anyio.from_thread.run_sync(started)
                try:
                    for note in conn.notifies(timeout=LISTEN_TICK):
                        anyio.from_thread.run_sync(self._deliver, note.channel, note.payload)
                        if stop.is_set():
                            break
                except psycopg.Error:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    def _deliver(self, channel: str, payload: str) -> None:
        """One notification, on the event loop ("" : the listener (re)connected)."""
        if channel == CMD_CHANNEL:
            if payload == self.host:
                self._cmd_wakeup.set()
        elif channel == REPLY_CHANNEL:
            try:
                waiter = self._replies.get(int(payload))
            except ValueError:
                return
            if waiter is not None:
                waiter.set()
        elif channel == JOBS_CHANNEL:
            try:
                job = uuid.UUID(payload.split(" ", 1)[0])
            except ValueError:
                return
            if job in self._watches:
                self._dirty.add(job)
                self._watch_wakeup.set()
        elif channel == HOSTS_CHANNEL:
            if self._watches:
                self._hosts_wakeup.set()
        else:
            self._cmd_wakeup.set()
            for waiter in self._replies.values():
                waiter.set()
            self._dirty.update(self._watches)
            self._watch_wakeup.set()
            self._hosts_wakeup.set()

    async def _serve(self, execute: Execute, tg: anyio.abc.TaskGroup) -> None:
        """Pick this host's pending commands as they are notified (and every
        POLL_INTERVAL), each run in a task of its own."""
        cleaned = 0.0
        outage = False
        while True:
            try:
                picked = await anyio.to_thread.run_sync(self._pick)
                now = time.monotonic()
                if now - cleaned >= CLEANUP_INTERVAL:
                    cleaned = now
                    await anyio.to_thread.run_sync(self._cleanup)
            except StoreError as exc:
                if not outage:
                    _log.warning("fleet commands cannot be read", host=self.host, error=str(exc))
                outage = True
                picked = []
            else:
                outage = False
            for cmd_id, job, verb, args in picked:
                tg.start_soon(self._answer, execute, cmd_id, job, verb, args)
            if len(picked) < MAX_PICK:
                await self._cmd_wakeup.wait(POLL_INTERVAL)

    async def _answer(
        self, execute: Execute, cmd_id: int, job: uuid.UUID, verb: str, args: tuple[Any, ...]
    ) -> None:
        result: str | None = None
        kind: str | None = None
        message: str | None = None
        try:
            if verb not in (HOST_VERBS if job == NO_JOB else VERBS):
                raise InvalidArgument(f"'{verb}' is not a verb another member may ask for")
            value = await execute(job, verb, args)
            try:
                result = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise JobError(f"internal error on host '{self.host}': {exc}") from None
        except JobError as exc:
            kind, message = _error_kind(exc), str(exc)
        except Exception as exc:
            _log.exception("fleet command failed", host=self.host, job=str(job), verb=verb)
            kind = "JobError"
            message = f"internal error on host '{self.host}': {type(exc).__name__}: {exc}"
        _log.debug("fleet command answered", job=str(job), verb=verb, error=kind)
        try:
            with anyio.CancelScope(shield=True):  # a verb that ran is answered
                await anyio.to_thread.run_sync(self._write_answer, cmd_id, result, kind, message)
        except StoreError as exc:
            _log.warning(
                "fleet command not answered: the database is unreachable",
                job=str(job),
                verb=verb,
                error=str(exc),
            )

    # ---- SQL (on worker threads, on the database's pool) --------------------------------

    def _sql(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        return self.fleet.run_sql(work, transaction=False)

    def _abandon_stale(self) -> None:
        """Commands a previous process of this host picked and never answered (it was
        killed): answered now, never run again (they may or may not have taken effect)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                rows = conn.execute(
                    b"UPDATE commands SET done = clock_timestamp(), error_kind = 'JobError',"
                    b" error = %s WHERE target = %s AND picked IS NOT NULL AND done IS NULL"
                    b" RETURNING id",
                    (
                        f"jobd on host '{self.host}' restarted while it ran this command: it "
                        "may or may not have taken effect; look at the job and ask again",
                        self.host,
                    ),
                ).fetchall()
                for (cmd_id,) in rows:
                    conn.execute(b"SELECT pg_notify(%s, %s)", (REPLY_CHANNEL, str(cmd_id)))

        self._sql(work)

    def _pick(self) -> list[_Picked]:
        """This host's pending commands, marked picked; those whose deadline passed are
        answered with an error instead (never run late)."""

        def work(conn: psycopg.Connection[Any]) -> list[_Picked]:
            with conn.transaction():
                rows = conn.execute(
                    b"SELECT id, job, verb, args, deadline <= clock_timestamp(),"
                    b" extract(epoch FROM clock_timestamp() - deadline) FROM commands"
                    b" WHERE target = %s AND done IS NULL AND picked IS NULL"
                    b" ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (self.host, MAX_PICK),
                ).fetchall()
                due: list[_Picked] = []
                for cmd_id, job, verb, args, expired, late in rows:
                    if expired:
                        conn.execute(
                            b"UPDATE commands SET picked = clock_timestamp(),"
                            b" done = clock_timestamp(), error_kind = 'OperationInvalid',"
                            b" error = %s WHERE id = %s",
                            (
                                f"'{verb}' on job '{job}' reached host '{self.host}' "
                                f"{float(late):.1f} s after its deadline: not run",
                                cmd_id,
                            ),
                        )
                        conn.execute(b"SELECT pg_notify(%s, %s)", (REPLY_CHANNEL, str(cmd_id)))
                        continue
                    try:
                        parsed = json.loads(args)
                        job_id = uuid.UUID(job)
                    except ValueError:
                        parsed, job_id = None, None
                    if not isinstance(parsed, list) or job_id is None:
                        conn.execute(
                            b"UPDATE commands SET picked = clock_timestamp(),"
                            b" done = clock_timestamp(), error_kind = 'InvalidArgument',"
                            b" error = %s WHERE id = %s",
                            (f"command {cmd_id} is malformed: not run", cmd_id),
                        )
                        conn.execute(b"SELECT pg_notify(%s, %s)", (REPLY_CHANNEL, str(cmd_id)))
                        continue
                    conn.execute(
                        b"UPDATE commands SET picked = clock_timestamp() WHERE id = %s", (cmd_id,)
                    )
                    due.append((cmd_id, job_id, verb, tuple(parsed)))
                return due

        found: list[_Picked] = self._sql(work)
        return found

    def _write_answer(
        self, cmd_id: int, result: str | None, kind: str | None, message: str | None
    ) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    b"UPDATE commands SET done = clock_timestamp(), result = %s,"
                    b" error_kind = %s, error = %s WHERE id = %s",
                    (result, kind, message, cmd_id),
                )
                conn.execute(b"SELECT pg_notify(%s, %s)", (REPLY_CHANNEL, str(cmd_id)))

        self._sql(work)

    def _cleanup(self) -> None:
        """Delete commands answered (or past their deadline) KEEP_ANSWERED s ago: their
        askers went away (a call takes its row as it reads the answer)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                b"DELETE FROM commands WHERE (done IS NOT NULL AND done < now() - %s * interval"
                b" '1 second') OR (done IS NULL AND deadline < now() - %s * interval '1 second')",
                (KEEP_ANSWERED, KEEP_ANSWERED),
            )

        self._sql(work)

    def _insert(
        self, target: str, job: uuid.UUID, verb: str, args: tuple[Any, ...], timeout: float
    ) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                row = conn.execute(
                    b"INSERT INTO commands (target, asker, job, verb, args, deadline)"
                    b" VALUES (%s, %s, %s, %s, %s, now() + %s * interval '1 second')"
                    b" RETURNING id",
                    (target, self.host, str(job), verb, json.dumps(list(args)), timeout),
                ).fetchone()
                assert row is not None
                conn.execute(b"SELECT pg_notify(%s, %s)", (CMD_CHANNEL, target))
                return int(row[0])

        cmd_id: int = self._sql(work)
        return cmd_id

    def _take_answer(self, cmd_id: int) -> tuple[bool, str | None, str | None, str | None]:
        """(answered, result, error kind, error); an answered row is deleted."""

        def work(conn: psycopg.Connection[Any]) -> tuple[bool, Any, Any, Any]:
            row = conn.execute(
                b"DELETE FROM commands WHERE id = %s AND done IS NOT NULL"
                b" RETURNING result, error_kind, error",
                (cmd_id,),
            ).fetchone()
            return (False, None, None, None) if row is None else (True, *row)

        answer: tuple[bool, str | None, str | None, str | None] = self._sql(work)
        return answer

    def _withdraw(self, cmd_id: int) -> bool:
        """Take back a command its owner has not picked yet (True), else leave it to be
        answered and cleaned up."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(
                b"DELETE FROM commands WHERE id = %s AND picked IS NULL RETURNING id", (cmd_id,)
            ).fetchone()
            return row is not None

        withdrawn: bool = self._sql(work)
        return withdrawn

    # ---- the asker's side ---------------------------------------------------------------

    async def call(
        self,
        job: uuid.UUID,
        verb: str,
        args: tuple[Any, ...] = (),
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> Any:
        """The job's owner runs ``verb(*args)`` on it: its (JSON-able) result, or the
        owner's JobError (same class and message). Refused at once when the owner is not
        live; OperationInvalid naming the host and the seconds if it did not answer
        within ``timeout``."""
        if verb not in VERBS:
            raise InvalidArgument(
                f"'{verb}' is not a verb another member may ask for ({', '.join(sorted(VERBS))})"
            )
        _check_timeout(timeout)
        remote = await self.fleet.job(job)
        if remote is None:
            raise NoSuchJob(f"no job with UUID '{job}' in the fleet")
        owner = remote.info.host
        if owner != self.host and remote.host_state is not HostState.LIVE:
            info = await self.host_info(owner)
            raise OperationInvalid(refusal(job, owner, info), job=job, verb=verb)
        return await self._ask(owner, job, verb, args, timeout)

    async def call_host(
        self, host: str, verb: str, args: tuple[Any, ...] = (), *, timeout: float = CALL_TIMEOUT
    ) -> Any:
        """Member ``host`` itself runs ``verb(*args)`` (one of HOST_VERBS): its result or
        its JobError, as ``call``. Refused at once when it is not live."""
        if verb not in HOST_VERBS:
            raise InvalidArgument(f"'{verb}' is not a command another member may run")
        _check_timeout(timeout)
        if host != self.host and await self.fleet.host_state(host) is not HostState.LIVE:
            raise OperationInvalid(
                f"host '{host}' is not a live member of the fleet: it cannot run '{verb}' now"
            )
        return await self._ask(host, NO_JOB, verb, args, timeout)

    async def _ask(
        self, owner: str, job: uuid.UUID, verb: str, args: tuple[Any, ...], timeout: float
    ) -> Any:
        """Insert the command for ``owner`` and wait for its answer (``call``'s rest)."""
        cmd_id = await anyio.to_thread.run_sync(self._insert, owner, job, verb, args, timeout)
        answered = False
        try:
            with anyio.move_on_after(timeout):
                checked = time.monotonic()
                while True:
                    waiter = self._replies[cmd_id] = anyio.Event()
                    with anyio.CancelScope(shield=True):  # an answer taken is not dropped
                        answered, result, kind, message = await anyio.to_thread.run_sync(
                            self._take_answer, cmd_id
                        )
                    if answered:
                        break
                    now = time.monotonic()
                    if owner != self.host and now - checked >= self._check_every and job != NO_JOB:
                        checked = now  # an owner lost meanwhile: no use waiting for it
                        await self._require_live(job, owner, verb, pending=cmd_id)
                    with anyio.move_on_after(REPLY_POLL):
                        await waiter.wait()
        finally:
            self._replies.pop(cmd_id, None)
            if not answered:
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(StoreError):  # else the clean-up deletes it
                        await anyio.to_thread.run_sync(self._withdraw, cmd_id)
        if not answered:
            raise OperationInvalid(
                f"host '{owner}' did not answer '{verb}'"
                + ("" if job == NO_JOB else f" on job '{job}'")
                + f" within {timeout:g} s "
                "(its jobd may be stuck, or its database connection slow): the command was "
                "withdrawn if it had not been picked up; look at the job and ask again",
                job=job,
                verb=verb,
            )
        if kind is not None:
            raise _rebuild(kind, message or "", job, verb)
        return None if result is None else json.loads(result)

    @property
    def _check_every(self) -> float:
        return max(self.fleet.lease_ttl / 2, REPLY_POLL)

    async def _require_live(
        self, job: uuid.UUID, owner: str, verb: str, *, pending: int | None = None
    ) -> None:
        """OperationInvalid unless ``owner`` is live; ``pending``: the command waiting for
        it, taken back if the owner has not picked it up."""
        if await self.fleet.host_state(owner) is HostState.LIVE:
            return
        why = refusal(job, owner, await self.host_info(owner))
        if pending is not None and not await anyio.to_thread.run_sync(self._withdraw, pending):
            why += f"; it had picked up '{verb}', which may or may not have taken effect"
        raise OperationInvalid(why, job=job, verb=verb)

    async def host_info(self, name: str) -> HostInfo | None:
        """The member ``name`` (None: not a member); only when a refusal names it (it
        counts every member's jobs)."""
        for info in await self.fleet.hosts():
            if info.name == name:
                return info
        return None

    # ---- events of other hosts' jobs ----------------------------------------------------

    def watch(self, job: uuid.UUID, hub: EventHub, *, since: int | None = None) -> WatchHandle:
        """Events of another host's job into ``hub`` (``hub.emit``): STATE and FINAL as
        its row changes, HOST_LOST when its host's lease expires. ``since``: the last
        event number the watcher knows (None: the row's number when it is first read);
        nothing comes for a job of this host (its engine emits those). Returns the
        function that ends the watch (a ``WatchHandle``)."""
        watch = _Watch(job, hub, since)
        self._watches.setdefault(job, []).append(watch)
        self._look_again(job)
        return WatchHandle(self, watch)

    def _look_again(self, job: uuid.UUID) -> None:
        self._dirty.add(job)
        self._watch_wakeup.set()

    def _unwatch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.job)
        if watches is not None and watch in watches:
            watches.remove(watch)
            if not watches:
                del self._watches[watch.job]

    @property
    def watching(self) -> int:
        """Live watches (for tests: none stays once their subscriptions ended)."""
        return sum(map(len, self._watches.values()))

    async def _watch_loop(self) -> None:
        while True:  # (rows that could not be read are read again after POLL_INTERVAL)
            await self._watch_wakeup.wait(POLL_INTERVAL if self._dirty else None)
            jobs, self._dirty = self._dirty, set()
            for job in jobs:
                if job not in self._watches:
                    continue
                try:
                    remote = await self.fleet.job(job)
                except StoreError:
                    self._dirty.add(job)  # read again once the database is back
                    continue
                for watch in list(self._watches.get(job, ())):
                    self._apply(watch, remote)

    def _apply(self, watch: _Watch, remote: RemoteJob | None) -> None:
        """The events ``watch`` gets from its job's row as it is now."""
        if remote is None or watch.ended:
            return
        info = remote.info
        if info.host == self.host:
            return
        watch.host, watch.type, watch.domain = info.host, str(info.type), info.domain
        watch.processed, watch.total = info.processed, info.total
        n = remote.event_seq
        if watch.seen is None:
            watch.seen, watch.state = n, info.state
            watch.ended = info.state.terminal
            return
        if n <= watch.seen:
            if watch.state is None:  # what the watcher knew (``since``) is the row's state
                watch.state = info.state
            return
        seen = watch.seen

        def event(kind: EventKind, seq: int, stats: Any = None) -> JobEvent:
            return JobEvent(
                kind,
                info.uuid,
                str(info.type),
                info.domain,
                info.state,
                None if kind is EventKind.FINAL else watch.state,
                info.processed,
                info.total,
                time.time(),
                stats,
                max(0, seq - seen - 1) if seen else 0,
                seq,
            )

        if info.state.terminal:
            if n - 1 > seen:
                watch.hub.emit(event(EventKind.STATE, n - 1))
                seen = n - 1
            watch.hub.emit(event(EventKind.FINAL, n, dict(remote.stats)))
            watch.ended = True
        else:
            watch.hub.emit(event(EventKind.STATE, n))
        watch.seen, watch.state = n, info.state

    async def _host_loop(self) -> None:
        """While watches exist: their hosts' leases, every lease_ttl/2 (and at each
        notification of a host); a job whose host is no longer live gets HOST_LOST once
        (again after its host was back)."""
        while True:
            await self._hosts_wakeup.wait(self.fleet.lease_ttl / 2)
            if not self._watches:
                continue
            names = {w.host for ws in self._watches.values() for w in ws if w.host is not None}
            try:
                states = {name: await self.fleet.host_state(name) for name in sorted(names)}
            except StoreError:
                continue
            for watches in list(self._watches.values()):
                for watch in watches:
                    if watch.host not in states or watch.ended or watch.state is None:
                        continue  # (a watch that began meanwhile: at the next look)
                    live = states[watch.host] is HostState.LIVE
                    if not live and not watch.lost_reported and watch.state.active:
                        watch.lost_reported = True
                        watch.hub.emit(
                            JobEvent(
                                EventKind.HOST_LOST,
                                watch.job,
                                watch.type,
                                watch.domain,
                                watch.state,
                                watch.state,
                                watch.processed,
                                watch.total,
                                time.time(),
                            )
                        )
                    elif live and watch.lost_reported:
                        watch.lost_reported = False
                        self._dirty.add(watch.job)
                        self._watch_wakeup.set()


def refusal(job: uuid.UUID, owner: str, host: HostInfo | None) -> str:
    """Why a verb on ``job`` cannot reach its owner now."""
    if host is None:
        return f"job '{job}' is on host '{owner}', which is not a member of the fleet"
    if host.state is HostState.FENCED:
        return (
            f"job '{job}' is on host '{owner}', which was fenced by '{host.fenced_by}': its "
            "jobs were failed; it runs none until it rejoins"
        )
    return (
        f"job '{job}' is on host '{owner}', which is {host.state} (lease "
        f"{host.lease_age:.0f} s old): wait for it to return, or fence it "
        f"(jobctl host fence {owner})"
    )


def _error_kind(exc: JobError) -> str:
    """The class name another member re-raises: the nearest jobcore class in the MRO (a
    driver's own subclass travels as its jobcore base, as over jobd's wire)."""
    for cls in type(exc).__mro__:
        if getattr(errors, cls.__name__, None) is cls:
            return str(cls.__name__)
    return "JobError"


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not (
        isinstance(timeout, int | float) and 0 < timeout <= MAX_SECONDS
    ):
        raise InvalidArgument(
            f"a fleet call's timeout is a number of seconds in 0…{MAX_SECONDS:g}, not {timeout!r}"
        )


def _rebuild(kind: str, message: str, job: uuid.UUID, verb: str) -> JobError:
    """The owner's error as the asker raises it: the class of that name in
    jobcore.errors (JobError for a name it does not have)."""
    cls = getattr(errors, kind, None)
    if not isinstance(cls, type) or not issubclass(cls, JobError):
        return JobError(message)
    if cls is OperationInvalid:
        return OperationInvalid(message, job=job, verb=verb)
    try:
        return cls(message)
    except TypeError:  # a class with required fields (JobConflict): its base
        return JobError(message)
