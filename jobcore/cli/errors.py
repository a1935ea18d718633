"""jobctl's exit statuses and how an error ends a command: one line on stderr, one code."""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from jobcore.cli.plain import broken_pipe as broken_pipe  # re-exported
from jobcore.errors import (
    AccessDenied,
    DaemonUnreachable,
    InvalidURI,
    JobConflict,
    JobError,
    NoSuchCheckpoint,
    NoSuchDomain,
    NoSuchJob,
)
from jobcore.lifecycle import JobState

if TYPE_CHECKING:
    from jobcore.info import JobInfo


class ExitCode(enum.IntEnum):
    """jobctl's exit status (documented in design/daemon.md)."""

    OK = 0
    ERROR = 1  # any other refusal or failure
    USAGE = 2  # bad command line, URI, JOB argument (click's own usage errors too)
    JOB_FAILED = 3  # the job waited for ended in 'failed'
    JOB_CANCELLED = 4  # the job waited for ended in 'cancelled'
    CONFLICT = 5  # JobBegin refused: another job holds a resource (JobConflict)
    UNREACHABLE = 6  # no jobd answers at the socket, or the connection was lost
    NOT_FOUND = 7  # no such domain, job or checkpoint
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


#: The exit status of each error class jobctl tells apart (first match wins).
_STATUS: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (JobConflict, ExitCode.CONFLICT),
    (DaemonUnreachable, ExitCode.UNREACHABLE),
    (NoSuchDomain, ExitCode.NOT_FOUND),
    (NoSuchJob, ExitCode.NOT_FOUND),
    (NoSuchCheckpoint, ExitCode.NOT_FOUND),
    (AccessDenied, ExitCode.DENIED),
    (InvalidURI, ExitCode.USAGE),
    (TimeoutError, ExitCode.TIMEOUT),
    (JobError, ExitCode.ERROR),
)


def classify(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit status and the message for ``exc``."""
    if isinstance(exc, Refusal):
        return exc.code, str(exc)
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc) or type(exc).__name__
    return ExitCode.ERROR, f"{type(exc).__name__}: {exc}"


def exit_for(info: JobInfo) -> ExitCode:
    """The status of a command that waited for the job now in ``info``."""
    if info.state is JobState.FAILED:
        return ExitCode.JOB_FAILED
    if info.state is JobState.CANCELLED:
        return ExitCode.JOB_CANCELLED
    return ExitCode.OK


def exit_with(status: int, message: str | None = None) -> NoReturn:
    """Exit with ``status`` after flushing stdout (a reader that went away is not an
    error worth a traceback: exit BROKEN_PIPE quietly, as a killed-by-SIGPIPE tool would)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        broken_pipe()
    if message is not None:
        click.echo(message, err=True)
    sys.exit(status)


def fail(status: ExitCode, message: str) -> NoReturn:
    """Exit with ``status`` and ``jobctl: error: MESSAGE`` on stderr."""
    exit_with(status, f"jobctl: error: {message}")
