"""What every runner shares: the job's phases, QEMU job tracking, verbs, one terminal report.

A runner's ``start()`` issues the QMP commands and returns once QEMU accepted them (its
refusal is a DriverError carrying QEMU's text). Its ``supervise()`` runs in the engine's
task group: it waits for the QEMU jobs' outcome (BLOCK_JOB_COMPLETED / _CANCELLED events,
or the process exiting), updates the driver's view of the backing chains, cleans up, and
reports exactly one terminal outcome. Verbs (pause, resume, set_speed, cancel, complete)
are forwarded to QEMU; the *user* paused flag is tracked here, never derived from QEMU's
status, which flips paused/running on its own whenever the block graph is drained.

QEMU jobs are started with ``auto-dismiss: false``: a job that ends stays in
``query-jobs`` (status ``concluded``, its ``error`` if it failed) until the runner has read
its outcome and dismissed it (``dismiss``), so a driver that was away when it ended still
learns how (``recover``). ``record()`` is what a job created, kept in the run directory on
a keep-guests connection; ``recover`` rebuilds a runner from it and from QEMU's state.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from attrs import define, field
from structlog.stdlib import BoundLogger

from drivers.qemu.domain import Domain
from drivers.qemu.process import Outcome, QemuProcess, QmpTimeout, SubJob
from drivers.qemu.runners.host import Host
from jobcore.driver import Concluded, DriverJob, JobReporter, Reattached, Recovered, Vanished
from jobcore.errors import DriverError, OperationInvalid
from jobcore.lifecycle import JobState
from jobcore.log import get_logger

CLEANUP_TIMEOUT = 10.0
#: QEMU job arguments: the outcome stays readable until the runner dismisses the job
KEEP_OUTCOME = {"auto-dismiss": False}
#: QEMU statuses of a job that has not ended
_LIVE = frozenset({"created", "running", "paused", "ready", "standby", "waiting", "pending"})


class Phase(enum.Enum):
    """Where a runner is, from the driver's side (the engine owns the job's state)."""

    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    ENDING = "ending"
    ENDED = "ended"


def verb_error(exc: DriverError, job: DriverJob, verb: str) -> Exception:
    text = str(exc)
    if "cannot accept command verb" in text or "already paused" in text or "not paused" in text:
        return OperationInvalid(text, job=job.uuid, verb=verb)
    return exc


@define(eq=False)
class Runner:
    conn: Host
    job: DriverJob
    domain: Domain
    proc: QemuProcess
    subjobs: list[SubJob] = field(factory=list)
    phase: Phase = Phase.STARTING
    user_paused: bool = False
    cancel_requested: bool = False
    complete_requested: bool = False
    end_requested: anyio.Event = field(factory=anyio.Event)
    #: a keep-guests connection closed under it: it stops watching, undoes nothing
    detached: bool = False
    #: rebuilt by ``recover`` (a previous owner started it): no second ``ready()``
    recovered: bool = False
    #: the outcome a previous owner noted before QEMU forgot it (``Host.note_outcome``):
    #: it is the job's outcome, whatever QEMU still lists
    noted: tuple[Outcome, str | None] | None = None
    log: BoundLogger = field(init=False)
    short: str = ""

    def __attrs_post_init__(self) -> None:
        self.short = self.job.uuid.hex[:8]
        self.log = get_logger(__name__).bind(
            job=str(self.job.uuid), job_type=str(self.job.type), domain=self.job.domain
        )

    # ------------------------------------------------------------ subclass API

    async def start(self) -> None:
        raise NotImplementedError

    async def supervise(self) -> None:
        raise NotImplementedError

    def report_progress(self) -> None:
        """Called by the connection's poller after it refreshed the subjobs' counters."""
        total = sum(sj.total for sj in self.subjobs)
        done = sum(sj.current for sj in self.subjobs)
        self.progress(done, total)

    async def poll(self) -> None:
        """Extra polling for runners that are not QEMU jobs (migration)."""

    def record(self) -> dict[str, Any]:
        """What a later owner needs to recover this job beyond its spec (JSON-able)."""
        return {}

    @classmethod
    def discard_record(cls, record: dict[str, Any]) -> None:
        """The job's domain is gone: remove what the job created (its record says)."""

    async def recover(self, last_state: JobState, record: dict[str, Any] | None) -> Recovered:
        """Reconcile with QEMU's state: the runner resumes (phase RUNNING/READY, then
        the connection supervises it), or the job's real outcome, or Vanished."""
        raise NotImplementedError

    # ---------------------------------------------------------------- recovery

    async def adopt_subjobs(self, ids: list[str]) -> bool:
        """Track QEMU jobs ``ids`` again, their status and progress from ``query-jobs``
        (a concluded one with its outcome); False when any of them is gone."""
        for job_id in ids:
            self.track(job_id)  # before the query: later events must find it
        infos = {str(i.get("id")): i for i in await self.proc.execute("query-jobs")}
        found = True
        for sj in self.subjobs:
            info = infos.get(sj.id)
            if info is None and self.noted is not None:  # dismissed: it ended as noted
                sj.finish(*self.noted)
                continue
            if info is None:
                found = False
                sj.finish(Outcome.FAILED, "gone")
                continue
            sj.current = int(info.get("current-progress", 0))
            sj.total = int(info.get("total-progress", 0))
            if sj.done.is_set():  # its event came meanwhile
                continue
            sj.status = str(info.get("status"))
            if sj.status in ("ready", "standby"):
                sj.ready.set()
            if sj.status not in _LIVE:
                error = info.get("error")
                sj.finish(Outcome.FAILED if error else Outcome.COMPLETED, error)
        return found

    def vanished(self, what: str) -> Vanished:
        return Vanished(
            f"{what} of job {self.job.uuid} on domain '{self.domain.name}' "
            f"(QEMU process {self.proc.pid}) is gone"
        )

    def reattached(self, last_state: JobState) -> Reattached:
        """The job runs on: RUNNING, or where the engine had it when QEMU agrees."""
        live = [sj for sj in self.subjobs if not sj.done.is_set()]
        if last_state in (JobState.PAUSED, JobState.STANDBY) and all(
            sj.status in ("paused", "standby") for sj in live
        ):
            self.user_paused = True
        if self.phase is Phase.READY:
            state = JobState.STANDBY if self.user_paused else JobState.READY
        else:
            state = JobState.PAUSED if self.user_paused else JobState.RUNNING
        total = sum(sj.total for sj in self.subjobs)
        return Reattached(state, sum(sj.current for sj in self.subjobs), total)

    @staticmethod
    def concluded(outcome: Outcome, errmsg: str | None) -> Concluded:
        state = {
            Outcome.COMPLETED: JobState.COMPLETED,
            Outcome.CANCELLED: JobState.CANCELLED,
            Outcome.FAILED: JobState.FAILED,
        }[outcome]
        return Concluded(state, errmsg if outcome is Outcome.FAILED else None)

    async def dismiss(
        self, outcome: Outcome | None = None, errmsg: str | None = None, *, discard: bool = False
    ) -> None:
        """The outcome is read: let QEMU free its ended jobs (``auto-dismiss`` is off). With
        ``outcome``, it is first noted in the job's record (``Host.note_outcome``): once
        dismissed, QEMU no longer says how the job ended, and the engine may not have
        written it yet."""
        if outcome is not None:
            await self.conn.note_outcome(self.job, outcome, errmsg, discard=discard)
        for sj in self.subjobs:
            if self.proc.alive:
                with contextlib.suppress(DriverError):
                    await self.proc.execute("job-dismiss", {"id": sj.id})

    # ----------------------------------------------------------------- helpers

    def report(self, call: Callable[[JobReporter], None]) -> None:
        """Make one report; the engine refusing a report must not kill the driver."""
        try:
            call(self.job.reporter)
        except Exception:
            self.log.exception("reporter refused a report")

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self.report(lambda r: r.progress(processed, total, extra))

    def job_id(self, kind: str, disk: str | None = None) -> str:
        """The QEMU job id: the job's whole UUID, so that no two jobs ever share one (two
        caller-chosen UUIDs may share any prefix)."""
        return f"{kind}-{self.job.uuid.hex}" + (f"-{disk}" if disk else "")

    def track(self, job_id: str) -> SubJob:
        """Register a QEMU job id *before* creating it: its events may beat the reply. An id
        another job registered is refused (never taken over)."""
        if job_id in self.proc.subjobs:
            raise DriverError(
                f"QEMU job id '{job_id}' is in use by another job of domain "
                f"'{self.domain.name}'; job {self.job.uuid} is not started"
            )
        sj = SubJob(job_id)
        self.proc.subjobs[job_id] = sj
        self.subjobs.append(sj)
        return sj

    def untrack(self) -> None:
        """Drop this runner's own QEMU job ids (an id is dropped only if it is ours)."""
        for sj in self.subjobs:
            if self.proc.subjobs.get(sj.id) is sj:
                del self.proc.subjobs[sj.id]

    async def wait_subjobs(self) -> None:
        for sj in self.subjobs:
            await sj.done.wait()

    def outcome(self) -> tuple[Outcome, str | None]:
        """Combined outcome of the QEMU jobs: any failure wins, then cancel, then success
        (or the outcome noted before they were dismissed)."""
        if self.noted is not None:
            return self.noted
        for sj in self.subjobs:
            if sj.outcome is Outcome.FAILED:
                return Outcome.FAILED, sj.error or "job failed"
        if any(sj.outcome is Outcome.CANCELLED for sj in self.subjobs):
            if self.cancel_requested:
                return Outcome.CANCELLED, None
            # nobody asked: QEMU cancelled it (e.g. while quitting), so the job failed
            reason = self.proc.exit_reason or "was cancelled by QEMU"
            return (
                Outcome.FAILED,
                f"QEMU process {self.proc.pid} of domain '{self.domain.name}' {reason}",
            )
        return Outcome.COMPLETED, None

    async def _each(self, verb: str, cmd: str, key: str = "id", **extra: Any) -> None:
        """Apply a verb to every QEMU job still running; QEMU's refusal is OperationInvalid."""
        for sj in self.subjobs:
            if sj.done.is_set():
                continue
            try:
                await self.proc.execute(cmd, {key: sj.id, **extra})
            except DriverError as exc:
                raise verb_error(exc, self.job, verb) from None

    def _require_active(self, verb: str) -> None:
        if self.phase in (Phase.ENDING, Phase.ENDED) or self.cancel_requested:
            raise OperationInvalid(
                f"job {self.job.uuid} is ending and cannot accept '{verb}'",
                job=self.job.uuid,
                verb=verb,
            )

    # ------------------------------------------------------------------- verbs

    async def pause(self) -> None:
        self._require_active("pause")
        if self.user_paused:
            raise OperationInvalid(
                f"job {self.job.uuid} is already paused",
                job=self.job.uuid,
                state="paused",
                verb="pause",
            )
        await self._each("pause", "job-pause")
        self.user_paused = True

    async def resume(self) -> None:
        self._require_active("resume")
        if not self.user_paused:
            raise OperationInvalid(
                f"job {self.job.uuid} is not paused", job=self.job.uuid, verb="resume"
            )
        await self._each("resume", "job-resume")
        self.user_paused = False

    async def set_speed(self, bandwidth: int | None) -> None:
        self._require_active("set-speed")
        await self._each("set-speed", "block-job-set-speed", "device", speed=bandwidth or 0)

    async def cancel(self) -> None:
        if self.phase is Phase.ENDED:
            raise OperationInvalid(
                f"job {self.job.uuid} has ended", job=self.job.uuid, verb="cancel"
            )
        self.cancel_requested = True
        self.end_requested.set()
        for sj in self.subjobs:
            if not sj.done.is_set():
                try:
                    await self.proc.execute("job-cancel", {"id": sj.id})
                except QmpTimeout:  # QEMU does not answer: say so, do not pretend
                    raise
                except DriverError:  # it may have just ended
                    pass

    async def complete(self) -> None:
        raise OperationInvalid(
            f"a {self.job.type} job does not wait for 'complete'",
            job=self.job.uuid,
            verb="complete",
        )

    # ------------------------------------------------------------------ common

    async def del_nodes(self, nodes: list[str]) -> None:
        for node in nodes:
            try:
                await self.proc.execute("blockdev-del", {"node-name": node})
            except DriverError as exc:
                self.log.warning("blockdev-del failed", node=node, error=str(exc))

    def end(
        self, outcome: Outcome, errmsg: str | None, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self.phase = Phase.ENDED
        self.untrack()
        self.log.info("job ended", outcome=outcome.value, error=errmsg)
        if outcome is Outcome.COMPLETED:
            self.report(lambda r: r.completed(extra))
        elif outcome is Outcome.CANCELLED:
            self.report(lambda r: r.cancelled())
        else:
            self.report(lambda r: r.failed(errmsg or "job failed"))
