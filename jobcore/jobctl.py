"""jobctl: the jobcore command line (design/daemon.md, README "Tour: jobd and jobctl").

``-c URI`` (or ``$JOBCORE_URI``) picks the connection; by default the local jobd's socket
in the default run directory when a daemon answers there, else the embedded
``sim:///default`` (where jobs live only as long as the command, so ``begin`` waits).

JOB arguments take a job UUID or a unique prefix of one (at least 4 hex digits).
Every read command takes ``--json``. Exit status: see ``ExitCode``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import anyio
import click
from attrs import frozen
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

import jobcore
from jobcore import constants as C
from jobcore.api import Connection, Domain, Job
from jobcore.daemon.main import daemon_options, start_from_options
from jobcore.errors import (
    InvalidURI,
    JobConflict,
    JobError,
    NoSuchDomain,
    NoSuchJob,
)
from jobcore.events import EventKind, JobEvent
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState
from jobcore.protocol import RW_SOCKET, AccessDenied, DaemonUnreachable, default_run_dir
from jobcore.uri import parse_uri
from jobcore.xml._parse import MAX_DOCUMENT_BYTES

EMBEDDED_URI = "sim:///default"


class ExitCode(enum.IntEnum):
    """jobctl's exit status (documented in design/daemon.md)."""

    OK = 0
    ERROR = 1  # any other refusal or failure
    USAGE = 2  # bad command line, URI, JOB argument (click's own usage errors too)
    JOB_FAILED = 3  # the job waited for ended in 'failed'
    JOB_CANCELLED = 4  # the job waited for ended in 'cancelled'
    CONFLICT = 5  # JobBegin refused: another job holds a resource (JobConflict)
    UNREACHABLE = 6  # no jobd answers at the socket, or the connection was lost
    NOT_FOUND = 7  # no such domain or job
    DENIED = 8  # read-only socket, or uid not allowed
    DAEMON_RUNNING = 9  # `jobctl daemon`: another jobd serves the run directory
    TIMEOUT = 10  # `wait --timeout` / `begin --wait --timeout` expired
    INTERRUPTED = 130  # Ctrl-C
    BROKEN_PIPE = 141  # stdout closed early (`jobctl list | head`): 128 + SIGPIPE, quietly


class Refusal(Exception):
    """Ends the command with a one-line message on stderr and an exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        self.code = code
        super().__init__(message)


def _classify(exc: BaseException) -> tuple[ExitCode, str]:
    for cls, code in (
        (Refusal, None),
        (JobConflict, ExitCode.CONFLICT),
        (DaemonUnreachable, ExitCode.UNREACHABLE),
        (NoSuchDomain, ExitCode.NOT_FOUND),
        (NoSuchJob, ExitCode.NOT_FOUND),
        (AccessDenied, ExitCode.DENIED),
        (InvalidURI, ExitCode.USAGE),
        (TimeoutError, ExitCode.TIMEOUT),
        (JobError, ExitCode.ERROR),
    ):
        if isinstance(exc, cls):
            if isinstance(exc, Refusal):
                return exc.code, str(exc)
            assert code is not None
            return code, str(exc) or type(exc).__name__
    return ExitCode.ERROR, f"{type(exc).__name__}: {exc}"


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups from task groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner: list[BaseException] = list(exc.exceptions)
        real = [e for e in inner if isinstance(e, Exception)]
        exc = (real or inner)[0]
    return exc


@frozen
class Ctx:
    uri: str
    embedded: bool
    out: Console
    err: Console


def _daemon_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def default_uri() -> str:
    """The local daemon's URI if one answers in the default run directory, else the
    embedded simulator."""
    path = default_run_dir() / RW_SOCKET
    return f"sim+unix:///default?socket={path}" if _daemon_answers(path) else EMBEDDED_URI


def run(ctx: Ctx, body: Callable[[Connection], Awaitable[int | None]]) -> NoReturn:
    """Open the connection, run ``body``, exit with its status (or the error's)."""

    async def main() -> int | None:
        async with jobcore.connect(ctx.uri) as conn:
            return await body(conn)

    try:
        code = anyio.run(main)
    except KeyboardInterrupt:
        _exit(ExitCode.INTERRUPTED)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, SystemExit | KeyboardInterrupt):
            raise leaf from None
        if isinstance(leaf, BrokenPipeError):  # socket errors arrive as ConnectionLost
            _broken_pipe()
        status, message = _classify(leaf)
        if status is ExitCode.UNREACHABLE and "cannot reach" in message:
            message += " (is jobd running? start it with 'jobctl daemon')"
        _exit(status, f"jobctl: error: {message}")
    _exit(code or 0)


