"""``make demo``: a backup and a block pull of one domain running in parallel, with
progress; a conflicting job refused with its message; final stats.

    python -m jobcore.demo                 # on sim:///default (embedded, ~4 s)
    python -m jobcore.demo --qemu          # on qemu:///session: real QEMU, real qcow2 images
    python -m jobcore.demo --uri URI       # any driver whose domain vm1 has vda (3 layers), vdb
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import jobcore
from jobcore.api import Connection, Domain
from jobcore.events import EventKind

MiB = 1 << 20


def backup_xml(target: str) -> str:
    return f"""<job type='backup'>
  <domainbackup mode='push'>
    <disks>
      <disk name='vdb' type='file'><target file='{target}'/></disk>
    </disks>
  </domainbackup>
</job>"""


def pull_xml(mib_per_s: int) -> str:
    return f"""<job type='blockpull'>
  <disk name='vda'/>
  <bandwidth unit='MiB/s'>{mib_per_s}</bandwidth>
</job>"""


CONFLICT_XML = """<job type='blockcommit'>
  <disk name='vda'/>
  <top index='1'/>
  <base index='2'/>
</job>"""


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _qemu_io(image: Path, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True
    )


def make_qemu_images(work: Path, console: Console) -> dict[str, Path]:
    """vda: base <- mid <- top (256 MiB, data in every layer); vdb: 256 MiB, no backing."""
    console.print(f"creating qcow2 images in {work}")
    base, mid, top, vdb = (
        work / n for n in ("vda-base.qcow2", "vda-mid.qcow2", "vda.qcow2", "vdb.qcow2")
    )
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "256M")
    _qemu_io(base, "write -P 0x11 0 192M")
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(mid))
    _qemu_io(mid, "write -P 0x22 64M 96M")
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(mid), str(top))
    _qemu_io(top, "write -P 0x33 128M 32M")
    _qemu_img("create", "-q", "-f", "qcow2", str(vdb), "256M")
    _qemu_io(vdb, "write -P 0x44 0 256M")
    return {"vda": top, "vdb": vdb}


def domain_xml(name: str, disks: dict[str, Path]) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{dev}'/></disk>"
        for dev, path in disks.items()
    )
    return (
        f"<domain><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<devices>{devices}</devices></domain>"
    )


async def scenario(
    conn: Connection, dom: Domain, target: str, pull_rate: int, console: Console
) -> int:
    console.print(f"[bold]jobcore demo[/] on [cyan]{conn.uri}[/], domain [cyan]{dom.name}[/]")
    with conn.subscribe(domain=dom.name) as events:
        backup = await dom.job_begin(backup_xml(target))
        console.print(f"began backup of vdb  {backup.uuid}  ({(await backup.info())['state']})")
        pull = await dom.job_begin(pull_xml(pull_rate))
        console.print(f"began pull of vda    {pull.uuid}  ({(await pull.info())['state']})")
        try:
            await dom.job_begin(CONFLICT_XML)
        except jobcore.JobConflict as exc:
            console.print(f"[yellow]refused[/] a block commit of vda: {exc}")
        finals: dict[Any, dict[str, Any]] = {}
        columns = (
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bars: dict[Any, TaskID] = {
                job.uuid: progress.add_task(
                    f"{job.type} {str(job.uuid)[:8]}", total=1, state="running"
                )
                for job in (backup, pull)
            }
            for job in (backup, pull):  # a job may have ended before we listened
                if job.state.terminal:
                    finals[job.uuid] = await job.stats()
            async for ev in events:
                bar = bars.get(ev.job)
                if bar is None or ev.job in finals:
                    continue
                if ev.total:
                    progress.update(bar, total=ev.total, completed=ev.processed)
                progress.update(bar, state=str(ev.state))
                if ev.kind is EventKind.FINAL and ev.stats is not None:
                    if ev.state is jobcore.JobState.COMPLETED:
                        progress.update(bar, completed=progress.tasks[bar].total)
                    finals[ev.job] = dict(ev.stats)
                if len(finals) == len(bars):
                    break
    table = Table(title="final stats (libvirt's keys)")
    table.add_column("key")
    for job in (backup, pull):
        table.add_column(f"{job.type} {str(job.uuid)[:8]}", overflow="fold")  # whole UUIDs
    for key in sorted({k for st in finals.values() for k in st}):
        table.add_row(key, *(str(finals.get(j.uuid, {}).get(key, "")) for j in (backup, pull)))
    console.print(table)
    chain = (await dom.info()).disk("vda")
    if chain is not None:
        console.print(f"vda's backing chain after the pull: {list(chain.chain)}")
    return 0 if all(st.get("success") for st in finals.values()) else 1


async def run(uri: str, qemu: bool, console: Console) -> int:
    if not qemu:
        async with jobcore.connect(uri) as conn:
            dom = await conn.lookup_domain("vm1")
            return await scenario(conn, dom, "/var/lib/sim/backups/vm1-vdb.qcow2", 200, console)
    with tempfile.TemporaryDirectory(prefix="jobcore-demo-") as tmp:
        work = Path(tmp)
        disks = await anyio.to_thread.run_sync(make_qemu_images, work, console)
        # a 256 MiB backup at 64 MiB/s and a pull at 48 MiB/s: a few seconds to watch
        uri = f"qemu:///session?dir={work / 'run'}&backup_bandwidth={64 * MiB}"
        async with jobcore.connect(uri) as conn:
            dom = await conn.create_domain(domain_xml("vm1", disks))
            try:
                return await scenario(conn, dom, str(work / "vdb-backup.qcow2"), 48, console)
            finally:
                await dom.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="jobcore demo: parallel jobs on one domain")
    parser.add_argument("--uri", default="sim:///default")
    parser.add_argument(
        "--qemu",
        action="store_true",
        help="run on real QEMU (qemu:///session) with fresh qcow2 images",
    )
    args = parser.parse_args(argv)
    return anyio.run(run, args.uri, args.qemu, Console())


if __name__ == "__main__":
    sys.exit(main())
