"""A stand-in for a driver that recovers, until the sim driver re-attaches by itself: the
sim driver whose connection has a ``recover_job`` that starts the job again on the
simulator (so it runs, reports and takes verbs like any job) and answers Reattached, or
answers what a test scripted for the job's UUID. ``use_recovering_sim`` installs it for
``sim:`` URIs of in-process connections (jobcore.local's driver lookup)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from jobcore import local
from jobcore.driver import DriverJob, Reattached, Recovered
from jobcore.drivers import load_driver
from jobcore.lifecycle import JobState
from jobcore.uri import URI, parse_uri

#: what recover_job answers for a UUID: an outcome, an exception to raise, or a function
#: of the inner connection and the job (async: may act on the simulator first)
Answer = Recovered | BaseException | Callable[[Any, DriverJob], Any]


class RecoveringConnection:
    def __init__(self, inner: Any, answers: dict[uuid.UUID, Answer]) -> None:
        self._inner = inner
        self._answers = answers
        #: (uuid, last_state) of every recover_job call, in call order
        self.recovered: list[tuple[uuid.UUID, JobState]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def recover_job(self, job: DriverJob, last_state: JobState) -> Recovered:
        self.recovered.append((job.uuid, last_state))
        answer = self._answers.get(job.uuid)
        if answer is None:  # start it again: it runs on as a reattached job
            await self._inner.start(job)
            if last_state is JobState.PAUSED:
                await self._inner.pause(job)
                return Reattached(JobState.PAUSED)
            return Reattached(JobState.RUNNING)
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            result: Recovered = await answer(self._inner, job)
            return result
        return answer


class RecoveringSim:
    def __init__(self, inner: Any, answers: dict[uuid.UUID, Answer]) -> None:
        self._inner = inner
        self._answers = answers
        self.scheme = inner.scheme
        self.uri_params = getattr(inner, "uri_params", None)
        self.connections: list[RecoveringConnection] = []

    @asynccontextmanager
    async def connect(self, uri: URI, tg: Any) -> AsyncIterator[RecoveringConnection]:
        async with self._inner.connect(uri, tg) as dconn:
            conn = RecoveringConnection(dconn, self._answers)
            self.connections.append(conn)
            yield conn


def use_recovering_sim(
    patch: Callable[[object, str, object], None], answers: dict[uuid.UUID, Answer] | None = None
) -> RecoveringSim:
    """Install the stand-in with ``patch`` (``monkeypatch.setattr``, or ``setattr`` in a
    child process); returns it (its ``connections`` record the recover_job calls)."""
    made: list[RecoveringSim] = []
    table = {} if answers is None else answers

    def load(uri: URI) -> Any:
        driver = load_driver(uri)
        if uri.driver != "sim":
            return driver
        if not made:
            made.append(RecoveringSim(driver, table))
        return made[0]

    patch(local, "load_driver", load)
    load(parse_uri("sim:///default"))
    return made[0]


class PlainConnection:
    """A sim connection without ``recover_job``: a driver that cannot re-attach jobs."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "recover_job":
            raise AttributeError(name)
        return getattr(self._inner, name)


class PlainSim:
    """The sim driver without persistent state or recovery (``persistent_state`` unset)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.scheme = inner.scheme
        self.uri_params = getattr(inner, "uri_params", None)

    @asynccontextmanager
    async def connect(self, uri: URI, tg: Any) -> AsyncIterator[PlainConnection]:
        async with self._inner.connect(uri, tg) as dconn:
            yield PlainConnection(dconn)


def use_plain_sim(patch: Callable[[object, str, object], None]) -> None:
    """Install, with ``patch``, a sim driver that cannot recover for in-process ``sim:``
    connections: the engine's rule for such drivers (their active jobs fail at the next
    open) is tested with it."""

    def load(uri: URI) -> Any:
        driver = load_driver(uri)
        return PlainSim(driver) if uri.driver == "sim" else driver

    patch(local, "load_driver", load)
