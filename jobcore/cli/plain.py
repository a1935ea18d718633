"""What jobctl prints without click, for render and the fast start alike: the ``list``
table (plain, or rich's on a terminal: rich is imported only then), the question whether
rich would find a terminal, a quiet exit once stdout's reader has gone."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not loaded for this (the fast start)
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from typing import Any, NoReturn, TextIO

    from rich.console import Console

#: ``jobctl list``'s columns after the UUID (``--fleet``: Lost instead of Time)
JOB_COLUMNS = ("Domain", "Host", "Type", "State", "Done", "Time")
FLEET_COLUMNS = ("Domain", "Host", "Type", "State", "Lost", "Done")
_WIDTHS = {"Domain": 10, "Host": 10, "Type": 11, "State": 10, "Lost": 4}
_RIGHTS = {"Done": 8, "Time": 9}
#: exit status once stdout's reader has gone (as jobcore.cli.errors.ExitCode.BROKEN_PIPE)
BROKEN_PIPE = 141


def may_be_terminal(stream: TextIO) -> bool:
    """Whether rich could find a terminal behind ``stream``: it is a tty, or one of the
    variables that make rich call anything a terminal (TTY_COMPATIBLE, FORCE_COLOR) is
    set. Where this is False, rich is not even imported."""
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        tty = False
    return tty or "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr), as jobctl uses them: no highlighting."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def terminal_console(*, stderr: bool = False) -> Console | None:
    """``console()`` where rich finds a terminal behind it, else None. rich is not even
    imported where it could not find one (``may_be_terminal``)."""
    if not may_be_terminal(sys.stderr if stderr else sys.stdout):
        return None
    out = console(stderr=stderr)
    return out if out.is_terminal else None


def job_row(info: Mapping[str, Any], fleet: bool) -> list[str]:
    """A ``list`` row of a job from its mapping view (``JobInfo``'s, or the same keys)."""
    row = [info["uuid"], info["domain"], info["host"], info["type"], info["state"]]
    if fleet:  # another host's elapsed time is as old as its row: Lost instead
        return [*row, "LOST" if info["host_lost"] else "-", f"{info['progress']:.1f}%"]
    return [*row, f"{info['progress']:.1f}%", f"{info['time_elapsed'] / 1000:.1f}s"]


def job_lines(infos: Sequence[Mapping[str, Any]], fleet: bool) -> Iterator[str]:
    """The plain ``list`` table (fixed columns, a header first), line by line."""
    cols = FLEET_COLUMNS if fleet else JOB_COLUMNS

    def line(cells: Sequence[str]) -> str:
        parts = [f"{cells[0]:<36}"]
        for col, cell in zip(cols, cells[1:], strict=True):
            parts.append(f"{cell:>{_RIGHTS[col]}}" if col in _RIGHTS else f"{cell:<{_WIDTHS[col]}}")
        return " ".join(parts)

    yield line(["UUID", *cols])
    for info in infos:
        yield line(job_row(info, fleet))


def rich_jobs_table(out: Console, infos: Sequence[Mapping[str, Any]], fleet: bool) -> None:
    """The ``list`` table on a terminal: rich's, UUIDs never cut (a narrow terminal wraps
    a cell); ``fleet``: LOST in bold red."""
    from rich.table import Table

    cols = FLEET_COLUMNS if fleet else JOB_COLUMNS
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    table.add_column("UUID", no_wrap=True, min_width=36, overflow="fold")
    for col in cols:
        table.add_column(col, justify="right" if col in _RIGHTS else "left", overflow="fold")
    for info in infos:
        row = job_row(info, fleet)
        if fleet and info["host_lost"]:
            row[cols.index("Lost") + 1] = "[bold red]LOST[/]"
        table.add_row(*row)
    out.print(table)


def broken_pipe() -> NoReturn:
    """Exit BROKEN_PIPE, quietly: stdout's reader is gone."""
    with open(os.devnull, "wb") as null:  # nothing left to flush at interpreter exit
        os.dup2(null.fileno(), sys.stdout.fileno())
    sys.exit(BROKEN_PIPE)
