"""The durable job store: SQLite (stdlib ``sqlite3``, WAL), behind ``JobStore``.

Reads come from memory: ``SQLiteJobStore`` is a ``MemoryJobStore`` whose changes are also
written to a database file. Writes are queued on the event loop (cheap, synchronous: plain
values, no closures) and committed in batches, one transaction per batch, by the file's
writer thread; the engine awaits a write's commit at the durability points
(design/store.md):

- a job's row is committed before ``JobBegin`` returns (and before the driver starts it);
- each state change is committed before its event is emitted (``defer``: callbacks run
  in order once everything queued before them is committed);
- final stats are written with the terminal state;
- progress is written at most every ``PROGRESS_INTERVAL`` seconds per job.

A batch being gathered keeps at most one write per row where a later one covers an
earlier (a state update replaces the job's queued progress or update; a delete replaces
both), and runs consecutive writes of one statement as one ``executemany``.

One database file serves every driver connection of a process (jobd's connections share
``RUN_DIR/jobs.sqlite``): each connection's jobs and domain definitions carry its
``scope`` (the driver URI without its query; under jobd the connection's identity), and a
scope is served by one connection at a time; table ``scopes`` keeps the URI that reopens
each (jobd reopens them at start). The file is locked against other processes (``flock``
on ``PATH.lock``) for as long as it is open.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import errno
import functools
import importlib
import json
import math
import queue
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import attrs
import sniffio
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
    DEFAULT_STORE_URL,
    JobRecord,
    JobStore,
    MemoryJobStore,
    default_host,
)

if TYPE_CHECKING:
    from jobcore.driver import Clock
    from jobcore.scheduler import Ticket

_log = get_logger("jobcore.store")

#: seconds between two progress writes of one job (its insert and state changes count:
#: they write its progress too)
PROGRESS_INTERVAL = 2.0
#: seconds a write nobody waits for (a purge, a progress tick) may wait for a batch
FLUSH_DELAY = 0.25
#: seconds between retries of a batch that could not be committed (full disk, I/O error)
RETRY_INTERVAL = 1.0
#: errmsg of an active job whose row an older jobcore wrote (schema v2 or before): its
#: prepared spec was not kept, so no driver can be handed it again
NO_PREPARED_SPEC = (
    "the job store row of this job was written by an older jobcore, which did not keep its "
    "prepared spec: the job cannot be re-attached after the restart"
)

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
    (
        2,
        (
            # the domains the daemon owns: their definitions, per driver scope
            """CREATE TABLE domains (
                scope TEXT NOT NULL,
                name TEXT NOT NULL,
                uuid TEXT NOT NULL,
                uri TEXT NOT NULL,
                xml TEXT NOT NULL,
                created REAL NOT NULL,
                modified REAL NOT NULL,
                PRIMARY KEY (scope, name),
                UNIQUE (scope, uuid)
            )""",
        ),
    ),
    (
        3,
        (
            # the exact prepared spec the driver got (spec_to_json); NULL in older rows
            "ALTER TABLE jobs ADD COLUMN spec TEXT",
            # the drivers' own durable records (jobcore.driver.DriverState), per scope
            """CREATE TABLE driver_state (
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (scope, key)
            )""",
        ),
    ),
    (
        4,
        (
            # each scope's driver URI with its configuration parameters: what reopens it
            # (jobd recovers every stored scope at start); older scopes get their name,
            # the URI without parameters, which opens them with the driver's defaults
            "CREATE TABLE scopes (scope TEXT PRIMARY KEY, uri TEXT NOT NULL)",
            "INSERT OR IGNORE INTO scopes (scope, uri)"
            " SELECT scope, scope FROM jobs GROUP BY scope ORDER BY min(rowid)",
            "INSERT OR IGNORE INTO scopes (scope, uri) SELECT DISTINCT scope, scope FROM domains",
            "INSERT OR IGNORE INTO scopes (scope, uri)"
            " SELECT DISTINCT scope, scope FROM driver_state",
        ),
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@frozen
class StoreURL:
    kind: str  # 'memory', 'sqlite' or 'postgresql'
    path: Path | None = None
    synchronous: str = "NORMAL"
    #: a PostgreSQL store's URL (libpq's connection URI), as given
    dsn: str | None = None


_STORE_URLS = "use 'memory:', 'sqlite:///ABS/PATH' or 'postgresql://…'"


def parse_store_url(url: str) -> StoreURL:
    """``memory:``, ``sqlite:///ABS/PATH[?synchronous=normal|full]`` or
    ``postgresql://…`` (libpq's connection URI, checked when it is opened)."""
    if not isinstance(url, str):
        raise InvalidArgument(f"invalid job store URL {url!r}: {_STORE_URLS}")
    if url == "memory:":
        return StoreURL("memory")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("postgresql", "postgres") and url.startswith(f"{parts.scheme}://"):
        return StoreURL("postgresql", dsn=url)
    if parts.scheme != "sqlite" or not url.startswith("sqlite://"):
        raise InvalidArgument(f"invalid job store URL '{url}': {_STORE_URLS}")
    if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
        raise InvalidArgument(
            f"invalid job store URL '{url}': the file must be an absolute path after "
            "'sqlite://' (three slashes: 'sqlite:///var/lib/jobs.sqlite')"
        )
    synchronous = "NORMAL"
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key != "synchronous" or value.upper() not in ("FULL", "NORMAL"):
            raise InvalidArgument(
                f"invalid job store URL '{url}': the only parameter is synchronous=normal|full"
            )
        synchronous = value.upper()
    return StoreURL("sqlite", Path(urllib.parse.unquote(parts.path)), synchronous)


