"""jobd serves the reads of ``server._INLINE`` in the client's read loop: each reply is the
one the same request gets from a task of its own (the dispatch every other call keeps),
on one in-process daemon whose table of inline reads is emptied for the second round."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobd_helpers import BACKUP_VDA, RawClient

import jobcore
from jobcore.daemon import server
from jobcore.daemon.config import DaemonConfig

ZERO = b"\x00" * 16
#: a job of our choosing (the job XML's <uuid>), so requests can name it before it exists
JOB = bytes(range(16))
BEGIN = BACKUP_VDA.format(tag="inline").replace(
    "<job type='backup'>", "<job type='backup'><uuid>00010203-0405-0607-0809-0a0b0c0d0e0f</uuid>"
)


def _reads() -> list[tuple[str, list[Any]]]:
    flags = jobcore.VIR_DOMAIN_JOB_STATS_COMPLETED | jobcore.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    return [
        ("lookup_domain", ["vm1"]),
        ("lookup_domain", ["nope"]),
        ("lookup_job", [JOB]),
        ("lookup_job", [ZERO]),
        ("job_lookup_by_uuid", ["vm1", JOB]),
        ("job_lookup_by_uuid", ["vm2", JOB]),
        ("list_jobs_page", ["vm1", -1, 10]),
        ("legacy_job_info", ["vm1"]),
        ("legacy_job_info", ["vm2"]),
        ("legacy_job_stats", ["vm1", 0]),
        ("legacy_job_stats", ["vm1", flags]),
        ("legacy_job_stats", ["vm1", 1 << 30]),
        ("block_job_info", ["vm1", "vda", 0]),
        ("block_job_info", ["vm1", "sdz", 0]),
        ("job_info", [JOB]),
        ("job_info", [ZERO]),
        ("job_stats", [JOB]),
        ("job_stats", ["not a uuid"]),
    ]


def _session(path: Path) -> list[list[Any]]:
    """Every read twice, in order: inline, then with the table emptied (tasks)."""
    with RawClient.ready(path, "sim:///inline?clock=manual") as raw:
        began = raw.call("job_begin", "vm1", BEGIN, 0)
        assert began[0] == 1 and began[2][0] == JOB, began
        assert {m for m, _ in _reads()} == {str(m) for m in server._INLINE}
        rounds = []
        for table in (server._INLINE, frozenset()):
            server._INLINE = table  # read by each request's dispatch
            replies = [raw.call(method, *args) for method, args in _reads()]
            rounds.append([[r[0], *r[2:]] for r in replies])  # the request ids differ
        return rounds


@pytest.mark.anyio
async def test_inline_reads_reply_as_their_tasks_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    monkeypatch.setattr(server, "_INLINE", server._INLINE)  # restored after the test
    daemon = server.Daemon(DaemonConfig(run_dir=tmp_path / "run", store="memory:"))
    async with anyio.create_task_group() as tg:
        await tg.start(partial(daemon.run, handle_signals=False))
        inline, tasks = await anyio.to_thread.run_sync(_session, daemon.rw_path)
        daemon.stop()
    assert inline == tasks
    kinds = [reply[0] for reply in inline]
    assert kinds.count(1) >= 10 and kinds.count(2) >= 6  # replies and errors both compared


SLOTS = 2  # the requests in flight per client (MAX_IN_FLIGHT) in the next test


def _wait_behind_full_slots(path: Path) -> tuple[list[Any], list[Any]]:
    """Fill every request slot with waits of a running job, then wait for an ended one:
    its reply comes at once (the read loop serves it); with a task it would queue for
    a slot until the running job ends."""
    with RawClient.ready(path, "sim:///inline?clock=manual") as raw:
        running = raw.call("job_begin", "vm1", BACKUP_VDA.format(tag="run"), 0)[2][0]
        ended = raw.call("job_begin", "vm2", BACKUP_VDA.format(tag="end"), 0)[2][0]
        assert raw.call("job_abort", ended)[0] == 1
        first = raw.call("job_wait", ended, None)  # its outcome is on disk once it returns
        assert first[0] == 1, first
        blocked = [raw.request("job_wait", running, None) for _ in range(SLOTS)]
        rid = raw.request("job_wait", ended, None)
        reply = raw.recv()  # the only frame jobd can send: the ended job's wait's reply
        assert reply[1] == rid, (reply, blocked)
        with RawClient.ready(path, "sim:///inline?clock=manual") as other:  # a slot of its own
            assert other.call("job_abort", running)[0] == 1
        finals = {raw.recv()[1] for _ in blocked}
        assert finals == set(blocked)
        return [first[0], *first[2:]], [reply[0], *reply[2:]]


@pytest.mark.parametrize("store", ["memory:", "sqlite"])
@pytest.mark.anyio
async def test_wait_of_an_ended_job_needs_no_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str, store: str
) -> None:
    monkeypatch.setattr(server, "MAX_IN_FLIGHT", SLOTS)
    url = f"sqlite:///{tmp_path}/jobs.sqlite" if store == "sqlite" else store
    daemon = server.Daemon(DaemonConfig(run_dir=tmp_path / "run", store=url))
    async with anyio.create_task_group() as tg:
        await tg.start(partial(daemon.run, handle_signals=False))
        first, again = await anyio.to_thread.run_sync(_wait_behind_full_slots, daemon.rw_path)
        daemon.stop()
    assert first == again  # the same final info, inline as from its task