def _exit(status: int, message: str | None = None) -> NoReturn:
    """Exit with ``status`` after flushing stdout (a reader that went away is not an
    error worth a traceback: exit BROKEN_PIPE quietly, as a killed-by-SIGPIPE tool would)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _broken_pipe()
    if message is not None:
        click.echo(message, err=True)
    sys.exit(status)


def _read_xml(file: Any, root: str) -> bytes:
    """At most the XML size limit of ``file`` (plus one byte, to tell a file over the
    limit, which is refused here: /dev/zero or an endless pipe never fills memory)."""
    data: bytes = file.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        _exit(
            ExitCode.ERROR,
            f"jobctl: error: {file.name}: <{root}> document refused: it is larger than the "
            f"limit of {MAX_DOCUMENT_BYTES} bytes (1 MiB)",
        )
    return data


def _timeout_option(_ctx: click.Context, _param: click.Parameter, value: float | None) -> Any:
    if value is not None and (math.isnan(value) or value < 0):
        raise click.BadParameter(f"{value} is not a number of seconds >= 0")
    return value


def _broken_pipe() -> NoReturn:
    with open(os.devnull, "wb") as null:  # nothing left to flush at interpreter exit
        os.dup2(null.fileno(), sys.stdout.fileno())
    sys.exit(ExitCode.BROKEN_PIPE)


def _json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=False, default=str))


# ---- formatting -------------------------------------------------------------------------

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
    rows = [
        ("UUID:", str(info.uuid)),
        ("Type:", str(info.type)),
        ("Domain:", info.domain),
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


def event_json(ev: JobEvent) -> dict[str, Any]:
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
    }


def event_line(ev: JobEvent) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.timestamp))
    head = f"{stamp} {ev.domain} {ev.job} {ev.type:<11}"
    lost = f" ({ev.lost_before} events lost before)" if ev.lost_before else ""
    if ev.kind is EventKind.PROGRESS:
        pct = 100.0 * ev.processed / ev.total if ev.total else 0.0
        return f"{head} progress {pct:5.1f}% {capacity(ev.processed)}/{capacity(ev.total)}{lost}"
    if ev.kind is EventKind.FINAL:
        err = (ev.stats or {}).get("errmsg")
        return f"{head} final {ev.state}" + (f": {err}" if err else "") + lost
    prev = "-" if ev.previous is None else str(ev.previous)
    return f"{head} state {prev} -> {ev.state}{lost}"


def _exit_for(info: JobInfo) -> ExitCode:
    if info.state is JobState.FAILED:
        return ExitCode.JOB_FAILED
    if info.state is JobState.CANCELLED:
        return ExitCode.JOB_CANCELLED
    return ExitCode.OK


# ---- resolving arguments ----------------------------------------------------------------


#: Matching UUIDs an ambiguous prefix's error lists.
_PREFIX_SHOWN = 3


async def resolve_job(conn: Connection, text: str) -> Job:
    """A job from its UUID, or from a unique prefix of one (any domain's)."""
    try:
        return await conn.lookup_job(uuid.UUID(text))
    except ValueError:
        pass
    prefix = text.lower().replace("-", "")
    if len(prefix) < 4 or any(ch not in "0123456789abcdef" for ch in prefix):
        raise Refusal(ExitCode.USAGE, f"'{text}' is not a job UUID (or a prefix of 4+ hex digits)")
    found = await conn.find_jobs(prefix, limit=_PREFIX_SHOWN + 1)  # the store's UUID index
    if not found:
        raise NoSuchJob(f"no job with a UUID starting with '{text}'")
    if len(found) > 1:
        shown = ", ".join(str(j.uuid) for j in found[:_PREFIX_SHOWN])
        more = " and more" if len(found) > _PREFIX_SHOWN else ""
        raise Refusal(
            ExitCode.USAGE, f"'{text}' matches several jobs ({shown}{more}): use more digits"
        )
    return found[0]


# ---- waiting with progress ----------------------------------------------------------------


async def follow(
    ctx: Ctx, conn: Connection, job: Job, timeout: float | None, quiet: bool = False
) -> JobInfo:
    """Wait for ``job`` to end, showing live progress (a rich bar on a terminal, plain
    lines otherwise, nothing when ``quiet``); its final info."""
    final: JobInfo | None = None
    with conn.subscribe(job=job.uuid, maxlen=256) as events:
        info = await job.info()
        if info.state.terminal:
            return info

        async def waiter(scope: anyio.CancelScope) -> None:
            nonlocal final
            with contextlib.suppress(TimeoutError):  # reported below, with the state
                final = await job.wait(timeout)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, tg.cancel_scope)
            if not quiet:
                if ctx.err.is_terminal:
                    await _bar(ctx, job, info, events)
                else:
                    await _lines(job, info, events)
    if final is None:
        state = (await job.info()).state
        raise Refusal(
            ExitCode.TIMEOUT,
            f"job {job.uuid} did not end within {timeout or 0:g} s (state: {state})",
        )
    return final


