"""Commands on domains: domains (list them), domain create, domain destroy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from jobcore.cli.options import complete_domain, json_option, read_xml
from jobcore.cli.render import domain_lines, note, show
from jobcore.cli.session import current, run

if TYPE_CHECKING:
    from jobcore.api import Connection


@click.command()
@json_option
def domains(as_json: bool) -> None:
    """List the domains of the connection."""

    async def body(conn: Connection) -> None:
        rows: list[dict[str, Any]] = []
        for dom in await conn.list_domains():
            info = await dom.info()
            jobs = await dom.list_jobs()
            rows.append(
                {
                    "name": dom.name,
                    "uuid": str(dom.uuid),
                    "running": info.running,
                    "memory": info.memory,
                    "disks": [
                        {
                            "name": d.name,
                            "chain": list(d.chain),
                            "format": d.format,
                            "virtual_size": d.virtual_size,
                        }
                        for d in info.disks
                    ],
                    "active_jobs": sum(1 for j in jobs if j.state.active),
                }
            )
        show(as_json, rows, domain_lines(rows))

    run(body)


@click.group()
def domain() -> None:
    """Create and destroy domains (from libvirt's domain XML; qemu:///session, sim:///NAME)."""


@domain.command(name="create")
@click.argument("file", type=click.File("rb"))
def domain_create(file: Any) -> None:
    """Create and start a domain from the domain XML in FILE ('-' reads stdin)."""
    ctx = current()
    xml = read_xml(file, "domain")
    if ctx.embedded:
        note(
            f"note: on the embedded {ctx.uri} the domain lives only as long as this "
            "command; start jobd to keep it"
        )

    async def body(conn: Connection) -> None:
        dom = await conn.create_domain(xml.decode("utf-8", errors="replace"))
        click.echo(f"Domain '{dom.name}' created from {file.name}")

    run(body)


@domain.command(name="destroy")
@click.argument("name", shell_complete=complete_domain)
def domain_destroy(name: str) -> None:
    """Stop domain NAME at once (its QEMU process ends; its active jobs fail)."""

    async def body(conn: Connection) -> None:
        await (await conn.lookup_domain(name)).destroy()
        click.echo(f"Domain '{name}' destroyed")

    run(body)
