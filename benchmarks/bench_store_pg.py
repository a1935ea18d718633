"""The PostgreSQL store's cost (issue 12's first benchmark): begin→completed of instant
sim jobs with the PostgreSQL store vs the SQLite store, on one host, in the same run.

The server is a private one on a unix socket in a temporary directory (tests/pg_helpers.py;
``make pg-deps`` installs Debian's postgresql), or the one ``BENCH_PG_URL`` names (a fresh,
empty database). Shapes as ``bench_store``'s: one client beginning and waiting for one job
at a time (two commits in series per job), ``CLIENTS`` clients at once (group commit),
jobs begun from job XML as jobd begins them. Each store at two durability levels: without
an fsync per commit (SQLite ``synchronous=normal``; PostgreSQL with ``fsync=off``: a commit
survives a kill of jobd, not a power loss) and with one (``synchronous=full``; PostgreSQL's
default ``fsync=on``). Besides jobs/s each line gives this process's CPU time per job
(the server's own CPU is not counted: it is another process).

    python -m benchmarks.bench_store_pg
    BENCH_STORE_JOBS=5000 python -m benchmarks.bench_store_pg
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import anyio

from benchmarks.bench_store import CLIENTS, N_JOBS, jobs_per_second

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int = N_JOBS) -> list[tuple[str, float, float, float, float]]:
    """(shape, sqlite jobs/s, postgresql jobs/s, sqlite CPU µs/job, postgresql CPU µs/job)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_helpers import PgServer

    given = os.environ.get("BENCH_PG_URL")  # one level: the server's own
    levels = [("normal", False)] if given else [("normal", False), ("full", True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-store-pg-") as tmp:
        for sync, fsync in levels:
            server = None if given else PgServer(fsync=fsync)
            try:
                for clients, from_xml in ((1, False), (CLIENTS, False), (CLIENTS, True)):
                    tag = f"{clients}-{from_xml}-{sync}"
                    lite = f"sqlite://{Path(tmp) / f'jobs-{tag}.sqlite'}?synchronous={sync}"
                    pg = server.create_database() if server is not None else str(given)
                    run = functools.partial(jobs_per_second, n, clients, from_xml=from_xml)
                    sqlite, sqlite_cpu = anyio.run(run, lite)
                    postgres, postgres_cpu = anyio.run(run, pg)
                    shape = (
                        f"{clients} client{'s' if clients > 1 else ''}"
                        f"{', from XML' if from_xml else ''}, synchronous={sync}"
                        f"{'' if given else (' / fsync=on' if fsync else ' / fsync=off')}"
                    )
                    rows.append((shape, sqlite, postgres, sqlite_cpu, postgres_cpu))
            finally:
                if server is not None:
                    server.close()
    return rows


def main() -> None:
    print(f"begin→completed of {N_JOBS:,d} instant sim jobs: PostgreSQL store vs SQLite store")
    for shape, sqlite, postgres, sqlite_cpu, postgres_cpu in measure():
        print(
            f"  {shape:52s} sqlite {sqlite:7,.0f} jobs/s  postgresql {postgres:7,.0f} jobs/s  "
            f"ratio {postgres / sqlite:.2f}×  CPU/job {sqlite_cpu:4.0f} vs {postgres_cpu:4.0f} µs"
        )


if __name__ == "__main__":
    main()
