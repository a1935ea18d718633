"""Big documents are parsed and formatted off the event loop, a few at a time, and a
job that parses can always be described back (issue 8, item 19)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

import jobcore
from jobcore import local as api
from jobcore.xml import format_job, parse_job
from jobcore.xml._parse import MAX_DOCUMENT_BYTES
from jobcore.xml.job import _parse_job

pytestmark = pytest.mark.anyio

MANUAL = "sim:///default?clock=manual"


def big_job(disks: int = 7400) -> str:
    """A backup that redefines its checkpoint with the domain's XML kept as written: about
    850 KB compact, more than 1 MiB once laid out in libvirt's style."""
    devices = "".join(
        f"<disk type='file' device='disk'><source file='/var/lib/images/guest-{i:05d}.qcow2'/>"
        f"<target dev='vd{i}'/></disk>"
        for i in range(disks)
    )
    return (
        "<job type='backup'><domainbackup mode='push'/><domaincheckpoint><name>c1</name>"
        f"<domain><name>vm1</name><devices>{devices}</devices></domain></domaincheckpoint></job>"
    )


def test_a_job_that_parses_can_be_formatted_even_when_its_text_grows() -> None:
    doc = big_job()
    assert 800_000 < len(doc) < MAX_DOCUMENT_BYTES
    spec = parse_job(doc)
    text = format_job(spec)
    assert len(text) > MAX_DOCUMENT_BYTES  # the layout made it bigger than any input
    assert _parse_job(text, None) == spec


async def test_a_big_job_begins_and_describes_back() -> None:
    async with jobcore.connect(MANUAL) as conn:
        dom = await conn.lookup_domain("vm1")
        job = await dom.job_begin(big_job())
        desc = await job.xml_desc()
        assert f"<uuid>{job.uuid}</uuid>" in desc and "guest-07399.qcow2" in desc
        described = _parse_job(desc, None)
        assert described.uuid == job.uuid
        assert described.checkpoint == parse_job(big_job()).checkpoint


def waits_for_the_loop(fn: Any, loop_ran: threading.Event, seen: list[bool]) -> Any:
    """``fn``, but first wait until a task on the event loop has run: possible only when
    ``fn`` runs on another thread (on the loop's own thread it would wait in vain)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen.append(loop_ran.wait(timeout=10))
        return fn(*args, **kwargs)

    return wrapped


async def test_the_loop_keeps_answering_while_a_big_document_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No timing: the parse (then the format) of a big document waits for a task of the
    event loop to run, which it can only do if the loop is free meanwhile."""
    loop_ran = threading.Event()
    seen: list[bool] = []
    monkeypatch.setattr(api, "parse_job", waits_for_the_loop(parse_job, loop_ran, seen))
    monkeypatch.setattr(api, "format_job", waits_for_the_loop(format_job, loop_ran, seen))

    async def loop_task() -> None:
        await anyio.sleep(0.01)
        loop_ran.set()

    async with jobcore.connect(MANUAL) as conn:
        dom = await conn.lookup_domain("vm1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop_task)
            job = await dom.job_begin(big_job())
        assert seen == [True]
        loop_ran.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop_task)
            assert "guest-07399.qcow2" in await job.xml_desc()
        assert seen == [True, True]


async def test_at_most_a_few_big_documents_are_parsed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    active = peak = 0
    lock = threading.Lock()

    def counting_parse(doc: str | bytes) -> Any:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.02)
            return parse_job(doc)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(api, "parse_job", counting_parse)
    small = "<job type='blockpull'><disk name='vda'/></job>"
    pad = "<!--" + "x" * (api.XML_THREAD_BYTES + 1) + "-->"
    big = small.replace("</job>", pad + "</job>")
    async with jobcore.connect(MANUAL) as conn:
        doms = [await conn.lookup_domain(name) for name in ("vm1", "vm2")]
        errors: list[Exception] = []

        async def begin(i: int) -> None:
            try:
                await doms[i % 2].job_begin(big)
            except jobcore.JobConflict as exc:  # one pull per disk: the rest conflict
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(begin, i)
    assert peak == api.XML_THREADS
    assert len(errors) == 6


def test_small_documents_are_parsed_inline() -> None:
    seen: list[threading.Thread] = []

    def where(doc: str) -> str:
        seen.append(threading.current_thread())
        return doc

    async def main() -> None:
        await api.xml_work(where, "<job/>", 6)
        await api.xml_work(where, "x", api.XML_THREAD_BYTES + 1)

    anyio.run(main)
    assert seen[0] is threading.current_thread() and seen[1] is not seen[0]
