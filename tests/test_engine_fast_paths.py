"""The fast paths of an instant job's way through the engine (design/README.md "Fast
paths") give what the slow ones gave: a backup's claims, the sim's DomainInfo made once
per change of its domains, and a driver start run inline (``start_inline``)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import pytest
from sim_state import MemoryState

import jobcore
from drivers.sim import SimConnection, SimDriver
from drivers.sim.persist import file_key
from jobcore import JobState
from jobcore.driver import DiskInfo, DomainInfo, DriverConnection
from jobcore.engine import Engine
from jobcore.errors import DriverError
from jobcore.events import EventKind
from jobcore.local import LocalConnection, as_local
from jobcore.scheduler import (
    Claim,
    Mode,
    checkpoint_resource,
    disk_resource,
    domain_resource,
    file_resource,
)
from jobcore.spec import random_uuid, uuid4_of
from jobcore.testing import prepare_job
from jobcore.types.backup import backup_claims, backup_socket
from jobcore.types.base import chain_uses, image_claims
from jobcore.uri import parse_uri

pytestmark = pytest.mark.anyio

MANUAL = "sim:///default?clock=manual"


def claims_as_before(spec: Any, dom: DomainInfo) -> tuple[Claim, ...]:
    """backup_claims as it was written before its fast path (through chain_uses and
    image_claims): the reference it must agree with."""
    claims = [Claim(domain_resource(dom.name), Mode.DOMAIN_SHARED)]
    files: dict[str, None] = {}
    bases: dict[str, None] = {}
    images: dict[Claim, None] = {}
    for disk in spec.disks:
        claims.append(Claim(disk_resource(dom.name, disk.name), Mode.READ))
        files[file_resource(disk.store)] = None
        if disk.incremental is not None:
            bases[checkpoint_resource(dom.name, disk.incremental)] = None
        found = dom.disk(disk.name)
        if found is not None:
            images.update(dict.fromkeys(image_claims(chain_uses(found, set()))))
    claims.extend(images)
    claims.extend(Claim(name, Mode.READ) for name in bases)
    sock = backup_socket(spec)
    if sock is not None:
        files[file_resource(sock)] = None
    claims.extend(Claim(name, Mode.WRITE) for name in files)
    return tuple(claims)


def test_backup_claims_are_the_claims_chain_uses_gave() -> None:
    """Shared layers between disks, a layer twice in one chain, relative and odd
    spellings, incremental and pull backups: the same claims in the same order."""
    dom = DomainInfo(
        "vm9",
        uuid.uuid4(),
        (
            DiskInfo("vda", ("/i/a.qcow2", "/i/base.qcow2", "/i/a.qcow2"), "qcow2", 1 << 30),
            DiskInfo("vdb", ("/i//b.qcow2", "/i/./base.qcow2"), "qcow2", 1 << 20),
            DiskInfo("vdc", ("rel/c.qcow2", "/i/../i/base.qcow2"), "qcow2", 1 << 20),
        ),
        1 << 29,
    )
    docs = [
        "<job type='backup'/>",
        "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
        "<target file='/t/b.qcow2'/></disk></disks></domainbackup></job>",
        "<job type='backup'><domainbackup><incremental>c1</incremental></domainbackup></job>",
        "<job type='backup'><domainbackup mode='pull'><server transport='unix' "
        "socket='/run/x.sock'/></domainbackup></job>",
    ]
    for doc in docs:
        spec = prepare_job(doc, dom, wall=1_700_000_000.0)
        assert backup_claims(spec, dom) == claims_as_before(spec, dom), doc


async def test_a_domains_info_follows_every_change_of_the_domain() -> None:
    """lookup_domain is made again once a job changed the domain (a pull shortens a
    chain, a migration moves the domain, a destroyed one is gone): always what the
    domain says now."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        sim = as_local(conn).driver
        assert isinstance(sim, SimConnection)

        async def agrees(name: str) -> DomainInfo:
            info = await sim.lookup_domain(name)
            assert info == sim.world.domain(name).info()
            return info

        before = await agrees("vm1")
        assert await agrees("vm1") is before  # unchanged: the same value again
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        assert (await job.wait()).state is JobState.COMPLETED
        after = await agrees("vm1")
        assert after.disk("vda") != before.disk("vda")  # the pull merged the chain
        job = await dom.job_begin("<job type='migration'><destination uri='sim:///other'/></job>")
        assert (await job.wait()).state is JobState.COMPLETED
        assert await agrees("vm1") == after  # the same domain, on its new host
        await sim.destroy_domain("vm2")
        with pytest.raises(jobcore.NoSuchDomain):
            await sim.lookup_domain("vm2")


