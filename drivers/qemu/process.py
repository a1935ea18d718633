"""One QEMU process: spawn, QMP session, event routing, and guaranteed reaping.

Every process gets ``-name``, ``-machine none``, ``-nodefaults``, ``-display none``, QMP on a
UNIX socket in the run directory and a pid file there. It runs in a session of its own
(``start_new_session``: a terminal's Ctrl-C reaches the driver, which stops QEMU in order,
not QEMU directly) with no inherited file descriptors, and no code runs in the child between
fork and exec. ``stop()`` always ends in a reaped child: ``quit`` over QMP, then SIGKILL
after a timeout. A driver killed without cleanup leaves its QEMUs running; the next owner of
the run directory finds them by their pid files (``rundir.RunDir.reap_stale``) and kills
them, or, in keep-guests mode, re-adopts them (``QemuProcess.adopt``: a process that is
not the driver's child, watched through a pidfd). ``detach()`` lets go of a process
without stopping it (a keep-guests connection closing).

QEMU's refusals that name no file (a locked image, a corrupt qcow2 taken offline) are
rewritten by ``explain`` into texts that name the image and say what to do.

Every QMP command has a time limit (``QMP_TIMEOUT``; a QEMU that is stopped or stuck in the
kernel never answers): past it the command raises ``QmpTimeout``, a DriverError naming the
domain and the command. The command may still run once QEMU wakes up (its late reply is
dropped); the session stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
from attrs import define, field
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient

from drivers.qemu.images import exists, qemu_binary
from drivers.qemu.rundir import escape_option, log_file, pid_file, qmp_socket
from jobcore.errors import DriverError
from jobcore.log import get_logger

log = get_logger(__name__)

QEMU_SYSTEM = "qemu-system-x86_64"
CONNECT_TIMEOUT = 10.0
QUIT_TIMEOUT = 3.0
#: seconds a QMP command may take before it is a QmpTimeout (tests lower it)
QMP_TIMEOUT = 10.0
#: QEMU's image-locking refusal ("Failed to get "write" lock", "Failed to get shared …")
_LOCK_REFUSAL = re.compile(r'Failed to get (?:shared )?"[^"]+" lock')
#: what QEMU says about a node it took offline (qcow2 flagged corrupt: ENOMEDIUM and kin)
_OFFLINE = ("No medium found", "is not inserted", "is ejected")
_MARKED_CORRUPT = "Image is corrupt; cannot be opened read/write"


def locked_image(file: str, qemu_text: str) -> str:
    return (
        f"image '{file}' is in use by another process (QEMU: {qemu_text}): stop the other "
        "user of the file (another domain, qemu-img, qemu-nbd, a VM) or give a copy"
    )


def corrupt_image(file: str, qemu_text: str) -> str:
    return (
        f"image '{file}' is not a valid qcow2 image: its metadata is corrupt (QEMU: "
        f"{qemu_text}); check it with 'qemu-img check {file}' while nothing uses it "
        "('-r all' repairs; keep a copy first), or restore it from a backup"
    )


def _open_log(path: Path) -> int:
    """The QEMU's stdout/stderr file (a small local file, opened synchronously)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


