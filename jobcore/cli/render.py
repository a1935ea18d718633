"""What jobctl prints: virsh-style sizes and layouts, tables, event lines, JSON.

rich is imported only where a terminal gets a rich table or bar (``terminal_console``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click

from jobcore import constants as C
from jobcore.cli.plain import (
    job_lines,
    rich_jobs_table,
    terminal_console,
)
from jobcore.events import EventKind, JobEvent
from jobcore.info import HostInfo, HostState, JobInfo

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
JOB_TYPE_NAMES = ("None", "Bounded", "Unbounded", "Completed", "Failed", "Cancelled")
OPERATION_NAMES = (
    "Unknown",
    "Start",
    "Save",
    "Restore",
    "Incoming migration",
    "Outgoing migration",
    "Snapshot",
    "Snapshot revert",
    "Dump",
    "Backup",
    "Snapshot delete",
)


def print_json(value: Any) -> None:
    """``value`` as one line of JSON on stdout."""
    click.echo(json.dumps(value, indent=None, sort_keys=False, default=str))


def show(as_json: bool, value: Any, lines: Iterable[str]) -> None:
    """``value`` as JSON, or ``lines`` one by one."""
    if as_json:
        print_json(value)
        return
    for line in lines:
        click.echo(line)


def note(message: str) -> None:
    """``jobctl: MESSAGE`` on stderr (not an error: the command goes on)."""
    click.echo(f"jobctl: {message}", err=True)


def capacity(value: float) -> str:
    """Bytes the way virsh prints them: ``331.000 MiB``."""
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.3f} {_UNITS[unit]}"


def domjobinfo_lines(stats: dict[str, Any]) -> Iterator[str]:
    """virsh ``domjobinfo`` layout of libvirt-named stats: labels padded to 17."""

    def line(label: str, value: str) -> str:
        return f"{label:<17} {value}"

    kind = stats.get("type", C.VIR_DOMAIN_JOB_NONE)
    yield line("Job type:", JOB_TYPE_NAMES[kind] if 0 <= kind < len(JOB_TYPE_NAMES) else str(kind))
    if kind == C.VIR_DOMAIN_JOB_NONE:
        return
    op = stats.get("operation", 0)
    yield line("Operation:", OPERATION_NAMES[op] if 0 <= op < len(OPERATION_NAMES) else str(op))
    ms = [
        ("time_elapsed", "Time elapsed:"),
        ("time_elapsed_net", "Time elapsed w/o network:"),
        ("time_remaining", "Time remaining:"),
    ]
    for key, label in ms:
        if key in stats:
            yield line(label, f"{stats[key]:<12} ms")
    for prefix, name in (("data", "Data"), ("memory", "Memory")):
        for part in ("processed", "remaining", "total"):
            if f"{prefix}_{part}" in stats:
                yield line(f"{name} {part}:", capacity(stats[f"{prefix}_{part}"]))
    if "memory_bps" in stats:
        yield line("Memory bandwidth:", f"{capacity(stats['memory_bps'])}/s")
    for key, label, suffix in (
        ("memory_dirty_rate", "Dirty rate:", " pages/s"),
        ("memory_page_size", "Page size:", " bytes"),
        ("memory_iteration", "Iteration:", ""),
        ("memory_postcopy_requests", "Postcopy requests:", ""),
        ("memory_constant", "Constant pages:", ""),
        ("memory_normal", "Normal pages:", ""),
    ):
        if key in stats:
            yield line(label, f"{stats[key]:<12}{suffix}".rstrip())
    if "memory_normal_bytes" in stats:
        yield line("Normal data:", capacity(stats["memory_normal_bytes"]))
    if "downtime" in stats:
        label = "Total downtime:" if kind == C.VIR_DOMAIN_JOB_COMPLETED else "Expected downtime:"
        yield line(label, f"{stats['downtime']:<12} ms")
    if "setup_time" in stats:
        yield line("Setup time:", f"{stats['setup_time']:<12} ms")
    for part in ("processed", "remaining", "total"):
        if f"disk_{part}" in stats:
            yield line(f"File {part}:", capacity(stats[f"disk_{part}"]))
    if "disk_bps" in stats:
        yield line("File bandwidth:", f"{capacity(stats['disk_bps'])}/s")
    if "disk_temp_used" in stats:
        yield line("Temporary disk space use:", capacity(stats["disk_temp_used"]))
    if "disk_temp_total" in stats:
        yield line("Temporary disk space total:", capacity(stats["disk_temp_total"]))
    if stats.get("errmsg"):
        yield line("Error message:", str(stats["errmsg"]))


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def info_lines(info: JobInfo) -> Iterator[str]:
    """``jobctl info JOB``: one labelled line per field."""
    rows = [
        ("UUID:", str(info.uuid)),
        ("Type:", str(info.type)),
        ("Domain:", info.domain),
        ("Host:", info.host + (" (not live: stopped or lease expired)" if info.host_lost else "")),
        ("State:", str(info.state)),
        (
            "Progress:",
            f"{info.progress:.1f} % ({capacity(info.processed)} of {capacity(info.total)})",
        ),
        ("Time elapsed:", f"{info.time_elapsed} ms"),
        ("Created:", _when(info.created)),
        ("Started:", _when(info.started)),
        ("Ended:", _when(info.ended)),
    ]
    if info.bandwidth:
        rows.append(("Bandwidth:", f"{capacity(info.bandwidth)}/s"))
    if info.errmsg:
        rows.append(("Error:", info.errmsg))
    for label, value in rows:
        yield f"{label:<14} {value}"


def stats_lines(stats: dict[str, Any]) -> Iterator[str]:
    """``jobctl stats JOB``: ``key: value`` lines."""
    for key, value in stats.items():
        yield f"{key + ':':<20} {value}"


def jobs_table(infos: Sequence[JobInfo], *, fleet: bool = False) -> None:
    """``jobctl list``: a rich table on a terminal (UUIDs never cut), else fixed columns.
    ``fleet`` (``list --fleet``): the Lost column (LOST: an active job whose host is not
    live; its state is the last its host wrote) instead of the elapsed time."""
    out = terminal_console()
    if out is None:
        for text in job_lines(infos, fleet):
            click.echo(text)
        return
    rich_jobs_table(out, infos, fleet)


def hosts_table(hosts: Sequence[HostInfo]) -> None:
    """``jobctl hosts``: one row per member; Fenced (by whom, why) when one is fenced."""
    fenced = any(h.state is HostState.FENCED for h in hosts)
    cols = ["Name", "State", "Lease", "TTL", "Active", "Jobs", "PID"]
    if fenced:
        cols.append("Fenced")

    def row(h: HostInfo) -> list[str]:
        cells = [h.name, str(h.state), f"{h.lease_age:.1f}s", f"{h.lease_ttl:g}s"]
        cells += [str(h.active_jobs), str(h.jobs), str(h.pid)]
        if fenced:
            cells.append(fence_text(h) if h.state is HostState.FENCED else "-")
        return cells

    out = terminal_console()
    if out is not None:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
        for col in cols:
            table.add_column(col, justify="right" if col in _NUMERIC else "left")
        for h in hosts:
            table.add_row(*row(h), style=None if h.state is HostState.LIVE else "bold")
        out.print(table)
        return
    for cells in [cols, *(row(h) for h in hosts)]:
        click.echo(
            " ".join(
                f"{c:>{_HOST_WIDTHS[col]}}" if col in _NUMERIC else f"{c:<{_HOST_WIDTHS[col]}}"
                for col, c in zip(cols, cells, strict=True)
            ).rstrip()
        )


_NUMERIC = ("Lease", "TTL", "Active", "Jobs", "PID")
_HOST_WIDTHS = {"Name": 12, "State": 8, "Lease": 8, "TTL": 6, "Active": 6, "Jobs": 6}
_HOST_WIDTHS |= {"PID": 8, "Fenced": 0}


def fence_text(h: HostInfo) -> str:
    """``by M: REASON`` of a fenced host (``by M`` when no reason was given)."""
    text = f"by {h.fenced_by or '?'}"
    return text + (f": {h.fence_reason}" if h.fence_reason else "")


def domain_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """``jobctl domains``: a header, then a line per domain row (as ``--json`` has them)."""
    yield f"{'Name':<12} {'UUID':<36} {'State':<8} {'Memory':>12}  {'Jobs':>4}  Disks"
    for r in rows:
        yield (
            f"{r['name']:<12} {r['uuid']:<36} "
            f"{'running' if r['running'] else 'shut off':<8} "
            f"{capacity(r['memory']):>12}  {r['active_jobs']:>4}  "
            + ", ".join(d["name"] for d in r["disks"])
        )


def event_json(ev: JobEvent) -> dict[str, Any]:
    """``jobctl events --json``: one object per event."""
    return {
        "kind": str(ev.kind),
        "uuid": str(ev.job),
        "type": ev.type,
        "domain": ev.domain,
        "state": str(ev.state),
        "previous": None if ev.previous is None else str(ev.previous),
        "processed": ev.processed,
        "total": ev.total,
        "timestamp": ev.timestamp,
        "stats": None if ev.stats is None else dict(ev.stats),
        "lost_before": ev.lost_before,
        "seq": ev.seq,
    }


def event_line(ev: JobEvent) -> str:
    """``jobctl events``: one line per event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
    head = f"{stamp} {ev.domain} {ev.job} {ev.type:<11}"
    lost = f" ({ev.lost_before} events lost before)" if ev.lost_before else ""
    if ev.kind is EventKind.PROGRESS:
        pct = 100.0 * ev.processed / ev.total if ev.total else 0.0
        return f"{head} progress {pct:5.1f}% {capacity(ev.processed)}/{capacity(ev.total)}{lost}"
    if ev.kind is EventKind.FINAL:
        err = (ev.stats or {}).get("errmsg")
        return f"{head} final {ev.state}" + (f": {err}" if err else "") + lost
    if ev.kind is EventKind.HOST_LOST:
        return f"{head} host-lost {ev.state} (its host's lease expired){lost}"
    if ev.kind is EventKind.PREEMPTED:
        st = ev.stats or {}
        return f"{head} preempted by {st.get('preempted_by')} ({st.get('preempt')}){lost}"
    prev = "-" if ev.previous is None else str(ev.previous)
    return f"{head} state {prev} -> {ev.state}{lost}"


def report_final(info: JobInfo) -> None:
    """``UUID STATE[: error]`` on stderr: how a waited-for job ended."""
    msg = f"{info.uuid} {info.state}"
    if info.errmsg:
        msg += f": {info.errmsg}"
    click.echo(msg, err=True)
