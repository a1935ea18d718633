"""structlog loggers for jobcore, routed through the stdlib ``logging`` tree.

A library must not print: unless the application configures logging, only warnings and
errors reach stderr (stdlib's last-resort handler). Every job's logger has its UUID, type
and domain bound (``job_logger``). Applications (jobd, the demo) call ``configure()``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def get_logger(name: str = "jobcore", **bound: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name), processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )
    return logger.bind(**bound) if bound else logger


def configure(level: int = logging.INFO, *, json: bool | None = None) -> None:
    """Send jobcore's logs to stderr: JSON when not on a terminal (or when asked)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
            ],
        )
    )
    root = logging.getLogger("jobcore")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for name in ("drivers", "jobd"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level)
        lg.propagate = False
