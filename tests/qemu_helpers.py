"""Helpers for the real-QEMU tests: a recording reporter, images, and process checks."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import anyio
from attrs import define, field

from drivers.qemu.rundir import LOCK, LOCK_MARKER, escape_option
from jobcore.driver import DomainInfo, DriverJob
from jobcore.testing import prepare_spec

TERMINAL = ("completed", "failed", "cancelled")


@define(eq=False)
class RecordingReporter:
    """A JobReporter that records every report and lets a test await them."""

    events: list[tuple[str, Any]] = field(factory=list)
    progress_calls: list[tuple[int, int, dict[str, int | str]]] = field(factory=list)
    _changed: anyio.Event = field(factory=anyio.Event)

    def _note(self, kind: str, value: Any = None) -> None:
        self.events.append((kind, value))
        self._changed.set()
        self._changed = anyio.Event()

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        self.progress_calls.append((processed, total, dict(extra or {})))

    def ready(self) -> None:
        self._note("ready")

    def completed(self, extra: Mapping[str, int | str] | None = None) -> None:
        self._note("completed", dict(extra or {}))

    def failed(self, errmsg: str) -> None:
        self._note("failed", errmsg)

    def cancelled(self) -> None:
        self._note("cancelled")

    def domain_moved(self, uri: str) -> None:
        self._note("domain_moved", uri)

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    @property
    def terminal(self) -> tuple[str, Any] | None:
        for kind, value in self.events:
            if kind in TERMINAL:
                return kind, value
        return None

    async def wait_for(self, kind: str, within: float = 30.0) -> Any:
        with anyio.fail_after(within):
            while True:
                for k, v in self.events:
                    if k == kind:
                        return v
                if kind != "ready" and self.terminal is not None:
                    raise AssertionError(f"wanted {kind}, job ended with {self.terminal}")
                await self._changed.wait()

    async def wait_end(self, within: float = 30.0) -> tuple[str, Any]:
        with anyio.fail_after(within):
            while self.terminal is None:
                await self._changed.wait()
        assert self.terminal is not None
        return self.terminal


class _Domains(Protocol):
    async def lookup_domain(self, name: str) -> DomainInfo: ...


async def make_job(
    conn: _Domains, domain: str, spec: Any, **prepare: Any
) -> tuple[DriverJob, RecordingReporter]:
    """The job the engine would hand ``conn`` for ``spec`` on ``domain`` (prepared against
    the domain as it is now; ``prepare``: jobcore.testing.prepare_spec's options)."""
    rep = RecordingReporter()
    prepared = prepare_spec(spec, await conn.lookup_domain(domain), **prepare)
    return DriverJob(prepared.uuid, prepared.TYPE, domain, prepared, rep), rep


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({res.returncode}): {res.stderr}{res.stdout}"
        )
    return res.stdout


def create(path: Path, size: str = "32M", backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    run(*args, str(path), size)
    return path


def write(path: Path, *commands: str) -> None:
    """qemu-io writes into an image that no QEMU has open, e.g. 'write -P 0x5a 0 4M'."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    run(*args, str(path))


def compare(a: str | Path, b: str | Path, *extra: str) -> None:
    """``qemu-img compare -U`` (identical or AssertionError); a/b may be NBD URIs."""
    run("qemu-img", "compare", "-U", *extra, str(a), str(b))


def differs(a: str | Path, b: str | Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-U", "-q", str(a), str(b)], check=False)
    return res.returncode == 1


def alive(pid: int) -> bool:
    """True when ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def domain_xml(name: str, disks: Mapping[str, Path], memory_mib: int = 0) -> str:
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{dev}'/></disk>"
        for dev, path in disks.items()
    )
    mem = f"<memory unit='MiB'>{memory_mib}</memory>" if memory_mib else ""
    return f"<domain><name>{name}</name>{mem}<devices>{devs}</devices></domain>"


