"""Migration: a destination QEMU of the same run directory takes over the domain."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
from attrs import define, field

from drivers.qemu.process import Outcome, QemuProcess, QmpTimeout
from drivers.qemu.rundir import migration_socket
from drivers.qemu.runners.base import CLEANUP_TIMEOUT, Phase, Runner
from jobcore.driver import Concluded, Recovered
from jobcore.errors import DriverError, OperationInvalid, Unsupported
from jobcore.lifecycle import JobState
from jobcore.types.migration import MigrationSpec

#: QEMU's migration default is 32 MiB/s; "no limit" has to be said explicitly.
UNLIMITED_MIGRATION_BANDWIDTH = 1 << 40

_MIGRATION_TERMINAL = {"completed", "failed", "cancelled"}


@define(eq=False)
class MigrationRunner(Runner):
    dest: QemuProcess | None = None
    dest_uri: str = ""
    status: str = "none"
    status_changed: anyio.Event = field(factory=anyio.Event)
    last_stats: dict[str, int | str] = field(factory=dict)
    source_paused: bool = False

    @property
    def spec(self) -> MigrationSpec:
        spec = self.job.spec
        assert isinstance(spec, MigrationSpec)
        return spec

    def _on_status(self, status: str) -> None:
        self.status = status
        self.status_changed.set()
        self.status_changed = anyio.Event()

    async def start(self) -> None:
        spec = self.spec
        self.dest_uri = self.conn.check_migration_destination(spec.destination)
        if spec.postcopy:
            raise Unsupported("post-copy migration is not supported by the qemu driver")
        self.dest = await self.conn.spawn_incoming(self.domain)
        try:
            sock = migration_socket(self.conn.run_dir, self.dest.stem)
            params: dict[str, Any] = {
                "max-bandwidth": spec.bandwidth or UNLIMITED_MIGRATION_BANDWIDTH
            }
            if spec.downtime_limit is not None:
                params["downtime-limit"] = spec.downtime_limit
            await self.proc.execute("migrate-set-parameters", params)
            await self.dest.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            if not spec.live:  # as libvirt: an offline-style migration pauses the guest
                await self.proc.execute("stop")
                self.source_paused = True
            self.proc.on_migration = self._on_status
            await self.proc.execute("migrate", {"uri": f"unix:{sock}"})
        except BaseException:
            self.proc.on_migration = None
            with anyio.CancelScope(shield=True):
                await self.conn.discard_process(self.dest, "migration did not start")
                await self._resume_source()
            raise
        self.phase = Phase.RUNNING

    async def supervise(self) -> None:
        assert self.dest is not None
        dest = self.dest
        try:
            async with anyio.create_task_group() as tg:

                async def _died(p: QemuProcess) -> None:
                    await p.exited.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_died, self.proc)
                while self.status not in _MIGRATION_TERMINAL:
                    await self.status_changed.wait()
                tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                if self.status == "completed":
                    await self.poll()
                    try:
                        await self._run_destination(dest)
                    except (DriverError, TimeoutError) as exc:
                        await self.conn.discard_process(dest, "did not take over the domain")
                        await self._resume_source()
                        self.end(Outcome.FAILED, f"the destination did not start: {exc}")
                        return
                    await self.conn.note_outcome(self.job, Outcome.COMPLETED, None, discard=False)
                    await self.conn.adopt_migrated(self.domain, dest)
                    self.report(lambda r: r.domain_moved(self.dest_uri))
                    self.end(Outcome.COMPLETED, None, dict(self.last_stats))
                    return
                if self.status == "failed":
                    err = "migration failed"
                    with contextlib.suppress(DriverError):
                        info = await self.proc.execute("query-migrate")
                        err = str(info.get("error-desc") or err)
                    await self.conn.discard_process(dest, "migration failed")
                    await self._resume_source()
                    self.end(Outcome.FAILED, err)
                    return
                await self.conn.discard_process(dest, "migration ended")
                await self._resume_source()
                if self.status == "cancelled":
                    self.end(Outcome.CANCELLED, None)
                else:  # source died
                    reason = (
                        self.proc.exit_reason or f"exited with status {self.proc.proc.returncode}"
                    )
                    self.end(
                        Outcome.FAILED,
                        f"QEMU process {self.proc.pid} of domain '{self.domain.name}' {reason}",
                    )
        finally:
            self.proc.on_migration = None
            if self.phase is not Phase.ENDED and not self.detached:
                with anyio.CancelScope(shield=True):
                    await self.conn.discard_process(dest, "migration abandoned")

    async def recover(self, last_state: JobState, record: dict[str, Any] | None) -> Recovered:
        """The source's ``query-migrate`` says where it is; the destination is the
        re-adopted ``-incoming`` process of the domain."""
        self.dest_uri = self.conn.check_migration_destination(self.spec.destination)
        self.source_paused = not self.spec.live
        dest = self.dest = self.conn.take_incoming(self.domain.name)
        self.proc.on_migration = self._on_status  # before the query: no event is lost
        info = await self.proc.execute("query-migrate")
        self.status = str(info.get("status", "none"))
        if self.noted is not None and (dest is None or self.status != "completed"):
            self.proc.on_migration = None  # it ended as noted; the source may be gone
            if dest is not None:
                await self.conn.discard_process(dest, "migration ended")
            self.phase = Phase.ENDED
            return self.concluded(*self.noted)
        if self.status in ("failed", "cancelled", "none") or dest is None:
            self.proc.on_migration = None
            if dest is not None:
                await self.conn.discard_process(dest, "migration ended")
            await self._resume_source()
            self.phase = Phase.ENDED
            # QEMU's own outcome first: a destination that died made the migration fail
            if self.status == "failed":
                return Concluded(JobState.FAILED, str(info.get("error-desc") or "migration failed"))
            if self.status == "cancelled":
                return Concluded(JobState.CANCELLED)  # as the live runner ends it
            if dest is None:
                return self.vanished("the migration's destination QEMU")
            return self.vanished("the migration")
        if self.status == "completed":
            self.proc.on_migration = None
            await self.poll()
            self.phase = Phase.ENDED
            try:
                await self._run_destination(dest)
            except (DriverError, TimeoutError) as exc:
                await self.conn.discard_process(dest, "did not take over the domain")
                await self._resume_source()
                return Concluded(JobState.FAILED, f"the destination did not start: {exc}")
            await self.conn.note_outcome(self.job, Outcome.COMPLETED, None, discard=False)
            await self.conn.adopt_migrated(self.domain, dest)
            self.report(lambda r: r.domain_moved(self.dest_uri))
            return Concluded(JobState.COMPLETED, None, dict(self.last_stats))
        self.phase = Phase.RUNNING
        return self.reattached(last_state)

    async def _run_destination(self, dest: QemuProcess) -> None:
        """Wait until the destination has taken over; resume it if the source was paused."""
        with anyio.fail_after(CLEANUP_TIMEOUT):
            while True:
                status = (await dest.execute("query-status")).get("status")
                if status == "running":
                    return
                if status == "paused":
                    await dest.execute("cont")
                    return
                await anyio.sleep(0.02)

    async def _resume_source(self) -> None:
        if self.source_paused and self.proc.alive:
            with contextlib.suppress(DriverError):
                await self.proc.execute("cont")
        self.source_paused = False

    async def poll(self) -> None:
        if not self.proc.alive:
            return
        try:
            info = await self.proc.execute("query-migrate")
        except DriverError:
            return
        ram = info.get("ram") or {}
        stats: dict[str, int | str] = {}
        for key, name in (
            ("total", "memory_total"),
            ("transferred", "memory_processed"),
            ("remaining", "memory_remaining"),
            ("duplicate", "memory_constant"),
            ("normal", "memory_normal"),
            ("normal-bytes", "memory_normal_bytes"),
            ("dirty-pages-rate", "memory_dirty_rate"),
            ("page-size", "memory_page_size"),
            ("dirty-sync-count", "memory_iteration"),
            ("postcopy-requests", "memory_postcopy_requests"),
        ):
            if key in ram:
                stats[name] = int(ram[key])
        if "mbps" in ram:
            stats["memory_bps"] = int(float(ram["mbps"]) * 1_000_000 / 8)
        for key, name in (
            ("downtime", "downtime"),
            ("setup-time", "setup_time"),
        ):
            if key in info:
                stats[name] = int(info[key])
        if "downtime" not in info and "expected-downtime" in info:
            stats["downtime"] = int(info["expected-downtime"])
        total = int(ram.get("total", 0))
        done = int(ram.get("transferred", 0))
        stats.update(
            data_total=total,
            data_processed=min(done, total),
            data_remaining=int(ram.get("remaining", 0)),
        )
        self.last_stats = stats
        if self.phase is Phase.RUNNING:
            self.progress(min(done, total), total, dict(stats))

    def report_progress(self) -> None:
        """Migration progress is reported from ``poll``."""

    async def pause(self) -> None:
        raise Unsupported("a migration cannot be paused")

    async def resume(self) -> None:
        raise Unsupported("a migration cannot be paused or resumed")

    async def set_speed(self, bandwidth: int | None) -> None:
        self._require_active("set-speed")
        await self.proc.execute(
            "migrate-set-parameters", {"max-bandwidth": bandwidth or UNLIMITED_MIGRATION_BANDWIDTH}
        )

    async def cancel(self) -> None:
        if self.phase is Phase.ENDED:
            raise OperationInvalid(
                f"job {self.job.uuid} has ended", job=self.job.uuid, verb="cancel"
            )
        self.cancel_requested = True
        try:
            await self.proc.execute("migrate_cancel")
        except QmpTimeout:
            raise
        except DriverError:
            pass
