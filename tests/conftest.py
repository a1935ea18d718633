"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# a private PostgreSQL server (tests/pg_helpers.py) for the tests that ask for one
# three jobd members on one private PostgreSQL server (tests/fleet_helpers.py)
from fleet_helpers import fleet2, jobd_fleet  # noqa: E402, F401
from pg_helpers import pg_server, pg_url, private_pg  # noqa: E402, F401

# the same test on an SQLite file and a PostgreSQL database (tests/store_helpers.py)
from store_helpers import durable  # noqa: E402, F401