def qemu_children() -> set[int]:
    """QEMU processes that are children of this test process."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and comm.startswith("qemu-system"):
            found.add(int(entry.name))
    return found


def kill_and_reap(pids: set[int]) -> None:
    """Last resort after a failed test: no QEMU may leak into the next one."""
    for pid in pids:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corrupt_first_cluster(path: Path) -> None:
    """Point the qcow2 L2 entry of guest offset 0 at an unaligned host offset.

    QEMU detects it on the first read of that cluster and fails the request with EIO
    (and flags the image corrupt), which makes a block job fail for real.
    """
    with path.open("r+b") as f:
        f.seek(40)  # l1_table_offset
        l1_offset = int.from_bytes(f.read(8), "big")
        f.seek(l1_offset)
        l2_offset = int.from_bytes(f.read(8), "big") & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2_offset)
        entry = int.from_bytes(f.read(8), "big")
        assert entry & 0x00FF_FFFF_FFFF_FE00, "guest cluster 0 must be allocated"
        f.seek(l2_offset)
        f.write((entry + 512).to_bytes(8, "big"))


def mark_driver_owned(run_dir: Path) -> None:
    """Leave the lock file every owner of a run directory writes (with its marker line)."""
    (run_dir / LOCK).write_text(LOCK_MARKER)


def start_orphan_qemu(run_dir: Path) -> subprocess.Popen[bytes]:
    """A QEMU as a dead driver would leave it: running, with its pid file in ``run_dir``
    (and the run directory's marked lock file, which every owner creates)."""
    mark_driver_owned(run_dir)
    qmp = escape_option(f"{run_dir}/old.0.qmp")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "old", "-machine", "none", "-nodefaults",
         "-display", "none",
         "-qmp", f"unix:{qmp},server=on,wait=off",
         "-pidfile", f"{run_dir}/old.0.pid"],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    pidfile = run_dir / "old.0.pid"
    # QEMU creates the pid file before it writes the pid: wait for the content
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise AssertionError("the orphan QEMU did not start")
        time.sleep(0.02)
    return proc


def ended_by(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Reap ``proc`` (killing it if it is still running) and return its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 0


# ---- a driver owner in a child process (recovery tests) --------------------------------


def owner_main() -> None:
    """Child process: open a keep-guests connection, create a domain, start a job, print
    one JSON line ``{"pid": QEMU pid, "spec": pickled prepared spec (hex)}`` once the job
    is where the test wants it, then wait to be killed (``sys.argv[1]``: JSON options)."""
    import json
    import pickle
    import sys

    opts = json.loads(sys.argv[1])
    anyio.run(_owner, opts, json, pickle, backend="asyncio")


async def _owner(opts: dict[str, Any], json: Any, pickle: Any) -> None:
    import sys

    from drivers.qemu import QemuDriver
    from jobcore.backup import (
        BackupDef,
        BackupDisk,
        BackupMode,
        BackupServer,
        BackupStore,
        DiskBackupMode,
        ServerTransport,
        StoreType,
    )
    from jobcore.spec import ChainRef
    from jobcore.types.backup import BackupJobSpec
    from jobcore.types.chain import BlockCommitSpec
    from jobcore.types.migration import MigrationSpec
    from jobcore.uri import parse_uri
    from jobcore.xml.domain import parse_domain

    async with (
        anyio.create_task_group() as tg,
        QemuDriver().connect(parse_uri(opts["uri"]), tg) as conn,
    ):
        await conn.create_domain(parse_domain(opts["xml"]))
        kind = opts["job"]
        spec: Any
        if kind in ("push", "pull"):
            disk = BackupDisk(
                "vda", True, StoreType.FILE, DiskBackupMode.FULL, None,
                store=BackupStore(opts["store"], "qcow2"),
            )  # fmt: skip
            if kind == "push":
                spec = BackupJobSpec(BackupDef(mode=BackupMode.PUSH, disks=(disk,)))
            else:
                server = BackupServer(ServerTransport.UNIX, socket=opts["socket"])
                backup = BackupDef(mode=BackupMode.PULL, server=server, disks=(disk,))
                spec = BackupJobSpec(backup)
        elif "top" in opts:  # an intermediate commit, slow enough to be killed mid-way
            spec = BlockCommitSpec(
                "vda", top=ChainRef(index=opts["top"]), base=ChainRef(index=opts["top"] + 1),
                bandwidth=opts.get("bandwidth"),
            )  # fmt: skip
        elif kind == "migrate":
            spec = MigrationSpec(opts["destination"], bandwidth=16 * 1024)
        else:
            spec = BlockCommitSpec("vda")
        job, rep = await make_job(conn, "vm1", spec)
        await conn.start(job)
        if opts.get("wait") == "ready":
            await rep.wait_for("ready")
        else:
            for _ in range(400):
                if any(p > 0 for p, _, _ in rep.progress_calls):
                    break
                await anyio.sleep(0.05)
        line = {"pid": conn.pid("vm1"), "spec": pickle.dumps(job.spec).hex()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        await anyio.sleep_forever()
