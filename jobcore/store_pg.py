"""The durable job store on PostgreSQL (psycopg 3 with a connection pool), for fleets.

It is the SQLite store's job store (``jobcore.store_sqlite.SQLiteJobStore``: reads from
memory, writes queued on the event loop and committed in batches by a writer thread, the
same durability points) on another database: ``PostgresDatabase`` holds a pool of
connections and its writer thread, and commits the store's statements translated to
PostgreSQL's dialect, each member's rows under its host (``jobd --host``). Each commit
is also a fleet member's (design/fleet.md): refused once the host is fenced, the shared
claims of the jobs it inserts arbitrated and those of the jobs it ends released in its
transaction, ``jobcore_jobs`` notified of each job row it writes. Design:
design/store.md "PostgreSQL", design/fleet.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from attrs import frozen

from jobcore.errors import InvalidArgument, JobConflict, JobError, StoreError
from jobcore.lifecycle import JobState
from jobcore.log import get_logger
from jobcore.scheduler import CONFLICTS, Mode
from jobcore.store import (
    DEFAULT_MAX_RETAINED,
    DEFAULT_MAX_RETAINED_PER_DOMAIN,
    DEFAULT_STORE_URL,
    JobStore,
    default_host,
)
from jobcore.store_sqlite import (
    _DELETE_DOMAIN,
    _DELETE_JOB,
    _DELETE_STATE,
    _INSERT_JOB,
    _PROGRESS_JOB,
    _SAVE_DOMAIN,
    _SAVE_SCOPE,
    _SAVE_STATE,
    _UPDATE_JOB,
    Refusal,
    SharedDatabase,
    SQLiteJobStore,
    StoreDatabase,
    StoredScope,
    StoreURL,
    Write,
    _loaded_row,
    _row_spec,
    batch_runs,
    open_database,
    open_shared,
    parse_store_url,
)
from jobcore.store_sqlite import open_store as open_sqlite_store

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

_log = get_logger("jobcore.store")

#: connections the pool keeps at most (the writer thread, the loads at open, a spare)
POOL_SIZE = 3
#: seconds to wait for a connection (at open: the server's answer; a commit: the pool's)
CONNECT_TIMEOUT = 3.0
#: seconds to wait at open for the host's lock to be released by a holder that died
LOCK_WAIT = 2.0

#: schema version -> the statements that bring a database from the previous version to
#: it. A PostgreSQL store started at the SQLite store's version 4 (the same tables, each
#: also keyed by its host); from version 5 (the fleet's tables) its versions are its own:
#: the SQLite store has no fleet.
PG_MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        4,
        (
            """CREATE TABLE jobs (
                uuid TEXT PRIMARY KEY,
                scope TEXT NOT NULL,
                type TEXT NOT NULL,
                domain TEXT NOT NULL,
                host TEXT NOT NULL,
                state TEXT NOT NULL,
                xml TEXT NOT NULL,
                claims TEXT NOT NULL,
                priority INTEGER NOT NULL DEFAULT 0,
                created DOUBLE PRECISION NOT NULL,
                started DOUBLE PRECISION,
                ended DOUBLE PRECISION,
                processed BIGINT NOT NULL DEFAULT 0,
                total BIGINT NOT NULL DEFAULT 0,
                stats TEXT NOT NULL DEFAULT '{}',
                errmsg TEXT,
                bandwidth BIGINT,
                retention DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION,
                event_seq INTEGER NOT NULL DEFAULT 0,
                started_after DOUBLE PRECISION,
                elapsed DOUBLE PRECISION,
                spec TEXT,
                seq BIGINT GENERATED ALWAYS AS IDENTITY
            )""",
            "CREATE INDEX jobs_host_scope ON jobs (host, scope, seq)",
            """CREATE TABLE domains (
                host TEXT NOT NULL,
                scope TEXT NOT NULL,
                name TEXT NOT NULL,
                uuid TEXT NOT NULL,
                uri TEXT NOT NULL,
                xml TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                modified DOUBLE PRECISION NOT NULL,
                seq BIGINT GENERATED ALWAYS AS IDENTITY,
                PRIMARY KEY (host, scope, name),
                UNIQUE (host, scope, uuid)
            )""",
            """CREATE TABLE driver_state (
                host TEXT NOT NULL,
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                seq BIGINT GENERATED ALWAYS AS IDENTITY,
                PRIMARY KEY (host, scope, key)
            )""",
            """CREATE TABLE scopes (
                host TEXT NOT NULL,
                scope TEXT NOT NULL,
                uri TEXT NOT NULL,
                seq BIGINT GENERATED ALWAYS AS IDENTITY,
                PRIMARY KEY (host, scope)
            )""",
        ),
    ),
    (
        5,
        (
            # the fleet's members and their leases (times by the server's clock)
            """CREATE TABLE hosts (
                host TEXT PRIMARY KEY,
                pid INTEGER NOT NULL,
                joined TIMESTAMPTZ NOT NULL,
                renewed TIMESTAMPTZ NOT NULL,
                lease_ttl DOUBLE PRECISION NOT NULL,
                left_at TIMESTAMPTZ,
                fenced_at TIMESTAMPTZ,
                fenced_by TEXT,
                fence_reason TEXT
            )""",
            # the shared-storage claims of active jobs, fleet-wide
            """CREATE TABLE claims (
                resource TEXT NOT NULL,
                mode TEXT NOT NULL,
                job TEXT NOT NULL,
                host TEXT NOT NULL,
                PRIMARY KEY (resource, job, mode)
            )""",
            "CREATE INDEX claims_job ON claims (job)",
            "CREATE INDEX claims_host ON claims (host)",
            # verbs on another member's jobs, and their answers (jobcore.fleet_commands)
            """CREATE TABLE commands (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                target TEXT NOT NULL,
                asker TEXT NOT NULL,
                job TEXT NOT NULL,
                verb TEXT NOT NULL,
                args TEXT NOT NULL,
                created TIMESTAMPTZ NOT NULL DEFAULT now(),
                deadline TIMESTAMPTZ NOT NULL,
                picked TIMESTAMPTZ,
                done TIMESTAMPTZ,
                result TEXT,
                error_kind TEXT,
                error TEXT
            )""",
            "CREATE INDEX commands_pending ON commands (target) WHERE done IS NULL",
            # the fleet-wide list in begin order, and UUID prefix lookups (byte order)
            "CREATE INDEX jobs_seq ON jobs (seq)",
            "CREATE INDEX jobs_uuid_pattern ON jobs (uuid text_pattern_ops)",
            # what every commit transaction of a member runs first: its hosts row locked
            # against a fence (which takes it FOR UPDATE), and refused once fenced
            """CREATE FUNCTION jobcore_check_fenced(member TEXT) RETURNS void
            LANGUAGE plpgsql AS $$
            DECLARE
                r RECORD;
            BEGIN
                SELECT fenced_at, fenced_by, fence_reason INTO r FROM hosts
                    WHERE host = member FOR KEY SHARE;
                IF FOUND AND r.fenced_at IS NOT NULL THEN
                    RAISE EXCEPTION USING ERRCODE = 'JCF01', MESSAGE = format(
                        'host ''%s'' was fenced by ''%s''%s: its writes are refused '
                        '(restart its jobd to rejoin the fleet)',
                        member, r.fenced_by, coalesce(': ' || r.fence_reason, ''));
                END IF;
            END $$""",
        ),
    ),
]
PG_SCHEMA_VERSION = PG_MIGRATIONS[-1][0]

#: the tables a job store has (a database holding one of them without a schema version
#: is not a job store)
_TABLES = ("jobs", "domains", "driver_state", "scopes")
#: the store's statements that name a scope's rows, as PostgreSQL runs them: the host
#: comes first (the other statements name a job by its UUID, unique in the fleet)
_HOST_SQL = {
    _SAVE_DOMAIN: (
        "INSERT INTO domains (host, scope, name, uuid, uri, xml, created, modified)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (host, scope, name) DO UPDATE"
        " SET uuid = excluded.uuid, uri = excluded.uri, xml = excluded.xml,"
        " modified = excluded.modified"
    ),
    _DELETE_DOMAIN: "DELETE FROM domains WHERE host = %s AND scope = %s AND name = %s",
    _SAVE_STATE: (
        "INSERT INTO driver_state (host, scope, key, value) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (host, scope, key) DO UPDATE SET value = excluded.value"
    ),
    _DELETE_STATE: "DELETE FROM driver_state WHERE host = %s AND scope = %s AND key = %s",
    _SAVE_SCOPE: (
        "INSERT INTO scopes (host, scope, uri) VALUES (%s, %s, %s)"
        " ON CONFLICT (host, scope) DO UPDATE SET uri = excluded.uri"
    ),
}
_RECOVERABLE_SCOPES = (
    "SELECT scope, uri, n FROM (SELECT s.scope, s.uri, s.seq, (SELECT count(*) FROM jobs j"
    " WHERE j.host = s.host AND j.scope = s.scope AND (j.expires IS NULL OR j.expires > %s))"
    " AS n, EXISTS (SELECT 1 FROM domains d WHERE d.host = s.host AND d.scope = s.scope)"
    " AS defined FROM scopes s WHERE s.host = %s) AS t WHERE n > 0 OR defined ORDER BY seq"
)
#: the advisory lock key space of jobcore (pg_advisory_lock's first int4)
_LOCK_CLASS = 0x6A6F62  # "job"
#: the key of the schema migration's lock (its second int4); a host's is its hashtext
_MIGRATION_LOCK = 0

#: the job statements as a member runs them: on its own rows only (``host`` last), an
#: insert never failing its batch on a UUID another host has (the commit refuses it)
_JOB_SQL = {
    _INSERT_JOB: _INSERT_JOB.replace("?", "%s") + " ON CONFLICT (uuid) DO NOTHING",
    _UPDATE_JOB: _UPDATE_JOB.replace("?", "%s") + " AND host = %s",
    _PROGRESS_JOB: _PROGRESS_JOB.replace("?", "%s") + " AND host = %s",
    _DELETE_JOB: _DELETE_JOB.replace("?", "%s") + " AND host = %s",
}
#: the fenced check every commit transaction starts with (``jobcore_check_fenced``: its
#: hosts row FOR KEY SHARE, so a renewal, which updates no key, does not wait for it and
#: a fence's FOR UPDATE does; raises SQLSTATE FENCED_STATE once fenced)
_FENCED = b"SELECT jobcore_check_fenced(%s)"
FENCED_STATE = "JCF01"
#: the claims held on some resources, with their job's scope (a job's own engine
#: arbitrates it against the other jobs of its scope: those are not checked again)
_CLAIMS_HELD = (
    b"SELECT c.resource, c.mode, c.job, c.host, j.scope FROM claims c"
    b" LEFT JOIN jobs j ON j.uuid = c.job AND j.host = c.host WHERE c.resource = ANY(%s)"
)
_CLAIM_LOCK = b"SELECT pg_advisory_xact_lock(%s)"
_CLAIM_INSERT = (
    b"INSERT INTO claims (resource, mode, job, host) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
_CLAIMS_RELEASE = b"DELETE FROM claims WHERE host = %s AND job = ANY(%s)"
_OTHER_HOSTS_JOBS = b"SELECT uuid, host FROM jobs WHERE uuid = ANY(%s) AND host <> %s"
#: the job row statements that notify ``jobcore_jobs`` of each row they write ("UUID HOST
#: EVENT_SEQ", delivered at commit); the insert returns the UUIDs it wrote
_NOTIFY = "SELECT uuid, pg_notify('jobcore_jobs', uuid || ' ' || host || ' ' || event_seq)"
_INSERT_NOTIFY = (
    f"WITH written AS ({_JOB_SQL[_INSERT_JOB]} RETURNING uuid, host, event_seq)"
    f" {_NOTIFY} FROM written"
).encode()
_JOB_SQL[_UPDATE_JOB] = (
    f"WITH written AS ({_JOB_SQL[_UPDATE_JOB]} RETURNING uuid, host, event_seq)"
    f" {_NOTIFY} FROM written"
)


# ---- shared storage (design/fleet.md "Shared-storage claims") ----------------------------


@frozen
class SharedRoot:
    """A directory on storage that several hosts mount (``jobd --shared-root [ID=]PATH``):
    the claims on files and images below it are arbitrated fleet-wide, by ``storage`` (its
    id) and the path relative to it, so hosts mounting it at different paths agree."""

    storage: str
    path: str


def parse_shared_root(text: str) -> SharedRoot:
    """``PATH`` (its storage id: the normalised path) or ``ID=PATH``; PATH absolute.
    InvalidArgument for anything else."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"invalid shared root {text!r}: give [ID=]PATH, PATH absolute")
    storage, path = (None, text) if text.startswith("/") else text.partition("=")[::2]
    if storage is not None and (not storage or any(c in storage for c in ": \t\n/")):
        raise InvalidArgument(
            f"invalid shared root '{text}': give [ID=]PATH (ID a name without ':', '/' or "
            "spaces, PATH absolute)"
        )
    if not path.startswith("/"):
        raise InvalidArgument(
            f"invalid shared root '{text}': its path must be absolute ('/srv/images' or "
            "'nfs1=/srv/images')"
        )
    normal = os.path.realpath(path)  # the spelling jobs' paths have (normalize_path)
    return SharedRoot(normal if storage is None else storage, normal)


