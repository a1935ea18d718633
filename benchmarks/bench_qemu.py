"""jobcore on real QEMU against qemu-img, in the same run, on the same image:

1. a 1 GiB push backup through jobcore (engine + qemu driver) vs ``qemu-img convert`` of
   that image (target: throughput ≥ 0.9× qemu-img's);
2. begin→completed time of a 256 MiB push backup.

Best of 5 alternating rounds each (this 2-core machine is noisy); every round is printed.

Both copies end on disk (the driver fsyncs a finished target; the ``qemu-img convert``
output is fsynced here), and both are checked with ``qemu-img compare``.

    python -m benchmarks.bench_qemu
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import anyio

import jobcore

GiB = 1 << 30
MiB = 1 << 20
ROUNDS = 5


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


async def _backup(dom: jobcore.Domain, dst: Path) -> float:
    """begin→completed of a push backup through jobcore (engine + qemu driver)."""
    with contextlib.suppress(FileNotFoundError):  # the benchmark's own scratch directory
        os.unlink(dst)
    xml = (
        "<job type='backup'><domainbackup><disks><disk name='vda' type='file'>"
        f"<target file='{dst}'/><driver type='qcow2'/></disk></disks></domainbackup></job>"
    )
    start = time.perf_counter()
    job = await dom.job_begin(xml)
    info = await job.wait()
    elapsed = time.perf_counter() - start
    if info.state is not jobcore.JobState.COMPLETED:
        raise RuntimeError(f"backup ended {info.state}: {info.errmsg}")
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
    async with jobcore.connect(f"qemu:///session?dir={work / 'run'}") as conn:
        dom_big = await conn.create_domain(_xml("bench-big", big))
        dom_small = await conn.create_domain(_xml("bench-small", small))
        conv_times, job_times = [], []
        for _ in range(ROUNDS):  # alternate, so neither side owns the warm cache
            conv_times.append(_convert(big, work / "conv.qcow2"))
            job_times.append(await _backup(dom_big, work / "bk.qcow2"))
        _sh("qemu-img", "compare", "-U", str(big), str(work / "conv.qcow2"))
        _sh("qemu-img", "compare", "-U", str(big), str(work / "bk.qcow2"))
        conv, job = min(conv_times), min(job_times)
        print(
            "rounds (s): convert",
            " ".join(f"{t:.2f}" for t in conv_times),
            "| jobcore",
            " ".join(f"{t:.2f}" for t in job_times),
        )
        print(f"1 GiB qemu-img convert       : {conv:6.3f} s ({GiB / conv / MiB:7.1f} MiB/s)")
        print(f"1 GiB push backup via jobcore: {job:6.3f} s ({GiB / job / MiB:7.1f} MiB/s)")
        print(f"throughput ratio jobcore/qemu-img: {conv / job:.2f}x (target >= 0.9x)")
        small_times = sorted([await _backup(dom_small, work / "small.bk") for _ in range(3)])
        print(
            f"256 MiB push backup begin->completed: best {small_times[0] * 1000:.0f} ms, "
            f"median {small_times[1] * 1000:.0f} ms"
        )


def main() -> None:
    base = os.environ.get("JOBCORE_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(prefix="bench-qemu-", dir=base) as tmp:
        anyio.run(_run, Path(tmp), backend="asyncio")


if __name__ == "__main__":
    main()
