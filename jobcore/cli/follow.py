"""Waiting for a job to end while showing its progress (``begin --wait``, ``wait``)."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import anyio
import click

from jobcore.cli.errors import ExitCode, Refusal
from jobcore.cli.plain import terminal_console
from jobcore.cli.render import capacity
from jobcore.errors import ConnectionLost
from jobcore.events import EventKind, JobEvent, Subscription
from jobcore.info import JobInfo
from jobcore.lifecycle import JobState

if TYPE_CHECKING:
    from rich.console import Console

    from jobcore.api import Connection, Job


#: Seconds the state shown after a timeout may take (jobd may be the reason it passed).
INFO_AFTER_TIMEOUT = 5.0


async def follow(conn: Connection, job: Job, timeout: float | None, quiet: bool = False) -> JobInfo:
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
                final = await wait_across_restarts(job, timeout)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, tg.cancel_scope)
            if not quiet:
                err = terminal_console(stderr=True)
                if err is not None:
                    await _bar(err, job, info, events)
                else:
                    await _lines(job, info, events)
    if final is None:
        state = "unknown: jobd did not answer"  # a stopped jobd must not hang the timeout
        with anyio.move_on_after(INFO_AFTER_TIMEOUT):
            state = str((await job.info()).state)
        raise Refusal(
            ExitCode.TIMEOUT,
            f"job {job.uuid} did not end within {timeout or 0:g} s (state: {state})",
        )
    return final


async def wait_across_restarts(job: Job, timeout: float | None) -> JobInfo:
    """``job.wait(timeout)``, asked again when the connection to jobd is lost meanwhile
    (ConnectionLost): the client reconnects by itself, and the next ``wait`` waits for
    that (DaemonUnreachable if jobd does not come back in time) and then for the job as
    the restarted jobd knows it, within what is left of ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    # the timeout bounds it all, a jobd that stopped answering (SIGSTOP) included
    with anyio.fail_after(timeout):
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await job.wait(left)
            except ConnectionLost:
                continue


async def _info(job: Job, info: JobInfo) -> JobInfo:
    """The job's info for the progress display; the last one while jobd is away (the
    waiter deals with the lost connection)."""
    try:
        return await job.info()
    except ConnectionLost:
        return info


async def _next(events: Subscription) -> JobEvent | None:
    """The next event, or None after a second without one."""
    with anyio.move_on_after(1.0):
        try:
            return await events.get()
        except anyio.EndOfStream:  # the connection is gone: the waiter reports why
            await anyio.sleep_forever()
    return None


async def _bar(err: Console, job: Job, info: JobInfo, events: Subscription) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(
            f"{job.type} {str(job.uuid)[:8]}",
            total=info.total or None,
            completed=info.processed,
            state=str(info.state),
        )
        while True:
            ev = await _next(events)
            if ev is None:
                info = await _info(job, info)
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


async def _lines(job: Job, info: JobInfo, events: Subscription) -> None:
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