async def _next(events: jobcore.Subscription) -> JobEvent | None:
    with anyio.move_on_after(1.0):
        try:
            return await events.get()
        except anyio.EndOfStream:  # the connection is gone: the waiter reports why
            await anyio.sleep_forever()
    return None


async def _bar(ctx: Ctx, job: Job, info: JobInfo, events: jobcore.Subscription) -> None:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=ctx.err, transient=False) as progress:
        task = progress.add_task(
            f"{job.type} {str(job.uuid)[:8]}",
            total=info.total or None,
            completed=info.processed,
            state=str(info.state),
        )
        while True:
            ev = await _next(events)
            if ev is None:
                info = await job.info()
                progress.update(
                    task, total=info.total or None, completed=info.processed, state=str(info.state)
                )
            elif ev.kind is EventKind.FINAL:
                progress.update(
                    task,
                    total=ev.total or 1,
                    completed=ev.total or 1 if ev.state is JobState.COMPLETED else ev.processed,
                    state=str(ev.state),
                )
                await anyio.sleep_forever()  # the waiter ends us
            else:
                progress.update(
                    task, total=ev.total or None, completed=ev.processed, state=str(ev.state)
                )


async def _lines(job: Job, info: JobInfo, events: jobcore.Subscription) -> None:
    state, last = info.state, 0.0

    def show(text: str) -> None:
        click.echo(f"{job.uuid} {text}", err=True)

    show(f"{state} {info.progress:5.1f}%")
    while True:
        ev = await _next(events)
        if ev is None or ev.kind is EventKind.FINAL:
            continue
        pct = 100.0 * ev.processed / ev.total if ev.total else 0.0
        if ev.state is not state:
            state = ev.state
            show(f"{state} {pct:5.1f}%")
        elif time.monotonic() - last >= 1.0:
            last = time.monotonic()
            show(f"{state} {pct:5.1f}% {capacity(ev.processed)}/{capacity(ev.total)}")


# ---- bandwidth arguments -----------------------------------------------------------------

#: libvirt's scaled-integer suffixes (virScaleInteger): a bare letter or ``XiB`` is a power of
#: 1024, ``XB`` a power of 1000; ``/s`` may follow.
_SCALE = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_BANDWIDTH = re.compile(r"(?P<n>\d+)\s*(?P<unit>(?P<p>[kmgtpe])(?P<base>i?b)?|b)?(?:/s)?", re.I)
MAX_BANDWIDTH = (1 << 63) - 1


