"""A private PostgreSQL server for tests: Debian's binaries, a temporary directory, a unix
socket in it and no TCP, stopped and removed at the end (design/fleet.md "Tests").

initdb refuses to run as root: as root the server runs as the package's ``postgres``
user (the directory is made its own), else as the user running the tests. The fixtures:
``pg_server`` (one server per test session, shared), ``pg_url`` (a fresh database on it
per test, as a ``postgresql://`` URL) and ``private_pg`` (a server of the test's own, which
it may stop and start).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

#: the superuser initdb makes (trust authentication on the socket alone)
SUPERUSER = "jobcore"


def pg_bin(name: str) -> str:
    """A PostgreSQL program of the newest installed version (``make pg-deps``)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed (/usr/lib/postgresql/*/bin): "
            "run 'make pg-deps' (Debian's postgresql package)"
        )
    return found[-1]


class PgServer:
    """One server in its own directory, listening only on a unix socket there."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests: a commit survives a kill, not a power loss
        self.dir = Path(tempfile.mkdtemp(prefix="jobcore-pg-"))
        self.data = self.dir / "data"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self.dir.chmod(0o700)
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.start()
        self._names = itertools.count()

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.dir, check=False, **self._as
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        # no TCP (listen_addresses empty), the socket in our directory
        options = f"-c listen_addresses='' -k {self.dir} -c max_connections=200"
        if not self.fsync:
            options += " -c fsync=off"
        self._run(
            pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
            "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        host = urllib.parse.quote(str(self.dir), safe="")
        return f"postgresql://{SUPERUSER}@/{dbname}?host={host}"

    def create_database(self) -> str:
        """A fresh database's URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A database of its own for this test on the session's server."""
    return pg_server.create_database()


@pytest.fixture
def private_pg() -> Iterator[PgServer]:
    """A server of this test's own (it may stop and start it)."""
    server = PgServer()
    try:
        yield server
    finally:
        server.close()
