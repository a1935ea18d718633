"""DriverState (jobcore.driver): the store-backed one (the driver_state table, written with
the job rows' batches) and the memory one, and how connect hands it to a driver that
declares ``persistent_state``."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import BACKUP_VDB
from store_helpers import url

import jobcore
from jobcore import local
from jobcore.drivers import load_driver
from jobcore.local import as_local
from jobcore.store import MemoryDriverState
from jobcore.store_sqlite import SQLiteJobStore, StoreDriverState
from jobcore.uri import URI, parse_uri

pytestmark = pytest.mark.anyio


def table(path: Path) -> dict[tuple[str, str], str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {(s, k): v for s, k, v in conn.execute("SELECT scope, key, value FROM driver_state")}
    finally:
        conn.close()


class StatefulSim:
    """The sim driver, declaring persistent_state: records the state connect got."""

    persistent_state = True

    def __init__(self) -> None:
        self._inner: Any = load_driver(parse_uri("sim:///default"))
        self.scheme = "sim"
        self.uri_params = getattr(self._inner, "uri_params", None)
        self.states: list[Any] = []

    @asynccontextmanager
    async def connect(self, uri: URI, tg: Any, *, state: Any) -> AsyncIterator[Any]:
        self.states.append(state)
        async with self._inner.connect(uri, tg) as dconn:
            yield dconn


@pytest.fixture
def stateful(monkeypatch: pytest.MonkeyPatch) -> StatefulSim:
    driver = StatefulSim()
    monkeypatch.setattr(local, "load_driver", lambda uri: driver)
    return driver


async def test_save_reopen_load_delete(tmp_path: Path, stateful: StatefulSim) -> None:
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default", store=url(path)) as conn:
        state = stateful.states[-1]
        assert isinstance(state, StoreDriverState) and state.load() == {}
        state.save("host", {"domains": ["vm1", "vm2"], "clock": 12.5})
        state.save("gone", 1)
        state.save("host", {"domains": ["vm1"], "clock": 13.0})  # the later value wins
        state.delete("gone")
        state.delete("never-saved")  # nothing to delete: nothing written
        await state.sync()
        assert table(path) == {
            ("sim:///default", "host"): '{"domains": ["vm1"], "clock": 13.0}'
        }  # on disk once sync returned
        # a value is copied when saved
        mutable = {"n": 1}
        state.save("copy", mutable)
        mutable["n"] = 2
        assert state.load()["copy"] == {"n": 1}
        with pytest.raises(TypeError):
            state.save("bad", object())
        assert as_local(conn).engine.store is not None
    async with jobcore.connect("sim:///other", store=url(path)):
        assert stateful.states[-1].load() == {}  # another scope's records are its own
    async with jobcore.connect("sim:///default", store=url(path)):
        assert stateful.states[-1].load() == {
            "host": {"domains": ["vm1"], "clock": 13.0},
            "copy": {"n": 1},
        }


async def test_saved_state_is_on_disk_before_jobbegin_returns(
    tmp_path: Path, stateful: StatefulSim
) -> None:
    """A save queued before a durability point is committed with it (one batch)."""
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default?rate=1048576", store=url(path)) as conn:
        stateful.states[-1].save("before-begin", True)
        job = await (await conn.lookup_domain("vm1")).job_begin(BACKUP_VDB.format(tag="s"))
        assert ("sim:///default", "before-begin") in table(path)
        store = as_local(conn).engine.store
        assert isinstance(store, SQLiteJobStore) and store.get(job.uuid) is not None
        await job.abort()


async def test_memory_store_gets_a_memory_state(stateful: StatefulSim) -> None:
    async with jobcore.connect("sim:///default"):
        state = stateful.states[-1]
        assert isinstance(state, MemoryDriverState)
        state.save("k", [1, 2])
        state.delete("missing")
        await state.sync()
        assert state.load() == {"k": [1, 2]}
        state.delete("k")
        assert state.load() == {}


async def test_drivers_without_persistent_state_are_called_as_before(tmp_path: Path) -> None:
    # the built-in sim driver takes no state: connect would fail if it got one
    async with jobcore.connect("sim:///default", store=url(tmp_path / "jobs.sqlite")) as conn:
        assert await conn.list_domains()


async def test_a_key_written_again_in_one_batch_costs_one_statement(
    tmp_path: Path, stateful: StatefulSim
) -> None:
    """Saves and deletes of one key gathered in one batch (one transaction): only the last
    is committed, and the table ends as if every one had been; across batches each
    batch's last write of the key is committed."""
    path = tmp_path / "jobs.sqlite"
    async with jobcore.connect("sim:///default", store=url(path)) as conn:
        store = as_local(conn).engine.store
        assert isinstance(store, SQLiteJobStore)
        state = stateful.states[-1]
        await state.sync()
        state.save("committed", 1)
        await state.sync()

        def gathered() -> list[tuple[str, tuple[Any, ...]]]:
            return [(w[0], w[1]) for w in store._pending if w is not None]

        state.save("job", {"n": 1})
        state.save("job", {"n": 2})
        state.save("kept", "a")
        state.save("job", {"ended": True})
        state.delete("job")  # saved three times, then deleted: only the delete remains
        state.save("committed", 2)
        state.delete("committed")  # committed before: its delete must be committed
        state.save("again", 1)
        state.delete("again")
        state.save("again", 2)  # deleted, then saved: the last save wins
        writes = gathered()
        keys = [params[1] for _, params in writes]
        assert sorted(keys) == ["again", "committed", "job", "kept"]  # one write per key
        assert dict(zip(keys, (sql.split()[0] for sql, _ in writes), strict=True)) == {
            "job": "DELETE",
            "kept": "INSERT",
            "committed": "DELETE",
            "again": "INSERT",
        }
        await state.sync()
        assert table(path) == {("sim:///default", "kept"): '"a"', ("sim:///default", "again"): "2"}
        assert state.load() == {"kept": "a", "again": 2}
        state.save("kept", "b")  # a new batch: its write is committed too
        await state.sync()
        assert table(path)[("sim:///default", "kept")] == '"b"'
    async with jobcore.connect("sim:///default", store=url(path)):
        assert stateful.states[-1].load() == {"kept": "b", "again": 2}