def parse_bandwidth(text: str) -> int:
    """Bytes per second from ``1048576``, ``100MiB``, ``100M``, ``1GB/s``, … (0: unlimited)."""
    m = _BANDWIDTH.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"'{text}' is not a bandwidth: give bytes/s (e.g. 1048576) or an integer with a "
            "unit: B, KiB, MiB, GiB, TiB, PiB, EiB (or K, M, G, … the same), "
            "KB, MB, GB, TB, PB, EB (powers of 1000); '/s' may follow"
        )
    base = 1000 if (m["base"] or "").lower() == "b" else 1024
    value: int = int(m["n"]) * pow(base, _SCALE[(m["p"] or "").lower()])
    if value > MAX_BANDWIDTH:
        raise ValueError(f"'{text}' is too large (at most {MAX_BANDWIDTH} bytes/s)")
    return value


def _bandwidth_arg(click_ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_bandwidth(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), click_ctx, param) from None


# ---- shell completion -------------------------------------------------------------------


def _completions(
    click_ctx: click.Context, fetch: Callable[[Connection], Awaitable[list[str]]]
) -> list[str]:
    """Names ``fetch`` gets from the command line's connection within 3 s; nothing on any
    error (completion must never print or hang)."""
    uri = click_ctx.find_root().params.get("uri") or default_uri()

    async def main() -> list[str]:
        with anyio.move_on_after(3.0):
            async with jobcore.connect(uri) as conn:
                return await fetch(conn)
        return []

    try:
        return anyio.run(main)
    except BaseException:
        return []


async def _domain_names(conn: Connection) -> list[str]:
    return [d.name for d in await conn.list_domains()]


async def _job_ids(conn: Connection) -> list[str]:
    ids: list[str] = []
    for dom in await conn.list_domains():
        ids += [str(j.uuid) for j in await dom.list_jobs()]
    return ids


