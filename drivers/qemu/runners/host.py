"""The host protocol: everything a runner may ask of the connection that runs it.

A runner drives its domain's QEMU itself (``QemuProcess.execute``: QMP commands and their
events), names new block nodes through its ``Domain`` (``new_node_name``, the chains it
updates), creates and removes images with ``drivers.qemu.images``, and reports to its job's
``JobReporter`` (``Runner.report``). What it needs beyond that, from the connection, is
listed here and nowhere else: runners never import ``drivers.qemu.connection``, which
implements this protocol and picks the runner for each job type from its table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from drivers.qemu.domain import Domain
from drivers.qemu.process import Outcome, QemuProcess
from jobcore.driver import DriverJob


class Host(Protocol):
    """The connection as its runners see it."""

    @property
    def run_dir(self) -> Path:
        """Where the connection's sockets live (NBD exports, migration streams); no job may
        name a file inside it."""

    @property
    def backup_bandwidth(self) -> int:
        """Default speed limit of push backups in bytes/s (0: none)."""

    @property
    def domains(self) -> Mapping[str, Domain]:
        """Every domain of the connection (a backup store must be no disk image of any)."""

    def check_migration_destination(self, destination: str) -> str:
        """The destination URI a migration may go to, or Unsupported."""

    def take_incoming(self, name: str) -> QemuProcess | None:
        """A re-adopted migration destination of domain ``name`` (once), if any."""

    async def spawn_incoming(self, domain: Domain) -> QemuProcess:
        """Start a destination QEMU for ``domain`` waiting for an incoming migration."""

    async def discard_process(self, proc: QemuProcess, reason: str) -> None:
        """Stop a process the migration started and no longer needs."""

    async def adopt_migrated(self, domain: Domain, dest: QemuProcess) -> None:
        """``dest`` took over: it becomes the domain's process, the source is stopped."""

    async def save_record(self, job: DriverJob, record: dict[str, Any]) -> None:
        """Keep-guests mode: put the job's record (``Runner.record``) on disk now (a runner
        whose start creates things writes one before QEMU starts its jobs)."""

    async def note_outcome(
        self, job: DriverJob, outcome: Outcome, errmsg: str | None, *, discard: bool
    ) -> None:
        """Keep-guests mode: the job's outcome goes into its record before QEMU forgets it
        (``discard``: what the job created is to be removed), so that an owner dying before
        the engine has written the end leaves it for the next one's ``recover_job``."""
