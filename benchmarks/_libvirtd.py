"""libvirtd beside jobcore in the benchmarks (never in the tests).

A real libvirtd 9 (Debian's monolithic daemon) runs here without systemd as
shared/research/libvirtd.md §2 found: its directories, the ``libvirt-qemu`` user the
daemon looks up before it reads qemu.conf, ``user = "root"`` in qemu.conf, then
``virtlogd -d`` and ``libvirtd -d``. ``bench_domain()`` starts a minimal transient TCG
domain on a fresh qcow2 in a temporary directory (§3); ``measure()`` runs libvirt-python's
calls in a ``/usr/bin/python3`` subprocess (Debian's binding: the venv cannot import it).
Everything started here is stopped, destroyed and deleted afterwards, also on failure; a
libvirtd that was already running is used and left running. What stays on the system is
the setup (packages from ``make libvirt-deps``, the user, qemu.conf, the directories).

If libvirtd cannot run, ``LibvirtdUnavailable`` says why; the benchmarks print it loudly
(``loud()``) instead of skipping in silence.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs

URI = "qemu:///system"
#: Debian's Python, the one with python3-libvirt.
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt"
RUN_DIRS = (
    "/var/log/libvirt/qemu",
    "/var/run/libvirt",
    "/var/lib/libvirt/qemu",
    "/var/cache/libvirt/qemu",
)
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRTD_PID = Path("/var/run/libvirtd.pid")
VIRTLOGD_PID = Path("/var/run/virtlogd.pid")
START_TIMEOUT = 20.0


class LibvirtdUnavailable(RuntimeError):
    """libvirtd cannot run (or cannot run a domain) on this machine; the message says why."""


def loud(reason: object) -> str:
    """A banner nobody reads past: libvirtd was not measured, and why."""
    bar = "!" * 78
    return f"{bar}\n!! libvirtd NOT MEASURED: {reason}\n!! (make libvirt-deps installs it)\n{bar}"


@attrs.frozen
class Libvirtd:
    uri: str
    started: bool  # by us (then stopped by us)


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _check_installed() -> None:
    missing = [b for b in ("virsh", "libvirtd", "virtlogd", "qemu-img", "qemu-io") if not _which(b)]
    if missing:
        raise LibvirtdUnavailable(f"not installed: {', '.join(missing)} (packages: {PACKAGES})")
    if _run(SYSTEM_PYTHON, "-c", "import libvirt").returncode != 0:
        raise LibvirtdUnavailable(f"{SYSTEM_PYTHON} cannot import libvirt (python3-libvirt)")
    if os.geteuid() != 0:
        raise LibvirtdUnavailable("qemu:///system needs root to start libvirtd")


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _setup() -> None:
    """§2: what libvirt-daemon-system would have set up (idempotent)."""
    for d in RUN_DIRS:
        Path(d).mkdir(parents=True, exist_ok=True)
    if _run("getent", "passwd", "libvirt-qemu").returncode != 0:
        if _run("getent", "group", "libvirt-qemu").returncode != 0:
            _checked("groupadd", "-r", "libvirt-qemu")
        _checked(
            "useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s",
            "/usr/sbin/nologin", "-M", "libvirt-qemu",
        )  # fmt: skip
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    settings = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}
    missing = [key for key in ("user", "group") if key not in settings]
    if missing:
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        with QEMU_CONF.open("a") as conf:
            conf.write("\n# jobcore benchmarks: QEMU writes backup targets in root's dirs\n")
            conf.writelines(f'{key} = "root"\n' for key in missing)


def _checked(*cmd: str) -> None:
    done = _run(*cmd)
    if done.returncode != 0:
        raise LibvirtdUnavailable(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


def _answers() -> bool:
    return _run("virsh", "-c", URI, "version", timeout=10).returncode == 0


def _pid(path: Path) -> int | None:
    with suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    return None


def _stop(pid: int | None) -> None:
    if pid is None:
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def libvirtd() -> Iterator[Libvirtd]:
    """A libvirtd answering on qemu:///system: one already running, or one started here
    (and stopped on leaving, with the virtlogd started for it)."""
    _check_installed()
    _setup()
    if _answers():
        yield Libvirtd(URI, started=False)
        return
    started: list[int | None] = []
    try:
        if _pid(VIRTLOGD_PID) is None:
            _checked("virtlogd", "-d")
            started.append(_wait_pid(VIRTLOGD_PID))
        _checked("libvirtd", "-d")
        started.append(_wait_pid(LIBVIRTD_PID))
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers():
            if time.monotonic() > deadline or _pid(LIBVIRTD_PID) is None:
                raise LibvirtdUnavailable(
                    "libvirtd did not answer on qemu:///system (see /var/log/libvirt/libvirtd.log)"
                )
            time.sleep(0.1)
        yield Libvirtd(URI, started=True)
    finally:
        for pid in reversed(started):
            _stop(pid)


def _wait_pid(path: Path) -> int | None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = _pid(path)
        if pid is not None:
            return pid
        time.sleep(0.05)
    return None


_DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@attrs.frozen
class BenchDomain:
    name: str
    dir: Path  # the disk and any backup target live here

    def push_backup_xml(self) -> str:
        target = self.dir / "backup-vda.qcow2"
        return (
            "<domainbackup mode='push'><disks><disk name='vda' type='file'>"
            f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>"
        )


@contextmanager
def bench_domain(
    lv: Libvirtd, *, disk_mib: int = 1024, data_mib: int = 512
) -> Iterator[BenchDomain]:
    """A transient TCG domain (128 MiB, one vCPU, no network) on a fresh qcow2 of
    ``disk_mib`` with ``data_mib`` written (what a push backup copies); destroyed and its
    directory deleted on leaving."""
    tmp = Path(tempfile.mkdtemp(prefix="jobcore-bench-libvirt-"))
    name = f"jobcore-bench-{os.getpid()}"
    created = False
    try:
        disk = tmp / "vda.qcow2"
        _checked("qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{disk_mib}M")
        if data_mib:
            _checked("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data_mib}M", str(disk))
        xml = tmp / "domain.xml"
        xml.write_text(_DOMAIN_XML.format(name=name, disk=disk))
        done = _run("virsh", "-c", lv.uri, "create", str(xml))
        if done.returncode != 0:
            raise LibvirtdUnavailable(f"virsh create: {done.stderr.strip()}")
        created = True
        yield BenchDomain(name, tmp)
    finally:
        if created:
            _run("virsh", "-c", lv.uri, "destroy", name)
        shutil.rmtree(tmp, ignore_errors=True)


#: Runs under /usr/bin/python3: argv = uri, domain, mode, calls, backup XML.
_MEASURE = r"""
import json, sys, time
import libvirt
uri, name, mode, n, backup_xml = sys.argv[1:6]
n = int(n)
conn = libvirt.open(uri)
dom = conn.lookupByName(name)
ACTIVE = libvirt.VIR_DOMAIN_JOB_UNBOUNDED
out = {}
if mode == "idle":
    for _ in range(200):
        dom.jobStats()
    start = time.perf_counter()
    for _ in range(n):
        stats = dom.jobStats()
    out = {"calls": n, "seconds": time.perf_counter() - start, "type": stats.get("type")}
