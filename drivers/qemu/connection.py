"""The qemu driver's connection: domains, their processes, jobs and the progress poller.

Guest ownership: an in-process connection stops the QEMUs it started when it closes. A
keep-guests connection (``?keep_guests=yes``, or ``keep_guests_by_default(True)`` in a
daemon such as jobd, or ``conn.keep_guests`` set before closing) leaves them running,
and the next keep-guests owner of the run directory re-adopts them (``adopt.py``) and
recovers their jobs (``recover_job``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.abc
import sniffio
from attrs import define, field

from drivers.qemu.adopt import is_incoming, rebuild_domain
from drivers.qemu.domain import Disk, Domain, Layer, blockdev_args, virt_type
from drivers.qemu.images import backing_chain, exists, owned_file
from drivers.qemu.process import Outcome, QemuProcess, QmpRefused, QmpTimeout
from drivers.qemu.rundir import RunDir, Survivor, job_record, read_record, run_dir_of, write_record
from drivers.qemu.runners.backup import BackupRunner
from drivers.qemu.runners.backup_checks import check_backup_job
from drivers.qemu.runners.base import Phase, Runner
from drivers.qemu.runners.chain import BlockCommitRunner, BlockPullRunner
from drivers.qemu.runners.migration import MigrationRunner
from jobcore.driver import (
    BitmapInfo,
    BitmapRemoval,
    DomainInfo,
    DriverJob,
    Recovered,
    SystemClock,
    Vanished,
)
from jobcore.errors import (
    DriverError,
    InvalidArgument,
    NoSuchDomain,
    OperationInvalid,
    Unsupported,
)
from jobcore.lifecycle import JobState, Verb
from jobcore.log import get_logger
from jobcore.paths import Access, PathGuard, PathUse
from jobcore.rundir import reserve_dir, unreserve_dir
from jobcore.spec import MAX_INT64, JobType
from jobcore.types.backup import PreparedBackup
from jobcore.uri import URI, parse_uri
from jobcore.xml.domain import DomainDef, domain_error

log = get_logger(__name__)

POLL_INTERVAL = 0.25
#: the process-wide default of ``keep_guests`` (a URI's ``keep_guests=`` wins)
_KEEP_GUESTS_DEFAULT = False


def keep_guests_by_default(keep: bool) -> None:
    """Make every qemu connection this process opens keep its guests (a daemon: jobd
    calls this at start), unless its URI says ``keep_guests=no``."""
    global _KEEP_GUESTS_DEFAULT
    _KEEP_GUESTS_DEFAULT = keep


#: the runner of each job type (each implements base.Runner; they reach this connection
#: through runners.host.Host only)
_RUNNERS: dict[str, type[Runner]] = {
    JobType.BACKUP: BackupRunner,
    JobType.BLOCKPULL: BlockPullRunner,
    JobType.BLOCKCOMMIT: BlockCommitRunner,
    JobType.MIGRATION: MigrationRunner,
}


@define(eq=False)
class QemuConnection:
    """A DriverConnection to QEMU processes the driver starts and owns."""

    uri: str
    run_dir: Path
    tg: anyio.abc.TaskGroup
    clock: SystemClock = field(factory=SystemClock)
    #: default speed limit of push backups in bytes/s (``?backup_bandwidth=``; 0: none)
    backup_bandwidth: int = 0
    #: the guest ownership switch: True, closing (or dying) leaves every QEMU running for
    #: the next owner to re-adopt; False, closing stops the QEMUs (may change any time
    #: before closing: jobd's "stop guests on SIGTERM" sets it False)
    keep_guests: bool = False
    domains: dict[str, Domain] = field(factory=dict)
    #: live QEMUs of a previous owner that could not be re-adopted: left alone, their
    #: names not reused
    unadopted: dict[str, int] = field(factory=dict)
    #: re-adopted migration destinations, by domain name (a migration's recovery takes it)
    incoming: dict[str, QemuProcess] = field(factory=dict)
    runners: dict[uuid.UUID, Runner] = field(factory=dict)
    closed: bool = False
    #: records of jobs whose outcome a previous owner noted (``note_outcome``): the ones no
    #: ``recover_job`` reads (the engine had written their end) go at the first start
    _ended_records: set[Path] = field(factory=set)
    #: records of jobs a previous owner left running: the ones no ``recover_job`` reads (the
    #: engine's store does not know them, e.g. jobd restarted on another store) are named
    #: in a warning at the first start, since their QEMU jobs may still run
    _unknown_records: set[Path] = field(factory=set)
    #: jobs of this connection whose outcome is noted: their record outlives the runner
    _noted: set[uuid.UUID] = field(factory=set)
    _work: anyio.Event = field(factory=anyio.Event)
    _scopes: set[anyio.CancelScope] = field(factory=set)
    _creating: set[str] = field(factory=set)
    #: ids of monitor passthrough commands that came without one
    _monitor_ids: Iterator[int] = field(factory=itertools.count)
    #: processes with a poll in flight, and those whose last poll timed out
    _polling: set[QemuProcess] = field(factory=set)
    _unresponsive: set[QemuProcess] = field(factory=set)
    #: fewer verbs than the type accepts (the engine refuses the others): QEMU cannot
    #: pause a migration
    job_verbs: ClassVar[Mapping[str, frozenset[Verb]]] = {
        JobType.MIGRATION: frozenset({Verb.ABORT, Verb.SET_SPEED})
    }

    # ---------------------------------------------------------------- domains

    def supports(self, job_type: JobType) -> bool:
        return job_type in _RUNNERS

    async def list_domains(self) -> list[DomainInfo]:
        return [d.info() for d in self.domains.values()]

    def _domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise NoSuchDomain(f"no domain with matching name '{name}'") from None

    async def lookup_domain(self, name: str) -> DomainInfo:
        return self._domain(name).info()

    async def create_domain(
        self, ddef: DomainDef, *, path_guard: PathGuard | None = None
    ) -> DomainInfo:
        """Start a QEMU for ``ddef`` (parsed by the core); the backing chains come from
        the images' own headers (a ``<backingStore>`` in the XML is not trusted)."""
        self._check_open()
        old = self.domains.get(ddef.name)
        if ddef.name in self._creating or (old is not None and old.process.alive):
            raise OperationInvalid(f"domain '{ddef.name}' already exists")
        if ddef.name in self.unadopted:
            raise OperationInvalid(
                f"domain '{ddef.name}': QEMU process {self.unadopted[ddef.name]} of a previous "
                "owner still runs under this name and could not be re-adopted; stop it first"
            )
        self._creating.add(ddef.name)
        try:
            disks = await self._read_disks(ddef, path_guard)
            proc = await self._spawn(ddef.name, 0, ddef.memory, incoming=False, uuid=str(ddef.uuid))
            domain = Domain(ddef.name, ddef.uuid, ddef.memory, disks, proc)
            try:
                domain.virt_type = await virt_type(proc)
                await self._add_disks(domain, proc)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await proc.stop("domain creation failed")
                raise
            self.domains[ddef.name] = domain
        finally:
            self._creating.discard(ddef.name)
        log.info("domain created", domain=ddef.name, pid=proc.pid)
        return domain.info()

    async def _read_disks(self, ddef: DomainDef, guard: PathGuard | None) -> dict[str, Disk]:
        disks: dict[str, Disk] = {}
        counter = 0
        for d in ddef.disks:
            what = f"source of disk '{d.target}'"
            if guard is not None:  # before qemu-img reads a byte of it
                guard([PathUse(d.source, Access.WRITE, what)])
            if not exists(d.source):
                raise domain_error(f"disk '{d.target}' source '{d.source}' does not exist")
            chain = await backing_chain(d.source, d.format)
            if guard is not None:  # qemu-img read their headers; QEMU has opened nothing
                guard(
                    PathUse(img.filename, Access.READ, f"backing file {i} of disk '{d.target}'")
                    for i, img in enumerate(chain[1:], 1)
                )
            layers = []
            for img in chain:
                layers.append(
                    Layer(
                        f"{d.target}-L{counter}", img.filename, img.format, owned_file(img.filename)
                    )
                )
                counter += 1
            disks[d.target] = Disk(d.target, layers, chain[0].virtual_size, bus=d.bus)
        return disks

    async def _add_disks(self, domain: Domain, proc: QemuProcess) -> None:
        for disk in domain.disks.values():
            below: str | None = None
            for layer in reversed(disk.layers):
                args = blockdev_args(layer, below, read_only=layer is not disk.active)
                await proc.execute("blockdev-add", args)
                below = layer.node

    async def _spawn(
        self, name: str, gen: int, memory: int, *, incoming: bool, uuid: str
    ) -> QemuProcess:
        extra = ["-m", f"{max(memory >> 20, 1)}M"] if memory else []
        proc = await QemuProcess.spawn(
            self.run_dir, name, f"{name}.{gen}", extra, incoming=incoming, uuid=uuid
        )
        self.tg.start_soon(self._run_process, proc)
        return proc

    @contextlib.contextmanager
    def _background(self) -> Iterator[None]:
        """Scope of a background task, cancelled when the connection closes."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)

    async def adopt_survivors(self, survivors: list[Survivor]) -> None:
        """Re-adopt the live QEMUs a previous owner left (keep-guests mode): QMP again,
        the domain rebuilt from QEMU. One that cannot be adopted is left running, alone."""
        # oldest generation first: a migration's source before its destination (by name,
        # vm1.10 would come first; and a source that was once a destination says -incoming)
        for s in sorted(survivors, key=lambda s: (s.name, int(s.stem.rsplit(".", 1)[1]))):
            try:
                proc = await QemuProcess.adopt(self.run_dir, s.name, s.stem, s.pid)
            except Exception as exc:
                log.warning("qemu not re-adopted", domain=s.name, pid=s.pid, error=str(exc))
                self.unadopted[s.name] = s.pid
                continue
            self.tg.start_soon(self._run_process, proc)
            if is_incoming(s.pid) and s.name in self.domains:
                self.incoming[s.name] = proc
                continue
            try:
                domain = await rebuild_domain(proc)
            except Exception as exc:
                log.warning("domain not rebuilt", domain=s.name, pid=s.pid, error=str(exc))
                await proc.detach()
                self.unadopted[s.name] = s.pid
                continue
            if s.name in self.domains:  # the source of a migration was found second
                self.incoming[s.name] = self.domains[s.name].process
            self.domains[s.name] = domain
            log.info("domain re-adopted", domain=s.name, pid=s.pid, disks=list(domain.disks))

    async def _run_process(self, proc: QemuProcess) -> None:
        with self._background():
            await proc.run(self._process_exited)

    def _process_exited(self, proc: QemuProcess) -> None:
        self._unresponsive.discard(proc)
        for domain in self.domains.values():
            if domain.process is proc and proc.exit_reason is None:
                log.warning(
                    "qemu died",
                    domain=domain.name,
                    pid=proc.pid,
                    status=proc.proc.returncode,
                    stderr=proc.stderr_tail(),
                )

    async def destroy_domain(self, name: str) -> None:
        domain = self._domain(name)
        await domain.process.stop("was destroyed")
        del self.domains[name]

    async def monitor_command(self, name: str, command: str, *, hmp: bool) -> str:
        """libvirt-qemu's qemuMonitorCommand: ``command`` straight to the domain's QEMU,
        HMP text (through ``human-monitor-command``) or a QMP command as JSON text, whose
        reply comes back as JSON text (``{"return": …, "id": …}``, or QEMU's
        ``{"error": …}`` as it sent it). Nothing is refused, as in libvirt, which marks
        the domain tainted instead: a command that changes the block graph or the jobs
        behind jobcore's back leaves its records stale, so each one is logged as such."""
        domain = self._domain(name)
        if not domain.process.alive:
            raise OperationInvalid(f"domain '{name}' is not running")
        log.warning(
            "qemu monitor command: jobcore's records of the domain may no longer match QEMU",
            domain=name,
            hmp=hmp,
            command=command[:200],
        )
        domain.tainted = True
        if hmp:
            return await domain.process.hmp(command)
        cmd, args, msg_id = _qmp_command(command)
        reply: dict[str, Any] = {}
        try:
            reply["return"] = await domain.process.execute(cmd, args)
        except QmpRefused as exc:
            reply["error"] = exc.error
        reply["id"] = msg_id if msg_id is not None else f"jobcore-{next(self._monitor_ids)}"
        return json.dumps(reply)

    # ------------------------------------------------------- test/admin hooks

    def pid(self, name: str) -> int:
        """The pid of the domain's QEMU (admins and tests)."""
        return self._domain(name).process.pid

    def pids(self) -> list[int]:
        return [d.process.pid for d in self.domains.values()]

    async def guest_io(self, name: str, disk: str, command: str) -> str:
        """Run a qemu-io command as the guest would, then flush (so images can be compared).

        Writes enter at the disk's top (through any backup filter), like guest writes do.
        """
        domain = self._domain(name)
        node = domain.disk(disk).top_node
        out = await domain.process.hmp(f'qemu-io {node} "{command}"')
        await self.flush(name)
        return out

    async def flush(self, name: str) -> None:
        """Flush every layer of every disk, so outside readers see current qcow2 metadata."""
        domain = self._domain(name)
        for disk in domain.disks.values():
            for layer in disk.layers:
                await domain.process.hmp(f'qemu-io {layer.node} "flush"')

    async def qmp(self, name: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A raw QMP command on the domain's process (diagnostics and tests)."""
        return await self._domain(name).process.execute(cmd, args)

    # ------------------------------------------------------------- checkpoints

    async def bitmaps(self, name: str) -> dict[str, list[BitmapInfo]]:
        """Each disk's dirty bitmaps, on its active layer's format node (where a
        checkpoint's bitmap lives), as QEMU has them now."""
        domain = self._domain(name)
        nodes = await domain.process.execute("query-named-block-nodes", {"flat": True})
        on_node = {str(n.get("node-name")): n.get("dirty-bitmaps") or () for n in nodes}
        return {
            disk.name: [
                BitmapInfo(
                    str(b.get("name")),
                    int(b.get("count", 0)),
                    persistent=bool(b.get("persistent", False)),
                    recording=bool(b.get("recording", True)),
                    inconsistent=bool(b.get("inconsistent", False)),
                )
                for b in on_node.get(disk.active.node, ())
                if b.get("name")  # a running backup's own copy bitmap has no name
            ]
            for disk in domain.disks.values()
        }

    async def add_bitmaps(self, name: str, bitmaps: Sequence[tuple[str, str]]) -> None:
        """Persistent bitmaps (disk, bitmap), in one transaction: all or none."""
        self._check_open()
        domain = self._domain(name)
        actions = [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": domain.disk(disk).active.node, "name": bitmap,
                         "persistent": True},
            }
            for disk, bitmap in bitmaps
        ]  # fmt: skip
        if actions:
            await domain.process.execute("transaction", {"actions": actions})

    async def remove_bitmaps(self, name: str, removals: Sequence[BitmapRemoval]) -> None:
        """Each bitmap merged into its ``merge_into`` (if named), then removed: one
        transaction, so the parent's bitmap never misses the changes."""
        self._check_open()
        domain = self._domain(name)
        actions: list[dict[str, Any]] = []
        for r in removals:
            node = domain.disk(r.disk).active.node
            if r.merge_into is not None:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": node, "target": r.merge_into, "bitmaps": [r.bitmap]},
                    }
                )
            actions.append(
                {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": r.bitmap}}
            )
        if actions:
            await domain.process.execute("transaction", {"actions": actions})

    # ------------------------------------------------------------------- jobs

    async def check_job(self, spec: Any, dom: DomainInfo) -> None:
        """Before admission: refuse a backup's existing (or unusable reused) files."""
        if isinstance(spec, PreparedBackup):
            await check_backup_job(self, spec, self._domain(dom.name))

    async def start(self, job: DriverJob) -> None:
        self._check_open()
        self._recovery_over()
        cls = _RUNNERS.get(job.type)
        if cls is None:
            raise Unsupported(f"the qemu driver does not run '{job.type}' jobs")
        if job.uuid in self.runners:
            raise OperationInvalid(f"job {job.uuid} is already running", job=job.uuid)
        domain = self._domain(job.domain)
        if not domain.process.alive:
            raise DriverError(f"domain '{job.domain}' is not running")
        runner = cls(conn=self, job=job, domain=domain, proc=domain.process)
        runner.log.info("starting")
        try:
            await runner.start()
        except BaseException:  # the runner undid its start: a record it saved goes too
            self._record_path(job).unlink(missing_ok=True)
            raise
        await self._save_record(runner)  # on disk before the start is acknowledged
        self._launch(runner)

    def _recovery_over(self) -> None:
        """A job starts: recovery is over (its leftover records are dealt with)."""
        for path in self._ended_records:  # recovery is over: the engine has their ends
            path.unlink(missing_ok=True)
        self._ended_records.clear()
        for path in sorted(self._unknown_records):  # recovery is over and did not ask
            if path.exists():
                log.warning(
                    "a job this connection's store does not know was left running by a "
                    "previous owner: its QEMU jobs may still run (restart jobd on the store "
                    "that began it to recover it)",
                    record=str(path),
                )
        self._unknown_records.clear()

    async def start_all(self, jobs: Sequence[DriverJob]) -> None:
        """Start jobs of one domain (a job group's members on one QEMU process) together:
        push backups in one QMP ``transaction`` (every disk's ``blockdev-backup`` and
        checkpoint bitmaps at one instant: one point in time for all of them); any other
        job is started on its own, first. All or none: a refused transaction undoes every
        job's preparation and raises."""
        together = [j for j in jobs if isinstance(j.spec, PreparedBackup) and not j.spec.pull]
        if len(together) < 2:
            for job in jobs:
                await self.start(job)
            return
        for job in jobs:
            if job not in together:
                await self.start(job)
        self._check_open()
        self._recovery_over()
        domains = {j.domain for j in together}
        if len(domains) != 1:
            raise InvalidArgument(f"start_all takes jobs of one domain, not {sorted(domains)}")
        domain = self._domain(together[0].domain)
        if not domain.process.alive:
            raise DriverError(f"domain '{domain.name}' is not running")
        for job in together:
            if job.uuid in self.runners:
                raise OperationInvalid(f"job {job.uuid} is already running", job=job.uuid)
        runners = [
            BackupRunner(conn=self, job=j, domain=domain, proc=domain.process) for j in together
        ]
        prepared: list[BackupRunner] = []
        try:
            actions: list[dict[str, Any]] = []
            for runner in runners:
                runner.log.info("starting", together=len(runners))
                actions += await runner.start_actions()
                prepared.append(runner)
            await domain.process.execute("transaction", {"actions": actions})
        except BaseException:
            with anyio.CancelScope(shield=True):
                for runner in prepared:  # a runner that failed its own part undid it
                    await runner.undo_start()
            for runner in runners:
                self._record_path(runner.job).unlink(missing_ok=True)
            raise
        for runner in runners:
            await runner.started()
            await self._save_record(runner)
            self._launch(runner)

    def _launch(self, runner: Runner) -> None:
        self.runners[runner.job.uuid] = runner
        self.tg.start_soon(self._supervise, runner)
        self._work.set()

    def _record_path(self, job: DriverJob) -> Path:
        return job_record(self.run_dir, job.domain, job.uuid)

    async def _save_record(self, runner: Runner) -> None:
        """Keep-guests mode: what the job created, for whoever recovers it."""
        await self.save_record(runner.job, runner.record())

    async def save_record(self, job: DriverJob, record: dict[str, Any]) -> None:
        """Keep-guests mode: write a job's record, fsynced, on a worker thread (the data
        was taken on the loop by the caller)."""
        if self.keep_guests:
            with anyio.CancelScope(shield=True):  # a half-saved start is never left
                await anyio.to_thread.run_sync(write_record, self._record_path(job), record)

    async def note_outcome(
        self, job: DriverJob, outcome: Outcome, errmsg: str | None, *, discard: bool
    ) -> None:
        if not self.keep_guests:
            return
        path = self._record_path(job)

        def note() -> None:
            record = read_record(path) or {}
            record["ended"] = {"outcome": outcome.value, "errmsg": errmsg, "discard": discard}
            write_record(path, record)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(note)
        self._noted.add(job.uuid)

    async def _supervise(self, runner: Runner) -> None:
        try:
            with self._background():
                await runner.supervise()
        finally:
            self.runners.pop(runner.job.uuid, None)
            if not runner.detached:
                runner.phase = Phase.ENDED
                if runner.job.uuid in self._noted:  # kept until the engine has the end
                    self._noted.discard(runner.job.uuid)
                else:
                    self._record_path(runner.job).unlink(missing_ok=True)

    async def recover_job(self, job: DriverJob, last_state: JobState) -> Recovered:
        """Reconcile a job a previous owner started with what QEMU says now (see
        design/qemu.md, "Recovery"): still running → Reattached (this connection
        supervises it from now on), ended → Concluded, gone → Vanished."""
        self._check_open()
        cls = _RUNNERS.get(job.type)
        if cls is None:
            return Vanished(f"the qemu driver does not run '{job.type}' jobs")
        if job.uuid in self.runners:
            raise OperationInvalid(f"job {job.uuid} is already running", job=job.uuid)
        domain = self.domains.get(job.domain)
        record = read_record(self._record_path(job))
        noted = _noted(record)
        self._unknown_records.discard(self._record_path(job))
        if noted is not None:
            self._ended_records.discard(self._record_path(job))
        if domain is None or not domain.process.alive:
            pid = self.unadopted.get(job.domain)
            why = f" (pid {pid} could not be re-adopted)" if pid else ""
            if record is not None and (noted is None or (record.get("ended") or {}).get("discard")):
                cls.discard_record(record)
            self._record_path(job).unlink(missing_ok=True)
            if noted is not None:  # it had ended, as noted, before its domain went
                return Runner.concluded(*noted)
            return Vanished(f"QEMU of domain '{job.domain}' is gone{why}")
        runner = cls(conn=self, job=job, domain=domain, proc=domain.process)
        runner.recovered = True
        runner.noted = noted
        try:
            result = await runner.recover(last_state, record)
        except BaseException:
            runner.untrack()
            raise
        if runner.phase in (Phase.RUNNING, Phase.READY):
            await self._save_record(runner)
            self._launch(runner)
        elif job.uuid in self._noted:  # kept until the engine has written the end
            self._noted.discard(job.uuid)
        else:
            self._record_path(job).unlink(missing_ok=True)
        runner.log.info("job recovered", outcome=type(result).__name__)
        return result

    def _runner(self, job: DriverJob) -> Runner:
        runner = self.runners.get(job.uuid)
        if runner is None:
            raise OperationInvalid(
                f"job {job.uuid} is not running on this connection", job=job.uuid
            )
        return runner

    async def cancel(self, job: DriverJob) -> None:
        await self._runner(job).cancel()

    async def pause(self, job: DriverJob) -> None:
        await self._runner(job).pause()

    async def resume(self, job: DriverJob) -> None:
        await self._runner(job).resume()

    async def complete(self, job: DriverJob) -> None:
        await self._runner(job).complete()

    async def set_speed(self, job: DriverJob, bandwidth: int | None) -> None:
        await self._runner(job).set_speed(bandwidth)

    async def _poller(self) -> None:
        """One progress poller per connection, 4 times a second while jobs run: each round
        starts one poll task per busy process that is not still busy with the last one, so
        a QEMU that stops answering holds back its own jobs' progress only."""
        with self._background():
            async with anyio.create_task_group() as tg:
                while True:
                    if not self.runners:
                        self._work = anyio.Event()
                        await self._work.wait()
                    self._poll_round(tg)
                    await anyio.sleep(POLL_INTERVAL)

    def _poll_round(self, tg: anyio.abc.TaskGroup) -> None:
        by_proc: dict[QemuProcess, list[Runner]] = {}
        for runner in self.runners.values():
            by_proc.setdefault(runner.proc, []).append(runner)
        for proc, runners in by_proc.items():
            if proc not in self._polling:
                self._polling.add(proc)
                tg.start_soon(self._poll_process, proc, runners)

    async def _poll_process(self, proc: QemuProcess, runners: list[Runner]) -> None:
        """query-jobs once on one process, then each of its runners reports progress."""
        try:
            if any(r.subjobs for r in runners) and proc.alive:
                try:
                    infos = await proc.execute("query-jobs")
                except QmpTimeout as exc:  # its jobs go on; their progress waits
                    if proc not in self._unresponsive:
                        self._unresponsive.add(proc)
                        log.warning("progress poll timed out", domain=proc.name, error=str(exc))
                    return
                except DriverError:
                    return
                if proc in self._unresponsive:
                    self._unresponsive.discard(proc)
                    log.info("qemu answers again", domain=proc.name, pid=proc.pid)
                for info in infos:
                    sj = proc.subjobs.get(str(info.get("id")))
                    if sj is not None and not sj.done.is_set():
                        sj.current = int(info.get("current-progress", 0))
                        sj.total = int(info.get("total-progress", 0))
            for runner in runners:
                if runner.phase in (Phase.RUNNING, Phase.READY):
                    await runner.poll()
                    runner.report_progress()
        except Exception:  # progress is best effort; the poller must not die
            log.exception("progress poll failed", domain=proc.name)
        finally:
            self._polling.discard(proc)

    # ---------------------------------------------------------------- migration

    def check_migration_destination(self, destination: str) -> str:
        dest = parse_uri(destination)
        if dest.driver != "qemu" or dest.transport or dest.path != "/session":
            raise Unsupported(
                f"the qemu driver migrates to qemu:///session only, not '{destination}'"
            )
        if run_dir_of(dest) != self.run_dir:
            raise Unsupported(
                "the qemu driver migrates only between processes of one run directory "
                f"({self.run_dir})"
            )
        return destination

    def take_incoming(self, name: str) -> QemuProcess | None:
        return self.incoming.pop(name, None)

    async def spawn_incoming(self, domain: Domain) -> QemuProcess:
        domain.generation += 1
        proc = await self._spawn(
            domain.name, domain.generation, domain.memory, incoming=True, uuid=str(domain.uuid)
        )
        try:
            await self._add_disks(domain, proc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await proc.stop("migration destination setup failed")
            raise
        return proc

    async def discard_process(self, proc: QemuProcess, reason: str) -> None:
        await proc.stop(reason)

    async def adopt_migrated(self, domain: Domain, dest: QemuProcess) -> None:
        source = domain.process
        domain.process = dest
        # a re-adopted domain has its source's generation: the next QEMU must not take the
        # name (pid file, sockets) of the one running now
        domain.generation = max(domain.generation, dest.generation)
        await source.stop("was left after migration")

    # ----------------------------------------------------------------- closing

    def _check_open(self) -> None:
        if self.closed:
            raise DriverError("the qemu connection is closed")

    async def aclose(self) -> None:
        """Stop every process this connection started and reap them all; with
        ``keep_guests``, let go of them instead: they and their jobs run on."""
        self.closed = True
        with anyio.CancelScope(shield=True):
            procs = {d.process for d in self.domains.values()} | set(self.incoming.values())
            for runner in self.runners.values():
                procs.add(runner.proc)
                dest = getattr(runner, "dest", None)
                if isinstance(dest, QemuProcess):
                    procs.add(dest)
                if self.keep_guests:
                    runner.detached = True
            async with anyio.create_task_group() as tg:
                for proc in procs:
                    if self.keep_guests:
                        tg.start_soon(proc.detach)
                    else:
                        tg.start_soon(proc.stop, "was stopped: connection closed")
            for scope in list(self._scopes):
                scope.cancel()
            self.domains.clear()


def _qmp_command(text: str) -> tuple[str, dict[str, Any] | None, Any]:
    """``{"execute": NAME, "arguments": {…}?, "id": …?}`` as text → its parts;
    InvalidArgument saying what is wrong otherwise."""
    try:
        msg = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"QMP command is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
        raise InvalidArgument(
            'a QMP command is a JSON object {"execute": NAME, "arguments": {...}}; pass '
            "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP for an HMP command line"
        )
    extra = sorted(set(msg) - {"execute", "arguments", "id"})
    if extra:
        raise InvalidArgument(f"QMP command has unknown members {extra}")
    args = msg.get("arguments")
    if args is not None and not isinstance(args, dict):
        raise InvalidArgument("QMP command 'arguments' must be a JSON object")
    return msg["execute"], args, msg.get("id")


def _require_asyncio() -> None:
    try:
        lib = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        lib = "none"
    if lib != "asyncio":
        raise Unsupported(
            f"the qemu driver needs the asyncio backend (qemu.qmp is asyncio-only), not {lib}"
        )


def _backup_bandwidth(uri: URI) -> int:
    """``?backup_bandwidth=N``: an integer number of bytes/s in 0…2^63-1 (QEMU's int64
    ``speed``; 0: no limit); InvalidArgument naming it otherwise."""
    text = uri.param("backup_bandwidth") or "0"
    value = int(text) if text.isascii() and text.isdigit() else -1
    if not 0 <= value <= MAX_INT64:
        raise InvalidArgument(
            f"backup_bandwidth={text[:80]!r} in '{uri}': it must be an integer number of "
            f"bytes/s from 0 (no limit) to {MAX_INT64}"
        )
    return value


def _noted(record: dict[str, Any] | None) -> tuple[Outcome, str | None] | None:
    """The outcome a record's owner noted before QEMU forgot the job (``note_outcome``)."""
    ended = (record or {}).get("ended")
    if not isinstance(ended, dict):
        return None
    errmsg = ended.get("errmsg")
    return Outcome(ended["outcome"]), str(errmsg) if errmsg else None


def _keep_guests(uri: URI) -> bool:
    """``?keep_guests=yes|no`` (also 1/0, true/false); absent: the process default."""
    text = uri.param("keep_guests")
    if text is None:
        return _KEEP_GUESTS_DEFAULT
    value = {"yes": True, "1": True, "true": True, "no": False, "0": False, "false": False}
    if text.lower() not in value:
        raise InvalidArgument(f"keep_guests={text[:80]!r} in '{uri}': it must be yes or no")
    return value[text.lower()]


class QemuDriver:
    """``qemu:///session[?dir=RUN_DIR]``: real QEMU processes over QMP."""

    scheme = "qemu"
    #: the query parameters connect() reads; any other is refused
    uri_params = frozenset({"dir", "backup_bandwidth", "keep_guests"})

    def serve_daemon(self, keep_guests: bool) -> None:
        """jobd loaded this driver (jobcore.driver.Driver): its connections keep their
        guests when they close, unless jobd runs with --stop-guests."""
        keep_guests_by_default(keep_guests)

    def identity(self, uri: URI) -> tuple[tuple[str, str], ...]:
        """``dir`` selects another run directory (other QEMU processes), resolved."""
        return (("dir", str(run_dir_of(uri))),) if uri.param("dir") is not None else ()

    def state_dir(self, uri: URI) -> Path:
        """The run directory the connection would lock, write and clean up."""
        return run_dir_of(uri)

    @contextlib.asynccontextmanager
    async def connect(self, uri: URI, tg: anyio.abc.TaskGroup) -> AsyncIterator[QemuConnection]:
        _require_asyncio()
        if uri.path != "/session" or uri.transport or uri.host:
            raise Unsupported(f"the qemu driver serves qemu:///session only, not '{uri}'")
        # every parameter is checked before the run directory is locked
        bandwidth = _backup_bandwidth(uri)
        keep = _keep_guests(uri)
        run_dir = RunDir(run_dir_of(uri), keep_guests=keep)
        run_dir.acquire()
        reserve_dir(run_dir.path)  # no job of any connection may name its files there
        try:  # and from here on, every way out releases it
            conn = QemuConnection(
                uri=str(uri),
                run_dir=run_dir.path,
                tg=tg,
                backup_bandwidth=bandwidth,
                keep_guests=keep,
            )
            try:
                tg.start_soon(conn._poller)
                await conn.adopt_survivors(run_dir.survivors)
                records = {p: read_record(p) or {} for p in run_dir.path.glob("*.job-*.json")}
                conn._ended_records = {
                    p for p, r in records.items() if isinstance(r.get("ended"), dict)
                }
                conn._unknown_records = {  # of a guest that runs on
                    p
                    for p in set(records) - conn._ended_records
                    if p.name.partition(".job-")[0] in conn.domains
                }
                yield conn
            finally:
                await conn.aclose()
        finally:
            unreserve_dir(run_dir.path)
            run_dir.release()