def open_store(
    url: str = DEFAULT_STORE_URL,
    *,
    scope: str = "default",
    max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
    max_retained: int = DEFAULT_MAX_RETAINED,
    host: str | None = None,
) -> JobStore:
    """The store a URL names: ``memory:`` or ``sqlite:///ABS/PATH`` (InvalidArgument for
    anything else; ``jobcore.store_pg.open_store`` opens ``postgresql://…`` too). A
    durable store keeps the jobs of one ``scope`` (a driver connection) and loads those
    already in the file; it blocks (open, check, load): call it off the event loop.
    StoreError when the file is corrupt, locked or of a newer schema."""
    parsed = parse_store_url(url)
    caps = {"max_retained_per_domain": max_retained_per_domain, "max_retained": max_retained}
    if parsed.kind == "memory":
        return MemoryJobStore(**caps)
    if parsed.path is None:
        raise InvalidArgument(f"the job store '{url}' is opened by jobcore.store_pg.open_store")
    db = open_database(parsed.path, parsed.synchronous)
    try:
        return SQLiteJobStore(db, scope, host=host, **caps)
    except BaseException:
        db.release()
        raise


# ---- what a batch holds -----------------------------------------------------------------

#: one statement of a batch: (sql, parameters, spec). A job's insert carries its prepared
#: spec: the writer thread formats its job XML and its JSON (the ``xml`` and ``spec``
#: columns, the last two parameters).
Write = tuple[str, tuple[Any, ...], Any]
#: a job whose insert was left out of a committed batch: (uuid, why), why being the text
#: of a refused job XML (raised as StoreError) or the error to raise (a PostgreSQL store's
#: JobConflict on a shared claim, InvalidArgument for a UUID another host has)
Refusal = tuple[str, str | JobError]
#: the outcome of a batch, reported to the store: the error that rolled it back (None:
#: committed), and the jobs whose insert was left out (``Refusal``); the rest of the
#: batch is committed
Outcome = tuple[BaseException | None, list[Refusal]]

_INSERT_JOB = (
    "INSERT INTO jobs (uuid, scope, type, domain, state, claims, priority, created,"
    " started, started_after, processed, total, bandwidth, retention, event_seq, host, xml,"
    " spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_JOB = (
    "UPDATE jobs SET state = ?, started = ?, started_after = ?, elapsed = ?, ended = ?,"
    " processed = ?, total = ?, stats = ?, errmsg = ?, bandwidth = ?, expires = ?,"
    " event_seq = ? WHERE uuid = ?"
)
_PROGRESS_JOB = "UPDATE jobs SET processed = ?, total = ?, stats = ?, bandwidth = ? WHERE uuid = ?"
_DELETE_JOB = "DELETE FROM jobs WHERE uuid = ?"
_SAVE_DOMAIN = (
    "INSERT INTO domains (scope, name, uuid, uri, xml, created, modified)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, name) DO UPDATE SET"
    " uuid = excluded.uuid, uri = excluded.uri, xml = excluded.xml,"
    " modified = excluded.modified"
)
_DELETE_DOMAIN = "DELETE FROM domains WHERE scope = ? AND name = ?"
_SAVE_STATE = (
    "INSERT INTO driver_state (scope, key, value) VALUES (?, ?, ?)"
    " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value"
)
_DELETE_STATE = "DELETE FROM driver_state WHERE scope = ? AND key = ?"
_SAVE_SCOPE = (
    "INSERT INTO scopes (scope, uri) VALUES (?, ?)"
    " ON CONFLICT (scope) DO UPDATE SET uri = excluded.uri"
)
#: the stored scopes worth reopening at a start: active or unexpired jobs, or domains
_RECOVERABLE_SCOPES = (
    "SELECT s.scope, s.uri, (SELECT count(*) FROM jobs j WHERE j.scope = s.scope"
    " AND (j.expires IS NULL OR j.expires > ?)) AS n FROM scopes s"
    " WHERE n > 0 OR EXISTS (SELECT 1 FROM domains d WHERE d.scope = s.scope)"
    " ORDER BY s.rowid"
)


# ---- the database file ----------------------------------------------------------------


@frozen
class StoredScope:
    """A scope of the file (``SQLiteDatabase.stored_scopes``): its name, the URI that
    reopens it (with its configuration parameters), its active and retained jobs."""

    scope: str
    uri: str
    jobs: int


class SharedDatabase(abc.ABC):
    """A store's database, open once per process and shared by its openers (one driver
    connection each, its scope): which scopes it serves, how many openers hold it. The last
    ``release`` closes it (``_close``)."""

    def __init__(self, key: Hashable, name: str, whose: str = "") -> None:
        self.key = key  # in ``_databases``
        self.refs = 0
        self.scopes: set[str] = set()
        self._name = name  # for messages: the file, or the URL without its password
        self._whose = whose  # e.g. " of host 'h1'"

    def claim(self, scope: str) -> None:
        with _databases_lock:
            if scope in self.scopes:
                raise StoreError(
                    f"the job store '{self._name}' already serves a connection to "
                    f"'{scope}'{self._whose}: close it first, or give this one another store"
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
            _databases.pop(self.key, None)
        self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """The last opener is gone: end the writer, close the connections and locks."""

    # ---- the writer thread: batches committed in the order they were submitted --------

    def _start_writer(self, name: str) -> None:
        # batches to commit, in order, and who to tell (None: stop)
        self._requests: queue.SimpleQueue[
            tuple[list[Write | None], Callable[[Outcome], None]] | None
        ] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_loop, name=f"jobcore store {name}", daemon=True
        )
        self._writer.start()

    def _stop_writer(self) -> None:
        self._requests.put(None)  # the writer ends after the batches before it
        self._writer.join()

    def submit(self, writes: list[Write | None], done: Callable[[Outcome], None]) -> None:
        """Queue a batch for the writer thread; it calls ``done`` (on its own thread) with
        the outcome once the batch is committed or rolled back. Batches commit in the
        order they were submitted."""
        self._requests.put((writes, done))

    def _write_loop(self) -> None:
        while (request := self._requests.get()) is not None:
            writes, done = request
            refused: list[Refusal] = []
            error: BaseException | None = None
            try:
                self.commit(writes, refused)
            except BaseException as exc:  # reported to the store, which decides
                error = exc
            done((error, refused))

    @abc.abstractmethod
    def commit(self, writes: list[Write | None], refused: list[Refusal]) -> None:
        """Run ``writes`` in one transaction (on the writer thread)."""


