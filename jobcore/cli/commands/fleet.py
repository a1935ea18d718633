"""Commands on the fleet (jobd on a postgresql:// store): hosts, host fence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from jobcore import constants as C
from jobcore.cli.options import complete_host, json_option
from jobcore.cli.render import hosts_table, print_json
from jobcore.cli.session import run

if TYPE_CHECKING:
    from jobcore.api import Connection


@click.command()
@json_option
def hosts(as_json: bool) -> None:
    """List the fleet's members: state, lease age and ttl, active and all jobs."""

    async def body(conn: Connection) -> None:
        members = await conn.fleet_hosts()
        if as_json:
            print_json([h.as_dict() for h in members])
        else:
            hosts_table(members)

    run(body)


@click.group()
def host() -> None:
    """Act on one fleet member (jobd on a postgresql:// store)."""


@host.command(name="fence")
@click.argument("name", shell_complete=complete_host)
@click.option("--reason", metavar="TEXT", help="Why: the error its failed jobs carry.")
@click.option(
    "--force",
    is_flag=True,
    help="Fence even a host whose lease is live (it may still be writing to shared storage).",
)
@json_option
def host_fence(name: str, reason: str | None, force: bool, as_json: bool) -> None:
    """Fence the lost host NAME: its shared-storage claims are released and its active
    jobs fail with the reason. Only when NAME is truly down: until it rejoins, nothing
    stops it from writing."""

    async def body(conn: Connection) -> None:
        before = {h.name: h.active_jobs for h in await conn.fleet_hosts()}
        fenced = await conn.fence_host(name, reason, C.JOB_FENCE_FORCE if force else 0)
        failed = before.get(fenced.name, 0)
        if as_json:
            print_json({"host": fenced.as_dict(), "jobs_failed": failed})
            return
        jobs = "1 active job" if failed == 1 else f"{failed} active jobs"
        why = f" ({fenced.fence_reason})" if fenced.fence_reason else ""
        click.echo(
            f"Host '{fenced.name}' fenced by '{fenced.fenced_by}'{why}: {jobs} failed, "
            "its shared-storage claims released"
        )
        hosts_table([fenced])

    run(body)
