"""Big documents are parsed and formatted off the event loop, a few at a time, and a
job that parses can always be described back (issue 8, item 19)."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

import jobcore
from jobcore import api
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


async def ticking_during(work: Any) -> float:
    """The longest the event loop went without running a 2 ms ticker while ``work()``."""
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.01)
        await work()
        done.set()
    return max(gaps)


async def test_the_loop_keeps_answering_while_a_big_document_is_parsed() -> None:
    doc = big_job()
    started = time.perf_counter()
    parse_job(doc)
    parse_time = time.perf_counter() - started
    async with jobcore.connect(MANUAL) as conn:
        dom = await conn.lookup_domain("vm1")
        holder: list[api.Job] = []

        async def begin() -> None:
            holder.append(await dom.job_begin(doc))

        gap = await ticking_during(begin)
        assert gap < parse_time / 2, (gap, parse_time)
        started = time.perf_counter()
        await holder[0].xml_desc()
        format_time = time.perf_counter() - started
        gap = await ticking_during(holder[0].xml_desc)
        assert gap < format_time / 2, (gap, format_time)


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
