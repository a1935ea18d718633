"""structlog loggers for jobcore, routed through the stdlib ``logging`` tree.

A library must not print. jobcore's loggers (``jobcore.*``, ``drivers.*``) are stdlib loggers
wrapped by structlog with processors of their own (``structlog.wrap_logger``), so they
neither need nor touch the application's ``structlog.configure()``. Each call becomes one
stdlib record whose ``msg`` is the structured event, a dict (``LogEvent``) that reads as a
line (``job ended state=failed job=…``) wherever stdlib formats it. The ``jobcore`` and
``drivers`` loggers have a ``NullHandler``: unless the application configures logging,
nothing is shown (not even warnings through stdlib's last-resort handler); with
``logging.basicConfig()`` or any handler, records appear as that handler formats them.

Every job's logger has its UUID, type and domain bound (``job_logger``). Applications that
want jobcore's own rendering (jobd) call ``configure()``: JSON lines or console
lines, on stderr or in a file that logrotate may rotate.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.stdlib import BoundLogger

#: The stdlib loggers jobcore logs under; each gets a NullHandler at import.
LIBRARY_LOGGERS = ("jobcore", "drivers")

for _name in LIBRARY_LOGGERS:
    logging.getLogger(_name).addHandler(logging.NullHandler())


def _text(value: Any) -> str:
    text = str(value)
    if not text or any(ch in text for ch in " \t\n\"'=") or text != text.strip():
        return repr(text)
    return text


class LogEvent(dict[str, Any]):
    """A structured event as a stdlib record's ``msg``: a dict for formatters that know
    it (``configure()``'s, structlog's ``ProcessorFormatter``), a readable
    ``event key=value …`` line for every other one (``str(record.msg)``)."""

    def __str__(self) -> str:
        name = str(self.get("event", ""))
        return name + "".join(f" {k}={_text(v)}" for k, v in self.items() if k != "event")


def _to_stdlib(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """The last processor: the event as the record's message, ``exc_info`` passed to
    stdlib (which renders the traceback)."""
    exc_info = event.pop("exc_info", None)
    kwargs: dict[str, Any] = {"exc_info": exc_info} if exc_info else {}
    return (LogEvent(event),), kwargs


#: structlog's method names and the stdlib level each logs at (as filter_by_level maps them).
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _dropped(*_args: Any, **_kwargs: Any) -> None:
    """A log call below its logger's level: what filter_by_level's DropEvent amounts to."""


class _LazyLogger:
    """A structlog logger made on the first call its stdlib logger's level lets through:
    structlog (which imports asyncio, and rich where installed) is not loaded by a process
    that never logs, such as a jobctl command. A call below the level returns at once, as
    structlog's filter_by_level would have dropped it; ``bind`` stays lazy."""

    __slots__ = ("_bound", "_real", "_stdlib")

    def __init__(self, stdlib: logging.Logger, bound: dict[str, Any]) -> None:
        self._stdlib = stdlib
        self._bound = bound
        self._real: BoundLogger | None = None

    def bind(self, **values: Any) -> _LazyLogger:
        return _LazyLogger(self._stdlib, {**self._bound, **values})

    def _structlog(self) -> BoundLogger:
        if self._real is None:
            import structlog

            real: BoundLogger = structlog.wrap_logger(
                self._stdlib,
                processors=[structlog.stdlib.filter_by_level, _to_stdlib],
                wrapper_class=structlog.stdlib.BoundLogger,
            )
            self._real = real.bind(**self._bound) if self._bound else real
        return self._real

    def __getattr__(self, name: str) -> Any:
        level = _LEVELS.get(name)
        if level is not None and not self._stdlib.isEnabledFor(level):
            return _dropped
        return getattr(self._structlog(), name)


def get_logger(name: str = "jobcore", **bound: Any) -> BoundLogger:
    """A structlog logger over the stdlib logger ``name``, independent of any global
    structlog configuration (made on its first call that logs: ``_LazyLogger``)."""
    return cast("BoundLogger", _LazyLogger(logging.getLogger(name), bound))


class EventFormatter(logging.Formatter):
    """Renders a record as structlog would: its structured event (or, for a plain stdlib
    record, its message) with ``level`` and ``timestamp``, as JSON or a console line."""

    def __init__(self, *, json: bool) -> None:
        super().__init__()
        import structlog  # only where jobcore renders its own logs (jobd)

        self._renderer: Any = (
            structlog.processors.JSONRenderer()
            if json
            else structlog.dev.ConsoleRenderer(colors=False)
        )
        self._format_exc_info: Any = structlog.processors.format_exc_info

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any]
        if isinstance(record.msg, LogEvent) and not record.args:
            event = dict(record.msg)
        else:  # a plain stdlib record (jobd's handler serves only jobd's and jobcore's)
            event = {"event": record.getMessage()}
        event["level"] = record.levelname.lower()
        event["timestamp"] = (
            datetime.fromtimestamp(record.created, tz=UTC).isoformat().replace("+00:00", "Z")
        )
        if record.exc_info:
            event["exc_info"] = record.exc_info
            event = dict(self._format_exc_info(None, "", event))
        return str(self._renderer(None, record.levelname.lower(), event))


class PrivateLogFileHandler(logging.handlers.WatchedFileHandler):
    """A ``WatchedFileHandler`` whose file is created mode 0600 (jobd's log holds peer uids,
    pids, URIs and paths) and never opened through a symbolic link (``O_NOFOLLOW``: a link
    planted at the path, at start or after rotation, fails with ELOOP instead of being
    appended to). An existing file keeps its mode."""

    def _open(self) -> Any:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise

    def emit(self, record: logging.LogRecord) -> None:
        # the stdlib reopens (after rotation) outside its own error handling: a link planted
        # at the path (ELOOP) or a vanished directory would raise out of the logging call
        try:
            super().emit(record)
        except OSError:
            self.handleError(record)  # stderr, as for any other failed write


def reopen_log_files() -> None:
    """Reopen the file ``configure()`` logs to if it was moved away or deleted (jobd on
    SIGHUP, as logrotate's postrotate sends it); the next line would reopen it anyway."""
    for name in (*LIBRARY_LOGGERS, "jobd"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.handlers.WatchedFileHandler):
                handler.acquire()
                try:
                    handler.reopenIfNeeded()
                except OSError:
                    pass  # the next line retries the open and reports the failure
                finally:
                    handler.release()


def configure(
    level: int = logging.INFO, *, json: bool | None = None, log_file: Path | None = None
) -> None:
    """Send jobcore's and jobd's logs to stderr, or to ``log_file`` (reopened when
    logrotate moves it away: ``logging.handlers.WatchedFileHandler``). JSON when the
    output is not a terminal (a file never is) or when asked."""
    handler: logging.Handler
    if log_file is not None:
        handler = PrivateLogFileHandler(log_file, encoding="utf-8")
        if json is None:
            json = True
    else:
        handler = logging.StreamHandler(sys.stderr)
        if json is None:
            json = not sys.stderr.isatty()
    handler.setFormatter(EventFormatter(json=json))
    for name in (*LIBRARY_LOGGERS, "jobd"):
        lg = logging.getLogger(name)
        for old in lg.handlers[:]:
            lg.removeHandler(old)
            if not isinstance(old, logging.NullHandler):
                old.close()
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
