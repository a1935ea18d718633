"""What every job description shares: the type name, the scheduling options, chain
positions and the value checks.

Each job type's own spec class lives with everything else about that type in
jobcore.types (backup, chain, migration). A spec is what the universal ``<job>`` XML
parses into and formats from (jobcore.xml); its type's ``prepare`` turns it into the
prepared spec a driver gets. Values are normalised: bandwidth in bytes/s whatever unit was
written, durations in seconds or milliseconds as named, chain positions as an index or a
file, identities as ``uuid.UUID``.
"""

from __future__ import annotations

import enum
import math
import operator
import os
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import attrs
from attrs import field, frozen, validators

from jobcore.errors import InvalidArgument


class JobType(str):
    """The name of a job type.

    An open enumeration: the four built-in types are class attributes, and a driver may
    register more (jobcore.registry). Compares equal to its plain string.
    """

    __slots__ = ()

    BACKUP: ClassVar[JobType]
    BLOCKPULL: ClassVar[JobType]
    BLOCKCOMMIT: ClassVar[JobType]
    MIGRATION: ClassVar[JobType]

    def __repr__(self) -> str:
        return f"JobType({str.__repr__(self)})"


JobType.BACKUP = JobType("backup")
JobType.BLOCKPULL = JobType("blockpull")
JobType.BLOCKCOMMIT = JobType("blockcommit")
JobType.MIGRATION = JobType("migration")


#: the largest bandwidth (bytes/s) and downtime limit (ms) a spec holds: QEMU's ``speed``
#: and ``max-bandwidth`` are int64, and every value must fit the daemon protocol
MAX_INT64 = (1 << 63) - 1
#: the longest queue timeout or retention (seconds): about 31.7 years
MAX_SECONDS = 1e9
#: Seconds an ended job keeps its final info and stats unless its XML says otherwise.
DEFAULT_RETENTION = 600.0
#: Ended jobs a domain's store keeps at most (the oldest ended go first; jobcore.store).
DEFAULT_MAX_RETAINED_PER_DOMAIN = 1000
#: Ended jobs a store keeps at most over all domains (the oldest ended go first).
DEFAULT_MAX_RETAINED = 10_000


def check_timeout(timeout: float | None) -> float | None:
    """A wait's ``timeout`` in seconds: None or +inf (no limit, returned as None) or a number
    >= 0; InvalidArgument for NaN, a negative number or anything else."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgument(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidArgument(
            f"timeout {timeout} is not a number of seconds >= 0 (None waits without limit)"
        )
    return None if math.isinf(timeout) else float(timeout)


def non_negative(_inst: object, attribute: object, value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{getattr(attribute, 'name', '?')} must not be negative")


def int64(_inst: object, attribute: object, value: Any) -> None:
    """None or an integer in 0…MAX_INT64 (bytes/s, ms)."""
    non_negative(_inst, attribute, value)
    if value is not None and value > MAX_INT64:
        raise ValueError(
            f"{getattr(attribute, 'name', '?')} {value} is too large: the maximum is {MAX_INT64}"
        )


def seconds(_inst: object, attribute: object, value: Any) -> None:
    """None or a finite number of seconds in 0…MAX_SECONDS."""
    name = getattr(attribute, "name", "?")
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value}")
    non_negative(_inst, attribute, value)
    if value > MAX_SECONDS:
        raise ValueError(f"{name} {value} s is too long: the maximum is {MAX_SECONDS:.0f} s")


@frozen
class ChainRef:
    """A position in a disk's backing chain: ``index`` (0 = active layer) or ``file``."""

    index: int | None = field(default=None, validator=non_negative)
    file: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.index is None) == (self.file is None):
            raise ValueError("a chain position names exactly one of index or file")


class Policy(enum.StrEnum):
    """What a job does about a job in its way (jobcore.scheduler's policy table; a job's
    ``<policy conflict='…'/>``). Defined here, below the scheduler, for JobOptions."""

    #: fail at once with JobConflict (today's fail-fast)
    REJECT = "reject"
    #: wait in the FIFO queues
    QUEUE = "queue"
    #: a job of higher priority takes the resource from the holder
    PREEMPT = "preempt"


