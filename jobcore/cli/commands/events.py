"""``jobctl events``: stream the connection's job events."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from jobcore.cli.options import complete_job, domain_filter_option, json_option
from jobcore.cli.render import event_json, event_line, note, print_json
from jobcore.cli.session import EMBEDDED_URI, current, resolve_job, run
from jobcore.events import EventKind
from jobcore.protocol import DaemonUnreachable

if TYPE_CHECKING:
    from jobcore.api import Connection


@click.command()
@domain_filter_option
@click.option("--job", "job_filter", shell_complete=complete_job, help="Only this job (UUID).")
@click.option("--count", "-n", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--no-progress", is_flag=True, help="Only state changes, final and host-lost events.")
@json_option
def events(
    domain: str | None, job_filter: str | None, count: int | None, no_progress: bool, as_json: bool
) -> None:
    """Stream job events (one line, or JSON object, per event) until Ctrl-C."""
    ctx = current()
    if ctx.embedded:
        note(
            f"note: on the embedded {EMBEDDED_URI} no other command's jobs "
            "are visible; start jobd to watch them"
        )

    async def body(conn: Connection) -> None:
        job_id = None
        if domain is not None:
            await conn.lookup_domain(domain)  # NoSuchDomain: exit 7, not a silent wait
        if job_filter is not None:
            job_id = (await resolve_job(conn, job_filter)).uuid
        kinds = [EventKind.STATE, EventKind.FINAL, EventKind.HOST_LOST] if no_progress else None
        seen = 0
        with conn.subscribe(domain=domain, job=job_id, kinds=kinds) as sub:
            await conn.list_domains()  # one round trip: the subscription is in place
            if sub.refusal is not None:  # the daemon refused it: say why, not "watching"
                raise sub.refusal
            note(f"watching events on {ctx.uri} (Ctrl-C to stop)")
            async for ev in sub:
                if as_json:
                    print_json(event_json(ev))
                else:
                    click.echo(event_line(ev))
                seen += 1
                if count is not None and seen >= count:
                    return
        raise DaemonUnreachable("the event stream ended: the connection was closed")

    run(body, events=True)
