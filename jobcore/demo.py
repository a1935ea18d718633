"""``make demo``: a backup and a block pull of one domain in parallel, with progress; a
conflicting job refused with its message; final stats. ``--uri`` picks the driver.

    python -m jobcore.demo [--uri sim:///default] [--rate BYTES_PER_S]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import jobcore
from jobcore.events import EventKind

BACKUP_XML = """<job type='backup'>
  <domainbackup mode='push'>
    <disks>
      <disk name='vdb' type='file'><target file='/var/lib/sim/backups/vm1-vdb.qcow2'/></disk>
    </disks>
  </domainbackup>
</job>"""

PULL_XML = """<job type='blockpull'>
  <disk name='vda'/>
  <bandwidth unit='MiB/s'>200</bandwidth>
</job>"""

CONFLICT_XML = """<job type='blockcommit'>
  <disk name='vda'/>
  <top index='1'/>
  <base index='2'/>
</job>"""


async def run(uri: str, console: Console) -> int:
    async with jobcore.connect(uri) as conn:
        dom = await conn.lookup_domain("vm1")
        console.print(f"[bold]jobcore demo[/] on [cyan]{uri}[/], domain [cyan]{dom.name}[/]")
        with conn.subscribe(domain=dom.name) as events:
            backup = await dom.job_begin(BACKUP_XML)
            console.print(f"began backup     {backup.uuid}  ({(await backup.info())['state']})")
            pull = await dom.job_begin(PULL_XML)
            console.print(f"began block pull {pull.uuid}  ({(await pull.info())['state']})")
            try:
                await dom.job_begin(CONFLICT_XML)
            except jobcore.JobConflict as exc:
                console.print(f"[yellow]refused[/] block commit of vda: {exc}")
            finals: dict[Any, dict[str, Any]] = {}
            columns = (
                TextColumn("{task.description:<28}"),
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
                async for ev in events:
                    bar = bars.get(ev.job)
                    if bar is None:
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
        table = Table(title="final stats (libvirt keys)")
        table.add_column("key")
        for job in (backup, pull):
            table.add_column(f"{job.type} {str(job.uuid)[:8]}")
        keys = sorted({k for st in finals.values() for k in st})
        for key in keys:
            table.add_row(key, *(str(finals.get(j.uuid, {}).get(key, "")) for j in (backup, pull)))
        console.print(table)
        ok = all(st.get("success") for st in finals.values())
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--uri", default="sim:///default")
    args = parser.parse_args(argv)
    return anyio.run(run, args.uri, Console())


if __name__ == "__main__":
    sys.exit(main())