else:  # calls while a push backup copies: only those that saw it running count
    dom.backupBegin(backup_xml, None, 0)
    try:
        calls = 0
        start = time.perf_counter()
        last = start
        while calls < n:
            stats = dom.jobStats()
            if stats.get("type") != ACTIVE:
                break
            calls += 1
            last = time.perf_counter()
        out = {"calls": calls, "seconds": last - start, "type": ACTIVE,
               "disk_processed": stats.get("disk_processed"), "disk_total": stats.get("disk_total")}
    finally:
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass  # it had ended
        deadline = time.monotonic() + 30
        while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE and time.monotonic() < deadline:
            time.sleep(0.05)
print(json.dumps(out))
"""


@attrs.frozen
class Rate:
    calls: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def measure(lv: Libvirtd, dom: BenchDomain, mode: str, calls: int) -> Rate:
    """``dom.jobStats()`` calls per second through libvirtd: ``idle`` (no job) or
    ``copying`` (while a push backup of the domain's disk runs)."""
    done = _run(
        SYSTEM_PYTHON, "-c", _MEASURE, lv.uri, dom.name, mode, str(calls), dom.push_backup_xml(),
        timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise LibvirtdUnavailable(f"libvirt-python's jobStats ({mode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    if mode != "idle" and result["calls"] < 50:
        raise LibvirtdUnavailable(
            f"the push backup ended after {result['calls']} calls: too short to measure"
        )
    return Rate(int(result["calls"]), float(result["seconds"]))


def main() -> None:
    """``python -m benchmarks._libvirtd``: libvirtd's jobStats rates alone."""
    try:
        with libvirtd() as lv, bench_domain(lv) as dom:
            for mode in ("idle", "copying"):
                rate = measure(lv, dom, mode, 3000)
                print(
                    f"libvirtd jobStats {mode}: {rate.per_second:8.0f} calls/s ({rate.calls} calls)"
                )
    except LibvirtdUnavailable as exc:
        print(loud(exc), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
