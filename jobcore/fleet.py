"""A fleet: the jobd members sharing one PostgreSQL database (design/fleet.md).

``Fleet`` is one member's side of it: its lease (a ``hosts`` row renewed every ttl/4, ages
by the database server's clock), the fleet-wide reads (any host's job rows, the members),
and fencing a lost member (its shared claims released, its active jobs failed). The
shared-storage claims themselves are taken by ``PostgresDatabase.commit`` in the
transaction of each job's insert (jobcore.store_pg). Every method runs its SQL off the
event loop, on the database's pool, and raises StoreError when it is unreachable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.abc
from attrs import frozen

from jobcore.driver import FleetPeers
from jobcore.errors import InvalidArgument, JobError, OperationInvalid, StoreError
from jobcore.info import HostInfo, HostState, JobInfo, job_stats
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.registry import registry
from jobcore.spec import JobType
from jobcore.store_pg import (
    CONNECT_TIMEOUT,
    PostgresDatabase,
    SharedRoot,
    parse_shared_root,
    shared_resource,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "LEASE_TTL",
    "Fleet",
    "FleetView",
    "RemoteJob",
    "SharedRoot",
    "parse_shared_root",
    "shared_resource",
]

_log = get_logger("jobcore.fleet")

#: seconds a lease lasts unless renewed (default); a member renews it every ttl/4
LEASE_TTL = 10.0

_ACTIVE = [str(s) for s in JobState if s.active]
#: a hosts row with its state's inputs, by the server's clock
_HOST_COLUMNS = (
    "h.host, h.pid, h.lease_ttl, extract(epoch FROM clock_timestamp() - h.renewed),"
    " h.left_at IS NOT NULL, h.fenced_at IS NOT NULL, h.fenced_by, h.fence_reason"
)
_HOSTS = (
    f"SELECT {_HOST_COLUMNS},"
    " (SELECT count(*) FROM jobs j WHERE j.host = h.host AND j.state = ANY(%s)),"
    " (SELECT count(*) FROM jobs j WHERE j.host = h.host) FROM hosts h"
)
_JOB_COLUMNS = (
    "j.uuid, j.type, j.domain, j.state, j.processed, j.total, j.created, j.started,"
    " j.ended, j.elapsed, j.errmsg, j.bandwidth, j.host, j.stats, j.event_seq,"
    " extract(epoch FROM clock_timestamp())"
)
_JOBS_FROM = "FROM jobs j"
#: a job's row with its host's lease (the host's columns NULL when it is no member)
_JOB_WITH_HOST = (
    f"SELECT {_JOB_COLUMNS}, j.xml, extract(epoch FROM clock_timestamp() - h.renewed),"
    " h.lease_ttl, h.left_at IS NOT NULL, h.fenced_at IS NOT NULL"
    f" {_JOBS_FROM} LEFT JOIN hosts h ON h.host = j.host WHERE j.uuid = %s"
).encode()

_T = TypeVar("_T")


@frozen
class RemoteJob:
    """One job row as another member reads it."""

    info: JobInfo  # host_lost set
    xml: str  # the stored job XML
    stats: Mapping[str, Any]  # the stored stats merged as Engine.stats gives them
    event_seq: int
    host_state: HostState | None  # None: its host is not a member (never joined)


class FleetView(Protocol):
    """What a connection's fleet calls need (jobcore.daemon.fleet.FleetService has it)."""

    @property
    def host(self) -> str: ...

    async def hosts(self) -> list[HostInfo]: ...

    async def fence(self, name: str, reason: str | None, *, force: bool = False) -> HostInfo: ...

    async def jobs_page(self, after: int, limit: int) -> tuple[list[JobInfo], int | None]: ...

    def peers(self) -> FleetPeers:
        """What this member's driver connections get as ``fleet_peers``."""
        ...


def _host_state(left: bool, fenced: bool, age: float, ttl: float) -> HostState:
    if fenced:
        return HostState.FENCED
    if left:
        return HostState.STOPPED
    return HostState.LOST if age > ttl else HostState.LIVE


def _host_info(row: tuple[Any, ...]) -> HostInfo:
    name, pid, ttl, age, left, fenced, by, reason, active, jobs = row
    age = max(0.0, float(age))
    return HostInfo(
        name=name,
        state=_host_state(left, fenced, age, ttl),
        lease_age=age,
        lease_ttl=float(ttl),
        active_jobs=int(active),
        jobs=int(jobs),
        pid=int(pid),
        fenced_by=by,
        fence_reason=reason,
    )


def _fenced_message(name: str, by: str | None, reason: str | None) -> str:
    return f"host '{name}' was fenced by '{by}'" + ("" if reason is None else f": {reason}")


