"""Job events and their subscribers.

Every state change emits a ``STATE`` event; progress reports emit ``PROGRESS``; the end of
a job emits exactly one ``FINAL`` event carrying its final stats (libvirt's JOB_COMPLETED).
A fleet member watching another host's job (``jobcore.fleet_commands``) also emits
``HOST_LOST`` when that host's lease expires (the job's state unchanged).

Each subscriber has its own bounded buffer. The engine never waits for a subscriber: when
a buffer is full, the oldest PROGRESS event in it is dropped (progress is superseded by
the next one anyway); if there is none, the oldest STATE event (the job's current state
stays readable with ``job.info()``); FINAL events, which carry final stats, go last. Every
drop is counted in ``Subscription.lost`` and the next event handed out carries the
count in ``lost_before``, so a consumer knows it missed something. Pushing, dropping and
reading are O(1) whatever the buffer's size (one FIFO per kind, see ``Subscription``).

A subscription given a ``lost_limit`` is ended once its consumer has lost more than that
many events since its buffer was last empty: ``get()`` then hands out what the buffer
still holds and raises ``SubscriptionOverflow`` (with the lost count). jobd sets one on
every subscription it serves (``subscriber_lost_limit``).

The hub indexes subscriptions by their filter (see ``EventHub``): an event touches only
the subscriptions that name its job, its domain, its type or its kind, and those that
filter on none of these, so idle subscriptions filtered on other jobs or domains cost an
event nothing.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
from attrs import define, field, frozen

from jobcore.errors import JobError, SubscriptionOverflow
from jobcore.lifecycle import JobState

if TYPE_CHECKING:
    import anyio  # imported where a subscription waits: a loop-free client never loads it


class EventKind(enum.StrEnum):
    STATE = "state"
    PROGRESS = "progress"
    FINAL = "final"
    #: a fleet member found the job's host lost (its lease expired, not left, not fenced):
    #: the job's state is unchanged, it may still run there (design/fleet.md); not numbered
    HOST_LOST = "host-lost"
    #: a preemptor took the job's resources (jobcore.engine): ``stats`` names it
    #: (``preempted_by``) and what it did (``preempt``: pause or cancel); not numbered
    PREEMPTED = "preempted"


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
    #: the job's event number (STATE and FINAL events; 0: PROGRESS, or a store that does
    #: not number events): 1 for its begin, one more per state change, the FINAL event the
    #: number after its terminal STATE event. Kept across jobd restarts by a durable store,
    #: so a subscriber that reconnects resumes from the last one it saw (see ``resume``)
    seq: int = 0


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


class EndReason(enum.StrEnum):
    """Why a subscription stopped taking events."""

    #: its consumer or its connection closed it
    CLOSED = "closed"
    #: its consumer lost more events than ``lost_limit`` without catching up
    OVERFLOW = "overflow"
    #: the daemon refused it (a remote subscription): ``get()`` raises the refusal
    REFUSED = "refused"


#: buffer slot of each kind, in the order a full buffer gives them up (HOST_LOST, a
#: remark on the job's state, shares the STATE events' slot)
_SLOT = {
    **{kind: i for i, kind in enumerate((*_DROP_ORDER, EventKind.FINAL))},
    EventKind.HOST_LOST: _DROP_ORDER.index(EventKind.STATE),
    EventKind.PREEMPTED: _DROP_ORDER.index(EventKind.STATE),
}
_SLOTS = len(set(_SLOT.values()))
#: (the hub's emission number, the event): made once per emit, shared by every buffer
_Entry: TypeAlias = tuple[int, JobEvent]


@define(eq=False)
class Subscription:
    """A filtered, bounded event queue. Iterate it (async) or call ``get()``.

    The buffer is one FIFO per event kind (HOST_LOST and PREEMPTED share STATE's), each entry tagged
    with the hub's emission number: a push appends, a drop pops the head of the first
    non-empty FIFO in drop order, and a read pops the oldest of the (at most three) heads,
    so every operation is O(1) whatever the buffer's size.

    ``lost_limit``: once the consumer has lost more than this many events since its
    buffer was last empty, the subscription ends (``end_reason`` is OVERFLOW): it takes
    no more events, what it holds can still be read, and then ``get()`` raises
    ``SubscriptionOverflow`` carrying ``lost``. None (the default in-process): never.
    """

    filter: EventFilter
    maxlen: int
    _hub: EventHub
    lost_limit: int | None = None
    #: called once when the subscription ends (closed or overflow), after the hub let it
    #: go; jobd counts its subscriptions with it
    on_end: Callable[[Subscription], None] | None = None
    _fifos: tuple[deque[_Entry], ...] = field(factory=lambda: tuple(deque() for _ in range(_SLOTS)))
    _size: int = 0
    _wakeup: anyio.Event | None = None
    #: events dropped (or refused once ended by overflow) over the subscription's life
    lost: int = 0
    _pending_lost: int = 0
    #: events lost since the buffer was last empty
    _lost_since_empty: int = 0
    closed: bool = False
    end_reason: EndReason | None = None
    #: why the daemon refused the subscription (REFUSED), raised by ``get()``
    refusal: JobError | None = None

    @property
    def buffered(self) -> int:
        """Events waiting to be read."""
        return self._size

    def _push(self, entry: _Entry) -> None:
        if self._size >= self.maxlen:
            if self.lost_limit is not None and self._lost_since_empty >= self.lost_limit:
                self.end(EndReason.OVERFLOW, lost=1)  # this event is lost too
                return
            self._drop_one()
        else:
            self._size += 1
        self._fifos[_SLOT[entry[1].kind]].append(entry)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def _drop_one(self) -> None:
        for fifo in self._fifos:  # progress, then state, then final
            if fifo:
                fifo.popleft()
                break
        self._count_lost(1)

    def _count_lost(self, n: int) -> None:
        self.lost += n
        self._pending_lost += n
        self._lost_since_empty += n

    def get_nowait(self) -> JobEvent | None:
        oldest: deque[_Entry] | None = None
        for fifo in self._fifos:
            if fifo and (oldest is None or fifo[0][0] < oldest[0][0]):
                oldest = fifo
        if oldest is None:
            return None
        ev = oldest.popleft()[1]
        self._size -= 1
        if not self._size:
            self._lost_since_empty = 0
        if self._pending_lost:
            ev = attrs.evolve(ev, lost_before=ev.lost_before + self._pending_lost)
            self._pending_lost = 0
        return ev

    async def get(self) -> JobEvent:
        """The next event; at the end ``anyio.EndOfStream`` (closed) or
        ``SubscriptionOverflow`` (ended by its ``lost_limit``)."""
        import anyio

        while True:
            ev = self.get_nowait()
            if ev is not None:
                return ev
            if self.end_reason is EndReason.OVERFLOW:
                limit = "" if self.lost_limit is None else f" (limit {self.lost_limit})"
                raise SubscriptionOverflow(
                    f"the event subscription was ended: its consumer lost {self.lost} "
                    f"events without catching up{limit}; read events faster or "
                    "subscribe with a bigger buffer",
                    lost=self.lost,
                )
            if self.refusal is not None:
                raise self.refusal
            if self.closed:
                raise anyio.EndOfStream
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        import anyio

        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def end(self, reason: EndReason, lost: int = 0) -> None:
        """Stop taking events (``lost`` more counted as lost); buffered ones stay
        readable. For connections that end a subscription on the peer's word."""
        self.lost += lost  # after every buffered event: no lost_before carries them
        if not self.closed:
            self.closed = True
            self.end_reason = reason
            self._hub.unsubscribe(self)
            if self._wakeup is not None:
                self._wakeup.set()
                self._wakeup = None
            if self.on_end is not None:
                self.on_end(self)

    def close(self) -> None:
        self.end(EndReason.CLOSED)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@define(eq=False)
class _Bucket:
    """The subscriptions filed under one index key, in subscription order. ``emit``
    iterates ``snapshot()``, a tuple rebuilt only after a change: a subscription that
    ends mid-emit (its push overflowed) changes the members, not the tuple being read."""

    members: dict[Subscription, None] = field(factory=dict)
    _snapshot: tuple[Subscription, ...] | None = None

    def add(self, sub: Subscription) -> None:
        self.members[sub] = None
        self._snapshot = None

    def discard(self, sub: Subscription) -> None:
        del self.members[sub]
        self._snapshot = None

    def snapshot(self) -> tuple[Subscription, ...]:
        if self._snapshot is None:
            self._snapshot = tuple(self.members)
        return self._snapshot


#: one table of the index (job, domain, type or kind -> bucket)
_Table: TypeAlias = dict[Any, _Bucket]


class EventHub:
    """Hands each event to the subscriptions whose filter matches it.

    Subscriptions are indexed by filter: one filed under its job if it names one, else
    its domain, else each of its types, else each of its kinds, else with those that
    take every event. An event has one job, one domain, one type and one kind, so
    ``emit`` finds each subscription that can match it exactly once (an empty set of
    types or kinds matches nothing and is filed nowhere), and checks the whole filter
    (``EventFilter.matches``) only on those: its cost follows the subscriptions that can
    match, not all of them. (Domain and job are looked up by hash: ``str`` and
    ``uuid.UUID`` values, as ``EventFilter`` declares.)
    """

    DEFAULT_BUFFER = 1024

    def __init__(self) -> None:
        self._by_job: _Table = {}
        self._by_domain: _Table = {}
        self._by_type: _Table = {}
        self._by_kind: _Table = {}
        #: the subscriptions filtering on none of the four (the key is always None)
        self._by_nothing: _Table = {}
        #: every live subscription and where it is filed
        self._keys: dict[Subscription, tuple[tuple[_Table, object], ...]] = {}
        self._emitted = 0

    def _filed_under(self, flt: EventFilter) -> tuple[tuple[_Table, object], ...]:
        if flt.job is not None:
            return ((self._by_job, flt.job),)
        if flt.domain is not None:
            return ((self._by_domain, flt.domain),)
        if flt.types is not None:
            return tuple((self._by_type, t) for t in flt.types)
        if flt.kinds is not None:
            return tuple((self._by_kind, k) for k in flt.kinds)
        return ((self._by_nothing, None),)

    def subscribe(
        self,
        flt: EventFilter | None = None,
        maxlen: int = DEFAULT_BUFFER,
        lost_limit: int | None = None,
    ) -> Subscription:
        if maxlen < 1:
            raise ValueError("an event buffer holds at least one event")
        if lost_limit is not None and lost_limit < 0:
            raise ValueError("lost_limit must be None or >= 0")
        sub = Subscription(flt or EventFilter(), maxlen, self, lost_limit)
        keys = self._filed_under(sub.filter)
        self._keys[sub] = keys
        for table, key in keys:
            bucket = table.get(key)
            if bucket is None:
                bucket = table[key] = _Bucket()
            bucket.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        keys = self._keys.pop(sub, None)
        if keys is None:
            return
        for table, key in keys:
            bucket = table[key]
            bucket.discard(sub)
            if not bucket.members:
                del table[key]  # emit only looks keys up: safe mid-emit

    @property
    def active(self) -> bool:
        return bool(self._keys)

    @property
    def subscriptions(self) -> int:
        """Live subscriptions (not yet closed or ended)."""
        return len(self._keys)

    @property
    def _subs(self) -> tuple[Subscription, ...]:
        """The live subscriptions, as a tuple (ending them while iterating it is safe)."""
        return tuple(self._keys)

    def _indexed(self) -> int:
        """Buckets in the index (for tests: none stays once its subscriptions are gone)."""
        tables = (self._by_job, self._by_domain, self._by_type, self._by_kind)
        return sum(map(len, tables)) + len(self._by_nothing)

    def emit(self, ev: JobEvent) -> None:
        entry = (self._emitted, ev)
        self._emitted += 1
        # an empty table is skipped: no hashing of a key nobody is filed under
        by_job, by_domain, by_type, by_kind = (
            self._by_job,
            self._by_domain,
            self._by_type,
            self._by_kind,
        )
        for bucket in (
            by_job.get(ev.job) if by_job else None,
            by_domain.get(ev.domain) if by_domain else None,
            by_type.get(ev.type) if by_type else None,
            by_kind.get(ev.kind) if by_kind else None,
            self._by_nothing.get(None),
        ):
            if bucket is not None:
                for sub in bucket.snapshot():
                    # closed: ended earlier in this emit, it takes no more events
                    if not sub.closed and sub.filter.matches(ev):
                        sub._push(entry)

    def emit_to(self, sub: Subscription, ev: JobEvent) -> None:
        """Hand ``ev`` to ``sub`` alone, in order with what the hub emits (a resumed
        subscription's catch-up event: jobd's ``resume``)."""
        if not sub.closed and sub.filter.matches(ev):
            sub._push((self._emitted, ev))
            self._emitted += 1

    def close(self) -> None:
        for sub in list(self._keys):
            sub.close()
