"""``jobctl explain DOMAIN FILE`` (what JobBegin would do with FILE now) and ``jobctl
explain JOB`` (what a queued job waits for): an admission dry run, changing nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from jobcore import constants as C
from jobcore.cli.options import complete_job, json_option, read_xml
from jobcore.cli.render import show
from jobcore.cli.session import resolve_job, run
from jobcore.info import Explanation

if TYPE_CHECKING:
    from jobcore.api import Connection


def explain_lines(ex: Explanation) -> Iterator[str]:
    """One labelled line per fact: the decision, each claim, each blocker and its rule."""
    yield f"Decision: {ex.decision}"
    if ex.position is not None:
        yield f"Position: {ex.position}"
    for claim in ex.claims:
        yield f"Claim:    {claim.resource} ({claim.mode})"
    for b in ex.blockers:
        yield f"Blocker:  {b.uuid} on {b.resource}: {b.rule}"


@click.command()
@click.argument("target", shell_complete=complete_job)
@click.argument("file", type=click.File("rb"), required=False)
@click.option("--queue", is_flag=True, help="As begin --queue would (with FILE).")
@json_option
def explain(target: str, file: Any, queue: bool, as_json: bool) -> None:
    """Explain admission without changing anything: with FILE, what `begin TARGET FILE`
    would do now (TARGET is a DOMAIN; decision admit, queue, conflict or preempt, the
    claims, each blocker with the rule that decides); without, what the queued job TARGET
    waits for and its position."""
    if file is None and queue:
        raise click.UsageError("--queue goes with a job XML FILE")
    xml = None if file is None else read_xml(file, "job")

    async def body(conn: Connection) -> None:
        if xml is None:
            ex = await (await resolve_job(conn, target)).explain()
        else:
            dom = await conn.lookup_domain(target)
            ex = await dom.job_explain(xml, C.JOB_BEGIN_QUEUE if queue else 0)
        show(as_json, ex.as_dict(), explain_lines(ex))

    run(body)
