"""Chain jobs: block pull (QEMU's block-stream) and block commit, active commit's pivot too."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
from attrs import define

from drivers.qemu.domain import Disk
from drivers.qemu.images import remove_created
from drivers.qemu.process import Outcome
from drivers.qemu.runners.base import Phase, Runner, verb_error
from jobcore.errors import DriverError, OperationInvalid
from jobcore.types.chain import PreparedCommit, PreparedPull

# ========================================================================= block pull


@define(eq=False)
class BlockPullRunner(Runner):
    disk: Disk | None = None
    top: int = 0
    base: int | None = None
    nothing_to_do: bool = False

    async def start(self) -> None:
        spec = self.job.spec
        assert isinstance(spec, PreparedPull)
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        if not spec.merged:
            self.nothing_to_do = True  # no backing below top, or nothing between
            self.phase = Phase.RUNNING
            return
        args: dict[str, Any] = {
            "job-id": self.job_id("pull", disk.name),
            "device": disk.layers[self.top].node,
        }
        if self.base is not None:
            args["base-node"] = disk.layers[self.base].node
        if spec.bandwidth:
            args["speed"] = spec.bandwidth
        self.track(args["job-id"])
        try:
            await self.proc.execute("block-stream", args)
        except BaseException:
            self.untrack()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        if self.nothing_to_do:
            self.progress(0, 0)
            self.end(Outcome.COMPLETED, None)
            return
        await self.wait_subjobs()
        outcome, err = self.outcome()
        if outcome is Outcome.COMPLETED:
            assert self.disk is not None
            stop = self.base if self.base is not None else len(self.disk.layers)
            removed = self.disk.layers[self.top + 1 : stop]
            del self.disk.layers[self.top + 1 : stop]
            with anyio.CancelScope(shield=True):
                await self.del_nodes([layer.node for layer in removed])
            total = sum(sj.total for sj in self.subjobs)
            self.progress(total, total)
        self.end(outcome, err)


# ======================================================================= block commit


@define(eq=False)
class BlockCommitRunner(Runner):
    disk: Disk | None = None
    top: int = 0
    base: int = 0

    @property
    def spec(self) -> PreparedCommit:
        spec = self.job.spec
        assert isinstance(spec, PreparedCommit)
        return spec

    @property
    def active(self) -> bool:
        return self.top == 0

    async def start(self) -> None:
        spec = self.spec
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        args: dict[str, Any] = {
            "job-id": self.job_id("commit", disk.name),
            "device": disk.active.node,
            "base-node": disk.layers[self.base].node,
        }
        if not self.active:
            args["top-node"] = disk.layers[self.top].node
        if spec.bandwidth:
            args["speed"] = spec.bandwidth
        self.track(args["job-id"])
        try:
            await self.proc.execute("block-commit", args)
        except BaseException:
            self.untrack()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        (sj,) = self.subjobs
        if self.active:
            async with anyio.create_task_group() as tg:

                async def _ended() -> None:
                    await sj.done.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_ended)
                await sj.ready.wait()
                tg.cancel_scope.cancel()
            if not sj.done.is_set() and not self.cancel_requested:
                self.phase = Phase.READY
                self.progress(sj.total, sj.total)
                self.report(lambda r: r.ready())
                if self.spec.pivot:
                    with contextlib.suppress(OperationInvalid, DriverError):
                        await self.complete()
        await sj.done.wait()
        outcome, err = self.outcome()
        if outcome is Outcome.COMPLETED:
            assert self.disk is not None
            removed = self.disk.layers[self.top : self.base]
            del self.disk.layers[self.top : self.base]
            with anyio.CancelScope(shield=True):
                await self.del_nodes([layer.node for layer in removed])
            if self.spec.delete:
                remove_created(layer.owned for layer in removed if layer.owned is not None)
            self.progress(sj.total, sj.total)
        self.end(outcome, err)

    async def complete(self) -> None:
        if not self.active:
            await super().complete()
        (sj,) = self.subjobs
        if self.phase is not Phase.READY and not sj.ready.is_set():
            raise OperationInvalid(
                f"job {self.job.uuid} is not ready",
                job=self.job.uuid,
                state=self.phase.value,
                verb="complete",
            )
        self.complete_requested = True
        try:
            await self.proc.execute("job-complete", {"id": sj.id})
            if self.user_paused:
                # QEMU accepts complete in standby but pivots only once resumed: finishing
                # is what was asked, so let it run
                await self.proc.execute("job-resume", {"id": sj.id})
                self.user_paused = False
        except DriverError as exc:
            raise verb_error(exc, self.job, "complete") from None
        self.phase = Phase.ENDING