async def run_jobs(conn: Any) -> list[tuple[Any, ...]]:
    """A few jobs (instant, failing, refused by the driver at start), their events and
    final info, with what differs between runs (UUIDs, times) left out."""
    sim = as_local(conn).driver
    assert isinstance(sim, SimConnection)
    seen: list[tuple[Any, ...]] = []
    dom = await conn.lookup_domain("vm1")
    with conn.subscribe() as sub:
        for n in range(3):
            doc = (
                "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
                f"<target file='/inline/{n}.qcow2'/></disk></disks></domainbackup></job>"
            )
            if n == 1:
                sim.inject_failure("backup", 0.0, "injected")
            job = await dom.job_begin(doc)
            info = await job.wait()
            seen.append((info.state, info.processed, info.total, info.errmsg))
        sim.crash()
        with pytest.raises(DriverError) as refused:
            await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        seen.append((type(refused.value), str(refused.value)))
        sim.restart()
        with anyio.fail_after(5):
            while True:
                event = await sub.get()
                seen.append((event.kind, event.type, event.state, event.previous))
                failed = event.kind is EventKind.STATE and event.state is JobState.FAILED
                if failed and event.type == "blockpull":
                    break
    return seen


async def test_an_inline_start_does_what_the_bounded_start_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        inline = await run_jobs(conn)
    monkeypatch.setattr(SimConnection, "start_inline", lambda self, job: False)
    async with jobcore.connect("sim:///default?rate=0") as conn:
        bounded = await run_jobs(conn)
    assert inline == bounded
    assert len(inline) > 10


@asynccontextmanager
async def engine_on_sim(start_timeout: float) -> AsyncIterator[LocalConnection]:
    async with anyio.create_task_group() as tg:
        async with SimDriver().connect(parse_uri(MANUAL), tg) as sim:
            dconn = cast(DriverConnection, sim)
            engine = Engine(dconn, tg, start_timeout=start_timeout)
            try:
                yield LocalConnection(MANUAL, dconn, engine)
            finally:
                engine.close()
        tg.cancel_scope.cancel()


async def test_a_start_said_inline_that_waits_fails_its_job_and_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver that breaks its promise (its start waits, here in a sleep: on trio
    inside a cancel scope of its own) is stopped where it waited: the job fails naming
    the broken promise, the driver is told to cancel, and the engine goes on (the disk
    is free for the next job)."""
    original = SimConnection.start
    calls: list[str] = []

    async def waits_first(self: SimConnection, job: Any) -> None:
        calls.append("start")
        await anyio.sleep(0.01)
        await original(self, job)

    async def cancel(self: SimConnection, job: Any) -> None:
        calls.append("cancel")

    monkeypatch.setattr(SimConnection, "start", waits_first)
    monkeypatch.setattr(SimConnection, "cancel", cancel)
    monkeypatch.setattr(SimConnection, "start_inline", lambda self, job: True)
    pull = "<job type='blockpull'><uuid>{u}</uuid><disk name='vda'/></job>"
    async with engine_on_sim(start_timeout=5) as conn:
        dom = await conn.lookup_domain("vm1")
        first = uuid.uuid4()
        with pytest.raises(DriverError, match=r"inline \(start_inline\) but its start waited"):
            await dom.job_begin(pull.format(u=first))
        rec = conn.engine.store.get(first)
        assert rec is not None and rec.state is JobState.FAILED
        assert calls == ["start", "cancel"]
        monkeypatch.setattr(SimConnection, "start", original)
        second = await dom.job_begin(pull.format(u=uuid.uuid4()))
        assert second.state is JobState.RUNNING


def test_a_sim_file_key_is_the_json_of_its_host_and_path() -> None:
    for host, path in [
        ("default", "/b/1.qcow2"),
        ("h\u00e9", '/q"uo\\te/\n\t\x00\x7f/\u2603/\U0001f600'),
        ("", ""),
    ]:
        assert file_key(host, path) == "file:" + json.dumps([host, path])


async def test_the_memory_stores_sim_saves_nothing_and_runs_as_a_saving_one() -> None:
    """The memory store's DriverState is not durable: the sim keeps no records in it
    (none could be read: no later process loads it), and its jobs run as those of a sim
    that saves every record (a durable state)."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        sim = as_local(conn).driver
        assert isinstance(sim, SimConnection) and sim._persist is None
        unsaved = await run_jobs(conn)
    state = MemoryState()
    async with anyio.create_task_group() as tg:
        async with SimDriver().connect(parse_uri("sim:///default?rate=0"), tg, state=state) as sim:
            dconn = cast(DriverConnection, sim)
            engine = Engine(dconn, tg)
            try:
                saved = await run_jobs(LocalConnection("sim:///default?rate=0", dconn, engine))
            finally:
                engine.close()
        tg.cancel_scope.cancel()
    assert saved == unsaved
    assert state.keys("host:") and state.keys("file:")  # the durable one saved its world


