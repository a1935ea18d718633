"""The durable job store: SQLite (stdlib ``sqlite3``, WAL), behind ``JobStore``.

Reads come from memory: ``SQLiteJobStore`` is a ``MemoryJobStore`` whose changes are also
written to a database file. Writes are queued on the event loop (cheap, synchronous) and
committed in batches, one transaction per batch, on a worker thread; the engine awaits a
write's commit at the durability points (design/store.md):

- a job's row is committed before ``JobBegin`` returns (and before the driver starts it);
- each state change is committed before its event is emitted (``defer``: callbacks run
  in order once everything queued before them is committed);
- final stats are written with the terminal state;
- progress is written at most every ``PROGRESS_INTERVAL`` seconds per job.

One database file serves every driver connection of a process (jobd's connections share
``RUN_DIR/jobs.sqlite``): each connection's jobs carry its ``scope`` (the driver URI without
its query), and a scope is served by one connection at a time. The file is locked against
other processes (``flock`` on ``PATH.lock``) for as long as it is open.
"""

from __future__ import annotations

import errno
import json
import math
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from attrs import frozen

from jobcore.errors import InvalidArgument, JobError, StoreError
from jobcore.filelock import FileLock, LockHeld
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.registry import registry
from jobcore.scheduler import Claim, Mode
from jobcore.store import (
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_PER_DOMAIN,
    JobRecord,
    MemoryJobStore,
)

if TYPE_CHECKING:
    from jobcore.driver import Clock
    from jobcore.scheduler import Ticket

_log = get_logger("jobcore.store")

#: seconds between two progress writes of one job (state changes are written at once)
PROGRESS_INTERVAL = 2.0
#: seconds a write nobody waits for (a purge, a progress tick) may wait for a batch
FLUSH_DELAY = 0.25
#: seconds between retries of a batch that could not be committed (full disk, I/O error)
RETRY_INTERVAL = 1.0
#: errmsg presented for a job that was active in the store when it was opened: recovery
#: (re-attaching drivers) is not built yet, so nothing knows how it ended
UNRECOVERED = "jobd restarted without recovery for this driver: the job's outcome is unknown"

#: schema version -> the statements that bring a database from the previous version to it
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        1,
        (
            """CREATE TABLE jobs (
                uuid TEXT PRIMARY KEY,
                scope TEXT NOT NULL,
                type TEXT NOT NULL,
                domain TEXT NOT NULL,
                host TEXT,
                state TEXT NOT NULL,
                xml TEXT NOT NULL,
                claims TEXT NOT NULL,
                priority INTEGER NOT NULL DEFAULT 0,
                created REAL NOT NULL,
                started REAL,
                ended REAL,
                processed INTEGER NOT NULL DEFAULT 0,
                total INTEGER NOT NULL DEFAULT 0,
                stats TEXT NOT NULL DEFAULT '{}',
                errmsg TEXT,
                bandwidth INTEGER,
                retention REAL NOT NULL,
                expires REAL,
                event_seq INTEGER NOT NULL DEFAULT 0,
                started_after REAL,
                elapsed REAL
            )""",
            "CREATE INDEX jobs_scope ON jobs (scope)",
        ),
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@frozen
class StoreURL:
    kind: str  # 'memory' or 'sqlite'
    path: Path | None = None
    synchronous: str = "FULL"


def parse_store_url(url: str) -> StoreURL:
    """``memory:`` or ``sqlite:///ABS/PATH[?synchronous=full|normal]``."""
    if not isinstance(url, str):
        raise InvalidArgument(
            f"invalid job store URL {url!r}: use 'memory:' or 'sqlite:///ABS/PATH'"
        )
    if url == "memory:":
        return StoreURL("memory")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "sqlite" or not url.startswith("sqlite://"):
        raise InvalidArgument(
            f"invalid job store URL '{url}': use 'memory:' or 'sqlite:///ABS/PATH'"
        )
    if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
        raise InvalidArgument(
            f"invalid job store URL '{url}': the file must be an absolute path after "
            "'sqlite://' (three slashes: 'sqlite:///var/lib/jobs.sqlite')"
        )
    synchronous = "FULL"
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key != "synchronous" or value.upper() not in ("FULL", "NORMAL"):
            raise InvalidArgument(
                f"invalid job store URL '{url}': the only parameter is synchronous=full|normal"
            )
        synchronous = value.upper()
    return StoreURL("sqlite", Path(urllib.parse.unquote(parts.path)), synchronous)


