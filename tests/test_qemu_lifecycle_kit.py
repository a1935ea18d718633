"""jobcore.testing's lifecycle and scheduling kit against real QEMU (``qemu:///session``).

Each hypothesis example gets fresh images, its own run directory and two real domains
(``vm1`` with a 3-layer ``vda`` and a plain ``vdb``, ``vm2`` with a plain ``vda``), then
applies random begins and verbs to real QEMU jobs. Small images keep it quick.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from jobcore.testing import (
    JobLifecycleMachine,
    JobTemplate,
    MakeXML,
    backup_job,
    chain_job,
    migration_job,
)

pytestmark = pytest.mark.qemu
SETTLE = 0.03

KIT_SETTINGS = settings(
    max_examples=8,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _img(path: Path, backing: Path | None = None, *, data: bool = False) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), "16M"], check=True)
    if data:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def _xml(name: str, disks: dict[str, Path]) -> str:
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{p}'/><target dev='{d}'/></disk>"
        for d, p in disks.items()
    )
    return f"<domain><name>{name}</name><devices>{devs}</devices></domain>"


class QemuKit(JobLifecycleMachine):
    BACKEND = "asyncio"

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="jobcore-kit-"))
        # Jobs with data and 1 MiB/s never end on their own within an example: only the
        # kit's verbs (abort, complete, an unlimited set-speed) end them, so what the
        # machine draws depends on its own steps, not on the machine's speed.
        type(self).URI = f"qemu:///session?dir={self.work / 'run'}&backup_bandwidth=1048576"
        base = _img(self.work / "base.qcow2")
        mid = _img(self.work / "mid.qcow2", base, data=True)
        top = _img(self.work / "top.qcow2", mid)
        vdb = _img(self.work / "vdb.qcow2", data=True)
        vm2 = _img(self.work / "vm2.qcow2", data=True)
        super().__init__()
        self.conn.createXML(_xml("vm1", {"vda": top, "vdb": vdb}))
        self.conn.createXML(_xml("vm2", {"vda": vm2}))

    def _drain_events(self) -> None:
        # Let QEMU's reaction to the last step land (ready, an unthrottled job ending:
        # milliseconds) before the model looks, so runs replay the same way.
        time.sleep(SETTLE)
        super()._drain_events()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def templates(self) -> list[JobTemplate]:
        work = str(self.work)

        def backup(disk: str, mode: str = "push") -> MakeXML:
            return backup_job(disk, work, mode)

        chain = chain_job

        def migration() -> MakeXML:
            return migration_job(
                f"qemu:///session?dir={work}/run", "<bandwidth unit='KiB/s'>64</bandwidth>"
            )

        vda, vdb = frozenset({"vda"}), frozenset({"vdb"})
        return [
            JobTemplate("backup-vda", "vm1", True, backup("vda"), reads=vda),
            JobTemplate("backup-vdb", "vm1", True, backup("vdb"), reads=vdb),
            JobTemplate("pull-backup-vdb", "vm1", True, backup("vdb", "pull"), reads=vdb),
            JobTemplate(
                "blockpull-vda",
                "vm1",
                False,
                chain("blockpull", "<disk name='vda'/><bandwidth unit='MiB/s'>1</bandwidth>"),
                chains=vda,
            ),
            JobTemplate(
                "commit-vda-active",
                "vm1",
                False,
                chain("blockcommit", "<disk name='vda'/>"),
                chains=vda,
            ),
            JobTemplate("migrate", "vm1", True, migration(), exclusive=True),
            JobTemplate("backup-vm2", "vm2", True, backup("vda"), reads=vda),
        ]


TestQemuKit = QemuKit.TestCase
TestQemuKit.settings = KIT_SETTINGS