def complete_domain(
    click_ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    names = _completions(click_ctx, _domain_names)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_job(
    click_ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    fetch = _domain_names if click_ctx.params.get("legacy") else _job_ids
    names = _completions(click_ctx, fetch)
    return [CompletionItem(n) for n in names if n.startswith(incomplete.lower())]


# ---- commands ---------------------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--connect",
    "uri",
    envvar="JOBCORE_URI",
    metavar="URI",
    help="Connection URI, e.g. sim+unix:///default?socket=DIR/jobd.sock "
    "[env JOBCORE_URI; default: the local jobd if running, else the "
    "embedded sim:///default].",
)
@click.version_option(package_name="jobcore", prog_name="jobctl")
@click.pass_context
def main(click_ctx: click.Context, uri: str | None) -> None:
    """jobctl: begin, watch and steer jobcore jobs.

    \b
    Exit status: 0 success, 1 error, 2 usage, 3 job failed, 4 job cancelled,
    5 conflict, 6 daemon unreachable, 7 no such domain/job, 8 access denied,
    9 daemon already running, 10 timeout, 141 stdout closed (e.g. by head).

    \b
    Shell completion (domains and job UUIDs come from the connection):
      bash: eval "$(_JOBCTL_COMPLETE=bash_source jobctl)"   in ~/.bashrc
      zsh:  eval "$(_JOBCTL_COMPLETE=zsh_source jobctl)"    in ~/.zshrc
      fish: _JOBCTL_COMPLETE=fish_source jobctl | source    in config.fish
    """
    if click_ctx.invoked_subcommand == "daemon":
        return
    resolved = uri or default_uri()
    try:
        embedded = parse_uri(resolved).transport is None
    except InvalidURI as exc:
        raise click.BadParameter(str(exc), param_hint="-c/--connect") from None
    click_ctx.obj = Ctx(
        resolved, embedded, Console(highlight=False), Console(stderr=True, highlight=False)
    )


def _ctx() -> Ctx:
    obj = click.get_current_context().find_object(Ctx)
    assert obj is not None
    return obj


@main.command()
@daemon_options
def daemon(**options: Any) -> None:
    """Run jobd (same as the jobd command; in the foreground unless --daemon)."""
    sys.exit(start_from_options(**options))


@main.command()
@json_option
def domains(as_json: bool) -> None:
    """List the domains of the connection."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        rows: list[dict[str, Any]] = []
        for dom in await conn.list_domains():
            info = await dom.info()
            jobs = await dom.list_jobs()
            rows.append(
                {
                    "name": dom.name,
                    "uuid": str(dom.uuid),
                    "running": info.running,
                    "memory": info.memory,
                    "disks": [
                        {
                            "name": d.name,
                            "chain": list(d.chain),
                            "format": d.format,
                            "virtual_size": d.virtual_size,
                        }
                        for d in info.disks
                    ],
                    "active_jobs": sum(1 for j in jobs if j.state.active),
                }
            )
        if as_json:
            _json(rows)
            return
        click.echo(f"{'Name':<12} {'UUID':<36} {'State':<8} {'Memory':>12}  {'Jobs':>4}  Disks")
        for r in rows:
            click.echo(
                f"{r['name']:<12} {r['uuid']:<36} "
                f"{'running' if r['running'] else 'shut off':<8} "
                f"{capacity(r['memory']):>12}  {r['active_jobs']:>4}  "
                + ", ".join(d["name"] for d in r["disks"])
            )

    run(ctx, body)


@main.command()
@click.argument("domain", shell_complete=complete_domain)
@click.argument("file", type=click.File("rb"))
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end, with progress.")
@click.option(
    "--timeout",
    type=float,
    callback=_timeout_option,
    help="With --wait: give up after this many seconds.",
)
@click.option("--queue", is_flag=True, help="Queue behind conflicting jobs instead of failing.")
@click.option(
    "--reuse-external",
    is_flag=True,
    help="Backup: write into existing target and scratch files (their format and size must "
    "fit) instead of refusing them (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL).",
)
def begin(
    domain: str, file: Any, wait_: bool, timeout: float | None, queue: bool, reuse_external: bool
) -> None:
    """Begin the job described by the job XML in FILE ('-' reads stdin) on DOMAIN and print
    its UUID."""
    ctx = _ctx()
    xml = _read_xml(file, "job")

    async def body(conn: Connection) -> int:
        dom: Domain = await conn.lookup_domain(domain)
        flags = (C.JOB_BEGIN_QUEUE if queue else 0) | (
            C.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse_external else 0
        )
        job = await dom.job_begin(xml, flags)
        click.echo(str(job.uuid))
        if not (wait_ or ctx.embedded):
            return ExitCode.OK
        if ctx.embedded and not wait_:
            click.echo(
                f"jobctl: no jobd: the job runs on the embedded {EMBEDDED_URI} and "
                "lives only as long as this command, so waiting for it",
                err=True,
            )
        final = await follow(ctx, conn, job, timeout)
        _report_final(final)
        return _exit_for(final)

    run(ctx, body)


def _report_final(info: JobInfo) -> None:
    msg = f"{info.uuid} {info.state}"
    if info.errmsg:
        msg += f": {info.errmsg}"
    click.echo(msg, err=True)


@main.command(name="list")
@click.option("--domain", "-d", shell_complete=complete_domain, help="Only this domain's jobs.")
@click.option("--all", "-a", "show_all", is_flag=True, help="Also ended jobs still retained.")
@json_option
def list_(domain: str | None, show_all: bool, as_json: bool) -> None:
    """List active jobs (with --all also retained ended ones)."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        doms = [await conn.lookup_domain(domain)] if domain else await conn.list_domains()
        infos: list[JobInfo] = []
        for dom in doms:
            for job in await dom.list_jobs():
                info = await job.info()
                if show_all or info.state.active:
                    infos.append(info)
        if as_json:
            _json([i.as_dict() for i in infos])
            return
        if not infos:
            click.echo(
                "no jobs" + ("" if show_all else " active (--all shows ended ones)"), err=True
            )
            return
        if ctx.out.is_terminal:
            table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
            table.add_column("UUID", no_wrap=True, min_width=36, overflow="fold")  # never cut
            for col in ("Domain", "Type", "State", "Progress", "Elapsed"):
                table.add_column(col, justify="right" if col in ("Progress", "Elapsed") else "left")
            for i in infos:
                table.add_row(
                    str(i.uuid),
                    i.domain,
                    str(i.type),
                    str(i.state),
                    f"{i.progress:.1f}%",
                    f"{i.time_elapsed / 1000:.1f}s",
                )
            ctx.out.print(table)
            return
        click.echo(
            f"{'UUID':<36} {'Domain':<10} {'Type':<11} {'State':<10} {'Progress':>8} {'Elapsed':>9}"
        )
        for i in infos:
            click.echo(
                f"{i.uuid!s:<36} {i.domain:<10} {i.type:<11} {i.state:<10} "
                f"{i.progress:>7.1f}% {i.time_elapsed / 1000:>8.1f}s"
            )

    run(ctx, body)


@main.command()
@click.argument("target", shell_complete=complete_job)
@click.option(
    "--legacy",
    is_flag=True,
    help="TARGET is a DOMAIN: its legacy domain job, laid out like virsh domjobinfo.",
)
@click.option(
    "--completed", is_flag=True, help="With --legacy: the last ended job's stats (read once)."
)
@click.option(
    "--keep-completed", is_flag=True, help="With --legacy --completed: do not consume them."
)
@json_option
def info(target: str, legacy: bool, completed: bool, keep_completed: bool, as_json: bool) -> None:
    """Show a job's state and progress (TARGET is a JOB), or with --legacy the domain
    job of DOMAIN."""
    ctx = _ctx()
    if (completed or keep_completed) and not legacy:
        raise click.UsageError("--completed and --keep-completed go with --legacy")

    async def body(conn: Connection) -> None:
        if legacy:
            flags = (C.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0) | (
                C.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED if keep_completed else 0
            )
            stats = await (await conn.lookup_domain(target)).job_stats(flags)
            if as_json:
                _json(stats)
            else:
                for line in domjobinfo_lines(stats):
                    click.echo(line)
            return
        job_info = await (await resolve_job(conn, target)).info()
        if as_json:
            _json(job_info.as_dict())
        else:
            for line in info_lines(job_info):
                click.echo(line)

    run(ctx, body)


@main.command()
@click.argument("job", shell_complete=complete_job)
@json_option
def stats(job: str, as_json: bool) -> None:
    """Show a job's libvirt-named statistics."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        values = await (await resolve_job(conn, job)).stats()
        if as_json:
            _json(values)
            return
        for key, value in values.items():
            click.echo(f"{key + ':':<20} {value}")

    run(ctx, body)


@main.command()
@click.argument("job", shell_complete=complete_job)
def dumpxml(job: str) -> None:
    """Print a job's XML with its UUID and effective values."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        click.echo((await (await resolve_job(conn, job)).xml_desc()).rstrip("\n"))

    run(ctx, body)


def _verb_command(name: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("job", shell_complete=complete_job)
    def command(job: str) -> None:
        ctx = _ctx()

        async def body(conn: Connection) -> None:
            handle = await resolve_job(conn, job)
            await getattr(handle, name)()
            click.echo(f"{handle.uuid}: {name} requested")

        run(ctx, body)


_verb_command("abort", "Abort a job (it ends 'cancelled').")
_verb_command("pause", "Pause a running job.")
_verb_command("resume", "Resume a paused job.")
_verb_command("complete", "Complete a job waiting in 'ready' (pivot, end a pull backup).")


@main.command(name="set-speed")
@click.argument("job", shell_complete=complete_job)
@click.argument("bandwidth", callback=_bandwidth_arg)
def set_speed(job: str, bandwidth: int) -> None:
    """Set a job's bandwidth limit; 0 lifts it.

    BANDWIDTH is bytes/s, or an integer with a unit as in libvirt: 100MiB (or 100M,
    100MiB/s) is 100 x 1024^2 bytes/s, 100MB is 100 x 1000^2; B, K, M, G, T, P, E."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        handle = await resolve_job(conn, job)
        await handle.set_speed(bandwidth or None)
        limit = f"{capacity(bandwidth)}/s" if bandwidth else "unlimited"
        click.echo(f"{handle.uuid}: bandwidth {limit}")

    run(ctx, body)


@main.group()
def domain() -> None:
    """Create and destroy domains (qemu:///session; sim's domains are built in)."""


@domain.command(name="create")
@click.argument("file", type=click.File("rb"))
def domain_create(file: Any) -> None:
    """Create and start a domain from the domain XML in FILE ('-' reads stdin)."""
    ctx = _ctx()
    xml = _read_xml(file, "domain")
    if ctx.embedded:
        click.echo(
            f"jobctl: note: on the embedded {ctx.uri} the domain lives only as long as this "
            "command; start jobd to keep it",
            err=True,
        )

    async def body(conn: Connection) -> None:
        text = xml.decode("utf-8", errors="replace") if isinstance(xml, bytes) else xml
        dom = await conn.create_domain(text)
        click.echo(f"Domain '{dom.name}' created from {file.name}")

    run(ctx, body)


@domain.command(name="destroy")
@click.argument("name", shell_complete=complete_domain)
def domain_destroy(name: str) -> None:
    """Stop domain NAME at once (its QEMU process ends; its active jobs fail)."""
    ctx = _ctx()

    async def body(conn: Connection) -> None:
        await (await conn.lookup_domain(name)).destroy()
        click.echo(f"Domain '{name}' destroyed")

    run(ctx, body)


@main.command()
@click.argument("job", shell_complete=complete_job)
@click.option(
    "--timeout",
    type=float,
    callback=_timeout_option,
    help="Give up after this many seconds (exit 10).",
)
@json_option
def wait(job: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end, with live progress; exit 0 completed, 3 failed, 4 cancelled."""
    ctx = _ctx()

    async def body(conn: Connection) -> int:
        handle = await resolve_job(conn, job)
        final = await follow(ctx, conn, handle, timeout, quiet=as_json)
        if as_json:
            _json(final.as_dict())
        else:
            _report_final(final)
        return _exit_for(final)

    run(ctx, body)


@main.command()
@click.option("--domain", "-d", shell_complete=complete_domain, help="Only this domain's jobs.")
@click.option("--job", "job_filter", shell_complete=complete_job, help="Only this job (UUID).")
@click.option("--count", "-n", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--no-progress", is_flag=True, help="Only state changes and final events.")
@json_option
def events(
    domain: str | None, job_filter: str | None, count: int | None, no_progress: bool, as_json: bool
) -> None:
    """Stream job events (one line, or JSON object, per event) until Ctrl-C."""
    ctx = _ctx()
    if ctx.embedded:
        click.echo(
            f"jobctl: note: on the embedded {EMBEDDED_URI} no other command's jobs "
            "are visible; start jobd to watch them",
            err=True,
        )

    async def body(conn: Connection) -> None:
        job_id = None
        if domain is not None:
            await conn.lookup_domain(domain)  # NoSuchDomain: exit 7, not a silent wait
        if job_filter is not None:
            job_id = (await resolve_job(conn, job_filter)).uuid
        kinds = [EventKind.STATE, EventKind.FINAL] if no_progress else None
        seen = 0
        with conn.subscribe(domain=domain, job=job_id, kinds=kinds) as sub:
            await conn.list_domains()  # one round trip: the subscription is in place
            if sub.refusal is not None:  # the daemon refused it: say why, not "watching"
                raise sub.refusal
            click.echo(f"jobctl: watching events on {ctx.uri} (Ctrl-C to stop)", err=True)
            async for ev in sub:
                if as_json:
                    _json(event_json(ev))
                else:
                    click.echo(event_line(ev))
                seen += 1
                if count is not None and seen >= count:
                    return
        raise DaemonUnreachable("the event stream ended: the connection was closed")

    run(ctx, body)


if __name__ == "__main__":
    main(prog_name="jobctl")
