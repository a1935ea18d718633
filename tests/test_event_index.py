"""The event hub's filter index: an event touches only the subscriptions that can match it,
with exactly the semantics of scanning them all; jobd caps subscriptions of all clients."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jobd_helpers import Jobd, RawClient, daemon_with

import jobcore
from jobcore.daemon.config import ConfigError, load_config
from jobcore.events import (
    EndReason,
    EventFilter,
    EventHub,
    EventKind,
    JobEvent,
    Subscription,
    _Entry,
)
from jobcore.lifecycle import JobState

JOBS = [uuid.UUID(int=i) for i in range(1, 4)]
DOMAINS = ["vm1", "vm2", "vm3"]
TYPES = ["backup", "blockpull", "commit"]


class NaiveHub(EventHub):
    """The reference: every subscription in one tuple, every event offered to each whose
    filter matches (the hub as it was before the index)."""

    def __init__(self) -> None:
        super().__init__()
        self._all: tuple[Subscription, ...] = ()

    def subscribe(
        self,
        flt: EventFilter | None = None,
        maxlen: int = EventHub.DEFAULT_BUFFER,
        lost_limit: int | None = None,
    ) -> Subscription:
        sub = Subscription(flt or EventFilter(), maxlen, self, lost_limit)
        self._all = (*self._all, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._all = tuple(s for s in self._all if s is not sub)

    def emit(self, ev: JobEvent) -> None:
        entry: _Entry = (self._emitted, ev)
        self._emitted += 1
        for sub in self._all:
            if sub.filter.matches(ev):
                sub._push(entry)


def _maybe_set(values: list[Any]) -> st.SearchStrategy[frozenset[Any] | None]:
    return st.none() | st.frozensets(st.sampled_from(values), max_size=len(values))


filters = st.builds(
    EventFilter,
    domain=st.none() | st.sampled_from(DOMAINS),
    job=st.none() | st.sampled_from(JOBS),
    types=_maybe_set(TYPES),
    kinds=_maybe_set(list(EventKind)),
)
events = st.builds(
    JobEvent,
    kind=st.sampled_from(list(EventKind)),
    job=st.sampled_from(JOBS),
    type=st.sampled_from(TYPES),
    domain=st.sampled_from(DOMAINS),
    state=st.sampled_from(list(JobState)),
    processed=st.integers(0, 10**6),
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("subscribe"),
            filters,
            st.integers(1, 4),  # small buffers: drops and overflow ends happen
            st.none() | st.integers(0, 3),
        ),
        st.tuples(st.just("emit"), events),
        st.tuples(st.just("read"), st.integers(0, 63)),
        st.tuples(st.just("close"), st.integers(0, 63)),
    ),
    max_size=80,
)


def _state(sub: Subscription) -> tuple[Any, ...]:
    return (sub.lost, sub.buffered, sub.closed, sub.end_reason)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_indexed_hub_behaves_as_scanning_every_subscription(ops: list[Any]) -> None:
    """Random filters (each part unset, one value or a set, empty sets included), events,
    reads and closes, on the indexed hub and the scanning one side by side: every read
    hands out the same event and every subscription ends up in the same state (buffered,
    lost, closed and why: small buffers with lost limits end some mid-emit)."""
    hubs = (EventHub(), NaiveHub())
    subs: tuple[list[Subscription], list[Subscription]] = ([], [])
    for op in ops:
        if op[0] == "subscribe":
            for hub, mine in zip(hubs, subs, strict=True):
                mine.append(hub.subscribe(op[1], op[2], op[3]))
        elif op[0] == "emit":
            for hub in hubs:
                hub.emit(op[1])
        elif subs[0]:
            i = op[1] % len(subs[0])
            if op[0] == "read":
                assert subs[0][i].get_nowait() == subs[1][i].get_nowait()
            else:
                subs[0][i].close()
                subs[1][i].close()
        assert [_state(s) for s in subs[0]] == [_state(s) for s in subs[1]]
    for indexed, naive in zip(*subs, strict=True):
        while (ev := naive.get_nowait()) is not None:
            assert indexed.get_nowait() == ev
        assert indexed.get_nowait() is None
    live = sum(not s.closed for s in subs[0])
    assert hubs[0].subscriptions == live
    hubs[0].close()
    assert hubs[0].subscriptions == 0 and not hubs[0]._indexed()


class CountingMatches:
    """Counts ``EventFilter.matches`` calls per filter (patched on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[EventFilter] = Counter()
        original = EventFilter.matches

        def matches(flt: EventFilter, ev: JobEvent) -> bool:
            self.calls[flt] += 1
            return original(flt, ev)

        monkeypatch.setattr(EventFilter, "matches", matches)


def test_an_event_does_not_touch_subscriptions_filtered_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2,000 subscriptions filtered on domain vm2, 500 on a job that has no events, 500 on
    a type and 500 on a kind no event has: 100 events of vm1 check the 10 subscriptions
    on vm1 and the 5 unfiltered ones, nothing else."""
    counting = CountingMatches(monkeypatch)
    hub = EventHub()
    idle = [hub.subscribe(EventFilter.of(domain="vm2")) for _ in range(2000)]
    idle += [hub.subscribe(EventFilter.of(job=uuid.uuid4())) for _ in range(500)]
    idle += [hub.subscribe(EventFilter.of(types=["commit"])) for _ in range(500)]
    idle += [hub.subscribe(EventFilter.of(kinds=[EventKind.FINAL])) for _ in range(500)]
    on_vm1 = [hub.subscribe(EventFilter.of(domain="vm1")) for _ in range(10)]
    everything = [hub.subscribe() for _ in range(5)]
    for i in range(100):
        hub.emit(JobEvent(EventKind.PROGRESS, JOBS[0], "backup", "vm1", JobState.RUNNING, None, i))
    assert counting.calls == {EventFilter.of(domain="vm1"): 100 * 10, EventFilter(): 100 * 5}
    assert all(s.buffered == 100 for s in on_vm1 + everything)
    assert all(s.buffered == 0 for s in idle)


@pytest.mark.anyio
async def test_engine_jobs_do_not_touch_idle_filtered_subscriptions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same through the engine: 300 instant sim jobs on vm1, with 1,000 subscriptions
    filtered on vm2 and 1,000 on vm1 and jobs that never run, check none of those; the two
    that can match are checked once per event."""
    counting = CountingMatches(monkeypatch)
    async with jobcore.connect("sim:///default?rate=0", retention=0) as conn:
        idle = [conn.subscribe(domain="vm2") for _ in range(1000)]
        idle += [conn.subscribe(domain="vm1", job=uuid.uuid4()) for _ in range(1000)]
        finals = conn.subscribe(domain="vm1", kinds=[EventKind.FINAL])
        every = conn.subscribe(maxlen=100_000)
        dom = await conn.lookup_domain("vm1")
        for _ in range(300):
            job = await dom.job_begin("<job type='blockpull'><disk name='vdb'/></job>")
            assert (await job.wait(10)).state is JobState.COMPLETED
        emitted = every.buffered
        assert emitted >= 3 * 300 and finals.buffered == 300
        assert counting.calls == {finals.filter: emitted, every.filter: emitted}
        assert all(s.buffered == 0 for s in idle)


def test_subscriptions_ending_mid_emit_leave_the_index_and_the_emit_whole() -> None:
    """Subscriptions that overflow (and so end and leave the hub) during an emit: the
    emit still reaches every subscription after them, and none stays indexed."""
    hub = EventHub()
    flt = EventFilter.of(domain="vm1")
    ending = [hub.subscribe(flt, maxlen=1, lost_limit=0) for _ in range(50)]
    after = [hub.subscribe(flt) for _ in range(5)]
    ended: list[Subscription] = []
    for sub in ending:
        sub.on_end = ended.append
    ev = JobEvent(EventKind.STATE, JOBS[0], "backup", "vm1", JobState.RUNNING)
    hub.emit(ev)
    hub.emit(ev)  # every 'ending' one is full and over its limit: it ends in this emit
    assert ended == ending
    assert all(s.end_reason is EndReason.OVERFLOW and s.lost == 1 for s in ending)
    assert all(s.buffered == 2 for s in after)
    assert hub.subscriptions == 5
    hub.emit(ev)
    assert all(s.buffered == 1 for s in ending) and all(s.buffered == 3 for s in after)
    for sub in after:
        sub.close()
    assert hub.subscriptions == 0 and not hub._indexed() and not hub.active


def test_a_subscription_filed_under_several_keys_is_checked_once_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counting = CountingMatches(monkeypatch)
    hub = EventHub()
    types = hub.subscribe(EventFilter.of(types=TYPES))
    kinds = hub.subscribe(EventFilter.of(kinds=list(EventKind)))
    for kind in EventKind:
        hub.emit(JobEvent(kind, JOBS[0], "commit", "vm3", JobState.RUNNING))
    n = len(EventKind)  # one event of each kind (HOST_LOST joined the three)
    assert counting.calls == {types.filter: n, kinds.filter: n}
    assert types.buffered == n and kinds.buffered == n


# ---- jobd: a cap on subscriptions of all clients ------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobd]:
    config = "max_subscriptions = 5\nsubscriber_lost_limit = 1\n"
    with daemon_with(tmp_path_factory.mktemp("subcap"), config) as daemon:
        yield daemon


def client(path: Path) -> RawClient:
    return RawClient.ready(path, "sim:///default?rate=0", timeout=20)


def subscribe(client: RawClient, domain: str = "no-such-domain", buffer: int = 16) -> list[Any]:
    return client.call("subscribe", domain, None, None, None, buffer)


def _refused(reply: list[Any]) -> bool:
    if reply[0] != 2:
        return False
    assert reply[2] == "InvalidArgument"
    assert "maximum of 5 subscriptions" in reply[3] and "max_subscriptions" in reply[3]
    return True


def _subscribe_when_free(raw: RawClient, timeout: float = 10.0) -> list[Any]:
    """Subscribe once jobd has let another subscription go (a disconnect is seen by
    jobd's reader some time after the client closed)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = subscribe(raw)
        if reply[0] == 1 or time.monotonic() > deadline:
            return reply
        assert _refused(reply)
        time.sleep(0.02)


def test_jobd_caps_subscriptions_of_all_clients(capped: Jobd) -> None:
    """max_subscriptions = 5 across the read-write socket's clients (the read-only socket
    has max_ro_subscriptions of its own: tests/test_jobd_fairness.py): the sixth is
    refused with a message naming the limit; unsubscribing, disconnecting and an end by
    overflow each give a place back."""
    a, b = client(capped.sock), client(capped.sock)
    try:
        a_subs = [subscribe(a) for _ in range(3)]
        assert all(r[0] == 1 for r in a_subs)
        assert [subscribe(b)[0] for _ in range(2)] == [1, 1]
        assert _refused(subscribe(b)) and _refused(subscribe(a))
        # a unsubscribes one: b gets its place, then the cap holds again
        assert a.call("unsubscribe", a_subs[0][1])[0] == 1
        b_third = subscribe(b)
        assert b_third[0] == 1
        assert _refused(subscribe(b))
        # a disconnects with 2: b gets 2 places
        a.close()
        assert _subscribe_when_free(b)[0] == 1
        assert subscribe(b)[0] == 1
        assert _refused(subscribe(b))
        # b gives one back; c takes it: vm1's events, a 1-event buffer, never read
        assert b.call("unsubscribe", b_third[1])[0] == 1
        c = client(capped.sock)
        try:
            overflowing = subscribe(c, domain="vm1", buffer=1)
            assert overflowing[0] == 1
            assert _refused(subscribe(b))
            anyio.run(_instant_jobs, capped.uri("rate=0"), 1000)
            while (msg := c.recv())[0] == 3:  # pushed before it fell behind
                pass
            assert msg[:2] == [5, overflowing[1]] and msg[3] == "overflow", msg
            # c's subscription ended by overflow: its place is free again
            assert subscribe(b)[0] == 1
            assert _refused(subscribe(b))
        finally:
            c.close()
    finally:
        b.close()
    # every place comes back once the clients are gone
    d = client(capped.sock)
    try:
        assert _subscribe_when_free(d)[0] == 1
        got = [subscribe(d)[0] for _ in range(5)]
        assert got[:4] == [1, 1, 1, 1] and got[4] == 2
    finally:
        d.close()


async def _instant_jobs(uri: str, n: int) -> None:
    async with jobcore.connect(uri) as conn:
        dom = await conn.lookup_domain("vm1")
        for _ in range(n):
            job = await dom.job_begin("<job type='blockpull'><disk name='vda'/></job>")
            assert (await job.wait(10)).state is JobState.COMPLETED


def test_config_checks_max_subscriptions(tmp_path: Path) -> None:
    for text in ("max_subscriptions = 0", "max_subscriptions = 'many'"):
        path = tmp_path / "bad.toml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match="max_subscriptions"):
            load_config(path)
    path = tmp_path / "good.toml"
    path.write_text("max_subscriptions = 100\n")
    assert load_config(path).max_subscriptions == 100
    assert load_config(None).max_subscriptions == 16384


def test_a_refused_remote_subscription_raises_the_refusal(tmp_path: Path) -> None:
    """The daemon's refusal reaches the consumer: iterating the subscription raises it,
    rather than ending as if the stream were simply over."""
    config = tmp_path / "jobd.toml"
    config.write_text("max_subscriptions = 1\n")
    daemon = Jobd(tmp_path / "run", "--config", str(config)).wait_ready()

    async def main() -> None:
        async with jobcore.connect(daemon.uri()) as conn:
            with conn.subscribe(domain="vm1") as first, conn.subscribe(domain="vm2") as second:
                with pytest.raises(jobcore.InvalidArgument, match="max_subscriptions"):
                    with anyio.fail_after(10):
                        async for _ in second:
                            pass
                assert not first.closed

    try:
        anyio.run(main)
    finally:
        daemon.stop()