_databases: dict[Hashable, SharedDatabase] = {}
_databases_lock = threading.Lock()

_D = TypeVar("_D", bound=SharedDatabase)


def open_shared(key: Hashable, kind: type[_D], make: Callable[[], _D]) -> _D:
    """The database open under ``key`` in this process, made by ``make`` if none is (shared
    within the process; ``release`` it)."""
    with _databases_lock:
        db = _databases.get(key)
        if not isinstance(db, kind):
            db = make()
            _databases[key] = db
        db.refs += 1
        return db


def open_database(path: Path, synchronous: str = "NORMAL") -> SQLiteDatabase:
    """The open database at ``path`` (shared within the process; ``release`` it)."""
    key = path.absolute()
    return open_shared(key, SQLiteDatabase, lambda: SQLiteDatabase(key, synchronous))


class SQLiteDatabase(SharedDatabase):
    """One SQLite file: its lock, its connection, its schema, its writer thread. Opening
    checks everything and raises StoreError naming the file."""

    #: the rows of every host are loaded by scope alone (one file is one machine's)
    host: str | None = None

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        super().__init__(path, str(path))
        self.path = path
        #: serialises use of ``conn`` (the loads at open, the writer thread)
        self.lock = threading.Lock()
        self._file_lock = self._take_lock()
        try:
            self.conn = self._connect(synchronous)
        except BaseException:
            self._file_lock.release()
            raise
        self._start_writer(path.name)

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
        if version < SCHEMA_VERSION:  # one line, however many versions it went through
            _log.info(
                "job store schema migrated",
                path=str(self.path),
                previous=version,
                version=SCHEMA_VERSION,
            )

    def _close(self) -> None:
        self._stop_writer()
        with self.lock:
            try:
                self.conn.close()
            finally:
                self._file_lock.release()

    def load(self, scope: str) -> list[tuple[tuple[Any, ...], Any, bool]]:
        """The scope's job rows in begin order, each with its spec and whether that is the
        prepared spec (from the ``spec`` column) or, for a row an older jobcore wrote, the
        spec parsed from its job XML (the row keeps None in place of both texts: they are
        not kept in memory)."""
        loaded = []
        with self.lock:
            for row in self.conn.execute(
                "SELECT uuid, type, domain, state, xml, claims, priority, created, started,"
                " ended, processed, total, stats, errmsg, bandwidth, retention, expires,"
                " event_seq, started_after, elapsed, spec, host FROM jobs WHERE scope = ?"
                " ORDER BY rowid",
                (scope,),
            ):
                spec, prepared = _row_spec(self.path, row)
                loaded.append((_loaded_row(row), spec, prepared))
        return loaded

    def stored_scopes(self, now: float) -> list[StoredScope]:
        """The scopes with jobs active or retained at wall time ``now``, or with domain
        definitions, in the order they were first stored: what a restart reopens."""
        with self.lock:
            rows = self.conn.execute(_RECOVERABLE_SCOPES, (now,)).fetchall()
        return [StoredScope(scope, uri, jobs) for scope, uri, jobs in rows]

    def load_state(self, scope: str) -> dict[str, Any]:
        with self.lock:
            return {
                key: json.loads(value)
                for key, value in self.conn.execute(
                    "SELECT key, value FROM driver_state WHERE scope = ? ORDER BY rowid",
                    (scope,),
                )
            }

    def load_domains(self, scope: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(
                "SELECT name, uuid, uri, xml, created, modified FROM domains"
                " WHERE scope = ? ORDER BY rowid",
                (scope,),
            ).fetchall()

    # ---- the writer thread's commits ---------------------------------------------------

    def commit(self, writes: list[Write | None], refused: list[Refusal]) -> None:
        """Run ``writes`` in one transaction (on the writer thread), consecutive writes of
        one statement as one ``executemany``, a lone statement as its own transaction;
        raises what sqlite raised. An insert whose job XML cannot be formatted is left
        out and listed in ``refused``."""
        runs = batch_runs(writes, refused)
        if not runs:
            return
        with self.lock:
            conn = self.conn
            if len(runs) == 1 and len(runs[0][1]) == 1:  # autocommit: one statement
                conn.execute(runs[0][0], runs[0][1][0])
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in runs:
                    if len(rows) == 1:
                        conn.execute(sql, rows[0])
                    else:
                        conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


def batch_runs(
    writes: list[Write | None], refused: list[Refusal]
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """A batch as runs of one statement each with their parameters, in order (what every
    durable store commits; on its writer thread): superseded writes dropped, each
    insert's job XML and spec JSON formatted (an insert whose XML cannot be formatted is
    left out and listed in ``refused``)."""
    from jobcore.xml import format_job

    runs: list[tuple[str, list[tuple[Any, ...]]]] = []
    for write in writes:
        if write is None:  # superseded by a later write of the same row
            continue
        sql, params, spec = write
        if spec is not None:
            try:
                params = (*params, format_job(spec), json.dumps(spec_to_json(spec)))
            except (JobError, TypeError) as exc:
                refused.append((params[0], str(exc)))
                continue
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params]))
    return runs


