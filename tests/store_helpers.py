"""Reading a durable job store from a test, as another process would: an SQLite file, or
a PostgreSQL database (``durable``: the same test on both)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from attrs import frozen
from psycopg.rows import dict_row


def url(path: Path) -> str:
    return f"sqlite://{path}"


def rows(path: Path) -> dict[str, dict[str, Any]]:
    """The jobs table, read with a connection of its own (as another process would)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {r["uuid"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
    finally:
        conn.close()


def pg_rows(dsn: str) -> dict[str, dict[str, Any]]:
    """A PostgreSQL store's jobs table, read with a connection of its own."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return {r["uuid"]: r for r in conn.execute("SELECT * FROM jobs")}


@frozen
class Durable:
    """A durable store for one test: its URL and a reader of its jobs table."""

    kind: str  # 'sqlite' or 'postgresql'
    url: str
    read: Callable[[], dict[str, dict[str, Any]]]

    def rows(self) -> dict[str, dict[str, Any]]:
        return self.read()


@pytest.fixture(params=["sqlite", "postgresql"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Durable:
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite"
        return Durable("sqlite", url(path), lambda: rows(path))
    dsn: str = request.getfixturevalue("pg_url")
    return Durable("postgresql", dsn, lambda: pg_rows(dsn))
