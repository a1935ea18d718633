"""Commands on jobs: begin, list (--fleet too), info, stats, dumpxml, wait, the verbs,
set-speed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from jobcore import constants as C
from jobcore.cli import declare
from jobcore.cli.errors import ExitCode, exit_for
from jobcore.cli.options import (
    bandwidth_arg,
    complete_domain,
    complete_job,
    domain_filter_option,
    job_argument,
    json_option,
    read_xml,
    timeout_option,
)
from jobcore.cli.render import (
    capacity,
    domjobinfo_lines,
    info_lines,
    jobs_table,
    note,
    print_json,
    report_final,
    show,
    stats_lines,
)
from jobcore.cli.session import EMBEDDED_URI, current, resolve_job, run
from jobcore.info import JobInfo

if TYPE_CHECKING:
    from jobcore.api import Connection


@click.command()
@click.argument("domain", shell_complete=complete_domain)
@click.argument("file", type=click.File("rb"))
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end, with progress.")
@timeout_option("With --wait: give up after this many seconds.")
@click.option("--queue", is_flag=True, help="Queue behind conflicting jobs instead of failing.")
@click.option(
    "--reuse-external",
    is_flag=True,
    help="Backup: write into existing target and scratch files (their format and size must "
    "fit) instead of refusing them (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL).",
)
def begin(
    domain: str, file: Any, wait_: bool, timeout: float | None, queue: bool, reuse_external: bool
) -> None:
    """Begin the job described by the job XML in FILE ('-' reads stdin) on DOMAIN and print
    its UUID."""
    embedded = current().embedded
    xml = read_xml(file, "job")

    async def body(conn: Connection) -> int:
        dom = await conn.lookup_domain(domain)
        flags = (C.JOB_BEGIN_QUEUE if queue else 0) | (
            C.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse_external else 0
        )
        job = await dom.job_begin(xml, flags)
        click.echo(str(job.uuid))
        if not (wait_ or embedded):
            return ExitCode.OK
        if embedded and not wait_:
            note(
                f"no jobd: the job runs on the embedded {EMBEDDED_URI} and "
                "lives only as long as this command, so waiting for it"
            )
        from jobcore.cli.follow import follow  # waiting: events, progress (rich on a tty)

        final = await follow(conn, job, timeout)
        report_final(final)
        return exit_for(final)

    run(body, events=wait_)  # --wait follows the job's events


@click.command(name="list")
@domain_filter_option
@declare.ALL.click_option()
@declare.FLEET.click_option()
@json_option
def list_(domain: str | None, show_all: bool, fleet: bool, as_json: bool) -> None:
    """List active jobs (with --all also retained ended ones; --fleet: of every host)."""

    async def body(conn: Connection) -> None:
        infos = await (_fleet_infos(conn) if fleet else _local_infos(conn, domain))
        infos = [
            i
            for i in infos
            if (show_all or i.state.active) and (domain is None or i.domain == domain)
        ]
        if as_json:
            print_json([i.as_dict() for i in infos])
        elif not infos:
            click.echo(
                "no jobs" + ("" if show_all else " active (--all shows ended ones)"), err=True
            )
        else:
            jobs_table(infos, fleet=fleet)

    run(body)


async def _local_infos(conn: Connection, domain: str | None) -> list[JobInfo]:
    doms = [await conn.lookup_domain(domain)] if domain else await conn.list_domains()
    return [await job.info() for dom in doms for job in await dom.list_jobs()]


async def _fleet_infos(conn: Connection) -> list[JobInfo]:
    """Every host's jobs, page by page (jobd bounds each page to a frame)."""
    infos: list[JobInfo] = []
    cursor: int | None = -1
    while cursor is not None:
        page, cursor = await conn.list_fleet_jobs(cursor)
        infos += page
    return infos


@click.command()
@click.argument("target", shell_complete=complete_job)
@click.option(
    "--legacy",
    is_flag=True,
    help="TARGET is a DOMAIN: its legacy domain job, laid out like virsh domjobinfo.",
)
@click.option(
    "--completed", is_flag=True, help="With --legacy: the last ended job's stats (read once)."
)
@click.option(
    "--keep-completed", is_flag=True, help="With --legacy --completed: do not consume them."
)
@json_option
def info(target: str, legacy: bool, completed: bool, keep_completed: bool, as_json: bool) -> None:
    """Show a job's state and progress (TARGET is a JOB), or with --legacy the domain
    job of DOMAIN."""
    if (completed or keep_completed) and not legacy:
        raise click.UsageError("--completed and --keep-completed go with --legacy")

    async def body(conn: Connection) -> None:
        if legacy:
            flags = (C.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0) | (
                C.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED if keep_completed else 0
            )
            stats = await (await conn.lookup_domain(target)).job_stats(flags)
            show(as_json, stats, domjobinfo_lines(stats))
            return
        job_info = await (await resolve_job(conn, target)).info()
        show(as_json, job_info.as_dict(), info_lines(job_info))

    run(body)


@click.command()
@job_argument
@json_option
def stats(job: str, as_json: bool) -> None:
    """Show a job's libvirt-named statistics."""

    async def body(conn: Connection) -> None:
        values = await (await resolve_job(conn, job)).stats()
        show(as_json, values, stats_lines(values))

    run(body)


@click.command()
@job_argument
def dumpxml(job: str) -> None:
    """Print a job's XML with its UUID and effective values."""

    async def body(conn: Connection) -> None:
        click.echo((await (await resolve_job(conn, job)).xml_desc()).rstrip("\n"))

    run(body)


@click.command()
@job_argument
@timeout_option("Give up after this many seconds (exit 10).")
@json_option
def wait(job: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end, with live progress; exit 0 completed, 3 failed, 4 cancelled."""

    async def body(conn: Connection) -> int:
        from jobcore.cli.follow import follow

        final = await follow(conn, await resolve_job(conn, job), timeout, quiet=as_json)
        if as_json:
            print_json(final.as_dict())
        else:
            report_final(final)
        return exit_for(final)

    run(body, events=True)


def _verb_command(name: str, doc: str) -> click.Command:
    @click.command(name=name, help=doc)
    @job_argument
    def command(job: str) -> None:
        async def body(conn: Connection) -> None:
            handle = await resolve_job(conn, job)
            await getattr(handle, name)()
            click.echo(f"{handle.uuid}: {name} requested")

        run(body)

    return command


abort = _verb_command("abort", "Abort a job (it ends 'cancelled').")
pause = _verb_command("pause", "Pause a running job.")
resume = _verb_command("resume", "Resume a paused job.")
complete = _verb_command(
    "complete", "Complete a job waiting in 'ready' (pivot, end a pull backup)."
)


@click.command(name="set-speed")
@job_argument
@click.argument("bandwidth", callback=bandwidth_arg)
def set_speed(job: str, bandwidth: int) -> None:
    """Set a job's bandwidth limit; 0 lifts it.

    BANDWIDTH is bytes/s, or an integer with a unit as in libvirt: 100MiB (or 100M,
    100MiB/s) is 100 x 1024^2 bytes/s, 100MB is 100 x 1000^2; B, K, M, G, T, P, E."""

    async def body(conn: Connection) -> None:
        handle = await resolve_job(conn, job)
        await handle.set_speed(bandwidth or None)
        limit = f"{capacity(bandwidth)}/s" if bandwidth else "unlimited"
        click.echo(f"{handle.uuid}: bandwidth {limit}")

    run(body)
