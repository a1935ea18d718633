"""One simulated job's progress over time, and the shape of a job family's behaviour.

A SimJob copies ``total`` bytes at ``rate`` bytes/s from ``base_bytes`` at ``base_time``;
the connection's scheduler loop wakes at its ``deadline()``. What a job type does to the
world (how much work it is, what it changes when it completes, what it removes when it
ends) is a ``Behaviour``, one per family module: ``backup``, ``chain``, ``migration``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field, frozen

from drivers.sim.world import SimDomain, SimWorld
from jobcore.driver import DriverJob


class Phase(enum.Enum):
    COPY = "copy"  # copying; ends in completion (or ready, for converging jobs)
    READY = "ready"  # converged, waiting for complete/cancel
    FINISH = "finish"  # a completion or cancel takes effect at the next step


@define(eq=False)
class SimJob:
    job: DriverJob
    total: int
    rate: float  # effective bytes/s; math.inf when instant
    converges: bool  # goes to ready instead of completing (active commit, pull backup)
    fail_at: int | None  # bytes at which the job fails
    fail_message: str
    base_bytes: float = 0.0
    base_time: float = 0.0
    paused: bool = False
    phase: Phase = Phase.COPY
    outcome: str = "completed"  # for Phase.FINISH: completed | cancelled | failed
    version: int = 0
    extra: dict[str, int | str] = field(factory=dict)
    #: target/scratch files this job created (removed again unless a push completes)
    created: tuple[str, ...] = ()
    #: a migration's destination that is another fleet member (the domain is handed over
    #: to it when the job completes; None: a simulated host of this world)
    handover_to: str | None = None
    #: its record's DriverState key (drivers.sim.persist.job_key), made at its first save
    state_key: str = ""

    def processed(self, now: float) -> int:
        if self.paused or self.phase is not Phase.COPY:
            return int(self.base_bytes)
        if math.isinf(self.rate):
            return self.total
        return int(min(self.total, self.base_bytes + self.rate * max(0.0, now - self.base_time)))

    def deadline(self) -> float:
        if self.phase is Phase.FINISH:
            return self.base_time
        if self.paused or self.phase is Phase.READY:
            return math.inf
        target = self.total if self.fail_at is None else min(self.total, self.fail_at)
        if math.isinf(self.rate) or target <= self.base_bytes:
            return self.base_time
        if self.rate <= 0:
            return math.inf
        return self.base_time + (target - self.base_bytes) / self.rate


#: bytes of work, whether the job converges to ready, and its initial extra stats
Plan = tuple[int, bool, dict[str, int | str]]


def _leave_nothing(world: SimWorld, sj: SimJob, outcome: str) -> None:
    """Most jobs leave no file behind to remove."""


@frozen
class Behaviour:
    """What the jobs of one family do to the simulated world."""

    #: before the job starts: its plan, or the error that refuses it
    plan: Callable[[SimWorld, Any, SimDomain], Plan]
    #: when it completes: its effect on the world, and the extra stats it adds
    apply: Callable[[SimWorld, DriverJob, SimDomain], Mapping[str, int | str]]
    #: when it ended, however: remove what it must not leave behind
    ended: Callable[[SimWorld, SimJob, str], None] = _leave_nothing
