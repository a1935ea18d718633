"""DriverStates for driver-level recovery tests (jobcore.driver.DriverState), and the
child process a test SIGKILLs while sim jobs run.

``MemoryState`` keeps the records in a dict (one "process" after another share it);
``FileState`` appends every save/delete to a JSON-lines file as it happens, so what a
killed process saved is there for the next one (a torn last line is ignored).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio


class MemoryState:
    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        #: set: sync() never returns (a store that never commits the engine's writes)
        self.stalled = False

    def load(self) -> Mapping[str, Any]:
        reread: dict[str, Any] = json.loads(json.dumps(self.records))
        return reread  # what a new process reads back

    def save(self, key: str, value: Any) -> None:
        self.records[key] = json.loads(json.dumps(value, allow_nan=False))

    def delete(self, key: str) -> None:
        self.records.pop(key, None)

    async def sync(self) -> None:
        if self.stalled:
            await anyio.sleep_forever()

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.records if k.startswith(prefix))


class FileState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def load(self) -> Mapping[str, Any]:
        records: dict[str, Any] = {}
        for line in self.path.read_text().splitlines():
            try:
                op = json.loads(line)
            except ValueError:
                continue  # torn by a kill mid-write
            if op[0] == "save":
                records[op[1]] = op[2]
            else:
                records.pop(op[1], None)
        return records

    def _append(self, op: list[Any]) -> None:
        os.write(self._fd, (json.dumps(op, allow_nan=False) + "\n").encode())

    def save(self, key: str, value: Any) -> None:
        self._append(["save", key, value])

    def delete(self, key: str) -> None:
        self._append(["delete", key])

    async def sync(self) -> None:
        pass  # every write is in the file (the kernel's) as soon as it returns

    def close(self) -> None:
        os.close(self._fd)


# ---- the child process -------------------------------------------------------------

WALL = 1_700_000_000.0
JOB_UUID = uuid.UUID("6f1c0c2e-5d0b-4a59-9f43-1c2b9d3e0a11")


BACKUP_XML = (
    f"<job type='backup'><uuid>{JOB_UUID}</uuid><domainbackup><disks>"
    "<disk name='vda' type='file'><target file='/backups/killed-vda.qcow2'/></disk>"
    "<disk name='vdb' type='file'><target file='/backups/killed-vdb.qcow2'/></disk>"
    "</disks></domainbackup><domaincheckpoint><name>cp-killed</name></domaincheckpoint></job>"
)


class SilentReporter:
    def progress(self, processed: int, total: int, extra: Any = None) -> None: ...
    def ready(self) -> None: ...
    def completed(self, extra: Any = None) -> None: ...
    def failed(self, errmsg: str) -> None: ...
    def cancelled(self) -> None: ...
    def domain_moved(self, uri: str) -> None: ...


async def _child(path: Path, uri: str) -> None:
    from drivers.sim import SimDriver
    from jobcore.driver import DriverJob
    from jobcore.testing import prepare_job
    from jobcore.uri import parse_uri

    async with (
        anyio.create_task_group() as tg,
        SimDriver().connect(parse_uri(uri), tg, FileState(path)) as conn,
    ):
        spec = prepare_job(BACKUP_XML, await conn.lookup_domain("vm1"), wall=WALL)
        job = DriverJob(spec.uuid, spec.TYPE, "vm1", spec, SilentReporter())
        await conn.start(job)
        sys.stdout.write("started\n")
        sys.stdout.flush()
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(_child, Path(sys.argv[1]), sys.argv[2])
