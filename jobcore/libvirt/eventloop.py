"""libvirt's default event loop: ``virEventRegisterDefaultImpl`` and
``virEventRunDefaultImpl``, with its handles and timeouts.

As libvirt's, one iteration of ``virEventRunDefaultImpl`` waits (poll) for the first of:
a registered file handle becoming ready, a timeout falling due, or a domain event arriving
from a connection; then it dispatches what is ready **on the calling thread** and returns.
Connections do not call callbacks themselves: their event readers (daemon threads, see
jobcore.libvirt.connection) ``post`` each event here, and a byte on a wake-up pipe ends
the wait. Events posted while nobody runs the loop wait for the next iteration; at most
``MAX_PENDING`` wait (the oldest go first, counted in ``dropped``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import define, field

from jobcore.libvirt import constants as C
from jobcore.libvirt.errors import make_error

MAX_PENDING = 10_000

HandleCallback = Callable[[int, int, int, Any], object]
TimeoutCallback = Callable[[int, Any], object]


@define
class _Handle:
    fd: int
    events: int
    callback: HandleCallback
    opaque: Any


@define
class _Timeout:
    #: milliseconds between calls; -1 disabled, 0 every iteration
    interval: int
    callback: TimeoutCallback
    opaque: Any
    due: float = 0.0


@define(eq=False)
class EventLoop:
    """The process's default event loop (one, as libvirt's)."""

    registered: bool = False
    dropped: int = 0
    _lock: threading.Lock = field(factory=threading.Lock)
    _handles: dict[int, _Handle] = field(factory=dict)
    _timeouts: dict[int, _Timeout] = field(factory=dict)
    _pending: deque[Callable[[], object]] = field(factory=deque)
    _next_id: int = 1
    _wake_r: int = -1
    _wake_w: int = -1

    def _ensure_pipe(self) -> None:
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)

    def _wake(self) -> None:
        if self._wake_w >= 0:
            # a full pipe: a wake-up is pending already
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the thread of the next ``virEventRunDefaultImpl`` iteration."""
        with self._lock:
            self._ensure_pipe()
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(fn)
        self._wake()

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    def add_handle(self, fd: int, events: int, cb: HandleCallback, opaque: Any) -> int:
        with self._lock:
            ident = self._new_id()
            self._handles[ident] = _Handle(fd, events, cb, opaque)
        self._wake()
        return ident

    def update_handle(self, watch: int, events: int) -> None:
        with self._lock:
            if watch in self._handles:
                self._handles[watch].events = events
        self._wake()

    def remove_handle(self, watch: int) -> int:
        with self._lock:
            found = self._handles.pop(watch, None)
        self._wake()
        return 0 if found is not None else -1

    def add_timeout(self, interval: int, cb: TimeoutCallback, opaque: Any) -> int:
        with self._lock:
            ident = self._new_id()
            self._timeouts[ident] = _Timeout(interval, cb, opaque, _due(interval))
        self._wake()
        return ident

    def update_timeout(self, timer: int, interval: int) -> None:
        with self._lock:
            found = self._timeouts.get(timer)
            if found is not None:
                found.interval = interval
                found.due = _due(interval)
        self._wake()

    def remove_timeout(self, timer: int) -> int:
        with self._lock:
            found = self._timeouts.pop(timer, None)
        self._wake()
        return 0 if found is not None else -1

    def run_once(self) -> None:
        """One iteration: wait for something ready, dispatch it on this thread."""
        with self._lock:
            self._ensure_pipe()
            handles = dict(self._handles)
            timers = {k: t for k, t in self._timeouts.items() if t.interval >= 0}
            pending = bool(self._pending)
        now = time.monotonic()
        wait: float | None = None
        if pending:
            wait = 0.0
        elif timers:
            wait = max(0.0, min(t.due for t in timers.values()) - now)
        ready: list[tuple[int, int, int]] = []
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            for ident, h in handles.items():
                mask = _selector_mask(h.events)
                if mask:
                    try:
                        sel.register(h.fd, mask, ident)
                    except (KeyError, ValueError, OSError):
                        ready.append((ident, h.fd, C.VIR_EVENT_HANDLE_ERROR))
            if not ready:
                for key, got in sel.select(wait):
                    if key.fd == self._wake_r:
                        _drain(self._wake_r)
                        continue
                    ready.append((key.data, key.fd, _libvirt_events(got)))
        for ident, fd, events in ready:
            h = handles[ident]
            h.callback(ident, fd, events, h.opaque)
        now = time.monotonic()
        for ident, t in timers.items():
            with self._lock:
                live = self._timeouts.get(ident) is t and t.interval >= 0
                if live and t.due <= now:
                    t.due = now + t.interval / 1000
                else:
                    live = False
            if live:
                t.callback(ident, t.opaque)
        with self._lock:
            todo = list(self._pending)
            self._pending.clear()
        for fn in todo:
            fn()


def _due(interval: int) -> float:
    return time.monotonic() + max(interval, 0) / 1000


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _selector_mask(events: int) -> int:
    mask = 0
    if events & C.VIR_EVENT_HANDLE_READABLE:
        mask |= selectors.EVENT_READ
    if events & C.VIR_EVENT_HANDLE_WRITABLE:
        mask |= selectors.EVENT_WRITE
    return mask


def _libvirt_events(mask: int) -> int:
    events = 0
    if mask & selectors.EVENT_READ:
        events |= C.VIR_EVENT_HANDLE_READABLE
    if mask & selectors.EVENT_WRITE:
        events |= C.VIR_EVENT_HANDLE_WRITABLE
    return events


#: the default loop
LOOP = EventLoop()


def virEventRegisterDefaultImpl() -> int:
    """Use the default event loop (call before opening connections, as with libvirt)."""
    LOOP.registered = True
    return 0


def virEventRunDefaultImpl() -> int:
    """Run one iteration of the default loop on the calling thread."""
    if not LOOP.registered:
        raise make_error(
            C.VIR_ERR_INTERNAL_ERROR,
            "no event loop implementation: call virEventRegisterDefaultImpl() first",
            C.VIR_FROM_EVENT,
        )
    LOOP.run_once()
    return 0


def virEventAddHandle(fd: int, events: int, cb: HandleCallback, opaque: Any) -> int:
    """Watch ``fd``: ``cb(watch, fd, events, opaque)`` when it is ready."""
    return LOOP.add_handle(fd, events, cb, opaque)


def virEventUpdateHandle(watch: int, events: int) -> None:
    LOOP.update_handle(watch, events)


def virEventRemoveHandle(watch: int) -> int:
    return LOOP.remove_handle(watch)


def virEventAddTimeout(timeout: int, cb: TimeoutCallback, opaque: Any) -> int:
    """``cb(timer, opaque)`` every ``timeout`` ms (0: every iteration, -1: disabled)."""
    return LOOP.add_timeout(timeout, cb, opaque)


def virEventUpdateTimeout(timer: int, timeout: int) -> None:
    LOOP.update_timeout(timer, timeout)


def virEventRemoveTimeout(timer: int) -> int:
    return LOOP.remove_timeout(timer)
