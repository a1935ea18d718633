"""Clocks for the simulated hypervisor: real time, or a manual clock tests advance."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable

import anyio

from jobcore.driver import wait_until_monotonic


class RealClock:
    manual = False

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float, wakeup: anyio.Event) -> None:
        """Return at ``deadline`` or as soon as ``wakeup`` is set."""
        delay = deadline - self.now()
        if delay <= 0:
            return
        if math.isinf(delay):  # nothing due: no timer (a cancel scope) to arm
            await wakeup.wait()
            return
        with anyio.move_on_after(delay):
            await wakeup.wait()

    async def wait_until(self, deadline: float) -> None:
        await wait_until_monotonic(deadline)


class ManualClock:
    """Time moves only when ``advance()`` is called: deterministic tests."""

    manual = True

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._listeners: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._timer_seq = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def on_advance(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def advance(self, seconds: float) -> None:
        """Move time forward; the simulated hypervisor catches up at its next step."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            heapq.heappop(self._timers)[2].set()
        for callback in self._listeners:
            callback()

    async def sleep_until(self, deadline: float, wakeup: anyio.Event) -> None:
        if deadline > self._now:
            await wakeup.wait()

    async def wait_until(self, deadline: float) -> None:
        """Return once ``advance()`` has moved the clock to ``deadline``."""
        if deadline <= self._now:
            return
        reached = anyio.Event()
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), reached))
        await reached.wait()
