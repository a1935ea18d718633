"""Chain jobs: block pull (QEMU's block-stream) and block commit, active commit's pivot too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import anyio
from attrs import define

from drivers.qemu.domain import Disk
from drivers.qemu.images import remove_created
from drivers.qemu.process import Outcome
from drivers.qemu.runners.base import KEEP_OUTCOME, Phase, Runner, verb_error
from jobcore.driver import Recovered
from jobcore.errors import DriverError, OperationInvalid
from jobcore.lifecycle import JobState
from jobcore.types.chain import PreparedCommit, PreparedPull


async def _recover_chain_job(
    runner: Runner, disk: Disk, job_id: str, last_state: JobState, left: Iterable[str], delete: bool
) -> Recovered:
    """A stream or commit a previous owner started: running → reattached (phase set);
    ended → its outcome, and after a success the chain without the files that ``left``
    it (found by file: the rebuilt chain may or may not still hold them)."""
    if not await runner.adopt_subjobs([job_id]):
        runner.untrack()
        return runner.vanished(f"QEMU job '{job_id}'")
    (sj,) = runner.subjobs
    if not sj.done.is_set():
        runner.phase = Phase.READY if sj.ready.is_set() else Phase.RUNNING
        return runner.reattached(last_state)
    runner.cancel_requested = last_state is JobState.ABORTING
    outcome, err = runner.outcome()
    await runner.dismiss(outcome, err)  # an ended job still holds its nodes until dismissed
    if outcome is Outcome.COMPLETED:
        gone = set(left)
        removed = [la for la in disk.layers + disk.orphans if la.file in gone]
        disk.layers = [la for la in disk.layers if la.file not in gone]
        disk.orphans = [la for la in disk.orphans if la.file not in gone]
        await runner.del_nodes([la.node for la in removed])
        if delete:
            remove_created(la.owned for la in removed if la.owned is not None)
    runner.phase = Phase.ENDED
    runner.untrack()
    return runner.concluded(outcome, err)


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
            **KEEP_OUTCOME,
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
        with anyio.CancelScope(shield=True):
            await self.dismiss(outcome, err)
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

    async def recover(self, last_state: JobState, record: dict[str, Any] | None) -> Recovered:
        spec = self.job.spec
        assert isinstance(spec, PreparedPull)
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        if not spec.merged:  # it ended at once when it started
            self.phase = Phase.ENDED
            return self.concluded(Outcome.COMPLETED, None)
        job_id = self.job_id("pull", disk.name)
        return await _recover_chain_job(self, disk, job_id, last_state, spec.merged, False)


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
            **KEEP_OUTCOME,
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
                reported = self.phase is Phase.READY and self.recovered
                self.phase = Phase.READY
                self.progress(sj.total, sj.total)
                if not reported:
                    self.report(lambda r: r.ready())
                if self.spec.pivot and not self.complete_requested:
                    with contextlib.suppress(OperationInvalid, DriverError):
                        await self.complete()
        await sj.done.wait()
        outcome, err = self.outcome()
        with anyio.CancelScope(shield=True):
            await self.dismiss(outcome, err)
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

    async def recover(self, last_state: JobState, record: dict[str, Any] | None) -> Recovered:
        spec = self.spec
        disk = self.disk = self.domain.disk(spec.disk)
        self.top, self.base = spec.top_index, spec.base_index
        job_id = self.job_id("commit", disk.name)
        self.complete_requested = last_state is JobState.COMPLETING
        return await _recover_chain_job(
            self, disk, job_id, last_state, spec.committed, bool(spec.delete)
        )

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