class ProcessHandle(Protocol):
    """What the driver uses of a QEMU's OS process (asyncio's child, or an adopted one)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


@define(eq=False)
class AdoptedProcess:
    """A QEMU a previous owner of the run directory started: not this process's child
    (its exit is seen through a pidfd; its status is unknown unless it was reparented to
    this process, which then reaps it)."""

    pid: int
    pidfd: int
    returncode: int | None = None
    #: one task at a time watches the pidfd; the others wait for it
    _watching: anyio.Lock = field(factory=anyio.Lock)

    @classmethod
    def open(cls, pid: int) -> AdoptedProcess:
        return cls(pid, os.pidfd_open(pid))

    def _reap(self) -> None:
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # someone else's child: its status is not ours to read
            done, status = self.pid, -1
        if done:
            self.returncode = os.waitstatus_to_exitcode(status) if status != -1 else -1

    async def wait(self) -> int:
        async with self._watching:
            while self.returncode is None:
                await anyio.wait_readable(self.pidfd)
                self._reap()
                if self.returncode is None:  # readable means exited; a child may lag
                    await anyio.sleep(0.01)
            if self.pidfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.pidfd)
                self.pidfd = -1
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None and self.pidfd >= 0:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


class QmpTimeout(DriverError):
    """QEMU did not answer a QMP command in time (stopped, or stuck in the kernel)."""


class QmpRefused(DriverError):
    """QEMU refused a QMP command; ``error`` is its reply's ``error`` member as it came
    (``class``, ``desc``), which a monitor passthrough returns as QEMU sent it."""

    def __init__(self, message: str, *, error: dict[str, Any]) -> None:
        super().__init__(message)
        self.error = error


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
    proc: ProcessHandle
    qmp: QMPClient
    subjobs: dict[str, SubJob] = field(factory=dict)
    on_migration: Callable[[str], None] | None = None
    export_deleted: dict[str, anyio.Event] = field(factory=dict)
    exit_reason: str | None = None  # why the driver ended it on purpose
    exited: anyio.Event = field(factory=anyio.Event)
    #: image file of each node opened with ``blockdev-add`` (to name files in errors)
    node_files: dict[str, str] = field(factory=dict)
    #: node → QEMU's message, for nodes QEMU reported corrupt (``BLOCK_IMAGE_CORRUPTED``)
    corrupt: dict[str, str] = field(factory=dict)
    #: the driver let go of it (a keep-guests connection closed): it runs on, unwatched
    detached: bool = False
    _listener: EventListener | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.exited.is_set() and not self.detached

    @property
    def generation(self) -> int:
        return int(self.stem.rsplit(".", 1)[1])

    @property
    def log_path(self) -> Path:
        return log_file(self.run_dir, self.stem)

    def stderr_tail(self, limit: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:]

    # ----------------------------------------------------------------- spawning

    @classmethod
    async def spawn(
        cls,
        run_dir: Path,
        name: str,
        stem: str,
        extra: list[str],
        *,
        incoming: bool = False,
        uuid: str | None = None,
    ) -> QemuProcess:
        qmp_path = qmp_socket(run_dir, stem)
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
            f"unix:{escape_option(str(qmp_path))},server=on,wait=off",
            "-pidfile",
            str(pid_file(run_dir, stem)),
            *(["-uuid", uuid] if uuid else []),
            *extra,
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        errlog = _open_log(log_file(run_dir, stem))
        try:
            # no preexec_fn: running Python between fork and exec is unsafe with threads
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=errlog,
                stderr=errlog,
                start_new_session=True,
                close_fds=True,
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

    @classmethod
    async def adopt(cls, run_dir: Path, name: str, stem: str, pid: int) -> QemuProcess:
        """Take over a running QEMU a previous owner started (the caller proved it is one):
        connect to its QMP socket, route its events from now on. Never stops it: a failure
        here leaves the process as it was."""
        proc = AdoptedProcess.open(pid)
        self = cls(name=name, stem=stem, run_dir=run_dir, proc=proc, qmp=QMPClient(stem))
        try:
            await self._connect(qmp_socket(run_dir, stem))
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(proc.pidfd)
            raise
        log.info("qemu re-adopted", domain=name, pid=pid)
        return self

    async def detach(self) -> None:
        """Let go of the process without stopping it: hang up QMP; it runs on."""
        if self.detached or not self.alive:
            return
        self.detached = True
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            with anyio.move_on_after(1):
                await self.qmp.disconnect()
        log.info("qemu left running", domain=self.name, pid=self.pid)

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

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run a QMP command. QEMU's refusal raises DriverError with its text; no answer
        within ``timeout`` (default ``QMP_TIMEOUT``) s raises QmpTimeout."""
        if not self.alive:
            raise DriverError(f"QEMU process of domain '{self.name}' is not running")
        limit = QMP_TIMEOUT if timeout is None else timeout
        try:
            with anyio.move_on_after(limit) as scope:
                result = await self.qmp.execute(cmd, args)
        except ExecuteError as exc:
            error = exc.received.get("error")
            raise QmpRefused(
                self.explain(str(exc), self._file_of(cmd, args)),
                error=dict(error) if isinstance(error, dict) else {"desc": str(exc)},
            ) from None
        except (ExecInterruptedError, ConnectError) as exc:
            raise DriverError(f"QEMU process of domain '{self.name}' went away: {exc}") from None
        except Exception as exc:  # StateError and other connection-level failures
            if not self.alive:
                raise DriverError(f"QEMU process of domain '{self.name}' exited") from None
            raise DriverError(f"QMP {cmd} failed: {exc}") from None
        if scope.cancelled_caught:
            raise QmpTimeout(
                f"QEMU for domain '{self.name}' did not answer QMP '{cmd}' within {limit:g} s "
                f"(process {self.pid} is stopped or stuck; check it, e.g. its state in "
                f"/proc/{self.pid}/status)"
            )
        if cmd == "blockdev-add" and args is not None:
            file = _opened_file(cmd, args)
            if file is not None:
                self.node_files[str(args["node-name"])] = file
            if args.get("driver") == "qcow2" and "data-file" not in args:
                await self._refuse_header_data_file(str(args["node-name"]), file)
        return result

    async def _refuse_header_data_file(self, node: str, file: str | None) -> None:
        """A qcow2 node the driver opened without naming a data file must have none: one
        its header names (written there after the driver read the header, by whoever
        owns the image) is closed again, with the node, before any I/O reaches it."""
        # the graph, not query-named-block-nodes: that one reads the image (allocation,
        # a corrupt qcow2 is marked so by it); the graph is QEMU's own bookkeeping
        graph = await self.execute("x-debug-query-block-graph")
        ids = {n.get("id") for n in graph.get("nodes", ()) if n.get("name") == node}
        if any(
            e.get("parent") in ids and e.get("name") == "data-file" for e in graph.get("edges", ())
        ):
            with contextlib.suppress(DriverError):
                await self.execute("blockdev-del", {"node-name": node})
            self.node_files.pop(node, None)
            raise DriverError(
                f"image '{file or node}' keeps its data in an external file its header "
                "names: the qemu driver does not open qcow2 data files (the header changed "
                "after the driver read it); QEMU closed the image again"
            )

    def _file_of(self, cmd: str, args: dict[str, Any] | None) -> str | None:
        """The image a command opens or needs to write (to name it in QEMU's refusal)."""
        opened = _opened_file(cmd, args)
        if opened is not None or args is None:
            return opened
        node = {"block-commit": "base-node", "block-stream": "device"}.get(cmd)
        return self.node_files.get(str(args.get(node))) if node else None

    def explain(self, text: str, file: str | None = None) -> str:
        """QEMU's error text, rewritten to name the image and what to do when QEMU's own
        text does not: a lock held by another process, a qcow2 QEMU found corrupt."""
        if file is not None and _LOCK_REFUSAL.search(text):
            return locked_image(file, text)
        if file is not None and _MARKED_CORRUPT in text:
            return corrupt_image(file, text)
        if self.corrupt and any(marker in text for marker in _OFFLINE):
            node, why = next(iter(self.corrupt.items()))
            return corrupt_image(self.node_files.get(node, node), f"{why}; {text}")
        return text

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
        if self.exited.is_set() or self.detached:
            return
        self.exited.set()
        reason = self.exit_reason or f"exited with status {self.proc.returncode}"
        msg = f"QEMU process {self.pid} of domain '{self.name}' {reason}"
        for sj in self.subjobs.values():
            sj.finish(Outcome.FAILED, msg)
        for ev in self.export_deleted.values():
            ev.set()
        pid_file(self.run_dir, self.stem).unlink(missing_ok=True)
        qmp_socket(self.run_dir, self.stem).unlink(missing_ok=True)
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
                sj.error = sj.error or self.explain(str(data["error"]))
            else:
                sj.outcome = sj.outcome or Outcome.COMPLETED
            sj.current = int(data.get("offset", sj.current))
            sj.total = int(data.get("len", sj.total))
        elif name == "BLOCK_JOB_READY":
            sj = self.subjobs.get(str(data.get("device")))
            if sj is not None:
                sj.ready.set()
        elif name == "BLOCK_IMAGE_CORRUPTED":
            node = str(data.get("node-name") or data.get("device") or "?")
            self.corrupt.setdefault(node, str(data.get("msg", "corrupt metadata")))
            log.warning("qemu found a corrupt image", domain=self.name, **data)
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


def _opened_file(cmd: str, args: dict[str, Any] | None) -> str | None:
    """The image file a ``blockdev-add`` opens (``file: {driver: file, filename}``)."""
    if cmd != "blockdev-add" or args is None:
        return None
    inner = args.get("file")
    if isinstance(inner, dict) and isinstance(inner.get("filename"), str):
        return str(inner["filename"])
    if isinstance(args.get("filename"), str):
        return str(args["filename"])
    return None
