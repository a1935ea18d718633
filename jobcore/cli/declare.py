"""Options declared once, as plain values, for both readers: click's commands are built
from them (``click_option``) and the fast start (jobcore.cli.fast) parses a command line
with them, without importing click. Only what the fast start reads lives here."""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not loaded for this (the fast start)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from click.decorators import FC


class Opt:
    """One option: click's declarations (its spellings, then its parameter's name), and
    whether it is a flag. ``help``, ``envvar`` and ``metavar`` as click's."""

    __slots__ = ("decls", "dest", "envvar", "flag", "help", "metavar")

    def __init__(
        self,
        *decls: str,
        dest: str,
        flag: bool = False,
        help: str,
        envvar: str | None = None,
        metavar: str | None = None,
    ) -> None:
        self.decls = decls
        self.dest = dest
        self.flag = flag
        self.help = help
        self.envvar = envvar
        self.metavar = metavar

    @property
    def spellings(self) -> tuple[str, ...]:
        return tuple(d for d in self.decls if d.startswith("-"))

    def click_option(self, **extra: Any) -> Callable[[FC], FC]:
        """The click decorator of this option (``extra``: what only click reads, such as
        ``shell_complete``)."""
        import click

        kwargs: dict[str, Any] = {"help": self.help, **extra}
        if self.flag:
            kwargs["is_flag"] = True
        if self.envvar is not None:
            kwargs["envvar"] = self.envvar
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        return click.option(*self.decls, **kwargs)


#: the root group's ``-c URI``
CONNECT = Opt(
    "-c",
    "--connect",
    "uri",
    dest="uri",
    envvar="JOBCORE_URI",
    metavar="URI",
    help="Connection URI, e.g. sim+unix:///default?socket=DIR/jobd.sock "
    "[env JOBCORE_URI; default: the local jobd if running, else the "
    "embedded sim:///default].",
)
JSON = Opt("--json", "as_json", dest="as_json", flag=True, help="Print JSON.")
DOMAIN_FILTER = Opt("--domain", "-d", dest="domain", help="Only this domain's jobs.")
#: ``jobctl list``'s own
ALL = Opt(
    "--all", "-a", "show_all", dest="show_all", flag=True, help="Also ended jobs still retained."
)
FLEET = Opt(
    "--fleet",
    dest="fleet",
    flag=True,
    help="Every fleet member's jobs (jobd on a postgresql:// store), LOST where the job's "
    "host is not live.",
)
#: ``jobctl list``'s options, in the order its click command declares them
LIST = (DOMAIN_FILTER, ALL, FLEET, JSON)