# ---- the database file ----------------------------------------------------------------

_databases: dict[Path, SQLiteDatabase] = {}
_databases_lock = threading.Lock()


def open_database(path: Path, synchronous: str = "FULL") -> SQLiteDatabase:
    """The open database at ``path`` (shared within the process; ``release`` it)."""
    key = path.absolute()
    with _databases_lock:
        db = _databases.get(key)
        if db is None:
            db = _databases[key] = SQLiteDatabase(key, synchronous)
        db.refs += 1
        return db


class SQLiteDatabase:
    """One SQLite file: its lock, its connection (used by one thread at a time), its
    schema. Opening checks everything and raises StoreError naming the file."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        self.refs = 0
        self.scopes: set[str] = set()
        #: serialises use of ``conn`` (worker threads, maybe of several event loops)
        self.lock = threading.Lock()
        self._file_lock = self._take_lock()
        try:
            self.conn = self._connect(synchronous)
        except BaseException:
            self._file_lock.release()
            raise

    def _take_lock(self) -> FileLock:
        lock = FileLock(Path(f"{self.path}.lock"), follow_symlinks=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except LockHeld:
            raise StoreError(
                f"the job store '{self.path}' is in use by another process (it holds "
                f"'{lock.path}'): stop it, or give this one another store"
            ) from None
        except OSError as exc:
            raise StoreError(
                f"cannot open the job store '{self.path}': {exc.strerror} ({lock.path})"
            ) from None
        return lock

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        what = f"the job store '{self.path}'"
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0.5
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {what}: {exc}") from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{what} has schema version {version}, newer than this jobcore's "
                    f"({SCHEMA_VERSION}): run the jobcore that wrote it, or give this one "
                    "another store"
                )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{what} cannot use WAL journaling (got '{mode}')")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(
                    f"{what} is corrupt ({check}): move it away to start afresh, or restore "
                    "a backup"
                )
            self._migrate(conn, version)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"{what} is corrupt or not a job store ({exc}): move it away to start "
                "afresh, or restore a backup"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"'{self.path}' is an SQLite database but not a job store (it has tables "
                "and no schema version): name another file"
            )
        for target, statements in MIGRATIONS:
            if target <= version:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql in statements:
                    conn.execute(sql)
                conn.execute(f"PRAGMA user_version={target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            _log.info("job store schema migrated", path=str(self.path), version=target)

    def claim(self, scope: str) -> None:
        with _databases_lock:
            if scope in self.scopes:
                raise StoreError(
                    f"the job store '{self.path}' already serves a connection to '{scope}': "
                    "close it first, or give this one another store"
                )
            self.scopes.add(scope)

    def unclaim(self, scope: str) -> None:
        with _databases_lock:
            self.scopes.discard(scope)

    def release(self, scope: str | None = None) -> None:
        with _databases_lock:
            if scope is not None:
                self.scopes.discard(scope)
            self.refs -= 1
            if self.refs > 0:
                return
            _databases.pop(self.path, None)
        with self.lock:
            try:
                self.conn.close()
            finally:
                self._file_lock.release()

    def load(self, scope: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(
                "SELECT uuid, type, domain, state, xml, claims, priority, created, started,"
                " ended, processed, total, stats, errmsg, bandwidth, retention, expires,"
                " event_seq, started_after, elapsed FROM jobs WHERE scope = ? ORDER BY rowid",
                (scope,),
            ).fetchall()

    def commit(self, ops: list[Op]) -> None:
        """Run ``ops`` in one transaction (on a worker thread); raises what sqlite raised."""
        with self.lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in ops:
                    op(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


Op = Callable[[sqlite3.Connection], None]


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _parse_row_spec(path: Path, row: tuple[Any, ...]) -> Any:
    """The spec of a loaded row (parsed when the store opens, off the event loop)."""
    from jobcore.xml import parse_job

    try:
        registry.get(row[1])
        return parse_job(row[4])
    except JobError as exc:
        raise StoreError(
            f"the job store '{path}' holds job '{row[0]}' that this jobcore cannot read "
            f"({exc}): register its job type, or give this one another store"
        ) from None


def _claims_json(claims: tuple[Claim, ...]) -> str:
    return json.dumps([[c.resource, str(c.mode)] for c in claims])


# ---- the store ------------------------------------------------------------------------


class SQLiteJobStore(MemoryJobStore):
    """A MemoryJobStore whose records are also kept in an SQLite file (see the module)."""

    durable = True

    def __init__(
        self,
        db: SQLiteDatabase,
        scope: str,
        *,
        max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
        max_retained: int = DEFAULT_MAX_RETAINED,
    ) -> None:
        super().__init__(max_retained_per_domain=max_retained_per_domain, max_retained=max_retained)
        db.claim(scope)
        self.db = db
        self.scope = scope
        self.path = db.path
        try:
            self._rows = [(row, _parse_row_spec(db.path, row)) for row in db.load(scope)]
        except sqlite3.DatabaseError as exc:
            db.unclaim(scope)
            raise StoreError(
                f"the job store '{db.path}' is corrupt ({exc}): move it away to start "
                "afresh, or restore a backup"
            ) from None
        except BaseException:
            db.unclaim(scope)
            raise
        self._closed = False
        # queued writes, and the number of the last one queued / committed
        self._pending: list[Op] = []
        self._queued = 0
        self._committed = 0
        # callbacks waiting for the commit of the writes queued before them
        self._outbox: deque[tuple[int, Callable[[], None]]] = deque()
        self._wake: anyio.Event | None = None
        self._inflight: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        #: the last commit failed (full disk, I/O error): new jobs are refused, writes
        #: are kept and retried, events are no longer held back
        self.error: StoreError | None = None
        self._progress_at: dict[uuid.UUID, float] = {}
        self._event_seq: dict[uuid.UUID, int] = {}
        #: jobs active in the file when it was opened: presented as failed (UNRECOVERED)
        #: in memory, their rows left as they are for recovery
        self.unrecovered: set[uuid.UUID] = set()

    # ---- restore at open --------------------------------------------------------------

    def restore(
        self,
        clock: Clock,
        seq: Iterator[int],
        ticket: Callable[[uuid.UUID, tuple[Claim, ...], int], Ticket],
    ) -> int:
        """Present the rows loaded at open as records (the engine calls this once, with
        its clock, seq counter and scheduler); returns how many."""
        rows, self._rows = self._rows, []
        now_wall, now = clock.wall(), clock.now()

        expired: list[str] = []
        count = 0
        for row, spec in rows:
            (job_s, type_s, domain, state_s, _xml, claims_s, priority, created, _started,
             ended, processed, total, stats_s, errmsg, bandwidth, retention, expires,
             event_seq, started_after, elapsed) = row  # fmt: skip
            state = JobState(state_s)
            if state.terminal and expires is not None and expires <= now_wall:
                expired.append(job_s)
                continue
            info = registry.get(type_s)
            job = uuid.UUID(job_s)
            claims = tuple(Claim(r, Mode(m)) for r, m in json.loads(claims_s))
            rec = JobRecord(
                uuid=job,
                type=info.type,
                info=info,
                domain=domain,
                spec=spec,
                state=state,
                seq=next(seq),
                ticket=ticket(job, claims, priority),
                retention=retention,
                created_wall=created,
                # a loaded record's clock readings are offsets from its begin (exact, so
                # time_elapsed and info.started read as before the restart)
                created=0.0,
                started=started_after,
                processed=processed,
                total=total,
                extra=json.loads(stats_s),
                errmsg=errmsg,
                bandwidth=bandwidth,
            )
            self._event_seq[job] = event_seq
            MemoryJobStore.add(self, rec)
            if state.terminal:
                rec.ended = elapsed
                rec.ended_wall = ended
                deadline = math.inf if expires is None else now + (expires - now_wall)
            else:  # no recovery yet: say so, keep the row as it is for the next jobd
                self.unrecovered.add(job)
                rec.state = JobState.FAILED
                rec.errmsg = UNRECOVERED
                rec.ended, rec.ended_wall = max(0.0, now_wall - created), now_wall
                deadline = math.inf
            MemoryJobStore.ended(self, rec, deadline)
            count += 1
        if expired:
            self._queue(_delete_many(expired))
        if self.unrecovered:
            _log.warning(
                "active jobs in the store are not recovered (no recovery yet): presented "
                "as failed, their rows kept",
                path=str(self.path),
                jobs=len(self.unrecovered),
            )
        return count

    # ---- writes -----------------------------------------------------------------------

    def _queue(self, op: Op) -> None:
        self._pending.append(op)
        self._queued += 1
        if len(self._pending) == 1:
            self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def add(self, rec: JobRecord) -> None:
        super().add(rec)
        self._event_seq[rec.uuid] = 1
        self._queue(_insert(self.scope, rec))

    def changed(self, rec: JobRecord) -> None:
        """The engine changed the record's state: queue its row's update (with the final
        stats and the retention deadline once it ended)."""
        n = self._event_seq.get(rec.uuid, 0) + 1
        self._event_seq[rec.uuid] = n
        self._progress_at.pop(rec.uuid, None)
        self._queue(_update(rec, n))

    def progress(self, rec: JobRecord) -> None:
        """A progress report: written if the job's last write is PROGRESS_INTERVAL old."""
        now = time.monotonic()
        last = self._progress_at.get(rec.uuid)
        if last is not None and now - last < PROGRESS_INTERVAL:
            return
        self._progress_at[rec.uuid] = now
        self._queue(_progress(rec))

    def _remove(self, rec: JobRecord) -> None:
        super()._remove(rec)
        self._progress_at.pop(rec.uuid, None)
        self._event_seq.pop(rec.uuid, None)
        if rec.uuid in self.unrecovered:
            self.unrecovered.discard(rec.uuid)  # evicted from memory by a cap: row stays
        else:
            self._queue(_delete_many([str(rec.uuid)]))

    def check_writable(self) -> None:
        """Raise the store's error while its writes fail (new jobs are refused)."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise StoreError(f"the job store '{self.path}' is closed")

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every write queued so far is committed (at once if none is
        waiting, or while the store's writes fail)."""
        if (self._committed >= self._queued or self.error is not None) and not self._outbox:
            fn()
            return
        self._outbox.append((self._queued, fn))
        self._wakeup()

    async def sync(self, *, raise_errors: bool = True) -> None:
        """Wait until every write queued so far is committed. While commits fail:
        StoreError (or return at once, without ``raise_errors``)."""
        target = self._queued
        while self._committed < target:
            if self.error is not None:
                if raise_errors:
                    raise self.error
                return
            if self._inflight is None and self._pending:
                await self._commit_once()  # in the caller: no hand-off to the writer task
                continue
            if self._changed is None:
                self._changed = anyio.Event()
            self._wakeup()
            await self._changed.wait()

    def _run_outbox(self, upto: int | None) -> None:
        while self._outbox and (upto is None or self._outbox[0][0] <= upto):
            _, fn = self._outbox.popleft()
            try:
                fn()
            except Exception:  # one subscriber's bug must not stop the others
                _log.exception("deferred callback failed")

    async def run(self) -> None:
        """The writer: commit queued writes in batches on a worker thread until
        cancelled (after ``drain``)."""
        while True:
            # commit at once when someone waits for it (a sync, a held-back event), else
            # within FLUSH_DELAY (purges, progress): lone writes join the next batch
            deadline = math.inf
            while True:
                if self._pending and (self._changed is not None or self._outbox):
                    break
                if self._pending:
                    if deadline == math.inf:
                        deadline = anyio.current_time() + FLUSH_DELAY
                    elif anyio.current_time() >= deadline:
                        break
                self._wake = anyio.Event()
                with anyio.CancelScope(deadline=deadline):
                    await self._wake.wait()
                self._wake = None
            await anyio.lowlevel.checkpoint()  # what this tick still queues joins in
            await self._commit_once()
            if self.error is not None:
                await anyio.sleep(RETRY_INTERVAL)

    async def _commit_once(self) -> None:
        # one batch in flight at a time: batches commit in queue order
        while self._inflight is not None:
            await self._inflight.wait()
        if not self._pending:
            return
        self._inflight = anyio.Event()
        try:
            await self._commit_batch()
        finally:
            inflight, self._inflight = self._inflight, None
            inflight.set()
            if self._pending:  # kept after a failure, or queued meanwhile: the writer's
                self._wakeup()

    async def _commit_batch(self) -> None:
        ops, upto = self._pending, self._queued
        self._pending = []
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.db.commit, ops)
        except Exception as exc:
            self._pending[:0] = ops  # kept in memory, retried in order
            first = self.error is None
            if _is_full(exc):
                self.error = StoreError(f"no space left for the job store at {self.path}")
            else:
                self.error = StoreError(f"cannot write the job store '{self.path}': {exc}")
            if first:
                _log.error(
                    "job store write failed: new jobs are refused, running jobs go on, "
                    "writes are kept and retried",
                    path=str(self.path),
                    error=str(exc),
                )
            self._run_outbox(None)  # events are no longer held back
        else:
            if self.error is not None:
                _log.info("job store writes succeed again", path=str(self.path))
                self.error = None
            self._committed = upto
            self._run_outbox(upto)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def drain(self, timeout: float = 10.0) -> None:
        """Commit what is queued (the connection is closing); give up after ``timeout``."""
        with anyio.move_on_after(timeout, shield=True):
            while self._pending:
                await self._commit_once()
                if self.error is not None:
                    break
        self._run_outbox(None)
        if self._pending:
            _log.error(
                "job store writes lost at close", path=str(self.path), writes=len(self._pending)
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.release(self.scope)


# ---- the writes (built on the event loop from the record's values at that moment) -----


def _insert(scope: str, rec: JobRecord) -> Op:
    spec = rec.spec  # frozen: formatted on the writer thread
    values = (
        str(rec.uuid),
        scope,
        str(rec.type),
        rec.domain,
        str(rec.state),
        _claims_json(rec.ticket.claims),
        rec.ticket.priority,
        rec.created_wall,
        rec.processed,
        rec.total,
        rec.bandwidth,
        rec.retention,
    )

    def op(conn: sqlite3.Connection) -> None:
        from jobcore.xml import format_job

        conn.execute(
            "INSERT INTO jobs (uuid, scope, type, domain, state, claims, priority, created,"
            " processed, total, bandwidth, retention, xml, event_seq)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (*values, format_job(spec)),
        )

    return op


def _update(rec: JobRecord, event_seq: int) -> Op:
    started = None if rec.started is None else rec.created_wall + (rec.started - rec.created)
    expires = None if rec.ended_wall is None else rec.ended_wall + rec.retention
    values = (
        str(rec.state),
        started,
        None if rec.started is None else rec.started - rec.created,
        None if rec.ended is None else rec.ended - rec.created,
        rec.ended_wall,
        rec.processed,
        rec.total,
        json.dumps(rec.extra),
        rec.errmsg,
        rec.bandwidth,
        expires,
        event_seq,
        str(rec.uuid),
    )

    def op(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE jobs SET state = ?, started = ?, started_after = ?, elapsed = ?, ended = ?,"
            " processed = ?, total = ?, stats = ?, errmsg = ?, bandwidth = ?, expires = ?,"
            " event_seq = ? WHERE uuid = ?",
            values,
        )

    return op


def _progress(rec: JobRecord) -> Op:
    values = (rec.processed, rec.total, json.dumps(rec.extra), str(rec.uuid))

    def op(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE jobs SET processed = ?, total = ?, stats = ? WHERE uuid = ?", values)

    return op


def _delete_many(jobs: list[str]) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM jobs WHERE uuid = ?", [(j,) for j in jobs])

    return op
