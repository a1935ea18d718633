"""The ``jobctl`` root group: ``-c URI``, ``--version``, and where each command lives.

A command's module is imported only when that command runs (or ``--help`` lists it), so
``jobctl list`` never loads the daemon and ``jobctl --version`` loads no command at all
(nor the wire protocol: the root group imports the session only to open a connection).
"""

from __future__ import annotations

import importlib

import click

from jobcore.cli import declare
from jobcore.errors import InvalidURI
from jobcore.uri import parse_uri

#: Every command: its name and the module of ``jobcore.cli.commands`` holding it (the
#: click command is the module's attribute of that name, ``-`` spelt ``_``).
COMMANDS = {
    "abort": "jobs",
    "begin": "jobs",
    "checkpoint": "checkpoints",
    "complete": "jobs",
    "daemon": "daemon",
    "domain": "domains",
    "domains": "domains",
    "dumpxml": "jobs",
    "events": "events",
    "explain": "explain",
    "group": "groups",
    "host": "fleet",
    "hosts": "fleet",
    "info": "jobs",
    "list": "jobs",
    "pause": "jobs",
    "resume": "jobs",
    "run": "run",
    "set-speed": "jobs",
    "stats": "jobs",
    "wait": "jobs",
}


def _attribute(name: str) -> str:
    return "list_" if name == "list" else name.replace("-", "_")


class _CommandTable(click.Group):
    """A group whose commands are imported on first use, from ``COMMANDS``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        found = getattr(
            importlib.import_module(f"jobcore.cli.commands.{module}"), _attribute(cmd_name)
        )
        assert isinstance(found, click.Command) and found.name == cmd_name, cmd_name
        return found


@click.group(cls=_CommandTable, context_settings={"help_option_names": ["-h", "--help"]})
@declare.CONNECT.click_option()
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
    if click_ctx.invoked_subcommand in ("daemon", "run"):  # they use no connection
        return
    from jobcore.cli.session import Ctx, default_uri, resolve_uri  # the wire: not for --version

    try:
        resolved = resolve_uri(uri) if uri else default_uri()
        embedded = parse_uri(resolved).transport is None
    except InvalidURI as exc:
        raise click.BadParameter(str(exc), param_hint="-c/--connect") from None
    click_ctx.obj = Ctx(resolved, embedded)