class Fleet:
    """One member of a fleet (jobd's, when its store is PostgreSQL): see the module."""

    def __init__(
        self,
        db: PostgresDatabase,
        *,
        lease_ttl: float = LEASE_TTL,
        shared_roots: tuple[SharedRoot, ...] = (),
    ) -> None:
        if not (isinstance(lease_ttl, int | float) and math.isfinite(lease_ttl) and lease_ttl > 0):
            raise InvalidArgument(f"invalid lease ttl {lease_ttl!r}: give a positive number")
        assert db.host is not None
        self.db = db
        self.host: str = db.host
        self.lease_ttl = float(lease_ttl)
        self.shared_roots = tuple(shared_roots)
        db.shared_roots = self.shared_roots

    # ---- SQL on the pool ------------------------------------------------------------

    def run_sql(
        self, work: Callable[[psycopg.Connection[Any]], _T], *, transaction: bool = True
    ) -> _T:
        """``work`` on a pooled connection, in one transaction unless told otherwise
        (blocking); StoreError when the database cannot be reached."""
        import psycopg

        try:
            with self.db.pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                if not transaction:
                    return work(conn)
                with conn.transaction():
                    return work(conn)
        except JobError:
            raise
        except (psycopg.Error, OSError) as exc:
            raise StoreError(
                f"the job store '{self.db.path}' is unreachable or failed ({_said(exc)})"
            ) from None
        except Exception as exc:  # the pool's timeout
            if type(exc).__name__ != "PoolTimeout":
                raise
            raise StoreError(
                f"the job store '{self.db.path}' is unreachable (no connection within "
                f"{CONNECT_TIMEOUT:.0f} s)"
            ) from None

    async def _call(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(self.run_sql, work))

    # ---- membership -----------------------------------------------------------------

    def join(self) -> str | None:
        """Upsert this member's hosts row (a fresh lease; left and fenced marks cleared)
        and reconcile its claims (those of jobs not active in its rows are dropped).
        Blocking. Returns a warning if it had been fenced, else None."""

        def work(conn: psycopg.Connection[Any]) -> str | None:
            before = conn.execute(
                "SELECT fenced_at, fenced_by, fence_reason FROM hosts WHERE host = %s FOR UPDATE",
                (self.host,),
            ).fetchone()
            conn.execute(
                "INSERT INTO hosts (host, pid, joined, renewed, lease_ttl)"
                " VALUES (%s, %s, clock_timestamp(), clock_timestamp(), %s)"
                " ON CONFLICT (host) DO UPDATE SET pid = excluded.pid, joined = excluded.joined,"
                " renewed = excluded.renewed, lease_ttl = excluded.lease_ttl, left_at = NULL,"
                " fenced_at = NULL, fenced_by = NULL, fence_reason = NULL",
                (self.host, os.getpid(), self.lease_ttl),
            )
            stale = conn.execute(
                "DELETE FROM claims c WHERE c.host = %s AND NOT EXISTS (SELECT 1 FROM jobs j"
                " WHERE j.uuid = c.job AND j.host = c.host AND j.state = ANY(%s))",
                (self.host, _ACTIVE),
            ).rowcount
            conn.execute("SELECT pg_notify('jobcore_hosts', %s)", (self.host,))
            if stale:
                _log.info("stale shared claims dropped at join", host=self.host, claims=stale)
            if before is None or before[0] is None:
                return None
            return (
                f"{_fenced_message(self.host, before[1], before[2])} (at {before[0]}): its "
                "shared claims were released and its active jobs failed; it rejoins the "
                "fleet now"
            )

        return self.run_sql(work)

    def leave(self) -> None:
        """Mark this member's lease left (a clean stop). Blocking."""

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE hosts SET left_at = clock_timestamp()"
                " WHERE host = %s AND fenced_at IS NULL",
                (self.host,),
            )
            conn.execute("SELECT pg_notify('jobcore_hosts', %s)", (self.host,))

        self.run_sql(work)

    def _renew(self) -> str | None:
        """Renew the lease; the fence message if this member was fenced."""

        def work(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(
                "UPDATE hosts SET renewed = CASE WHEN fenced_at IS NULL THEN clock_timestamp()"
                " ELSE renewed END, left_at = NULL WHERE host = %s"
                " RETURNING fenced_at, fenced_by, fence_reason",
                (self.host,),
            ).fetchone()
            if row is None:  # its row was removed by hand: join again
                conn.execute(
                    "INSERT INTO hosts (host, pid, joined, renewed, lease_ttl) VALUES"
                    " (%s, %s, clock_timestamp(), clock_timestamp(), %s)",
                    (self.host, os.getpid(), self.lease_ttl),
                )
                return None
            if row[0] is None:
                return None
            return _fenced_message(self.host, row[1], row[2])

        return self.run_sql(work)

    async def run(
        self,
        *,
        on_fenced: Callable[[str], None],
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew the lease every ttl/4 until cancelled; once this member is found fenced,
        call ``on_fenced(message)`` once and return. A renewal that fails is retried at
        the next tick (logged once per outage)."""
        task_status.started()
        failing = False
        while True:
            try:
                fenced = await anyio.to_thread.run_sync(self._renew)
            except StoreError as exc:
                if not failing:
                    _log.error(
                        "fleet lease renewal failed: retried", host=self.host, error=str(exc)
                    )
                failing = True
            else:
                if failing:
                    _log.info("fleet lease renewed again", host=self.host)
                failing = False
                if fenced is not None:
                    _log.error("this member was fenced", host=self.host, message=fenced)
                    on_fenced(fenced)
                    return
            await anyio.sleep(self.lease_ttl / 4)

    # ---- the members ------------------------------------------------------------------

    async def hosts(self) -> list[HostInfo]:
        """Every member, by name."""

        def work(conn: psycopg.Connection[Any]) -> list[HostInfo]:
            rows = conn.execute((_HOSTS + " ORDER BY h.host").encode(), (_ACTIVE,)).fetchall()
            return [_host_info(r) for r in rows]

        return await self._call(work)

    async def host_state(self, name: str) -> HostState | None:
        """A member's state (None: not a member)."""

        def work(conn: psycopg.Connection[Any]) -> HostState | None:
            return _states(conn, [name]).get(name)

        return await self._call(work)

    async def fence(self, name: str, reason: str | None, *, force: bool = False) -> HostInfo:
        """Fence a lost member, in one transaction: its shared claims released, its
        active jobs failed with the reason (event_seq + 2: the terminal STATE event and
        the FINAL one, as a member numbers its own end; notified). Refused for this
        member itself or a name that is no member (InvalidArgument), and for a LIVE one
        unless ``force`` (OperationInvalid). The operator makes sure the host is down."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument("fence needs a host name")
        if name == self.host:
            raise InvalidArgument(
                f"host '{name}' is this member: a member cannot fence itself (stop its jobd)"
            )
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgument("a fence reason is a text")

        def work(conn: psycopg.Connection[Any]) -> HostInfo:
            row = conn.execute(
                f"SELECT {_HOST_COLUMNS} FROM hosts h WHERE h.host = %s FOR UPDATE".encode(),
                (name,),
            ).fetchone()
            if row is None:
                raise InvalidArgument(f"host '{name}' is not a member of the fleet")
            _, _, ttl, age, left, fenced, _, _ = row
            state = _host_state(left, fenced, float(age), ttl)
            if state is HostState.LIVE and not force:
                raise OperationInvalid(
                    f"host '{name}' is live (its lease was renewed {float(age):.1f} s ago): "
                    "fence only a host that is down (power it off first), or pass --force"
                )
            conn.execute(
                "UPDATE hosts SET fenced_at = clock_timestamp(), fenced_by = %s,"
                " fence_reason = %s WHERE host = %s",
                (self.host, reason, name),
            )
            conn.execute("DELETE FROM claims WHERE host = %s", (name,))
            why = _fenced_message(name, self.host, reason)
            failed = conn.execute(
                "UPDATE jobs SET state = 'failed', errmsg = %s,"
                " ended = extract(epoch FROM clock_timestamp()),"
                " elapsed = extract(epoch FROM clock_timestamp()) - created,"
                " expires = extract(epoch FROM clock_timestamp()) + retention,"
                " event_seq = event_seq + 2 WHERE host = %s AND state = ANY(%s)"
                " RETURNING uuid, event_seq",
                (why, name, _ACTIVE),
            ).fetchall()
            notes = [f"{job} {name} {seq}" for job, seq in failed]
            if notes:
                conn.execute(
                    "SELECT pg_notify('jobcore_jobs', p) FROM unnest(%s::text[]) AS p", (notes,)
                )
            conn.execute("SELECT pg_notify('jobcore_hosts', %s)", (name,))
            _log.warning(
                "host fenced", host=name, by=self.host, reason=reason, jobs_failed=len(failed)
            )
            after = conn.execute(
                (_HOSTS + " WHERE h.host = %s").encode(), (_ACTIVE, name)
            ).fetchone()
            assert after is not None
            return _host_info(after)

        return await self._call(work)

    # ---- every host's jobs ------------------------------------------------------------

    async def job(self, job: uuid.UUID) -> RemoteJob | None:
        """The job's row, whichever host owns it (None: no such row)."""

        def work(conn: psycopg.Connection[Any]) -> RemoteJob | None:
            row = conn.execute(_JOB_WITH_HOST, (str(job),)).fetchone()
            if row is None:
                return None
            age, ttl, left, fenced = row[17:]
            state = None if ttl is None else _host_state(left, fenced, float(age), ttl)
            info = self._info(row, state)
            return RemoteJob(info, row[16], _stats(info, row[13]), int(row[14]), state)

        # one statement, one snapshot: no transaction of its own (a round trip less each
        # way; the lookup benchmark of design/fleet.md measures it)
        return await anyio.to_thread.run_sync(
            functools.partial(self.run_sql, work, transaction=False)
        )

    async def jobs_page(self, after: int, limit: int) -> tuple[list[JobInfo], int | None]:
        """Every host's jobs in begin order after cursor ``after`` (-1: the start), at most
        ``limit``, and the cursor of the next page (None: this was the last)."""
        if limit < 1:
            raise InvalidArgument("a page holds at least one job")

        def work(conn: psycopg.Connection[Any]) -> tuple[list[JobInfo], int | None]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS}, j.seq {_JOBS_FROM} WHERE j.seq > %s"
                " ORDER BY j.seq LIMIT %s".encode(),
                (after, limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            states = _states(conn, sorted({r[12] for r in rows}))
            infos = [self._info(r, states.get(r[12])) for r in rows]
            return infos, (int(rows[-1][16]) if more else None)

        return await self._call(work)

    async def find_prefix(self, digits: str, limit: int) -> list[JobInfo]:
        """Up to ``limit`` jobs of any host whose UUID's hex digits start with ``digits``
        (1 to 32, any case), in UUID order."""
        if not 1 <= len(digits) <= 32 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise InvalidArgument(f"invalid UUID prefix '{digits}': give 1 to 32 hex digits")
        lower = digits.lower()
        # the digits as the start of the UUID's text (dashes after digits 8, 12, 16, 20)
        prefix = "-".join(
            lower[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)) if lower[a:b]
        )
        if len(lower) in (8, 12, 16, 20):
            prefix += "-"

        def work(conn: psycopg.Connection[Any]) -> list[JobInfo]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} {_JOBS_FROM} WHERE j.uuid LIKE %s"
                ' ORDER BY j.uuid COLLATE "C" LIMIT %s'.encode(),
                (prefix + "%", limit),
            ).fetchall()
            states = _states(conn, sorted({r[12] for r in rows}))
            return [self._info(r, states.get(r[12])) for r in rows]

        return await self._call(work)

    def _info(self, row: tuple[Any, ...], host_state: HostState | None) -> JobInfo:
        (job_s, type_s, domain, state_s, processed, total, created, started, ended, elapsed,
         errmsg, bandwidth, host, _stats_s, _seq, now) = row[:16]  # fmt: skip
        state = JobState(state_s)
        if state.terminal and elapsed is not None:
            millis = elapsed * 1000
        else:
            millis = (float(now) - created) * 1000
        return JobInfo(
            uuid=uuid.UUID(job_s),
            type=JobType(type_s),
            domain=domain,
            state=state,
            processed=int(processed),
            total=int(total),
            time_elapsed=max(0, math.floor(millis)),
            created=created,
            started=started,
            ended=ended,
            errmsg=errmsg,
            bandwidth=bandwidth,
            host=host,
            host_lost=state.active and host != self.host and host_state is not HostState.LIVE,
        )


def _states(conn: psycopg.Connection[Any], names: list[str]) -> dict[str, HostState]:
    """The states of the named members (those that are members)."""
    if not names:
        return {}
    rows = conn.execute(
        "SELECT host, extract(epoch FROM clock_timestamp() - renewed), lease_ttl,"
        " left_at IS NOT NULL, fenced_at IS NOT NULL FROM hosts WHERE host = ANY(%s)",
        (names,),
    ).fetchall()
    return {
        name: _host_state(left, fenced, float(age), ttl) for name, age, ttl, left, fenced in rows
    }


def _stats(info: JobInfo, stats_s: str) -> dict[str, Any]:
    """The job's stats as ``Engine.stats`` gives them, from its row."""
    try:
        type_info = registry.get(info.type)
        operation, prefix = type_info.operation, type_info.progress_keys
    except JobError:  # a type this member does not have
        operation, prefix = 0, "disk"
    return job_stats(info, operation, prefix, json.loads(stats_s))


def _said(exc: BaseException) -> str:
    return " ".join(str(exc).split())