def _loaded_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A loaded job row as ``restore`` takes it (from ``SELECT uuid … spec, host``): the
    XML and spec texts left out, the host last."""
    return (*row[:4], None, *row[5:20], row[21])


def _loop_callers() -> tuple[Callable[[Callable[[], object]], object], ...]:
    """ "Run this soon on the running event loop" (asyncio or trio): from the loop's own
    thread, and from any thread (how the writer thread hands a batch's outcome back)."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        return token.run_sync_soon, token.run_sync_soon
    loop = asyncio.get_running_loop()
    return loop.call_soon, loop.call_soon_threadsafe


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _row_spec(path: Path | str, row: tuple[Any, ...]) -> tuple[Any, bool]:
    """The spec of a loaded row, and whether it is the prepared one (read when the store
    opens, off the event loop): the ``spec`` column, else (a row of schema v2 or before)
    the job XML parsed."""
    from jobcore.xml import parse_job

    try:
        registry.get(row[1])
        if row[20] is not None:
            return spec_from_json(json.loads(row[20])), True
        return parse_job(row[4]), False
    except (JobError, TypeError, ValueError, ImportError, AttributeError) as exc:
        raise StoreError(
            f"the job store '{path}' holds job '{row[0]}' that this jobcore cannot read "
            f"({exc}): register its job type, or give this one another store"
        ) from None


# ---- the prepared spec, as JSON (the ``spec`` column, v3) --------------------------------
#
# Tagged, so that a reload rebuilds exactly the objects the driver got (attrs classes,
# enums, UUIDs, tuples) whatever a type's prepared spec holds: ``{"@": "module:Class",
# "f": {field: value}}`` for an attrs instance, ``{"@e": "module:Enum", "v": value}``,
# ``{"@u": "…"}``, ``{"@t": […]}`` (tuple), ``{"@s": […]}`` (frozenset), ``{"@d": […]}``
# (a dict, as [key, value] pairs); JSON's own types as themselves.


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


#: types written as themselves (exactly these: a subclass may be an enum or a JobType)
_JSON_PLAIN = frozenset({type(None), bool, int, float, str})
_NO_DEFAULT = object()


_JsonFields = tuple[str, tuple[tuple[str, str, Any], ...]] | None
_json_fields_of: dict[type, _JsonFields] = {}


def _json_fields(cls: type) -> _JsonFields:
    """An attrs class's tag and its init fields (name, alias, default or _NO_DEFAULT),
    worked out once per class (the writer formats every new job's spec); None for
    another class."""
    known = _json_fields_of.get(cls, _NO_DEFAULT)
    if known is not _NO_DEFAULT:
        return known  # type: ignore[return-value]
    _json_fields_of[cls] = found = _json_fields_now(cls)
    return found


def _json_fields_now(cls: type) -> _JsonFields:
    if not attrs.has(cls):
        return None
    fields = []
    for f in attrs.fields(cls):
        if not f.init:
            continue
        default = f.default
        if isinstance(default, attrs.Factory) or default is attrs.NOTHING:  # type: ignore[arg-type]  # a class at runtime
            default = _NO_DEFAULT
        fields.append((f.name, f.alias, default))
    return _class_name(cls), tuple(fields)


def spec_to_json(value: Any) -> Any:
    """``value`` (a prepared spec, or anything in one) as JSON-able data."""
    cls = type(value)
    if cls in _JSON_PLAIN:
        return value
    known = _json_fields_of.get(cls, _NO_DEFAULT)  # an attrs class seen before: at once
    if known is not _NO_DEFAULT:
        plan: _JsonFields = known  # type: ignore[assignment]
    else:
        if isinstance(value, enum.Enum):
            return {"@e": _class_name(cls), "v": value.value}
        if isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return {"@e": _class_name(cls), "v": str(value)}  # e.g. a JobType
        if isinstance(value, uuid.UUID):
            return {"@u": str(value)}
        plan = _json_fields(cls)
    if plan is not None:
        name, fields = plan
        out: dict[str, Any] = {}
        for fname, alias, default in fields:
            item = getattr(value, fname)
            if default is not _NO_DEFAULT and type(item) is type(default) and item == default:
                continue  # the class's default: rebuilt by the constructor
            out[alias] = spec_to_json(item)
        return {"@": name, "f": out}
    if isinstance(value, tuple):
        return {"@t": [spec_to_json(v) for v in value]}
    if isinstance(value, frozenset | set):
        return {"@s": [spec_to_json(v) for v in value]}
    if isinstance(value, list):
        return [spec_to_json(v) for v in value]
    if isinstance(value, dict):
        return {"@d": [[spec_to_json(k), spec_to_json(v)] for k, v in value.items()]}
    raise TypeError(f"cannot keep a {type(value).__name__} of a prepared spec in the store")


@functools.cache
def _named_class(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"'{name}' is not a class")
    return obj


def spec_from_json(data: Any) -> Any:
    """What ``spec_to_json`` made, rebuilt (TypeError, ValueError, ImportError,
    AttributeError when it names what this process does not have)."""
    if isinstance(data, list):
        return [spec_from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "@" in data:
        cls = _named_class(data["@"])
        if not attrs.has(cls):
            raise TypeError(f"'{data['@']}' is not an attrs class")
        return cls(**{k: spec_from_json(v) for k, v in data["f"].items()})
    if "@e" in data:
        cls = _named_class(data["@e"])
        if not issubclass(cls, enum.Enum | str):
            raise TypeError(f"'{data['@e']}' is not an enum")
        return cls(data["v"])
    if "@u" in data:
        return uuid.UUID(data["@u"])
    if "@t" in data:
        return tuple(spec_from_json(v) for v in data["@t"])
    if "@s" in data:
        return frozenset(spec_from_json(v) for v in data["@s"])
    if "@d" in data:
        return {spec_from_json(k): spec_from_json(v) for k, v in data["@d"]}
    raise ValueError(f"unknown spec data {sorted(data)}")


def _claims_json(claims: tuple[Claim, ...]) -> str:
    return json.dumps([[c.resource, str(c.mode)] for c in claims])


@frozen
class DomainDefinition:
    """A domain the daemon owns, as its driver defined it (the ``domains`` table)."""

    name: str
    uuid: uuid.UUID
    #: the driver URI it was defined through
    uri: str
    #: the driver's definition document
    xml: str
    #: wall times of its first definition and of its last change
    created: float
    modified: float


# ---- the store ------------------------------------------------------------------------


class StoreDatabase(Protocol):
    """What a durable job store keeps its rows in: an SQLite file (``SQLiteDatabase``) or
    a PostgreSQL database (``jobcore.store_pg.PostgresDatabase``). Writes are this
    module's statements (``Write``, ``?`` parameters); a database that speaks another
    dialect translates them."""

    @property
    def path(self) -> Path | str:
        """What messages name: the file, or the database's URL without its password."""

    @property
    def host(self) -> str | None:
        """The fleet member whose rows it serves (None: the one each store names)."""

    def claim(self, scope: str) -> None: ...
    def unclaim(self, scope: str) -> None: ...
    def release(self, scope: str | None = None) -> None: ...
    def load(self, scope: str) -> list[tuple[tuple[Any, ...], Any, bool]]: ...
    def load_domains(self, scope: str) -> list[tuple[Any, ...]]: ...
    def load_state(self, scope: str) -> dict[str, Any]: ...
    def stored_scopes(self, now: float) -> list[StoredScope]: ...
    def submit(self, writes: list[Write | None], done: Callable[[Outcome], None]) -> None: ...


class SQLiteJobStore(MemoryJobStore):
    """A MemoryJobStore whose records are also kept in a database (an SQLite file, or
    PostgreSQL through ``jobcore.store_pg``; see the module)."""

    durable = True

    def __init__(
        self,
        db: StoreDatabase,
        scope: str,
        *,
        max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
        max_retained: int = DEFAULT_MAX_RETAINED,
        host: str | None = None,
    ) -> None:
        super().__init__(max_retained_per_domain=max_retained_per_domain, max_retained=max_retained)
        db.claim(scope)
        self.db = db
        self.scope = scope
        self.path = db.path
        #: the fleet member whose jobs these are (the database's, else the one named)
        self.host = db.host or host or default_host()
        try:
            self._rows = db.load(scope)
            self._domains: dict[str, DomainDefinition] = {
                row[0]: DomainDefinition(row[0], uuid.UUID(row[1]), *row[2:])
                for row in db.load_domains(scope)
            }
            self._state: dict[str, Any] = db.load_state(scope)
        except sqlite3.DatabaseError as exc:
            db.unclaim(scope)
            raise StoreError(
                f"the job store '{db.path}' is corrupt ({exc}): move it away to start "
                "afresh, or restore a backup"
            ) from None
        except BaseException:
            db.unclaim(scope)
            raise
        self._domain_names = {d.uuid: d.name for d in self._domains.values()}
        self._closed = False
        # the batch being gathered, and the number of the last write queued / committed
        self._pending: list[Write | None] = []
        self._queued = 0
        self._committed = 0
        # job -> the number of its last insert or state update (what its waiters wait for)
        self._state_at: dict[uuid.UUID, int] = {}
        # job -> (its last write in the batch being gathered, whether it is a state update)
        self._last: dict[uuid.UUID, tuple[int, bool]] = {}
        # driver-state key -> its last save or delete in the batch being gathered (a later
        # one of the same key covers it: one transaction, so only the last is seen)
        self._state_last: dict[str, int] = {}
        # callbacks waiting for the commit of the writes queued before them
        self._outbox: deque[tuple[int, Callable[[], None]]] = deque()
        self._inflight = False  # a batch is on the writer thread
        self._kicked = False  # a _kick is scheduled
        self._synced: anyio.Event | None = None  # set at the next batch's outcome
        # sync() waiters in the order of their targets (the count of writes they wait for)
        # (waiters whose writes the next batch commits share one: [target, event])
        self._sync_waiters: deque[list[Any]] = deque()
        self._inflight_upto = 0  # the count of writes the batch on the writer covers
        self._timer: anyio.Event | None = None  # wakes ``run`` for a lone write
        self._soon: tuple[Callable[[Callable[[], object]], object], ...] | None = None
        #: the last commit failed (full disk, I/O error): new jobs are refused, writes
        #: are kept and retried, events are no longer held back
        self.error: StoreError | None = None
        # jobs whose insert the writer left out (their job XML was refused, or the
        # database refused it): the error their begin raises
        self._refused: dict[str, JobError] = {}
        self._progress_at: dict[uuid.UUID, float] = {}
        self._event_seq: dict[uuid.UUID, int] = {}
        self._last_end_wall = 0.0  # the wall time of the latest end (see ``ended``)
        #: the active jobs loaded whose spec is not the prepared one (an older jobcore's
        #: rows): the engine fails them at recovery (NO_PREPARED_SPEC)
        self.unprepared: set[uuid.UUID] = set()

    # ---- restore at open --------------------------------------------------------------

    def restore(
        self,
        clock: Clock,
        seq: Iterator[int],
        ticket: Callable[[uuid.UUID, tuple[Claim, ...], int], Ticket],
    ) -> list[JobRecord]:
        """Present the rows loaded at open as records (the engine calls this once, with
        its clock, seq counter and scheduler): ended rows as ended records (expired ones
        are deleted), and returns the active ones, in begin order, in the state their row
        has, for the engine to recover (design/store.md "Recovery")."""
        rows, self._rows = self._rows, []
        now_wall, now = clock.wall(), clock.now()

        expired: list[str] = []
        active: list[JobRecord] = []
        ended_recs: list[tuple[JobRecord, float]] = []
        for row, spec, prepared in rows:
            (job_s, type_s, domain, state_s, _xml, claims_s, priority, created, _started,
             ended, processed, total, stats_s, errmsg, bandwidth, retention, expires,
             event_seq, started_after, elapsed, host) = row  # fmt: skip
            state = JobState(state_s)
            if state.terminal and expires is not None and expires <= now_wall:
                expired.append(job_s)
                continue
            info = registry.get(type_s)
            job = uuid.UUID(job_s)
            claims = tuple(Claim(r, Mode(m)) for r, m in json.loads(claims_s))
            # an ended record's clock readings are offsets from its begin (exact, so
            # time_elapsed and info.started read as before the restart); an active one's
            # begin is placed on this process's clock from the wall time it began
            begun = 0.0 if state.terminal else now - max(0.0, now_wall - created)
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
                created=begun,
                started=None if started_after is None else begun + started_after,
                processed=processed,
                total=total,
                extra=json.loads(stats_s),
                errmsg=errmsg,
                bandwidth=bandwidth,
                host=host or self.host,  # NULL in rows written before hosts
            )
            self._event_seq[job] = event_seq
            MemoryJobStore.add(self, rec)
            if state.terminal:
                rec.ended = elapsed
                rec.ended_wall = ended
                deadline = math.inf if expires is None else now + (expires - now_wall)
                ended_recs.append((rec, deadline))
            else:
                if not prepared:
                    self.unprepared.add(job)
                active.append(rec)
        # retained in the order they ended (the alias's last ended job, the caps' oldest)
        ended_recs.sort(key=lambda e: e[0].ended_wall or 0.0)
        for rec, deadline in ended_recs:
            MemoryJobStore.ended(self, rec, deadline)
        if ended_recs:
            self._last_end_wall = ended_recs[-1][0].ended_wall or 0.0
        for job_s in expired:
            self._queue((_DELETE_JOB, (job_s,), None))
        return active

    # ---- job writes -------------------------------------------------------------------

    def _queue(self, write: Write) -> None:
        self._pending.append(write)
        self._queued += 1
        if len(self._pending) == 1 and not self._inflight and self._timer is not None:
            self._timer.set()  # committed within FLUSH_DELAY if nobody waits for it sooner

    def _supersede(self, job: uuid.UUID, *, update: bool) -> None:
        """A write of the job's whole row follows: drop its last write from the batch being
        gathered if that one is covered (a progress write always; a state update only
        by a later update or a delete, ``update``)."""
        last = self._last.pop(job, None)
        if last is not None and (update or not last[1]):
            self._pending[last[0]] = None

    def save_scope_uri(self, uri: str) -> None:
        """Record ``uri`` as what reopens this scope (table ``scopes``; jobd reopens every
        stored scope at start): committed with the next batch, so called at open, before
        the first job's row."""
        self._queue((_SAVE_SCOPE, (self.scope, uri), None))

    def add(self, rec: JobRecord) -> None:
        super().add(rec)
        self._event_seq[rec.uuid] = 1  # the STATE event of its begin
        self._progress_at[rec.uuid] = time.monotonic()  # the insert writes its progress
        self._last.pop(rec.uuid, None)  # a new row: what came before it stays before it
        self._queue(_insert(self.scope, rec))
        self._state_at[rec.uuid] = self._queued

    def ended(self, rec: JobRecord, expires: float) -> None:
        # ends get strictly increasing wall times (a tie moves on by the least step), so
        # the next open, which retains rows in the order of their end, keeps this order
        if rec.ended_wall is not None:
            if rec.ended_wall <= self._last_end_wall:
                rec.ended_wall = math.nextafter(self._last_end_wall, math.inf)
            self._last_end_wall = rec.ended_wall
        super().ended(rec, expires)

    def changed(self, rec: JobRecord) -> None:
        """The engine changed the record's state: queue its row's update (with the final
        stats and the retention deadline once it ended)."""
        # one number per STATE event; a terminal state's FINAL event takes the next one
        # (both are released by this write's commit)
        n = self._event_seq.get(rec.uuid, 0) + (2 if rec.state.terminal else 1)
        self._event_seq[rec.uuid] = n
        self._progress_at[rec.uuid] = time.monotonic()
        self._supersede(rec.uuid, update=True)
        self._last[rec.uuid] = (len(self._pending), True)
        self._queue(_update(rec, n))
        self._state_at[rec.uuid] = self._queued

    def progress(self, rec: JobRecord) -> None:
        """A progress report: written if the job's last write is PROGRESS_INTERVAL old."""
        now = time.monotonic()
        last = self._progress_at.get(rec.uuid)
        if last is not None and now - last < PROGRESS_INTERVAL:
            return
        self.speed_changed(rec)

    def speed_changed(self, rec: JobRecord) -> None:
        """Its progress and speed, written now (a speed set: ``sync_job`` waits for it)."""
        self._progress_at[rec.uuid] = time.monotonic()
        self._supersede(rec.uuid, update=False)
        self._last[rec.uuid] = (len(self._pending), False)
        self._queue(_progress(rec))

    def _remove(self, rec: JobRecord) -> None:
        super()._remove(rec)
        self._progress_at.pop(rec.uuid, None)
        self._event_seq.pop(rec.uuid, None)
        self._state_at.pop(rec.uuid, None)  # its waiters wait for everything queued
        self._supersede(rec.uuid, update=True)
        self._queue((_DELETE_JOB, (str(rec.uuid),), None))

    def last_event_seq(self, job: uuid.UUID) -> int | None:
        """The number of the job's last STATE or FINAL event, as written with its state
        (None: not a job this store holds). The STATE event of its begin is 1, each state
        change adds one, and the FINAL event takes the number after its terminal STATE
        event; PROGRESS events are not numbered. Read from memory; the row's
        ``event_seq`` holds the same number once the write is committed."""
        return self._event_seq.get(job)

    def check_writable(self) -> None:
        """Raise the store's error while its writes fail (new jobs are refused)."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise StoreError(f"the job store '{self.path}' is closed")

    def check_inserted(self, rec: JobRecord) -> None:
        """After the ``sync`` that committed the job's insert: StoreError if the writer
        left the row out because its job XML could not be formatted (it could not be read
        back); the database's own refusal if it left it out (a PostgreSQL store: a
        JobConflict on a shared claim, InvalidArgument for a UUID another host has)."""
        error = self._refused.pop(str(rec.uuid), None)
        if error is not None:
            raise error

    # ---- committing -------------------------------------------------------------------
    #
    # No task switch per batch: a batch is handed to the writer thread from a loop
    # callback (``_kick``, scheduled at most once per tick, so what the tick still queues
    # joins in), and its outcome comes back as a loop callback (``_done``), which releases
    # the deferred callbacks, wakes ``sync`` waiters and hands over the next batch at once
    # if writes queued meanwhile (group commit). The ``run`` task only flushes lone writes
    # within FLUSH_DELAY and retries failed batches every RETRY_INTERVAL.

    def _callers(self) -> tuple[Callable[[Callable[[], object]], object], ...]:
        if self._soon is None:
            self._soon = _loop_callers()
        return self._soon

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every write queued so far is committed (at once if none is
        waiting, or while the store's writes fail)."""
        if (self._committed >= self._queued or self.error is not None) and not self._outbox:
            fn()
            return
        self._outbox.append((self._queued, fn))
        self._kick_soon()

    async def sync(self, *, raise_errors: bool = True, upto: int | None = None) -> None:
        """Wait until every write queued so far (or the first ``upto``) is committed.
        While commits fail: StoreError (or return at once, without ``raise_errors``)."""
        target = self._queued if upto is None else upto
        while self._committed < target:
            if self.error is not None:
                if raise_errors:
                    raise self.error
                return
            if self._inflight and target <= self._inflight_upto:
                await self._next_outcome()  # the batch on the writer commits it
                continue
            # woken once its writes are committed (or a commit failed), not by every
            # batch before: many clients waiting cost a wake-up each, not one per batch
            self._kick_soon()
            waiters = self._sync_waiters
            last = waiters[-1] if waiters else None
            if last is not None and (not self._inflight or last[0] > self._inflight_upto):
                # both wait for the next batch (it takes every pending write): one event
                last[0] = max(last[0], target)
                committed = last[1]
            else:
                committed = anyio.Event()
                waiters.append([target, committed])
            await committed.wait()

    def _job_upto(self, job: uuid.UUID) -> int:
        """The writes a job's outcome needs committed: up to its last insert or state
        update (every write queued so far for a job this store no longer holds)."""
        return self._state_at.get(job, self._queued)

    def job_synced(self, job: uuid.UUID) -> bool:
        """The job's last insert or state update is committed (and so is every write
        queued before it), or the store's writes fail (``sync_job`` returns at once)."""
        return self._committed >= self._job_upto(job) or self.error is not None

    async def sync_job(self, job: uuid.UUID, *, raise_errors: bool = True) -> None:
        """Wait until the job's last insert or state update is committed, with every
        write queued before it (batches commit in queue order), not for the writes
        other jobs queued since: a waiter learns its job's outcome once that is on disk."""
        await self.sync(raise_errors=raise_errors, upto=self._job_upto(job))

    @property
    def settled(self) -> bool:
        """Every write queued so far is committed and what waited for it has run."""
        return self._committed >= self._queued and not self._outbox

    async def _next_outcome(self) -> None:
        self._kick_soon()
        if self._synced is None:
            self._synced = anyio.Event()
        await self._synced.wait()

    def _kick_soon(self) -> None:
        if not self._kicked and not self._inflight:
            self._kicked = True
            self._callers()[0](self._kick)

    def _kick(self) -> None:
        self._kicked = False
        if not self._inflight and self._pending and self.error is None:
            self._submit()

    def _submit(self) -> None:
        writes, upto = self._pending, self._queued
        self._pending, self._last, self._state_last = [], {}, {}
        self._inflight = True
        self._inflight_upto = upto
        threadsafe = self._callers()[1]

        def done(outcome: Outcome) -> None:  # on the writer thread
            # RuntimeError: the event loop is gone, and whoever waited with it
            with contextlib.suppress(RuntimeError):
                threadsafe(functools.partial(self._done, writes, upto, outcome))

        self.db.submit(writes, done)

    def _done(self, writes: list[Write | None], upto: int, outcome: Outcome) -> None:
        """A batch's outcome, on the event loop."""
        self._inflight = False
        exc, refused = outcome
        for job_s, why in refused:
            if isinstance(why, JobError):  # the database refused it (PostgreSQL's claims)
                self._refused[job_s] = why
                continue
            _log.error("job XML refused by the store: its row is not written", job=job_s)
            self._refused[job_s] = StoreError(
                f"the job store '{self.path}' cannot keep job '{job_s}': {why}"
            )
        if exc is not None:
            self._pending[:0] = writes  # kept in memory, retried in order
            self._last, self._state_last = {}, {}
            first = self.error is None
            if isinstance(exc, StoreError):  # the database's own words (PostgreSQL)
                self.error = exc
            elif _is_full(exc):
                self.error = StoreError(f"no space left for the job store at {self.path}")
            else:
                self.error = StoreError(f"cannot write the job store '{self.path}': {exc!r}")
            if first:
                _log.error(
                    "job store write failed: new jobs are refused, running jobs go on, "
                    "writes are kept and retried",
                    path=str(self.path),
                    error=str(exc),
                )
            self._run_outbox(None)  # events are no longer held back
            if self._timer is not None:
                self._timer.set()  # the retry
        else:
            if self.error is not None:
                _log.info("job store writes succeed again", path=str(self.path))
                self.error = None
            self._committed = upto
            self._run_outbox(upto)
            if self._pending:  # queued while this batch was on the writer
                self._submit()
        waiters = self._sync_waiters
        while waiters and (exc is not None or waiters[0][0] <= self._committed):
            waiters.popleft()[1].set()
        if self._synced is not None:
            self._synced.set()
            self._synced = None

    def _run_outbox(self, upto: int | None) -> None:
        while self._outbox and (upto is None or self._outbox[0][0] <= upto):
            _, fn = self._outbox.popleft()
            try:
                fn()
            except Exception:  # one subscriber's bug must not stop the others
                _log.exception("deferred callback failed")

    async def run(self) -> None:
        """Flush lone writes (a purge, a progress tick: nobody waits for them) within
        FLUSH_DELAY, and retry a failed batch every RETRY_INTERVAL, until cancelled
        (after ``drain``)."""
        self._callers()
        while True:
            if not self._pending or self._inflight:
                self._timer = anyio.Event()
                await self._timer.wait()  # set by the first write queued while idle
                self._timer = None
            await anyio.sleep(RETRY_INTERVAL if self.error is not None else FLUSH_DELAY)
            if not self._inflight and self._pending:
                self._submit()

    async def drain(self, timeout: float = 10.0) -> None:
        """Commit what is queued (the connection is closing); give up after ``timeout``."""
        with anyio.move_on_after(timeout, shield=True):
            while (self._pending or self._inflight) and self.error is None:
                await self._next_outcome()
        self._run_outbox(None)
        if self._pending:
            _log.error(
                "job store writes lost at close", path=str(self.path), writes=len(self._pending)
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.release(self.scope)

    # ---- the drivers' own records (jobcore.driver.DriverState) ---------------------------

    def driver_state(self) -> StoreDriverState:
        """The DriverState of this store's scope (its values as loaded at open)."""
        return StoreDriverState(self)

    def _save_state(self, key: str, value: Any) -> None:
        text = json.dumps(value)  # copied now: TypeError for what JSON cannot hold
        self._state[key] = _SavedText(text)  # decoded only if load() is asked again
        self._queue_state((_SAVE_STATE, (self.scope, key, text), None), key)

    def _delete_state(self, key: str) -> None:
        if self._state.pop(key, _MISSING) is not _MISSING:
            self._queue_state((_DELETE_STATE, (self.scope, key), None), key)

    def _queue_state(self, write: Write, key: str) -> None:
        """Queue a save or delete of a driver-state key, dropping the key's previous one
        from the batch being gathered: the batch commits as one transaction, so the last
        write of a key is all a reader (or a reopened store) can see: the sim's instant
        job, saved at its start and at its end in one batch, costs one upsert, not two."""
        last = self._state_last.get(key)
        if last is not None:
            self._pending[last] = None
        self._state_last[key] = len(self._pending)
        self._queue(write)

    # ---- domain definitions -------------------------------------------------------------

    def domains(self) -> list[DomainDefinition]:
        """The domain definitions of this store's scope, in the order they were first
        defined (from memory)."""
        return list(self._domains.values())

    def domain(self, name: str) -> DomainDefinition | None:
        return self._domains.get(name)

    async def save_domain(
        self, name: str, domain_uuid: uuid.UUID, uri: str, xml: str
    ) -> DomainDefinition:
        """Define a domain, or change its definition (same name, same UUID); returns once
        the row is committed. InvalidArgument if the name is defined with another UUID or
        the UUID under another name; StoreError while the store's writes fail (then
        nothing changed) or if this commit failed (then the write is kept in memory and
        retried like every write)."""
        if not name or not isinstance(name, str):
            raise InvalidArgument("a domain definition needs a name")
        old = self._domains.get(name)
        if old is not None and old.uuid != domain_uuid:
            raise InvalidArgument(
                f"domain '{name}' is already defined with UUID {old.uuid}, not {domain_uuid}"
            )
        other = self._domain_names.get(domain_uuid)
        if other is not None and other != name:
            raise InvalidArgument(f"UUID {domain_uuid} is already domain '{other}'")
        self.check_writable()
        now = time.time()
        saved = DomainDefinition(
            name, domain_uuid, uri, xml, now if old is None else old.created, now
        )
        self._domains[name] = saved
        self._domain_names[domain_uuid] = name
        self._queue(
            (
                _SAVE_DOMAIN,
                (self.scope, name, str(domain_uuid), uri, xml, saved.created, now),
                None,
            )
        )
        with anyio.CancelScope(shield=True):
            await self.sync()
        return saved

    async def delete_domain(self, name: str) -> bool:
        """Forget a domain's definition (False: none was saved); returns once the delete
        is committed. StoreError as for ``save_domain``."""
        if name not in self._domains:
            return False
        self.check_writable()
        gone = self._domains.pop(name)
        del self._domain_names[gone.uuid]
        self._queue((_DELETE_DOMAIN, (self.scope, name), None))
        with anyio.CancelScope(shield=True):
            await self.sync()
        return True


_MISSING = object()


class _SavedText(str):
    """A driver-state value saved since open, kept as its JSON text until ``load``."""


class StoreDriverState:
    """A driver connection's DriverState in the job store (the ``driver_state`` table):
    its writes join the store's batches, so they are committed, in order, with the job
    writes queued before the engine's next durability point."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self._store = store

    def load(self) -> dict[str, Any]:
        return {
            key: json.loads(value) if isinstance(value, _SavedText) else value
            for key, value in self._store._state.items()
        }

    def save(self, key: str, value: Any) -> None:
        self._store._save_state(key, value)

    def delete(self, key: str) -> None:
        self._store._delete_state(key)

    async def sync(self) -> None:
        await self._store.sync()


# ---- the writes (built on the event loop from the record's values at that moment) -----


def _insert(scope: str, rec: JobRecord) -> Write:
    values = (
        str(rec.uuid),
        scope,
        str(rec.type),
        rec.domain,
        str(rec.state),
        _claims_json(rec.ticket.claims),
        rec.ticket.priority,
        rec.created_wall,
        None if rec.started is None else rec.created_wall + (rec.started - rec.created),
        None if rec.started is None else rec.started - rec.created,
        rec.processed,
        rec.total,
        rec.bandwidth,
        rec.retention,
        1,
        rec.host,
    )
    return (_INSERT_JOB, values, rec.spec)  # the spec is frozen: formatted by the writer


def _update(rec: JobRecord, event_seq: int) -> Write:
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
    return (_UPDATE_JOB, values, None)


def _progress(rec: JobRecord) -> Write:
    values = (rec.processed, rec.total, json.dumps(rec.extra), rec.bandwidth, str(rec.uuid))
    return (_PROGRESS_JOB, values, None)
