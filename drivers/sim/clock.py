"""Clocks for the simulated hypervisor: real time, or a manual clock tests advance."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio


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
        with anyio.move_on_after(None if math.isinf(delay) else delay):
            await wakeup.wait()


class ManualClock:
    """Time moves only when ``advance()`` is called: deterministic tests."""

    manual = True

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self._listeners: list[Callable[[], None]] = []

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
        for callback in self._listeners:
            callback()

    async def sleep_until(self, deadline: float, wakeup: anyio.Event) -> None:
        if deadline > self._now:
            await wakeup.wait()