class Decision(enum.StrEnum):
    """What admission does with a job (``Scheduler.verdict``). Defined here, below the
    scheduler, for the values that carry it (jobcore.info's Explanation, the wire), so
    neither loads the scheduler."""

    ADMIT = "admit"  # no conflict: it runs now
    QUEUE = "queue"  # it waits in the FIFO queues
    CONFLICT = "conflict"  # JobConflict
    PREEMPT = "preempt"  # its holders are paused or cancelled; it runs once they let go


@frozen
class JobOptions:
    """Scheduling options common to every job type (jobcore's additions to the job XML)."""

    #: wait in a FIFO queue when a resource is busy instead of failing with JobConflict
    queue: bool = False
    #: seconds a queued job waits before it fails with QueueTimeout; None = forever
    queue_timeout: float | None = field(default=None, validator=seconds)
    #: higher runs first among queued jobs; FIFO within one priority
    priority: int = field(
        default=0, validator=validators.and_(validators.ge(-1000), validators.le(1000))
    )
    #: seconds an ended job keeps its final info and stats; None = the connection default
    retention: float | None = field(default=None, validator=seconds)
    #: ``<policy conflict='…'/>``: what this job does about a conflict, whatever the
    #: connection's policy table says; None = the table, else ``queue``'s choice
    conflict: Policy | None = None
    #: ``<policy requeue='yes'/>``: if preempted and cancelled, begin again as a new queued
    #: job (same XML, a new UUID)
    requeue: bool = False


class JobSpec(Protocol):
    """What every spec class offers, built-in or registered, prepared or not (a
    prepared spec, what a driver gets, keeps its type's TYPE)."""

    TYPE: ClassVar[JobType]

    @property
    def uuid(self) -> uuid.UUID | None: ...

    @property
    def options(self) -> JobOptions: ...


def random_uuid() -> uuid.UUID:
    """``uuid.uuid4()``: a version 4 UUID from 16 bytes of ``os.urandom``."""
    return uuid4_of(os.urandom(16))


def uuid4_of(random: bytes) -> uuid.UUID:
    """``uuid.UUID(bytes=random, version=4)``, built without UUID.__init__'s argument
    checks (the same bits: variant RFC 4122, version 4; a job's begin makes one)."""
    n = int.from_bytes(random, "big")
    n = (n & ~(0xC000 << 48) | (0x8000 << 48)) & ~(0xF000 << 64) | (4 << 76)
    made = object.__new__(uuid.UUID)
    object.__setattr__(made, "int", n)
    object.__setattr__(made, "is_safe", uuid.SafeUUID.unknown)
    return made


# ---- attrs values, changed fast (hot paths: a job's begin) --------------------------

_Value = TypeVar("_Value")


def evolved(inst: _Value, **changes: Any) -> _Value:
    """``attrs.evolve(inst, **changes)`` (an attrs instance with ``changes`` applied by
    init argument), with the class's fields looked up once per class, not per call."""
    cls = type(inst)
    aliases, read = init_fields(cls)
    given = dict(zip(aliases, read(inst), strict=True))
    given.update(changes)
    return cls(**given)


def init_fields(cls: type[Any]) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    """The init argument of each field ``cls.__init__`` takes, and a reader of those
    fields' values of an instance, in the same order (an attrs class's fields are fixed
    once the class exists; one ``attrgetter`` call reads them all)."""
    found = _INIT_FIELDS.get(cls)
    if found is None:
        fields = [a for a in attrs.fields(cls) if a.init]
        names = [a.name for a in fields]
        read: Callable[[Any], tuple[Any, ...]]
        if len(names) > 1:
            read = operator.attrgetter(*names)
        elif names:
            one = operator.attrgetter(names[0])
            read = lambda inst: (one(inst),)  # noqa: E731
        else:
            read = lambda inst: ()  # noqa: E731
        found = _INIT_FIELDS[cls] = (tuple(a.alias for a in fields), read)
    return found


_INIT_FIELDS: dict[type[Any], tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}
