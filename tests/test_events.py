"""Event buffers: the loss policy, O(1) drops, and subscribers ended for falling behind."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import anyio
import attrs
import pytest

import jobcore
from jobcore.errors import SubscriptionOverflow
from jobcore.events import EndReason, EventHub, EventKind, JobEvent, Subscription
from jobcore.lifecycle import JobState

JOB = uuid.UUID(int=1)


def event(kind: EventKind, n: int = 0) -> JobEvent:
    return JobEvent(kind, JOB, "backup", "vm1", JobState.RUNNING, processed=n)


@attrs.define
class Probe:
    """Stands in for a JobEvent in a buffer and counts how often its kind is read:
    a drop that scans the buffer reads the kind of every event it passes. (An attrs class
    with JobEvent's fields, so a subscription hands it out the way it hands out events.)"""

    reads: ClassVar[int] = 0

    _kind: EventKind
    processed: int
    job: uuid.UUID = JOB
    type: str = "backup"
    domain: str = "vm1"
    state: JobState = JobState.RUNNING
    previous: JobState | None = None
    total: int = 0
    timestamp: float = 0.0
    stats: Mapping[str, Any] | None = None
    lost_before: int = 0
    seq: int = 0

    @property
    def kind(self) -> EventKind:
        Probe.reads += 1
        return self._kind


FINAL_MARK = -(10**9)


def fill_with_probes(hub: EventHub, n: int) -> None:
    """n STATE probes (processed -1 … -n), then one FINAL probe."""
    for i in range(n):
        hub.emit(cast(JobEvent, Probe(EventKind.STATE, -(i + 1))))
    hub.emit(cast(JobEvent, Probe(EventKind.FINAL, FINAL_MARK)))


@pytest.mark.parametrize("size", [1_000, 50_000])
def test_dropping_from_a_full_buffer_touches_no_other_event(size: int) -> None:
    """A full buffer of ``size`` STATE events (no PROGRESS to give up first) and one FINAL:
    1,000 more pushes each drop one event, and no push reads the kind of any event already
    buffered, whatever the size (a linear scan reads ``size`` of them per push)."""
    hub = EventHub()
    sub = hub.subscribe(maxlen=size + 1)
    fill_with_probes(hub, size)
    Probe.reads = 0
    for i in range(1_000):
        hub.emit(event(EventKind.STATE, i))
    assert Probe.reads == 0
    assert sub.lost == 1_000
    # the oldest 1,000 STATE events went; the FINAL stayed; the new ones follow in order
    got = [sub.get_nowait() for _ in range(size + 1)]
    assert [e.processed for e in got if e is not None] == [
        *range(-1_001, -size - 1, -1),
        FINAL_MARK,
        *range(1_000),
    ]
    assert got[0] is not None and got[0].lost_before == 1_000
    assert sub.get_nowait() is None


def test_loss_policy_progress_first_then_state_final_last() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxlen=4)
    for ev in (
        event(EventKind.STATE, 1),
        event(EventKind.PROGRESS, 2),
        event(EventKind.FINAL, 3),
        event(EventKind.PROGRESS, 4),
    ):
        hub.emit(ev)
    hub.emit(event(EventKind.STATE, 5))  # drops progress 2
    hub.emit(event(EventKind.STATE, 6))  # drops progress 4
    hub.emit(event(EventKind.STATE, 7))  # no progress left: drops state 1
    got = [sub.get_nowait() for _ in range(4)]
    assert [e.processed for e in got if e is not None] == [3, 5, 6, 7]  # arrival order
    assert got[0] is not None and got[0].lost_before == 3
    assert all(e is not None and e.lost_before == 0 for e in got[1:])
    assert sub.get_nowait() is None and sub.lost == 3
    only_finals = hub.subscribe(maxlen=2)
    for n in range(5):
        hub.emit(event(EventKind.FINAL, n))
    assert [only_finals.get_nowait().processed for _ in range(2)] == [3, 4]  # type: ignore[union-attr]
    assert only_finals.lost == 3