async def test_a_job_due_at_once_ends_in_a_callback_as_the_loop_task_ended_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sim runs a job due at once (an instant job's end) in one loop callback, not
    through its deadline heap and a wake-up of its loop task: the same jobs, events and
    outcomes as through the heap."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        callback = await run_jobs(conn)
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(_instant_backup("/due-now/x.qcow2"))
        assert job.state is JobState.RUNNING  # ends at the loop's next step, not in begin
        assert (await job.wait()).state is JobState.COMPLETED
    monkeypatch.setattr(SimConnection, "due_now_callback", False)
    async with jobcore.connect("sim:///default?rate=0") as conn:
        heap = await run_jobs(conn)
    assert callback == heap
    assert len(callback) > 10


async def test_a_job_rescheduled_before_its_due_now_callback_runs_as_rescheduled() -> None:
    """A job rescheduled between its start (due at once) and the callback is left to its
    new schedule, as the heap's version check did: the stale entry does nothing."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        sim = as_local(conn).driver
        assert isinstance(sim, SimConnection)
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        sj = sim._jobs[job.uuid]
        sj.version += 1  # rescheduled meanwhile: the queued entry is stale
        await anyio.sleep(0.01)
        assert job.state is JobState.RUNNING
        sim._schedule(sj)
        assert (await job.wait()).state is JobState.COMPLETED


def _instant_backup(target: str) -> str:
    return (
        "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
        f"<target file='{target}'/></disk></disks></domainbackup></job>"
    )


def test_a_begins_uuid_is_what_uuid4_makes_of_the_same_bytes() -> None:
    """begin's UUIDs are built without UUID.__init__: the same value, version, variant
    and text as ``uuid.UUID(bytes=..., version=4)`` of the same random bytes."""
    for _ in range(2000):
        random = os.urandom(16)
        made, reference = uuid4_of(random), uuid.UUID(bytes=random, version=4)
        assert made == reference and made.int == reference.int
        assert (made.version, made.variant, str(made)) == (4, uuid.RFC_4122, str(reference))
        assert hash(made) == hash(reference) and made.is_safe is reference.is_safe
    for edge in (b"\x00" * 16, b"\xff" * 16):
        assert uuid4_of(edge) == uuid.UUID(bytes=edge, version=4)
    assert random_uuid().version == 4 and random_uuid() != random_uuid()


async def test_waiters_of_one_job_each_get_its_end_when_one_gave_up() -> None:
    """wait()'s event (asyncio's own on asyncio): a waiter whose timeout ran out leaves
    the others waiting, and each of them gets the job's final info when it ends."""
    async with jobcore.connect(MANUAL) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
        got: list[Any] = []

        async def waits() -> None:
            got.append(await job.wait())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waits)
            tg.start_soon(waits)
            with pytest.raises(TimeoutError):
                await job.wait(timeout=0.01)
            await job.abort()
        assert [info.state for info in got] == [JobState.CANCELLED] * 2
        assert (await job.wait(timeout=0)).state is JobState.CANCELLED


async def test_a_wait_settles_an_instant_jobs_end_as_the_loop_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """wait() asks the driver to settle what is due at once (the sim: an instant job's
    end) before it waits: it returns without suspending, and every job, event and
    outcome is what waiting for the loop's next step gave."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        settled = await run_jobs(conn)
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(_instant_backup("/settle/x.qcow2"))
        assert job.state is JobState.RUNNING
        others: list[str] = []

        async def another_task() -> None:
            others.append("ran")

        async with anyio.create_task_group() as tg:
            tg.start_soon(another_task)
            ended = await job.wait()
            assert others == []  # the wait did not yield to the loop: it ended the job
        assert ended.state is JobState.COMPLETED and others == ["ran"]
    monkeypatch.delattr(SimConnection, "settle")
    async with jobcore.connect("sim:///default?rate=0") as conn:
        unsettled = await run_jobs(conn)
    assert settled == unsettled
    assert len(settled) > 10


async def test_wait_ready_settles_an_instant_job_first() -> None:
    """jobd serves a JobWait in the client's read loop when ``wait_ready`` says it waits
    for nothing: an instant job's end is settled first, so its wait is one of those; a
    job still copying is not."""
    async with jobcore.connect("sim:///default?rate=0") as conn:
        engine = as_local(conn).engine
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(_instant_backup("/ready/x.qcow2"))
        rec = engine.store.get(job.uuid)
        assert rec is not None and rec.state is JobState.RUNNING
        assert engine.wait_ready(rec) and job.state is JobState.COMPLETED
    async with jobcore.connect(MANUAL) as conn:
        engine = as_local(conn).engine
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(_instant_backup("/ready/y.qcow2"))
        rec = engine.store.get(job.uuid)
        assert rec is not None and not engine.wait_ready(rec)
        assert rec.state is JobState.RUNNING
