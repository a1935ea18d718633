"""Job events and their subscribers.

Every state change emits a ``STATE`` event; progress reports emit ``PROGRESS``; the end of
a job emits exactly one ``FINAL`` event carrying its final stats (libvirt's JOB_COMPLETED).

Each subscriber has its own bounded buffer. The engine never waits for a subscriber: when
a buffer is full, the oldest PROGRESS event in it is dropped (progress is superseded by
the next one anyway); if there is none, the oldest STATE event (the job's current state
stays readable with ``job.info()``); FINAL events, which carry final stats, go last. Every
drop is counted in ``Subscription.lost`` and the next event handed out carries the
count in ``lost_before``, so a consumer knows it missed something.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
from attrs import define, field, frozen

from jobcore.lifecycle import JobState


class EventKind(enum.StrEnum):
    STATE = "state"
    PROGRESS = "progress"
    FINAL = "final"


#: which events a full buffer gives up first
_DROP_ORDER = (EventKind.PROGRESS, EventKind.STATE)


@frozen
class JobEvent:
    kind: EventKind
    job: uuid.UUID
    type: str
    domain: str
    state: JobState
    previous: JobState | None = None
    processed: int = 0
    total: int = 0
    timestamp: float = 0.0
    #: FINAL only: the job's final stats (what ``job.stats()`` returns afterwards)
    stats: Mapping[str, Any] | None = None
    #: events this subscriber lost (dropped) just before this one
    lost_before: int = 0


@frozen
class EventFilter:
    domain: str | None = None
    job: uuid.UUID | None = None
    types: frozenset[str] | None = None
    kinds: frozenset[EventKind] | None = None

    @classmethod
    def of(
        cls,
        domain: str | None = None,
        job: uuid.UUID | None = None,
        types: Iterable[str] | None = None,
        kinds: Iterable[EventKind | str] | None = None,
    ) -> EventFilter:
        """A filter from ``subscribe()``'s keyword arguments (any iterables)."""
        return cls(
            domain,
            job,
            None if types is None else frozenset(map(str, types)),
            None if kinds is None else frozenset(EventKind(k) for k in kinds),
        )

    def matches(self, ev: JobEvent) -> bool:
        return (
            (self.domain is None or ev.domain == self.domain)
            and (self.job is None or ev.job == self.job)
            and (self.types is None or ev.type in self.types)
            and (self.kinds is None or ev.kind in self.kinds)
        )


@define(eq=False)
class Subscription:
    """A filtered, bounded event queue. Iterate it (async) or call ``get()``."""

    filter: EventFilter
    maxlen: int
    _hub: EventHub
    _buf: deque[JobEvent] = field(factory=deque)
    _wakeup: anyio.Event | None = None
    lost: int = 0
    _pending_lost: int = 0
    closed: bool = False

    def _push(self, ev: JobEvent) -> None:
        if len(self._buf) >= self.maxlen:
            self._drop_one()
        self._buf.append(ev)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def _drop_one(self) -> None:
        for kind in _DROP_ORDER:
            for i, old in enumerate(self._buf):
                if old.kind is kind:
                    del self._buf[i]
                    break
            else:
                continue
            break
        else:
            self._buf.popleft()
        self.lost += 1
        self._pending_lost += 1

    def get_nowait(self) -> JobEvent | None:
        if not self._buf:
            return None
        ev = self._buf.popleft()
        if self._pending_lost:
            ev = JobEvent(
                ev.kind,
                ev.job,
                ev.type,
                ev.domain,
                ev.state,
                ev.previous,
                ev.processed,
                ev.total,
                ev.timestamp,
                ev.stats,
                self._pending_lost,
            )
            self._pending_lost = 0
        return ev

    async def get(self) -> JobEvent:
        while True:
            ev = self.get_nowait()
            if ev is not None:
                return ev
            if self.closed:
                raise anyio.EndOfStream
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub.unsubscribe(self)
            if self._wakeup is not None:
                self._wakeup.set()
                self._wakeup = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    DEFAULT_BUFFER = 1024

    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def subscribe(
        self, flt: EventFilter | None = None, maxlen: int = DEFAULT_BUFFER
    ) -> Subscription:
        if maxlen < 1:
            raise ValueError("an event buffer holds at least one event")
        sub = Subscription(flt or EventFilter(), maxlen, self)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def emit(self, ev: JobEvent) -> None:
        for sub in self._subs:
            if sub.filter.matches(ev):
                sub._push(ev)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()
