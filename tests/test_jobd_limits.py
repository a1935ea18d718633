"""jobd under pressure: a subscriber that stops reading is ended with its lost count;
retained jobs are capped; lists come in pages; UUID prefixes resolve by an index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack  # type: ignore[import-untyped]
import pytest
from jobd_helpers import ROOT, Jobd, RawClient, daemon_with, jobctl

import jobcore
import jobcore.protocol
import jobcore.remote
from jobcore import JobState, NoSuchJob
from jobcore.api import Job
from jobcore.cli import ExitCode
from jobcore.daemon.config import ConfigError, load_config
from jobcore.daemon.handlers import _page_size
from jobcore.events import EndReason
from jobcore.methods import Method
from jobcore.protocol import (
    MAX_FRAME,
    Reply,
    SubscriptionEnd,
    decode_message,
    encode_job_ref,
    encode_message,
)

LOST_LIMIT = 20
PULL = "<job type='blockpull'><disk name='{disk}'/></job>"  # instant at rate=0


@pytest.fixture(scope="module")
def jobd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    config = (
        f"subscriber_lost_limit = {LOST_LIMIT}\nmax_retained_per_domain = 50\nmax_retained = 60\n"
    )
    with daemon_with(tmp_path_factory.mktemp("limits"), config) as daemon:
        yield daemon


async def _instant_jobs(uri: str, domain: str, n: int, disk: str = "vda") -> list[Job]:
    async with jobcore.connect(uri) as conn:
        dom = await conn.lookup_domain(domain)
        jobs = []
        for _ in range(n):
            job = await dom.job_begin(PULL.format(disk=disk))
            assert (await job.wait(10)).state is JobState.COMPLETED
            jobs.append(job)
        return jobs


def run_jobs(jobd: Jobd, domain: str, n: int) -> list[Job]:
    return anyio.run(_instant_jobs, jobd.uri("rate=0"), domain, n)


def test_subscriber_that_stops_reading_gets_sub_end_with_its_lost_count(jobd: Jobd) -> None:
    with RawClient(jobd.sock, "sim:///default?rate=0", timeout=20) as s:
        assert s.hello is not None and s.hello[:2] == [1, 1]
        assert s.call("subscribe", None, None, None, None, 4) == [1, 2, None]
        # from here on the client reads nothing while 1,000 jobs run (3 events each)
        run_jobs(jobd, "vm1", 1000)
        events: list[list[Any]] = []
        while True:
            msg = s.recv()
            if msg[0] != 3:
                break
            events.append(msg)
        assert msg[:2] == [5, 2] and len(msg) == 4 and msg[3] == "overflow", msg
        lost = msg[2]
        assert isinstance(lost, int) and lost > LOST_LIMIT
        # every loss but the one that ended it was reported on a later event
        assert sum(ev[2][10] for ev in events) == lost - 1
        assert len(events) < 3000
        # the subscription ended, not the client: it is served as before
        reply = s.call("list_domains")
        assert reply[:2] == [1, 3] and [d[0] for d in reply[2]] == ["vm1", "vm2"]
    assert "subscriber fell behind" in jobd.log()


READER = """
import json, sys
import anyio, jobcore
from jobcore.errors import SubscriptionOverflow

async def main():
    async with jobcore.connect(sys.argv[1]) as conn:
        with conn.subscribe(maxlen=4) as sub:
            await conn.list_domains()  # one round trip: the subscription is in place
            print("ready", flush=True)
            got = []
            try:
                async for ev in sub:
                    got.append(ev)
            except SubscriptionOverflow as exc:
                print(json.dumps({"lost": exc.lost, "sub_lost": sub.lost,
                                  "reason": str(sub.end_reason), "events": len(got),
                                  "lost_before": sum(e.lost_before for e in got)}))

