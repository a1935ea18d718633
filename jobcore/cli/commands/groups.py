"""Commands on job groups (design/scheduling.md "Job groups"): group begin, group info,
group wait, group abort, group explain. GROUP arguments are a group's full UUID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from jobcore import constants as C
from jobcore.cli.commands.explain import explain_lines
from jobcore.cli.errors import ExitCode, fail
from jobcore.cli.options import json_option, read_xml, timeout_option
from jobcore.cli.render import note, show
from jobcore.cli.session import EMBEDDED_URI, current, run
from jobcore.info import GroupInfo

if TYPE_CHECKING:
    from jobcore.api import Connection, JobGroup


def _group_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        fail(ExitCode.USAGE, f"'{text}' is not a job group UUID")


def _lines(info: GroupInfo) -> Iterator[str]:
    yield f"UUID:     {info.uuid}"
    yield f"Mode:     {info.mode}"
    yield f"State:    {info.state}"
    for job, domain, job_type, state in zip(
        info.jobs, info.domains, info.types, info.states, strict=True
    ):
        yield f"Member:   {job}  {job_type} on {domain}: {state}"


def _exit(info: GroupInfo) -> int:
    """A waited-for group's status: as a job's (3 failed, 4 cancelled); ``partial`` is 3."""
    if info.state in ("failed", "partial"):
        return ExitCode.JOB_FAILED
    if info.state == "cancelled":
        return ExitCode.JOB_CANCELLED
    return ExitCode.OK


async def _final(group: JobGroup, timeout: float | None) -> GroupInfo:
    try:
        return await group.wait(timeout)
    except TimeoutError:
        info = await group.info()
        fail(
            ExitCode.TIMEOUT,
            f"job group {group.uuid} did not end within {timeout:g} s (state: {info.state})",
        )


@click.group()
def group() -> None:
    """Begin, show, wait for and abort job groups (<jobgroup> documents)."""


@group.command(name="begin")
@click.argument("file", type=click.File("rb"))
@click.option("--wait", "wait_", is_flag=True, help="Wait for every member to end.")
@timeout_option("With --wait: give up after this many seconds.")
@click.option("--queue", is_flag=True, help="Queue all members if one cannot run now.")
@json_option
def group_begin(file: Any, wait_: bool, timeout: float | None, queue: bool, as_json: bool) -> None:
    """Begin the members of the <jobgroup> in FILE ('-' reads stdin) as one and print the
    group's UUID (with --wait, its final state and members)."""
    embedded = current().embedded
    xml = read_xml(file, "jobgroup")

    async def body(conn: Connection) -> int:
        g = await conn.job_group_begin(xml, C.JOB_BEGIN_QUEUE if queue else 0)
        if not (wait_ or embedded):
            show(as_json, {"uuid": str(g.uuid)}, [str(g.uuid)])
            return ExitCode.OK
        if embedded and not wait_:
            note(
                f"no jobd: the group runs on the embedded {EMBEDDED_URI} and lives only as "
                "long as this command, so waiting for it"
            )
        info = await _final(g, timeout)
        show(as_json, info.as_dict(), _lines(info))
        return _exit(info)

    run(body)


@group.command(name="info")
@click.argument("group_id", metavar="GROUP")
@json_option
def group_info(group_id: str, as_json: bool) -> None:
    """The group's mode, state and members (UUID, type, domain, state)."""
    gid = _group_id(group_id)

    async def body(conn: Connection) -> None:
        info = await (await conn.job_group_lookup(gid)).info()
        show(as_json, info.as_dict(), _lines(info))

    run(body)


@group.command(name="wait")
@click.argument("group_id", metavar="GROUP")
@timeout_option("Give up after this many seconds (exit 10).")
@json_option
def group_wait(group_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait until every member ended; exit 0 completed, 3 failed or partial, 4 cancelled."""
    gid = _group_id(group_id)

    async def body(conn: Connection) -> int:
        info = await _final(await conn.job_group_lookup(gid), timeout)
        show(as_json, info.as_dict(), _lines(info))
        return _exit(info)

    run(body)


@group.command(name="abort")
@click.argument("group_id", metavar="GROUP")
def group_abort(group_id: str) -> None:
    """Abort every active member of the group."""
    gid = _group_id(group_id)

    async def body(conn: Connection) -> None:
        await (await conn.job_group_lookup(gid)).abort()
        click.echo(f"Job group {gid} aborted")

    run(body)


@group.command(name="explain")
@click.argument("file", type=click.File("rb"))
@click.option("--queue", is_flag=True, help="As group begin --queue would.")
@json_option
def group_explain(file: Any, queue: bool, as_json: bool) -> None:
    """What `group begin FILE` would do now, changing nothing: the group's decision
    (admit, queue, conflict, preempt), every member's claims, and each blocker with the
    rule that decides, naming the member."""
    xml = read_xml(file, "jobgroup")

    async def body(conn: Connection) -> None:
        ex = await conn.job_group_explain(xml, C.JOB_BEGIN_QUEUE if queue else 0)
        show(as_json, ex.as_dict(), explain_lines(ex))

    run(body)
