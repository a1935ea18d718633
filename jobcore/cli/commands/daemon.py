"""``jobctl daemon``: jobd in the foreground (or ``--daemon``), with jobd's own options."""

from __future__ import annotations

import sys
from typing import Any

import click

from jobcore.daemon.main import daemon_options, start_from_options


@click.command()
@daemon_options
def daemon(**options: Any) -> None:
    """Run jobd (same as the jobd command; in the foreground unless --daemon)."""
    sys.exit(start_from_options(**options))
