"""The qemu driver against qemu-img, in the same run, on the same image:

1. a 1 GiB push backup through the driver vs ``qemu-img convert`` of that image
   (target: driver throughput ≥ 0.9× qemu-img's);
2. begin→completed time of a 256 MiB push backup.

Both copies end on disk (the driver's target is flushed when its node closes; the
``qemu-img convert`` output is fsynced), and both are checked with ``qemu-img compare``.

    python -m benchmarks.bench_qemu
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import anyio

from drivers.qemu import QemuConnection, QemuDriver
from drivers.qemu.images import remove_files
from jobcore.backup import BackupDef, BackupDisk, BackupMode, BackupStore, DiskBackupMode, StoreType
from jobcore.driver import DriverJob
from jobcore.spec import BackupJobSpec, JobType
from jobcore.uri import parse_uri

GiB = 1 << 30
MiB = 1 << 20
ROUNDS = 3


class _Reporter:
    """The smallest JobReporter: remembers the outcome and wakes the waiter."""

    def __init__(self) -> None:
        self.outcome: str | None = None
        self.done = anyio.Event()

    def progress(
        self, processed: int, total: int, extra: Mapping[str, int | str] | None = None
    ) -> None:
        pass

    def ready(self) -> None:
        pass

    def completed(self, extra: Mapping[str, int | str] | None = None) -> None:
        self._end("completed")

    def failed(self, errmsg: str) -> None:
        self._end(f"failed: {errmsg}")

    def cancelled(self) -> None:
        self._end("cancelled")

    def domain_moved(self, uri: str) -> None:
        pass

    def _end(self, outcome: str) -> None:
        self.outcome = outcome
        self.done.set()


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _make_image(path: Path, size: int) -> None:
    """A sparse-but-written qcow2: patterns over 15/16 of it, the rest left unallocated."""
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    written = size - size // 16
    _sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {written}", str(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    start = time.perf_counter()
    _sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(src), str(dst))
    _fsync(dst)
    return time.perf_counter() - start


async def _driver_backup(conn: QemuConnection, domain: str, dst: Path) -> float:
    remove_files([dst])
    disk = BackupDisk(
        "vda", True, StoreType.FILE, DiskBackupMode.FULL, store=BackupStore(str(dst), "qcow2")
    )
    spec = BackupJobSpec(BackupDef(mode=BackupMode.PUSH, disks=(disk,)))
    rep = _Reporter()
    start = time.perf_counter()
    await conn.start(DriverJob(uuid.uuid4(), JobType.BACKUP, domain, spec, rep))
    await rep.done.wait()
    elapsed = time.perf_counter() - start
    if rep.outcome != "completed":
        raise RuntimeError(f"backup {rep.outcome}")
    return elapsed


def _xml(name: str, path: Path) -> str:
    return (
        f"<domain><name>{name}</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{path}'/><target dev='vda'/>"
        "</disk></devices></domain>"
    )


async def _run(work: Path) -> None:
    big, small = work / "big.qcow2", work / "small.qcow2"
    _make_image(big, GiB)
    _make_image(small, 256 * MiB)
    async with anyio.create_task_group() as tg:
        uri = parse_uri(f"qemu:///session?dir={work / 'run'}")
        async with QemuDriver().connect(uri, tg) as conn:
            await conn.create_domain(_xml("bench-big", big))
            await conn.create_domain(_xml("bench-small", small))
            conv_times, drv_times = [], []
            for _ in range(ROUNDS):  # alternate, so neither side owns the warm cache
                conv_times.append(_convert(big, work / "conv.qcow2"))
                drv_times.append(await _driver_backup(conn, "bench-big", work / "bk.qcow2"))
            _sh("qemu-img", "compare", "-U", str(big), str(work / "conv.qcow2"))
            _sh("qemu-img", "compare", "-U", str(big), str(work / "bk.qcow2"))
            conv, drv = min(conv_times), min(drv_times)
            print(f"1 GiB qemu-img convert : {conv:6.3f} s  ({GiB / conv / MiB:7.1f} MiB/s)")
            print(f"1 GiB driver backup    : {drv:6.3f} s  ({GiB / drv / MiB:7.1f} MiB/s)")
            print(f"throughput ratio driver/qemu-img: {conv / drv:.2f}x (target >= 0.9x)")
            small_times = [
                await _driver_backup(conn, "bench-small", work / "small-bk.qcow2") for _ in range(3)
            ]
            print(
                f"256 MiB backup begin->completed: {min(small_times) * 1000:.0f} ms "
                f"(median of 3: {sorted(small_times)[1] * 1000:.0f} ms)"
            )
        tg.cancel_scope.cancel()


def main() -> None:
    base = os.environ.get("JOBCORE_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(prefix="bench-qemu-", dir=base) as tmp:
        anyio.run(_run, Path(tmp), backend="asyncio")


if __name__ == "__main__":
    main()