anyio.run(main)
"""


def test_remote_subscription_ends_with_subscription_overflow(jobd: Jobd) -> None:
    """A real client process stops (SIGSTOP) while jobs run; resumed, it reads what it
    was sent and then gets SubscriptionOverflow carrying the count."""
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, jobd.uri("rate=0")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            run_jobs(jobd, "vm1", 1000)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["reason"] == str(EndReason.OVERFLOW)
    assert result["lost"] == result["sub_lost"] > LOST_LIMIT
    assert result["lost"] > result["lost_before"] and result["events"] > 0


def test_sub_end_codec_keeps_the_short_form_and_reads_both() -> None:
    short = encode_message(SubscriptionEnd(7))
    assert msgpack.unpackb(short[4:]) == [5, 7]
    assert decode_message(short[4:]) == SubscriptionEnd(7, 0, EndReason.CLOSED)
    long = encode_message(SubscriptionEnd(7, 123, EndReason.OVERFLOW))
    assert msgpack.unpackb(long[4:]) == [5, 7, 123, "overflow"]
    assert decode_message(long[4:]) == SubscriptionEnd(7, 123, EndReason.OVERFLOW)
    future = msgpack.packb([5, 7, 4, "some-new-reason"])
    assert decode_message(future) == SubscriptionEnd(7, 4, EndReason.CLOSED)


def test_retained_jobs_are_capped_and_lists_come_in_pages(
    jobd: Jobd, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = run_jobs(jobd, "vm2", 120)
    pages = 0
    real: Callable[[Method, Any], Any] = jobcore.protocol.decode_result

    def counting(method: Method, value: Any) -> Any:
        nonlocal pages
        pages += method is Method.LIST_JOBS_PAGE
        return real(method, value)

    monkeypatch.setattr(jobcore.remote, "LIST_PAGE", 7)
    monkeypatch.setattr(jobcore.remote, "decode_result", counting)

    async def check() -> None:
        async with jobcore.connect(jobd.uri("rate=0")) as conn:
            listed = await (await conn.lookup_domain("vm2")).list_jobs()
            assert [j.uuid for j in listed] == [j.uuid for j in jobs[-50:]]
            assert pages == 8  # 50 jobs, 7 a page
            for gone in (jobs[0], jobs[69]):
                with pytest.raises(NoSuchJob):
                    await conn.lookup_job(gone.uuid)
                assert await conn.find_jobs(gone.uuid.hex) == []
            newest = jobs[-1]
            assert [j.uuid for j in await conn.find_jobs(newest.uuid.hex[:10])] == [newest.uuid]
            assert (await conn.lookup_job(jobs[70].uuid)).state is JobState.COMPLETED

    anyio.run(check)


def test_list_page_replies_are_capped_whatever_the_limit(jobd: Jobd) -> None:
    run_jobs(jobd, "vm2", 5)
    with RawClient.ready(jobd.sock, "sim:///default?rate=0", timeout=20) as s:
        reply = s.call("list_jobs_page", "vm2", -1, 2)
        refs, cursor = reply[2]
        assert len(refs) == 2 and isinstance(cursor, int)
        rest, end = s.call("list_jobs_page", "vm2", cursor, 10**9)[2]
        assert end is None and 1 <= len(rest) <= 1000
        assert not {bytes(r[0]) for r in refs} & {bytes(r[0]) for r in rest}
        found = s.call("find_jobs", uuid.UUID(bytes=bytes(rest[-1][0])).hex[:8], 10**9)
        assert found[:2] == [1, 4] and [r[0] for r in found[2]] == [rest[-1][0]]
        refused = s.call("find_jobs", "not-hex", 5)
        assert refused[:3] == [2, 5, "InvalidArgument"], refused


@pytest.mark.parametrize("name_len", [3, 1000, 100_000, 1 << 20])
def test_a_page_fits_a_frame_however_long_the_domain_name(name_len: int) -> None:
    name = "d" * name_len
    n = _page_size(name, 10**9)
    assert n >= 1
    ref = encode_job_ref(uuid.uuid4(), "blockcommit", name, JobState.CANCELLED)
    assert len(encode_message(Reply(2**31, [[ref] * n, 2**62]))) <= MAX_FRAME


def test_jobctl_list_and_prefix_through_jobd(jobd: Jobd) -> None:
    jobs = run_jobs(jobd, "vm2", 60)
    uri = jobd.uri("rate=0")
    listed = jobctl(uri, "list", "--all", "--domain", "vm2", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["uuid"] for row in json.loads(listed.stdout)] == [str(j.uuid) for j in jobs[-50:]]
    newest = jobs[-1]
    info = jobctl(uri, "info", newest.uuid.hex[:8], "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["uuid"] == str(newest.uuid)
    gone = jobctl(uri, "info", str(jobs[0].uuid)[:13])
    assert gone.returncode == ExitCode.NOT_FOUND, gone.stderr


def test_config_checks_the_new_keys(tmp_path: Path) -> None:
    for text in (
        "subscriber_lost_limit = -1",
        "max_retained = -5",
        "max_retained_per_domain = 'many'",
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=text.split()[0]):
            load_config(path)
    path = tmp_path / "good.toml"
    path.write_text("subscriber_lost_limit = 0\nmax_retained = 7\nmax_retained_per_domain = 3\n")
    cfg = load_config(path)
    assert (cfg.subscriber_lost_limit, cfg.max_retained, cfg.max_retained_per_domain) == (0, 7, 3)
