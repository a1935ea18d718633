"""Drivers for engine tests: one that holds any driver call at a point of the test's
choosing (to cancel or race there), and one that never reports anything by itself."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio

from drivers.sim import SimConnection, SimDriver
from drivers.sim.clock import ManualClock
from jobcore.driver import Clock, DiskInfo, DomainInfo, DriverConnection, DriverJob
from jobcore.engine import Engine
from jobcore.errors import DriverError, NoSuchDomain
from jobcore.events import JobEvent, Subscription
from jobcore.local import LocalConnection
from jobcore.spec import JobType
from jobcore.uri import parse_uri
from jobcore.xml.domain import DomainDef

MANUAL = "sim:///default?clock=manual"

#: a point in a driver call: (method, "before" | "after" the wrapped driver ran it)
Point = tuple[str, str]


class Gated:
    """A DriverConnection around another one. Every async call is recorded; ``hold``
    stops the next call of a method before or after the wrapped driver runs it, until
    ``release`` is set; ``refuse`` makes methods raise DriverError without reaching it."""

    def __init__(self, inner: DriverConnection) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.clock = inner.clock
        self.calls: list[str] = []
        self.hold: Point | None = None
        self.reached = anyio.Event()
        self.release = anyio.Event()
        self.refuse: set[str] = set()
        self.raise_in_start: BaseException | None = None

    def supports(self, job_type: JobType) -> bool:
        return self.inner.supports(job_type)

    async def _point(self, name: str, where: str) -> None:
        if self.hold == (name, where):
            self.hold = None
            self.reached.set()
            await self.release.wait()

    async def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        await self._point(name, "before")
        if name in self.refuse:
            raise DriverError(f"the hypervisor refused {name}")
        result = await getattr(self.inner, name)(*args)
        await self._point(name, "after")
        return result

    async def list_domains(self) -> list[DomainInfo]:
        result: list[DomainInfo] = await self._call("list_domains")
        return result

    async def lookup_domain(self, name: str) -> DomainInfo:
        result: DomainInfo = await self._call("lookup_domain", name)
        return result

    async def create_domain(self, definition: DomainDef) -> DomainInfo:
        result: DomainInfo = await self._call("create_domain", definition)
        return result

    async def destroy_domain(self, name: str) -> None:
        await self._call("destroy_domain", name)

    async def start(self, job: DriverJob) -> None:
        if self.raise_in_start is not None:
            _driver_bug(self.raise_in_start)
        await self._call("start", job)

    async def cancel(self, job: DriverJob) -> None:
        await self._call("cancel", job)

    async def pause(self, job: DriverJob) -> None:
        await self._call("pause", job)

    async def resume(self, job: DriverJob) -> None:
        await self._call("resume", job)

    async def complete(self, job: DriverJob) -> None:
        await self._call("complete", job)

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None:
        await self._call("set_speed", job, bandwidth)


def _driver_bug(exc: BaseException) -> None:
    raise exc


@asynccontextmanager
async def gated_sim(
    uri: str = MANUAL,
) -> AsyncIterator[tuple[LocalConnection, Gated, SimConnection]]:
    """A LocalConnection whose engine talks to a sim host through ``Gated``."""
    async with anyio.create_task_group() as tg:
        async with SimDriver().connect(parse_uri(uri), tg) as sim:
            gated = Gated(cast(DriverConnection, sim))
            engine = Engine(gated, tg)
            try:
                yield LocalConnection(uri, gated, engine), gated, sim
            finally:
                engine.close()
        tg.cancel_scope.cancel()


class Quiet:
    """A driver that accepts every call and never reports on its own: the test reports
    through the job's reporter. One domain, ``vm1``, with a 3-layer disk ``vda``."""

    uri = "quiet:///"

    def __init__(self) -> None:
        self.clock: Clock = ManualClock()
        self.jobs: dict[uuid.UUID, DriverJob] = {}
        self.dom = DomainInfo(
            "vm1",
            uuid.uuid5(uuid.NAMESPACE_URL, "quiet:vm1"),
            (DiskInfo("vda", ("/q/vda.0", "/q/vda.1", "/q/vda.2"), virtual_size=1 << 30),),
        )

    def supports(self, job_type: JobType) -> bool:
        return True

    async def list_domains(self) -> list[DomainInfo]:
        return [self.dom]

    async def lookup_domain(self, name: str) -> DomainInfo:
        if name != self.dom.name:
            raise NoSuchDomain(f"domain '{name}' not found")
        return self.dom

    async def create_domain(self, definition: DomainDef) -> DomainInfo:
        raise DriverError("no")

    async def destroy_domain(self, name: str) -> None:
        raise DriverError("no")

    async def start(self, job: DriverJob) -> None:
        self.jobs[job.uuid] = job

    async def cancel(self, job: DriverJob) -> None:
        pass

    async def pause(self, job: DriverJob) -> None:
        pass

    async def resume(self, job: DriverJob) -> None:
        pass

    async def complete(self, job: DriverJob) -> None:
        pass

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None:
        pass


@asynccontextmanager
async def quiet_connection() -> AsyncIterator[tuple[LocalConnection, Quiet]]:
    driver = Quiet()
    async with anyio.create_task_group() as tg:
        engine = Engine(driver, tg)
        try:
            yield LocalConnection(driver.uri, driver, engine), driver
        finally:
            engine.close()
        tg.cancel_scope.cancel()


def drain(sub: Subscription) -> list[JobEvent]:
    out: list[JobEvent] = []
    while (ev := sub.get_nowait()) is not None:
        out.append(ev)
    return out