@pytest.mark.anyio
async def test_a_subscriber_that_stays_behind_is_ended_with_its_lost_count() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxlen=4, lost_limit=10)
    bystander = hub.subscribe(maxlen=100)
    for n in range(20):
        hub.emit(event(EventKind.STATE, n))
    # 4 buffered, 10 dropped, the 11th loss ended it; the rest never reached it
    assert sub.closed and sub.end_reason is EndReason.OVERFLOW
    assert sub.lost == 11
    assert bystander.buffered == 20  # emitting went on for the others
    held = [await sub.get() for _ in range(4)]
    assert [e.processed for e in held] == [10, 11, 12, 13]
    assert held[0].lost_before == 10
    with pytest.raises(SubscriptionOverflow, match="lost 11 events") as ended:
        await sub.get()
    assert ended.value.lost == 11
    with pytest.raises(SubscriptionOverflow):  # iterating ends the same way
        async for _ in sub:
            pass


def test_catching_up_resets_the_count_toward_the_limit() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxlen=2, lost_limit=3)
    for _round in range(5):
        for n in range(5):  # 3 losses each round: at the limit, not past it
            hub.emit(event(EventKind.STATE, n))
        assert not sub.closed
        while sub.get_nowait() is not None:  # the consumer catches up
            pass
    assert sub.lost == 15 and sub.end_reason is None
    for n in range(6):
        hub.emit(event(EventKind.STATE, n))
    assert sub.end_reason is EndReason.OVERFLOW


def test_closing_is_not_an_overflow() -> None:
    hub = EventHub()
    sub: Subscription = hub.subscribe(maxlen=2, lost_limit=0)
    hub.emit(event(EventKind.STATE))
    sub.close()
    assert sub.end_reason is EndReason.CLOSED and not hub.active


@pytest.mark.anyio
async def test_engine_subscriber_over_its_limit_ends_and_jobs_go_on() -> None:
    async with jobcore.connect("sim:///default?rate=0") as conn:
        dom = await conn.lookup_domain("vm1")
        slow = conn.subscribe(maxlen=8)
        slow.lost_limit = 50
        with conn.subscribe(kinds=[EventKind.FINAL], maxlen=1000) as finals:
            for i in range(100):
                job = await dom.job_begin(
                    "<job type='backup'><domainbackup><disks><disk name='vdb' type='file'>"
                    f"<target file='/b/ev-{i}.qcow2'/></disk></disks></domainbackup></job>"
                )
                assert (await job.wait(5)).state is JobState.COMPLETED
            assert finals.buffered == 100
        assert slow.end_reason is EndReason.OVERFLOW and slow.lost == 51
        held = []
        with pytest.raises(SubscriptionOverflow) as ended:
            with anyio.fail_after(5):
                async for ev in slow:
                    held.append(ev)
        assert len(held) == 8 and ended.value.lost == 51
        assert sum(e.lost_before for e in held) == 50  # the last loss came after them


def test_an_event_handed_out_after_a_loss_keeps_every_other_field() -> None:
    """The event that carries ``lost_before`` is the buffered one with that count added:
    every other field of JobEvent (whatever fields it gains) comes out as it went in."""
    values: dict[str, Any] = {
        "kind": EventKind.FINAL,
        "job": JOB,
        "type": "backup",
        "domain": "vm1",
        "state": JobState.COMPLETED,
        "previous": JobState.RUNNING,
        "processed": 7,
        "total": 9,
        "timestamp": 12.5,
        "stats": {"state": "completed"},
        "lost_before": 2,
        "seq": 4,
    }
    assert set(values) == {f.name for f in attrs.fields(JobEvent)}, "name the new field here"
    hub = EventHub()
    sub = hub.subscribe(maxlen=1)
    hub.emit(event(EventKind.PROGRESS))
    hub.emit(JobEvent(**values))  # drops the PROGRESS event
    got = sub.get_nowait()
    assert got == JobEvent(**{**values, "lost_before": 3})
