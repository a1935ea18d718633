"""Commands on checkpoints: checkpoint list, checkpoint info (its XML), checkpoint delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from jobcore import constants as C
from jobcore.cli.options import complete_domain, json_option
from jobcore.cli.render import show
from jobcore.cli.session import run

if TYPE_CHECKING:
    from jobcore.api import Connection


@click.group()
def checkpoint() -> None:
    """List, show and delete a domain's checkpoints."""


@checkpoint.command(name="list")
@click.argument("domain", shell_complete=complete_domain)
@json_option
def checkpoint_list(domain: str, as_json: bool) -> None:
    """The checkpoints of DOMAIN in creation order: name and parent."""

    async def body(conn: Connection) -> None:
        rows: list[dict[str, Any]] = []
        for cp in await (await conn.lookup_domain(domain)).list_checkpoints():
            parent = await cp.parent()
            rows.append({"name": cp.name, "parent": None if parent is None else parent.name})
        lines = [f"{r['name']}  (parent: {r['parent'] or '-'})" for r in rows]
        show(as_json, rows, lines)

    run(body)


@checkpoint.command(name="info")
@click.argument("domain", shell_complete=complete_domain)
@click.argument("name")
@click.option("--size", is_flag=True, help="Add each disk's bytes dirty since the checkpoint.")
def checkpoint_info(domain: str, name: str, size: bool) -> None:
    """The <domaincheckpoint> XML of checkpoint NAME of DOMAIN."""
    flags = C.VIR_DOMAIN_CHECKPOINT_XML_SIZE if size else 0

    async def body(conn: Connection) -> None:
        cp = await (await conn.lookup_domain(domain)).checkpoint_lookup(name)
        click.echo(await cp.xml_desc(flags), nl=False)

    run(body)


@checkpoint.command(name="delete")
@click.argument("domain", shell_complete=complete_domain)
@click.argument("name")
@click.option("--children", is_flag=True, help="Delete its descendants too.")
@click.option("--children-only", is_flag=True, help="Delete only its descendants.")
@click.option("--metadata", is_flag=True, help="Keep the disks' bitmaps.")
def checkpoint_delete(
    domain: str, name: str, children: bool, children_only: bool, metadata: bool
) -> None:
    """Delete checkpoint NAME of DOMAIN (its bitmaps merged into its parent's)."""
    flags = (
        (C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN if children else 0)
        | (C.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY if children_only else 0)
        | (C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata else 0)
    )

    async def body(conn: Connection) -> None:
        cp = await (await conn.lookup_domain(domain)).checkpoint_lookup(name)
        await cp.delete(flags)
        what = "children deleted" if children_only else "deleted"
        click.echo(f"Domain checkpoint {name} {what}")

    run(body)