def shared_resource(resource: str, roots: Iterable[SharedRoot]) -> str | None:
    """``file:P`` or ``image:P`` with P at or below a root's path (the deepest root
    holding it) as ``KIND:STORAGE:RELPATH`` (RELPATH from the root, starting with '/');
    None for any other resource."""
    kind, sep, path = resource.partition(":")
    if not sep or kind not in ("file", "image") or not path.startswith("/"):
        return None
    path = os.path.normpath(path)
    best: SharedRoot | None = None
    for root in roots:
        top = root.path.rstrip("/")
        if (path == root.path or path.startswith(top + "/")) and (
            best is None or len(root.path) > len(best.path)
        ):
            best = root
    if best is None:
        return None
    rel = path[len(best.path.rstrip("/")) :] or "/"
    return f"{kind}:{best.storage}:{rel}"


def display_url(dsn: str) -> str:
    """The URL as messages name it: without its password."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def open_pg_database(dsn: str, host: str) -> PostgresDatabase:
    """The open database at ``dsn`` serving ``host`` (shared within the process;
    ``release`` it). Blocks: call it off the event loop."""
    return open_shared((dsn, host), PostgresDatabase, lambda: PostgresDatabase(dsn, host))


def open_store_database(url: StoreURL, host: str | None = None) -> StoreDatabase | None:
    """The database a parsed store URL names, opened (None for ``memory:``): what jobd
    opens before it serves, so that a bad store stops it at start."""
    if url.kind == "postgresql":
        assert url.dsn is not None
        return open_pg_database(url.dsn, host or default_host())
    if url.path is not None:
        return open_database(url.path, url.synchronous)
    return None


def open_store(
    url: str = DEFAULT_STORE_URL,
    *,
    scope: str = "default",
    max_retained_per_domain: int = DEFAULT_MAX_RETAINED_PER_DOMAIN,
    max_retained: int = DEFAULT_MAX_RETAINED,
    host: str | None = None,
) -> JobStore:
    """The store a URL names: ``memory:``, ``sqlite:///ABS/PATH`` or ``postgresql://…``
    (``jobcore.store_sqlite.open_store`` says the rest). A PostgreSQL store keeps the jobs
    of ``host`` (default: the machine's hostname) and ``scope``."""
    parsed = parse_store_url(url)
    if parsed.kind != "postgresql":
        return open_sqlite_store(
            url,
            scope=scope,
            host=host,
            max_retained_per_domain=max_retained_per_domain,
            max_retained=max_retained,
        )
    assert parsed.dsn is not None
    db = open_pg_database(parsed.dsn, host or default_host())
    try:
        return SQLiteJobStore(
            db, scope, max_retained_per_domain=max_retained_per_domain, max_retained=max_retained
        )
    except BaseException:
        db.release()
        raise


class PostgresDatabase(SharedDatabase):
    """One PostgreSQL database as a host's job store: a pool of connections, a writer
    thread, the schema checked and migrated at open, and a session advisory lock that
    keeps the host to one process (as the SQLite file's ``flock``). Opening raises
    StoreError naming the database (its URL without the password)."""

    def __init__(self, dsn: str, host: str) -> None:
        from psycopg_pool import ConnectionPool

        if not host:
            raise StoreError("a PostgreSQL job store needs a host name (jobd --host)")
        self.dsn = dsn
        self.path = display_url(dsn)
        super().__init__((dsn, host), self.path, f" of host '{host}'")
        self.host: str | None = host
        #: the roots of shared storage (jobcore.fleet.Fleet sets them): claims on files and
        #: images below them are taken fleet-wide in the transaction of the job's insert
        self.shared_roots: tuple[SharedRoot, ...] = ()
        self._lock_conn = self._connect_and_lock()
        try:
            self.pool: ConnectionPool[Any] = ConnectionPool(
                dsn,
                min_size=1,
                max_size=POOL_SIZE,
                kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT)},
                check=ConnectionPool.check_connection,
                name=f"jobcore store {host}",
                open=False,
            )
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except BaseException as exc:
            self._lock_conn.close()
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise StoreError(f"cannot reach the job store '{self.path}': {exc}") from None
            raise
        #: the writer thread's pooled connection, taken at its first batch
        self._wconn: psycopg.Connection[Any] | None = None
        self._start_writer(host)

    def _connect_and_lock(self) -> psycopg.Connection[Any]:
        """The connection that holds the host's advisory lock, after it checked and
        migrated the schema."""
        import psycopg

        what = f"the job store '{self.path}'"
        try:
            conn: psycopg.Connection[Any] = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
            )
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot reach {what}: {_said(exc)}: start the server, or give this "
                "jobd another store"
            ) from None
        try:
            if not self._lock_host(conn):
                raise StoreError(
                    f"host '{self.host}' of {what} is served by another process (it holds "
                    "the host's advisory lock): stop it, or give this one another --host"
                )
            self._migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {what}: {_said(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _lock_host(self, conn: psycopg.Connection[Any]) -> bool:
        """Take the host's session advisory lock, waiting up to LOCK_WAIT for a holder
        that just died (the server ends a killed process's session when it sees its
        socket close: a jobd restarted right after kill -9 may find it still there)."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            got = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, self.host)
            ).fetchone()
            if got and got[0]:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        what = f"the job store '{self.path}'"
        with conn.transaction():
            # one member migrates at a time; the others then find it done
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _MIGRATION_LOCK))
            found = {
                row[0]
                for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            }
            if "jobcore_schema" in found:
                row = conn.execute("SELECT version FROM jobcore_schema").fetchone()
                version = 0 if row is None else int(row[0])
            elif found & set(_TABLES):
                named = ", ".join(sorted(found & set(_TABLES)))
                raise StoreError(
                    f"{what} has tables named like a job store's ({named}) and no schema "
                    "version: name another database"
                )
            else:
                conn.execute("CREATE TABLE jobcore_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO jobcore_schema (version) VALUES (0)")
                version = 0
            if version > PG_SCHEMA_VERSION:
                raise StoreError(
                    f"{what} has schema version {version}, newer than this jobcore's "
                    f"({PG_SCHEMA_VERSION}): run the jobcore that wrote it, or give this one "
                    "another store"
                )
            for target, statements in PG_MIGRATIONS:
                if target <= version:
                    continue
                for sql in statements:
                    conn.execute(sql.encode())
                conn.execute("UPDATE jobcore_schema SET version = %s", (target,))
        if version < PG_SCHEMA_VERSION:
            _log.info(
                "job store schema migrated",
                path=self.path,
                previous=version,
                version=PG_SCHEMA_VERSION,
            )

    def _close(self) -> None:
        self._stop_writer()
        if self._wconn is not None:
            self.pool.putconn(self._wconn)
        self.pool.close()
        import psycopg

        with contextlib.suppress(psycopg.Error):  # gone with the connection anyway
            self._lock_conn.execute(
                "SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, self.host)
            )
        self._lock_conn.close()

    # ---- loads (at open, on the opener's thread) ----------------------------------------

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with self.pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                rows: list[tuple[Any, ...]] = conn.execute(sql.encode(), params).fetchall()
                return rows
        except (psycopg.Error, OSError) as exc:
            raise StoreError(f"cannot read the job store '{self.path}': {exc}") from None
        except Exception as exc:  # the pool's timeout
            raise StoreError(f"cannot reach the job store '{self.path}': {exc}") from None

    def load(self, scope: str) -> list[tuple[tuple[Any, ...], Any, bool]]:
        """The scope's job rows in begin order (as ``SQLiteDatabase.load``)."""
        rows = self._rows(
            "SELECT uuid, type, domain, state, xml, claims, priority, created, started,"
            " ended, processed, total, stats, errmsg, bandwidth, retention, expires,"
            " event_seq, started_after, elapsed, spec, host FROM jobs"
            " WHERE host = %s AND scope = %s ORDER BY seq",
            (self.host, scope),
        )
        loaded = []
        for row in rows:
            spec, prepared = _row_spec(self.path, row)
            loaded.append((_loaded_row(row), spec, prepared))
        return loaded

    def load_domains(self, scope: str) -> list[tuple[Any, ...]]:
        return self._rows(
            "SELECT name, uuid, uri, xml, created, modified FROM domains"
            " WHERE host = %s AND scope = %s ORDER BY seq",
            (self.host, scope),
        )

    def load_state(self, scope: str) -> dict[str, Any]:
        import json

        rows = self._rows(
            "SELECT key, value FROM driver_state WHERE host = %s AND scope = %s ORDER BY seq",
            (self.host, scope),
        )
        return {key: json.loads(value) for key, value in rows}

    def stored_scopes(self, now: float) -> list[StoredScope]:
        """The host's scopes worth reopening (as ``SQLiteDatabase.stored_scopes``)."""
        rows = self._rows(_RECOVERABLE_SCOPES, (now, self.host))
        return [StoredScope(scope, uri, int(n)) for scope, uri, n in rows]

    # ---- the writer thread's commits (SharedDatabase runs the thread) ----------------

    def _statement(
        self, sql: str, rows: list[tuple[Any, ...]]
    ) -> tuple[bytes, list[tuple[Any, ...]]]:
        """One of the store's statements as PostgreSQL runs it, with its parameters."""
        host_sql = _HOST_SQL.get(sql)
        if host_sql is not None:
            return host_sql.encode(), [(self.host, *r) for r in rows]
        job_sql = _JOB_SQL.get(sql)
        if job_sql is not None:  # not an insert: the commit runs those itself
            return job_sql.encode(), [(*r, self.host) for r in rows]
        return _pg_sql(sql), rows

    def commit(self, writes: list[Write | None], refused: list[Refusal]) -> None:
        """Run ``writes`` in one transaction; StoreError saying what failed (the store
        keeps the writes and retries them). The transaction first checks that the host
        is not fenced (else StoreError, nothing written), releases the shared claims of
        the jobs it ends, takes those of the jobs it inserts (a conflict, or a UUID
        another host has, leaves that insert out: listed in ``refused`` with the error
        to raise) and notifies ``jobcore_jobs`` of each job row written."""
        runs = batch_runs(writes, refused)
        if not runs:
            return
        import psycopg

        mine = len(refused)  # what this attempt adds: dropped if it fails
        try:
            if self._wconn is None:  # held while it works: no check, no hand-off per batch
                self._wconn = self.pool.getconn(timeout=CONNECT_TIMEOUT)
            conn = self._wconn
            try:
                self._commit_runs(conn, runs, refused)
            except BaseException:
                del refused[mine:]
                # back to the pool, which replaces it if it is broken; the retry takes one
                self._wconn = None
                self.pool.putconn(conn)
                raise
        except psycopg.errors.DiskFull:
            raise StoreError(f"no space left for the job store at {self.path}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreError(
                f"the job store '{self.path}' is unreachable ({_said(exc)}): new jobs "
                "are refused until it is back"
            ) from None
        except psycopg.Error as exc:
            if exc.sqlstate == FENCED_STATE:
                raise StoreError(exc.diag.message_primary or _said(exc)) from None
            raise StoreError(f"cannot write the job store '{self.path}': {exc}") from None
        except Exception as exc:  # the pool's timeout: no connection could be made
            if type(exc).__name__ != "PoolTimeout":
                raise
            raise StoreError(
                f"the job store '{self.path}' is unreachable (no connection within "
                f"{CONNECT_TIMEOUT:.0f} s): new jobs are refused until it is back"
            ) from None

    def _commit_runs(
        self,
        conn: psycopg.Connection[Any],
        runs: list[tuple[str, list[tuple[Any, ...]]]],
        refused: list[Refusal],
    ) -> None:
        host = self.host
        inserts = [row for sql, rows in runs if sql == _INSERT_JOB for row in rows]
        ending: dict[str, None] = {}  # jobs whose claims this batch releases
        for sql, rows in runs:
            if sql == _UPDATE_JOB:
                ending.update((r[-1], None) for r in rows if JobState(r[0]).terminal)
            elif sql == _DELETE_JOB:
                ending.update((r[0], None) for r in rows)
        wanted = self._shared_claims(inserts) if self.shared_roots else {}
        out: dict[str, JobError] = {}  # inserts left out, and why
        if wanted:
            inserted = self._commit_claiming(conn, runs, wanted, ending, out)
        else:
            inserted = self._commit_at_once(conn, runs, ending)
        missing = [r[0] for r in inserts if r[0] not in out and r[0] not in inserted]
        if missing:  # a UUID already in the table: another host's (or its own, retried)
            taken = conn.execute(_OTHER_HOSTS_JOBS, (missing, host)).fetchall()
            for job_s, other in taken:
                out[job_s] = InvalidArgument(
                    f"a job with UUID '{job_s}' already exists (on host '{other}'): "
                    "choose another UUID"
                )
            if taken and wanted:  # inserted at the same time as this one's: its claims go
                conn.execute(_CLAIMS_RELEASE, (host, [t[0] for t in taken]))
        refused.extend(out.items())

    def _commit_at_once(
        self,
        conn: psycopg.Connection[Any],
        runs: list[tuple[str, list[tuple[Any, ...]]]],
        ending: dict[str, None],
    ) -> set[str]:
        """A batch that takes no shared claims: its statements as one query (one round
        trip; the server runs them as one transaction, the fenced check first); returns
        the UUIDs inserted."""
        import psycopg

        host = self.host
        cur = psycopg.ClientCursor(conn)
        parts = [cur.mogrify(_FENCED.decode(), (host,))]
        if ending:
            parts.append(cur.mogrify(_CLAIMS_RELEASE.decode(), (host, list(ending))))
        inserts_at: list[int] = []  # the results of the inserts, by position
        for sql, rows in runs:
            if sql == _INSERT_JOB:
                for row in rows:
                    inserts_at.append(len(parts))
                    parts.append(cur.mogrify(_INSERT_NOTIFY.decode(), row))
                continue
            stmt, params = self._statement(sql, rows)
            text = stmt.decode()
            parts.extend(cur.mogrify(text, p) for p in params)
        cur.execute(";".join(parts).encode())
        inserted: set[str] = set()
        at = 0
        for i in inserts_at:
            while at < i:
                cur.nextset()
                at += 1
            inserted.update(row[0] for row in cur.fetchall())
        return inserted

    def _commit_claiming(
        self,
        conn: psycopg.Connection[Any],
        runs: list[tuple[str, list[tuple[Any, ...]]]],
        wanted: dict[str, _Wanted],
        ending: dict[str, None],
        out: dict[str, JobError],
    ) -> set[str]:
        """A batch that takes shared claims, in one transaction, pipelined: only the
        claims held are waited for before the rest goes out; returns the UUIDs
        inserted."""
        written: list[psycopg.Cursor[Any]] = []  # the inserts' cursors
        with conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            cur.execute(_FENCED, (self.host,))  # fails the transaction if fenced
            if ending:
                cur.execute(_CLAIMS_RELEASE, (self.host, list(ending)))
            self._take_claims(conn, wanted, ending, out)
            for sql, rows in runs:
                if sql == _INSERT_JOB:
                    rows = [r for r in rows if r[0] not in out]
                    if rows:
                        written.append(conn.cursor())
                        written[-1].executemany(_INSERT_NOTIFY, rows, returning=True)
                elif rows:
                    cur.executemany(*self._statement(sql, rows))
        inserted: set[str] = set()
        for wcur in written:
            while True:
                inserted.update(row[0] for row in wcur.fetchall())
                if not wcur.nextset():
                    break
        return inserted

    def _shared_claims(self, inserts: list[tuple[Any, ...]]) -> dict[str, _Wanted]:
        """job -> its scope and its claims on shared resources (``shared_resource``), of
        the inserts that have some."""
        wanted: dict[str, _Wanted] = {}
        for row in inserts:
            found: dict[tuple[str, Mode], None] = {}
            for resource, mode in json.loads(row[5]):
                shared = shared_resource(resource, self.shared_roots)
                if shared is not None:
                    found[(shared, Mode(mode))] = None
            if found:
                wanted[row[0]] = (row[1], list(found))
        return wanted

    def _take_claims(
        self,
        conn: psycopg.Connection[Any],
        wanted: dict[str, _Wanted],
        ending: dict[str, None],
        out: dict[str, JobError],
    ) -> None:
        """Arbitrate the inserts' shared claims against every host's (in the batch's
        transaction): each resource's advisory lock, in one order for every member, then
        the claims held; a job whose claim conflicts, or whose UUID another host has,
        goes to ``out``."""
        host = self.host or ""
        other_hosts = conn.cursor()
        other_hosts.execute(_OTHER_HOSTS_JOBS, (list(wanted), host))
        cur = conn.cursor()
        resources = sorted({r for _, claims in wanted.values() for r, _ in claims})
        cur.executemany(_CLAIM_LOCK, [(k,) for k in sorted({_lock_key(r) for r in resources})])
        cur.execute(_CLAIMS_HELD, (resources,))
        held: dict[str, list[_Held]] = {}
        for resource, mode, job, other_host, scope in cur.fetchall():
            held.setdefault(resource, []).append((Mode(mode), job, other_host, scope))
        for job_s, other in other_hosts.fetchall():
            out[job_s] = InvalidArgument(
                f"a job with UUID '{job_s}' already exists (on host '{other}'): choose another UUID"
            )
        rows: list[tuple[str, str, str, str]] = []
        for job, (scope, claims) in wanted.items():
            if job in out:
                continue
            conflict = _conflict(job, host, scope, claims, held)
            if conflict is not None:
                out[job] = conflict
                continue
            for resource, mode in claims:
                held.setdefault(resource, []).append((mode, job, host, scope))
                if job not in ending:  # a job begun and ended in one batch holds nothing
                    rows.append((resource, str(mode), job, host))
        if rows:
            cur.executemany(_CLAIM_INSERT, rows)


#: an insert's shared claims: its scope, (resource, mode) each
_Wanted = tuple[str, list[tuple[str, Mode]]]
#: a claim held: (mode, job, host, the job's scope)
_Held = tuple[Mode, str, str, str | None]


def _conflict(
    job: str,
    host: str,
    scope: str,
    claims: list[tuple[str, Mode]],
    held: dict[str, list[_Held]],
) -> JobConflict | None:
    """The refusal of ``job``'s shared claims by a claim another job holds, if any (not
    one of a job of its own scope: its engine arbitrated those, queueing it or not)."""
    import uuid

    for resource, mode in claims:
        for other_mode, other, other_host, other_scope in held.get(resource, ()):
            if other_host == host and (other == job or other_scope == scope):
                continue
            if other_mode in CONFLICTS[mode]:
                return JobConflict(
                    f"job '{job}' conflicts with job '{other}' on host '{other_host}' "
                    f"holding '{resource}' ({other_mode.value} excludes {mode.value})",
                    holder=uuid.UUID(other),
                    resource=resource,
                )
    return None


def _lock_key(resource: str) -> int:
    """The advisory lock key of a shared resource: 63 bits of its BLAKE2b digest (every
    member computes the same; locks are taken in key order, so two never deadlock)."""
    import hashlib

    digest = hashlib.blake2b(resource.encode(), digest_size=8, person=b"jobcore").digest()
    return int.from_bytes(digest, "big") >> 1


def _said(exc: BaseException) -> str:
    """What libpq said, on one line."""
    return " ".join(str(exc).split())


_pg_sql_of: dict[str, bytes] = {}


def _pg_sql(sql: str) -> bytes:
    """One of the store's statements (``?`` parameters) in psycopg's form (``%s``)."""
    found = _pg_sql_of.get(sql)
    if found is None:
        found = _pg_sql_of[sql] = sql.replace("?", "%s").encode()
    return found
