"""Reading an SQLite job store from a test, as another process would."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


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
