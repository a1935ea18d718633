"""One QEMU process: spawn, QMP session, event routing, and guaranteed reaping.

Every process gets ``-name``, ``-machine none``, ``-nodefaults``, ``-display none``, QMP on a
UNIX socket in the run directory and a pid file there. It is started with
``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the driver's thread even if the driver never
reaches its cleanup, and ``stop()`` always ends in a reaped child: ``quit`` over QMP, then
SIGKILL after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from attrs import define, field
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient

from drivers.qemu.images import exists, qemu_binary
from jobcore.errors import DriverError
from jobcore.log import get_logger

log = get_logger(__name__)

QEMU_SYSTEM = "qemu-system-x86_64"
CONNECT_TIMEOUT = 10.0
QUIT_TIMEOUT = 3.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _open_log(path: Path) -> int:
    """The QEMU's stdout/stderr file (a small local file, opened synchronously)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@define(eq=False)
class SubJob:
    """One QEMU job (query-jobs id) as seen through its events."""

    id: str
    status: str = "created"
    outcome: Outcome | None = None
    error: str | None = None
    current: int = 0
    total: int = 0
    ready: anyio.Event = field(factory=anyio.Event)
    done: anyio.Event = field(factory=anyio.Event)

    def finish(self, outcome: Outcome, error: str | None = None) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.error = error
        self.done.set()


@define(eq=False)
class QemuProcess:
    """A running QEMU, its QMP client, and the QEMU jobs it runs."""

    name: str  # the domain's name (``-name``)
    stem: str  # file stem in the run directory: NAME.GEN
    run_dir: Path
    proc: asyncio.subprocess.Process
    qmp: QMPClient
    subjobs: dict[str, SubJob] = field(factory=dict)
    on_migration: Callable[[str], None] | None = None
    export_deleted: dict[str, anyio.Event] = field(factory=dict)
    exit_reason: str | None = None  # why the driver ended it on purpose
    exited: anyio.Event = field(factory=anyio.Event)
    _listener: EventListener | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.exited.is_set()

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.stem}.log"

    def stderr_tail(self, limit: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:]

    # ----------------------------------------------------------------- spawning

    @classmethod
    async def spawn(
        cls, run_dir: Path, name: str, stem: str, extra: list[str], *, incoming: bool = False
    ) -> QemuProcess:
        qmp_path = run_dir / f"{stem}.qmp"
        qmp_path.unlink(missing_ok=True)
        argv = [
            qemu_binary(QEMU_SYSTEM),
            "-name",
            name,
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            "-pidfile",
            str(run_dir / f"{stem}.pid"),
            *extra,
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        errlog = _open_log(run_dir / f"{stem}.log")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=errlog,
                stderr=errlog,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(errlog)
        qmp = QMPClient(stem)
        self = cls(name=name, stem=stem, run_dir=run_dir, proc=proc, qmp=qmp)
        log.info("qemu started", domain=name, pid=proc.pid, argv=" ".join(argv))
        try:
            await self._connect(qmp_path)
            await self.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop("start failed")
            raise
        return self

    async def _connect(self, path: Path) -> None:
        with anyio.move_on_after(CONNECT_TIMEOUT):
            while True:
                if self.proc.returncode is not None:
                    raise DriverError(
                        f"QEMU for domain '{self.name}' exited with status "
                        f"{self.proc.returncode} at start: {self.stderr_tail()}"
                    )
                if exists(path):
                    try:
                        await self.qmp.connect(str(path))
                    except ConnectError:
                        pass
                    else:
                        self._listener = EventListener()
                        self.qmp.register_listener(self._listener)
                        return
                await anyio.sleep(0.01)
        raise DriverError(
            f"QEMU for domain '{self.name}' did not open QMP within {CONNECT_TIMEOUT}s"
        )

    # --------------------------------------------------------------------- QMP

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command. QEMU's refusal raises DriverError with its text."""
        if not self.alive:
            raise DriverError(f"QEMU process of domain '{self.name}' is not running")
        try:
            return await self.qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise DriverError(str(exc)) from None
        except (ExecInterruptedError, ConnectError) as exc:
            raise DriverError(f"QEMU process of domain '{self.name}' went away: {exc}") from None
        except Exception as exc:  # StateError and other connection-level failures
            if not self.alive:
                raise DriverError(f"QEMU process of domain '{self.name}' exited") from None
            raise DriverError(f"QMP {cmd} failed: {exc}") from None

    async def hmp(self, command_line: str) -> str:
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    # ---------------------------------------------------------------- lifetime

    async def run(self, on_exit: Callable[[QemuProcess], None]) -> None:
        """Background task: route events until the process exits, then reap and report."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._route_events)
            await self.proc.wait()
            tg.cancel_scope.cancel()
        self._mark_exited()
        on_exit(self)

    def _mark_exited(self) -> None:
        if self.exited.is_set():
            return
        self.exited.set()
        reason = self.exit_reason or f"exited with status {self.proc.returncode}"
        msg = f"QEMU process {self.pid} of domain '{self.name}' {reason}"
        for sj in self.subjobs.values():
            sj.finish(Outcome.FAILED, msg)
        for ev in self.export_deleted.values():
            ev.set()
        (self.run_dir / f"{self.stem}.pid").unlink(missing_ok=True)
        (self.run_dir / f"{self.stem}.qmp").unlink(missing_ok=True)
        log.info("qemu exited", domain=self.name, pid=self.pid, status=self.proc.returncode)

    async def _route_events(self) -> None:
        assert self._listener is not None
        async for event in self._listener:
            try:
                data = event.get("data")
                self._on_event(str(event["event"]), data if isinstance(data, dict) else {})
            except Exception:  # an odd event must not kill the router
                log.exception("event routing failed", domain=self.name, qmp_event=dict(event))

    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "JOB_STATUS_CHANGE":
            sj = self.subjobs.get(str(data.get("id")))
            if sj is None:
                return
            sj.status = str(data.get("status"))
            if sj.status == "ready":
                sj.ready.set()
            elif sj.status in ("concluded", "null"):
                # BLOCK_JOB_COMPLETED/CANCELLED came first for block jobs; a job that
                # ended without either (early failure) counts as failed.
                sj.finish(Outcome.FAILED, "job ended without completing")
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            sj = self.subjobs.get(str(data.get("device")))
            if sj is None:
                return
            if name == "BLOCK_JOB_CANCELLED":
                sj.outcome = sj.outcome or Outcome.CANCELLED
            elif data.get("error"):
                sj.outcome = sj.outcome or Outcome.FAILED
                sj.error = sj.error or str(data["error"])
            else:
                sj.outcome = sj.outcome or Outcome.COMPLETED
            sj.current = int(data.get("offset", sj.current))
            sj.total = int(data.get("len", sj.total))
        elif name == "BLOCK_JOB_READY":
            sj = self.subjobs.get(str(data.get("device")))
            if sj is not None:
                sj.ready.set()
        elif name == "BLOCK_JOB_ERROR":
            log.warning("block job I/O error", domain=self.name, **data)
        elif name == "MIGRATION":
            if self.on_migration is not None:
                self.on_migration(str(data.get("status")))
        elif name == "BLOCK_EXPORT_DELETED":
            ev = self.export_deleted.get(str(data.get("id")))
            if ev is not None:
                ev.set()

    async def stop(self, reason: str, grace: float = QUIT_TIMEOUT) -> None:
        """End the process: ``quit``, SIGKILL after ``grace`` s; always reaped on return."""
        if self.exit_reason is None:
            self.exit_reason = reason
        with anyio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with contextlib.suppress(Exception):
                    with anyio.move_on_after(grace / 2):
                        await self.qmp.execute("quit")
                        # hang up before QEMU does, so its closing is not a reset
                        await self.qmp.disconnect()
                with anyio.move_on_after(grace):
                    await self.proc.wait()
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
            with contextlib.suppress(Exception):
                with anyio.move_on_after(1):
                    await self.qmp.disconnect()
            self._mark_exited()
